"""Write a folder or file under a temporary sibling name and rename it into place when complete.

The one writer for every file or folder another process or a later step reads: exports, the
merged model and adapter, checkpoints, the quantized-base cache, reports, uploads kept in the
store, the cached tokenizer, download archives. A kill, a full disk or an error while saving
leaves the previous version (or nothing) under the final name, never a half-written model that
looks finished. The temporary name keeps the final name's suffix (``.partial-<pid>-model.gguf``)
for writers that check it.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _sync(path: Path) -> None:
    for f in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


@contextmanager
def atomic_path(final, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``final`` to write; on success it replaces ``final``.

    On an exception the temporary is removed and ``final`` is left exactly as it was. ``durable``
    flushes what was written to the disk before the rename (a checkpoint must survive a power cut,
    not only a kill).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".partial-{os.getpid()}-{final.name}")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if durable:
        _sync(tmp)
    old = final.with_name(f".old-{os.getpid()}-{final.name}")
    if final.exists():
        os.replace(final, old)  # a folder cannot replace a non-empty folder in one rename
    os.replace(tmp, final)
    _remove(old)


def write_text(final, text: str) -> Path:
    """``final`` holds ``text`` in full, or is as it was: :func:`atomic_path` for one small file."""
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(final)
