"""Durable file writes: every file advvit writes whole (checkpoints, args.yaml, state, reports).

A write goes to a temporary file in the destination's folder (same file system, so the rename is
atomic), is flushed and fsynced, then replaces the destination with ``os.replace``; the folder is
fsynced after. A failure or a kill at any point leaves the previous file whole. A kill can leave
the temporary file behind: :func:`remove_stale_tmp` clears those on the next start.

This module imports the standard library only.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, List, Union

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "remove_stale_tmp",
           "TMP_SUFFIX"]

PathLike = Union[str, "os.PathLike[str]"]
TMP_SUFFIX = ".tmp"


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform can open a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}."


def atomic_write(path: PathLike, write: Callable[[IO], None], *, binary: bool = True) -> None:
    """Write a file atomically: ``write(fh)`` fills a temporary file that then replaces ``path``.

    The folder is created if missing. On a Python exception the temporary file is removed and
    ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=TMP_SUFFIX, dir=path.parent)
    try:
        # mkstemp makes the file private (0600); give it the mode open() would (0666 less the
        # umask), so reports and checkpoints are as readable as any other file the user writes.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_write_json(path: PathLike, payload: Any, *, indent: int | None = None) -> None:
    """Write ``payload`` as JSON to ``path`` atomically."""
    atomic_write(path, lambda f: json.dump(payload, f, indent=indent), binary=False)


def remove_stale_tmp(folder: PathLike) -> List[Path]:
    """Remove the temporary files that killed atomic writes left in ``folder``.

    Only names of the form :func:`atomic_write` makes (``.NAME.<random>.tmp``) are removed. Call
    it only while no other process writes into ``folder`` (the training run holds its folder's
    lock when it does).

    Returns:
        The removed paths.
    """
    folder = Path(folder)
    removed: List[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        name = entry.name
        if name.startswith(".") and name.endswith(TMP_SUFFIX) and name.count(".") >= 3 and entry.is_file():
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:
                pass
    return removed
