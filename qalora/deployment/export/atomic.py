"""Write a folder or file under a temporary sibling name and rename it into place when complete.

A kill, a full disk or an error while saving leaves the previous version (or nothing) under the
final name, never a half-written model that looks finished. The temporary name keeps the final
name's suffix (``.partial-<pid>-model.gguf``) for writers that check it.
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


@contextmanager
def atomic_path(final) -> Iterator[Path]:
    """Yield a temporary sibling of ``final`` to write; on success it replaces ``final``.

    On an exception the temporary is removed and ``final`` is left exactly as it was.
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
    old = final.with_name(f".old-{os.getpid()}-{final.name}")
    if final.exists():
        os.replace(final, old)  # a folder cannot replace a non-empty folder in one rename
    os.replace(tmp, final)
    _remove(old)

