"""Crash-safe file writes: write a temporary sibling, fsync it, rename it over the target.

A reader (or a resumed run) therefore sees either the old file or the complete new one, never a
truncated one. Every file or folder the project publishes goes through :func:`atomic_write` or
:func:`publish_dir`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Flush a folder's entry list (so a rename inside it survives a power cut); ignored where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_sibling(path: Path) -> Path:
    """``<folder>/.<name>.tmp``: where :func:`atomic_write` writes before the rename."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """``with atomic_write(path) as tmp: <write tmp>``: on success ``tmp`` is fsynced and renamed to ``path``;
    on an exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically replace ``path`` by a UTF-8 file holding ``text``."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def publish_dir(path: Path, fill: Callable[[Path], None]) -> Path:
    """Build a folder with ``fill(tmp_folder)`` and rename it over ``path`` (an old ``path`` is replaced whole)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for file in tmp.rglob("*"):
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
    if path.exists():
        trash = path.with_name(f".{path.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
        os.replace(tmp, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, path)
    fsync_dir(path.parent)
    return path
