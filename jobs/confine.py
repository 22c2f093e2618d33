"""What the web form may reach on the server: paths under allowed folders, and uploads kept safe.

The app is shared with a team; its form must not become a way to read any file the server can
read. A server path typed in the form (a dataset file or folder, a base model folder or
``.gguf``) must resolve, symlinks followed, inside one of:

- ``QALORA_HOME/datasets`` and ``QALORA_HOME/models`` (put shared data and models there),
- ``QALORA_HOME/uploads`` (where uploads are kept),
- the folders in ``QALORA_ALLOWED_DIRS`` (colon-separated).

Anything else gets one message that says the same whether or not the path exists. Uploaded
files are copied to ``QALORA_HOME/uploads/<sha256>.<ext>`` (Gradio's temporary copy is cleaned
up by Gradio; a job resumed next week must still find its data), up to ``QALORA_MAX_UPLOAD_MB``.
The CLI, run by the machine's own user, is not confined: only the form's handlers call this.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from qalora.errors import ConfigError, DataError
from storage import get_settings

DEFAULT_MAX_UPLOAD_MB = 2048
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def allowed_roots() -> list[Path]:
    home = get_settings().home
    extra = [Path(p).expanduser() for p in os.environ.get("QALORA_ALLOWED_DIRS", "").split(":") if p.strip()]
    return [home / "datasets", home / "models", home / "uploads", *extra]


# Kept uploads' names as the user knows them, so messages about a kept file name the upload.
_UPLOAD_NAMES: dict[str, str] = {}


def _outside(what: str) -> ConfigError:
    roots = ", ".join(str(r) for r in allowed_roots())
    fix = "upload it, or put it there" if what == "dataset" else "put it there"
    return ConfigError(f"{what}: the form only reads server files under {roots}; {fix} (or ask the operator "
                       "to add its folder to QALORA_ALLOWED_DIRS).")


def with_upload_names(message: str) -> str:
    """``message`` with kept uploads' hashed file names replaced by the names they were uploaded as."""
    for kept, original in _UPLOAD_NAMES.items():
        message = message.replace(kept, original)
    return message


def confine(ref: str, what: str) -> str:
    """``ref`` if it is no server path or lies under an allowed root; else a ``ConfigError``."""
    path = Path(ref).expanduser()
    resolved = path.resolve()  # symlinks followed: a link inside a root to a file outside is refused
    if not any(resolved.is_relative_to(root.resolve()) for root in allowed_roots()):
        raise _outside(what)
    return ref


def is_server_path(ref: str, suffixes=()) -> bool:
    """Whether a form value names a file or folder on the server (not a Hub id or dataset name)."""
    return (ref.startswith(("/", ".", "~")) or Path(ref).suffix.lower() in suffixes
            or os.path.lexists(os.path.expanduser(ref)))


def confine_base(base: str) -> str:
    if base in ("default", "tiny-random") or not is_server_path(base, (".gguf",)):
        return base  # the embedded models, or a Hub id
    return confine(base, "base model")


def confine_data(ref: str) -> str:
    if ref.startswith("builtin:") or not is_server_path(ref, DATA_SUFFIXES):
        return ref  # a built-in set, or a dataset name in the local datasets cache
    return confine(ref, "dataset")


def max_upload_bytes() -> int:
    raw = os.environ.get("QALORA_MAX_UPLOAD_MB") or str(DEFAULT_MAX_UPLOAD_MB)
    try:
        mb = float(raw)
    except ValueError:
        raise ConfigError(f"QALORA_MAX_UPLOAD_MB={raw!r} is not a number; unset it or give e.g. 2048.") from None
    return int(mb * 2 ** 20)


def keep_upload(temp_path: str) -> str:
    """Copy an uploaded file to ``uploads/<sha256>.<ext>`` (once per content) and return that path."""
    src = Path(temp_path)
    suffix = src.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise DataError(f"{src.name}: unsupported file type {suffix or '(none)'}; upload a "
                        f"{', '.join(DATA_SUFFIXES)} file.")
    size, limit = src.stat().st_size, max_upload_bytes()
    if size > limit:
        raise DataError(f"{src.name} is {size / 2 ** 20:,.0f} MB; uploads are limited to {limit / 2 ** 20:,.0f} MB "
                        "(QALORA_MAX_UPLOAD_MB). Put a larger file under QALORA_HOME/datasets and give its path.")
    digest = hashlib.sha256()
    with open(src, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    uploads = get_settings().home / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    dest = uploads / f"{digest.hexdigest()}{suffix}"
    if not dest.is_file():
        tmp = uploads / f".partial-{os.getpid()}-{dest.name}"
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    _UPLOAD_NAMES[dest.name] = src.name
    return str(dest)
