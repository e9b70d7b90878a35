"""Durable file writes: every file advvit writes whole (checkpoints, args.yaml, state, reports).

A write goes to a temporary file in the destination's folder (same file system, so the rename is
atomic), is flushed and fsynced, then replaces the destination with ``os.replace``; the folder is
fsynced after. A failure or a kill at any point leaves the previous file whole. A kill can leave
the temporary file behind: :func:`remove_stale_tmp` clears those on the next start.

A file only one process may use at a time (a run folder, an evaluation state file) is guarded by
:func:`lock_file`: an exclusive ``fcntl.flock`` on a lock file that names its holder (pid, host,
start time). The operating system drops the lock when the process ends, however it ends; a clean
release also empties the file, so a non-empty lock file that can be taken names a holder that was
killed or crashed, and is taken over (:attr:`FileLock.stale` says whose it was).

This module imports the standard library only.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator, List, Optional, Union

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "remove_stale_tmp",
           "TMP_SUFFIX", "FileLock", "FileInUseError", "lock_file", "folder_instead_of_file",
           "input_file_problem", "WriteError", "naming_write_errors", "OptionError", "input_file",
           "check_folder", "check_file_target", "sha256_file"]

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


class WriteError(RuntimeError):
    """Writing a file failed (a full disk, a lost mount, a permission): names the file and the
    operating system's error. An :func:`atomic_write` that fails leaves the earlier file whole.

    Attributes:
        path: the file.
        error: the OSError.
    """

    def __init__(self, path: PathLike, error: OSError) -> None:
        code = errno.errorcode.get(error.errno or 0)
        reason = f"{code}: {error.strerror}" if code and error.strerror else str(error)
        super().__init__(f"could not write {path} ({reason})")
        self.path, self.error = Path(path), error


@contextlib.contextmanager
def naming_write_errors(path: PathLike) -> Iterator[None]:
    """Raise an OSError of the writes inside as a :class:`WriteError` naming ``path`` (the
    error of a failed write, ENOSPC say, names no file)."""
    try:
        yield
    except OSError as err:
        raise WriteError(path, err) from err


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


def folder_instead_of_file(path: PathLike, example: str) -> Optional[str]:
    """The message for a folder given where a file is expected; None when ``path`` is no folder.

    Args:
        path: what was given.
        example: a file name such a folder may hold (``best.pth``), shown as the fix.
    """
    p = Path(path)
    if not p.is_dir():
        return None
    return f"{p} is a folder, not a file: give a file inside it (e.g. {p / example})"


def input_file_problem(path: PathLike, example: str) -> Optional[str]:
    """What is wrong with ``path`` as a file to read (a folder, missing, not a regular file), or
    None when it is a regular file; each caller raises it as its own error.

    Args:
        path: what was given.
        example: a file name such a folder may hold (``best.pth``), shown as the fix.
    """
    p = Path(path)
    folder = folder_instead_of_file(p, example)
    if folder:
        return folder
    if not p.exists():
        return f"{p} does not exist"
    if not p.is_file():
        return f"{p} is not a regular file"
    return None


class FileInUseError(RuntimeError):
    """Another process holds the lock.

    Attributes:
        path: the lock file.
        holder: what the lock file says about its holder ("pid N on HOST, started T"), or "".
    """

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by {holder or 'another process'}")
        self.path, self.holder = path, holder


class FileLock:
    """An exclusive lock, held from :func:`lock_file` until :meth:`release`.

    Attributes:
        path: the lock file.
        stale: what the lock file said when it was taken over from a holder that did not release
            it (killed or crashed), or None.
    """

    def __init__(self, path: Optional[Path], fd: Optional[int], stale: Optional[str]) -> None:
        self.path, self._fd, self.stale = path, fd, stale

    @classmethod
    def none(cls) -> "FileLock":
        """The lock of a process that does not lock (ranks other than 0)."""
        return cls(None, None, None)

    def release(self) -> None:
        """Empty the lock file (a clean exit) and unlock; safe to call twice."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096).decode("utf-8", "replace").strip()
    try:
        info = json.loads(raw)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return raw


def lock_file(path: PathLike) -> FileLock:
    """Take the exclusive lock of ``path`` (created, with its folder, if missing).

    The lock file is never removed: a process that opened it just before the removal would lock
    a file no other process sees.

    Raises:
        FileInUseError: another process holds it (never waits).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _read_holder(fd)
        os.close(fd)
        raise FileInUseError(path, holder) from None
    previous = _read_holder(fd)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": started}).encode())
    os.fsync(fd)
    return FileLock(path, fd, previous or None)


class OptionError(ValueError):
    """A bad command-line value or input: the message names the option and the fix. Library
    functions that validate what an option gave raise it; the commands print it after their
    usage line and exit 2."""


def input_file(path: PathLike, option: str, *, example: str) -> Path:
    """The file an option names, or OptionError: it does not exist, or it is a folder."""
    problem = input_file_problem(path, example)
    if problem:
        raise OptionError(f"{option} {problem}")
    return Path(path)


def check_folder(target: PathLike, option: str) -> Path:
    """A folder that is there and writable, or can be created (its nearest existing parent is a
    writable folder).

    Raises:
        OptionError: the path is a file, or its nearest existing parent is not a writable folder.
    """
    out = Path(target)
    if out.exists() and not out.is_dir():
        raise OptionError(f"{option} {target} is a file: give a folder")
    existing = next(p for p in (out.resolve(), *out.resolve().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise OptionError(f"{option} {target}: {existing} is not a writable folder")
    return out


def sha256_file(path: PathLike) -> str:
    """sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_file_target(target: Optional[PathLike], option: str) -> None:
    """A file an option names can be written: the path is not a folder, and its nearest existing
    folder is a writable folder (the missing ones are created when the file is written).

    Raises:
        OptionError: naming the option; nothing when no file is given.
    """
    if not target:
        return
    path = Path(target).resolve()
    if path.is_dir():
        raise OptionError(f"{option} {target} is a folder: give a file name in it")
    existing = next(p for p in path.parents if p.exists())
    if not existing.is_dir():
        raise OptionError(f"{option} {target}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise OptionError(f"{option} {target}: {existing} is not writable")
