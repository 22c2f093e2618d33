"""What the web form may reach on the server: paths under allowed folders, and uploads kept safe.

The app is shared with a team; its form must not become a way to read any file the server can
read. A server path typed in the form (a dataset file or folder, a base model folder or
``.gguf``) must resolve, symlinks followed, inside one of:

- ``QALORA_HOME/datasets`` and ``QALORA_HOME/models`` (put shared data and models there),
- ``QALORA_HOME/uploads`` (where uploads are kept),
- the folders in ``QALORA_ALLOWED_DIRS`` (colon-separated).

Anything else gets one message that says the same whether or not the path exists; a name that
is no path (a dataset name) but exists as a relative path on the server gets the message a
missing dataset name gets. Uploaded files are copied to ``QALORA_HOME/uploads/<sha256>.<ext>`` (Gradio's temporary copy is cleaned
up by Gradio; a job resumed next week must still find its data), up to ``QALORA_MAX_UPLOAD_MB``.
The command line, run by the machine's own user, is not confined: where it goes through the
form's checks (``python -m jobs sweep``) it runs them inside :func:`unconfined`.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from contextvars import ContextVar
from pathlib import Path

from qalora.atomic import atomic_path
from qalora.errors import ConfigError, DataError, ModelError
from storage import get_settings

DEFAULT_MAX_UPLOAD_MB = 2048
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def allowed_roots() -> list[Path]:
    home = get_settings().home
    extra = [Path(p).expanduser() for p in os.environ.get("QALORA_ALLOWED_DIRS", "").split(":") if p.strip()]
    return [*(home / name for name in HOME_ROOTS), *extra]


_CONFINED: ContextVar[bool] = ContextVar("qalora_confined", default=True)


@contextlib.contextmanager
def unconfined():
    """Inside the block the form's checks reach every path (the command line's own user's)."""
    token = _CONFINED.set(False)
    try:
        yield
    finally:
        _CONFINED.reset(token)


# Kept uploads' names as the user knows them, so messages about a kept file name the upload.
_UPLOAD_NAMES: dict[str, str] = {}


HOME_ROOTS = ("datasets", "models", "uploads")  # the folders under QALORA_HOME the form reads


def _outside(what: str) -> ConfigError:
    """The refusal names the allowed folders relative to QALORA_HOME, never a server path: a
    visitor learns where to put a file, not how the server's disk is laid out."""
    roots = ", ".join(f"QALORA_HOME/{name}" for name in HOME_ROOTS)
    extra = " and the folders the operator listed in QALORA_ALLOWED_DIRS" if len(allowed_roots()) > len(HOME_ROOTS) \
        else ""
    fix = "upload it, or put it there" if what == "dataset" else "put it there"
    return ConfigError(f"{what}: the form only reads server files under {roots}{extra}; {fix} (or ask the operator "
                       "to add its folder to QALORA_ALLOWED_DIRS).")


def with_upload_names(message: str) -> str:
    """``message`` with kept uploads' hashed file names replaced by the names they were uploaded as."""
    for kept, original in _UPLOAD_NAMES.items():
        message = message.replace(kept, original)
    return message


def _allowed(ref: str) -> bool:
    resolved = Path(ref).expanduser().resolve()  # symlinks followed: a link in a root to a file outside
    return any(resolved.is_relative_to(root.resolve()) for root in allowed_roots())


def confine(ref: str, what: str) -> str:
    """``ref`` if it lies under an allowed root (or confinement is off); else a ``ConfigError``."""
    if _CONFINED.get() and not _allowed(ref):
        raise _outside(what)
    return ref


def looks_like_path(ref: str, suffixes=()) -> bool:
    """Whether a form value is written as a server path (``/``, ``.``, ``~``, or a file suffix):
    decided from the text alone, so the answer says nothing about what exists on the server."""
    return ref.startswith(("/", ".", "~")) or Path(ref).suffix.lower() in suffixes


def confine_base(base: str) -> str:
    if base in ("default", "tiny-random"):
        return base  # the embedded models
    if looks_like_path(base, (".gguf",)):
        return confine(base, "base model")
    if _CONFINED.get() and os.path.lexists(os.path.expanduser(base)) and not _allowed(base):
        # written as a name but naming a folder here: told what the same name is told where it is missing
        from qalora.models.hub import _Status, endpoint, hub_config, hub_error

        from .spec import _HUB_ID, missing_model_message
        if not _HUB_ID.match(base):
            raise ModelError(missing_model_message(base))
        hub_config(base)  # a Hub id: what the Hub says of it, as for any Hub id typed in the form
        raise ModelError(hub_error(base, _Status(404), endpoint()))
    return base


def confine_data(ref: str) -> str:
    if ref.startswith("builtin:"):
        return ref
    if looks_like_path(ref, DATA_SUFFIXES):
        return confine(ref, "dataset")
    if _CONFINED.get() and os.path.lexists(os.path.expanduser(ref)) and not _allowed(ref):
        # written as a dataset name but naming a file or folder here: what the Hub says of that name
        # (as for any Hub dataset typed in the form), then what a missing Hub dataset is told
        from qalora.models.hub import _Status
        from qalora.data.hub import hub_message, overview, parse_ref
        hub_ref = parse_ref(ref)
        overview(hub_ref)
        raise DataError(hub_message(hub_ref, _Status(404)))
    return ref  # a Hub dataset ID[:CONFIG][@SPLIT]


def is_upload(ref: str) -> bool:
    """Whether ``ref`` is a file kept from this app's uploads (the visitor's own file)."""
    return Path(ref).resolve().is_relative_to((get_settings().home / "uploads").resolve())


@contextlib.contextmanager
def owned_by_visitor(ref: str):
    """Inside the block a refusal naming a file's columns names them only for an upload: a file on
    the server may hold what the visitor may not read (its column names included)."""
    from qalora.data.records import UnknownColumns
    try:
        yield
    except UnknownColumns as exc:
        if is_upload(ref):
            raise
        raise DataError(exc.without_names()) from None


def max_upload_bytes() -> int:
    raw = os.environ.get("QALORA_MAX_UPLOAD_MB") or str(DEFAULT_MAX_UPLOAD_MB)
    try:
        mb = float(raw)
    except ValueError:
        raise ConfigError(f"QALORA_MAX_UPLOAD_MB={raw!r} is not a number; unset it or give e.g. 2048.") from None
    return int(mb * 1e6)  # MB of 10^6 bytes, as every size the app shows


def keep_upload(temp_path: str) -> str:
    """Copy an uploaded file to ``uploads/<sha256>.<ext>`` (once per content) and return that path."""
    src = Path(temp_path)
    suffix = src.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise DataError(f"{src.name}: unsupported file type {suffix or '(none)'}; upload a "
                        f"{', '.join(DATA_SUFFIXES)} file.")
    size, limit = src.stat().st_size, max_upload_bytes()
    if size > limit:
        raise DataError(f"{src.name} is {size / 1e6:,.0f} MB; uploads are limited to {limit / 1e6:,.0f} MB "
                        "(QALORA_MAX_UPLOAD_MB). Put a larger file under QALORA_HOME/datasets and give its path.")
    digest = hashlib.sha256()
    with open(src, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    uploads = get_settings().home / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    dest = uploads / f"{digest.hexdigest()}{suffix}"
    if not dest.is_file():
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
    _UPLOAD_NAMES[dest.name] = src.name
    return str(dest)
