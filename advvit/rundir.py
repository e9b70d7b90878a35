"""The run folder: who may write into it, what a new or resumed run finds there, what it records.

One training run owns its folder (``output/<experiment>``) while it runs: it holds the lock of
``<folder>/.lock`` (:func:`advvit.io.lock_file`: the file names the holder), so a second run into
the same folder stops with one message before any work. A lock left by a run that was killed or
crashed is taken over with a note. Only the main process (rank 0) locks and writes.

A new run refuses a folder that already holds run files (``summary.csv``, ``args.yaml``, ``tb/``,
``best.pth``, ``resume_history.yaml``) unless it resumes one of its checkpoints: appending to
another run's logs would interleave two runs.

On resume the config is compared with the one the checkpoint was trained with. Keys that alter
the result are refused (named, old -> new); the keys in :data:`OVERRIDABLE` may differ when
``--resume-override`` names them. ``args.yaml`` keeps the settings the run started with and
``resume_history.yaml`` records every resume and each change made.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import yaml

from .config import FIELDS, ConfigError, TrainConfig, shown
from .io import (FileInUseError, FileLock, atomic_write, atomic_write_text,
                 folder_instead_of_file, lock_file, remove_stale_tmp)

__all__ = ["LOCK", "LAST", "BEST", "RECOVERY", "HISTORY", "RUN_FILES", "OVERRIDABLE",
           "RunLock", "run_dir_for", "resume_auto_args", "check_run_dir", "lock_run_dir",
           "refuse_leftovers", "choose_resume", "config_changes", "check_resume_config",
           "parse_overrides", "record_resume", "write_args_if_missing", "checkpoint_step", "link_best"]

LOCK = ".lock"
LAST = "last.pth"
BEST = "best.pth"
RECOVERY = "recovery.pth"
HISTORY = "resume_history.yaml"
# What a run leaves besides its checkpoints; a new run must not append to these.
RUN_FILES = ("summary.csv", "args.yaml", "tb", BEST, HISTORY)

# Keys that may differ between a checkpoint's config and the resuming config, with
# --resume-override. They decide how long the run goes on, what it logs and where and how fast
# the same recipe executes; none of them changes the model, the data, the loss, the optimizer or
# how the best checkpoint is chosen (evaluation keys are not here: best.pth compares epochs by
# one measure).
OVERRIDABLE: Dict[str, str] = {
    "epochs": "run length; the learning-rate schedule is rebuilt for the new length, as timm's "
              "own resume does",
    "cooldown_epochs": "run length (epochs at min_lr after the schedule)",
    "log_interval": "logging only",
    "tensorboard": "logging only",
    "log_wandb": "logging only",
    "recovery_interval_steps": "when recovery checkpoints are written",
    "recovery_interval_minutes": "when recovery checkpoints are written",
    "workers": "loader processes: the same augmentations drawn from other worker seeds",
    "data_dir": "the same data at another path (a moved disk, another machine)",
    "device": "another machine for the same recipe (numerics differ; on XLA the attacks run in "
              "train mode: see docs/architecture.md, accel)",
    "compile": "torch.compile: the same computation, compiled",
    "threads": "CPU threads: the same computation at another speed (float sums may round "
               "differently)",
    "channels_last": "memory layout only",
    "xla_spawn": "process layout on an XLA host",
}
# Keys that say where this invocation runs or how it resumes: never compared.
_NOT_COMPARED = ("output", "experiment", "resume", "resume_override")


def resume_auto_args(argv: Sequence[str]) -> List[str]:
    """Training arguments that continue the run from its folder: any ``--resume`` replaced by
    ``--resume auto``."""
    out: List[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif not arg.startswith("--resume="):
            out.append(arg)
    return [*out, "--resume", "auto"]


def run_dir_for(cfg: TrainConfig) -> str:
    """The run folder: ``output/experiment`` (default name: model-dataset-loss)."""
    name = cfg.run.experiment or "-".join(
        [cfg.model.model, cfg.data.dataset.replace("/", "_"), cfg.attack.loss])
    return os.path.join(cfg.run.output, name)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


RunLock = FileLock
"""A run folder's lock (see :func:`advvit.io.lock_file`)."""


def acquire(run_dir: str) -> RunLock:
    """Take the folder's lock (creating the folder) or raise ``ConfigError`` naming the holder."""
    try:
        return lock_file(Path(run_dir) / LOCK)
    except FileInUseError as err:
        raise ConfigError("experiment", f"the run folder {run_dir} is in use by another training "
                          f"run ({err.holder or 'holder unknown'})",
                          "wait for it to finish, or set another experiment / output") from None


def check_run_dir(run_dir: str) -> None:
    """Refuse a run folder that could not be made or written into, before anything is written.

    The nearest of the run folder and its parents that exists must be a folder this process
    may write into: the run folder itself, or where it (and any missing parent) is created.

    Raises:
        ConfigError: naming ``experiment`` (the run folder itself) or ``output``, and the fix.
    """
    path = Path(run_dir).absolute()
    found = next(p for p in (path, *path.parents) if os.path.lexists(p))
    key, fix = (("experiment", "set another experiment") if found == path else
                ("output", "give a folder for output: run folders are made inside it"))
    if not found.is_dir():
        raise ConfigError(key, f"{found} is a file, not a folder", fix)
    if not os.access(found, os.W_OK | os.X_OK):
        why = ("is on a read-only file system" if os.statvfs(found).f_flag & os.ST_RDONLY
               else "is not writable by this user")
        raise ConfigError(key, f"{found} {why}, so the run folder {run_dir} cannot be written",
                          "give an output folder this user can write to")


def lock_run_dir(run_dir: str, *, is_main: bool, say=print) -> RunLock:
    """The main process's lock on ``run_dir``, with the folder cleared of stale temporary files.

    Args:
        run_dir: the run folder (created).
        is_main: only the main process locks; the others get a lock that holds nothing.
        say: where notes go (a taken-over stale lock, removed temporary files).

    Raises:
        ConfigError: another run holds the folder.
    """
    if not is_main:
        return RunLock.none()
    lock = acquire(run_dir)
    if lock.stale:
        say(f"note: took over the lock of {run_dir} left by a run that did not exit cleanly "
            f"({lock.stale})")
    removed = remove_stale_tmp(run_dir)
    if removed:
        say(f"note: removed {len(removed)} temporary file(s) of interrupted writes in {run_dir}: "
            + ", ".join(p.name for p in removed))
    return lock


def refuse_leftovers(run_dir: str) -> None:
    """Refuse a folder holding run files but no checkpoint to resume from.

    Raises:
        ConfigError: naming the files and the fix.
    """
    folder = Path(run_dir)
    if (folder / LAST).exists() or (folder / RECOVERY).exists():
        return
    found = [name for name in RUN_FILES if (folder / name).exists()]
    if found:
        raise ConfigError("experiment", f"{run_dir} holds files of an earlier run "
                          f"({', '.join(found)}) but no checkpoint to resume (last.pth or recovery.pth); a new run would "
                          "append to its logs",
                          f"remove them (rm -r {run_dir}) to start over, or set another "
                          "experiment / output")


def checkpoint_step(path: "os.PathLike[str] | str") -> int:
    """A checkpoint's global step, read without loading its tensors (memory-mapped); -1 when
    the file is missing or unreadable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state["step"])
    except Exception:  # noqa: BLE001  (a damaged file is reported by load_checkpoint later)
        return -1


def choose_resume(run_dir: str, resume: Optional[str]) -> Optional[str]:
    """The checkpoint a run continues from, or None for a new run.

    ``resume`` None: a new run (refused where the folder holds a checkpoint). ``"auto"``: the
    folder's ``recovery.pth`` when it is further on than ``last.pth`` (a run stopped inside an
    epoch), else ``last.pth``, else a new run. A path: that file.

    Raises:
        ConfigError: a new run into a folder with a checkpoint, or a missing file.
    """
    folder = Path(run_dir)
    last, recovery = folder / LAST, folder / RECOVERY
    if resume is None:
        found = [p.name for p in (last, recovery) if p.exists()]
        if found:
            raise ConfigError("resume", f"{run_dir} already holds a checkpoint "
                              f"({', '.join(found)}) that a new run would overwrite", "pass --resume auto to continue "
                              "it, or set another experiment / output")
        return None
    if resume == "auto":
        if recovery.exists() and (not last.exists()
                                  or checkpoint_step(recovery) > checkpoint_step(last)):
            return str(recovery)
        return str(last) if last.exists() else None
    folder = folder_instead_of_file(resume, LAST)
    if folder:
        raise ConfigError("resume", folder, "or 'auto' for the run folder's own")
    if not os.path.isfile(resume):
        raise ConfigError("resume", f"no such checkpoint: {resume}", "give a last.pth or 'auto'")
    return resume


def parse_overrides(text: Optional[str]) -> List[str]:
    """The keys of ``--resume-override KEY[,KEY...]`` (dashes read as underscores).

    Raises:
        ConfigError: an unknown key, or one that alters the run.
    """
    keys = [k.strip().replace("-", "_") for k in (text or "").split(",") if k.strip()]
    for key in keys:
        if key not in FIELDS:
            raise ConfigError("resume_override", f"unknown key {shown(key)}",
                              "name config keys, e.g. --resume-override epochs,log_interval")
        if key not in OVERRIDABLE:
            raise ConfigError("resume_override", f"{shown(key)} changes what the run computes and "
                              "cannot differ on resume", "keys that may: " + ", ".join(OVERRIDABLE)
                              + "; start a new run (another experiment) to change it")
    return keys


def config_changes(saved: Mapping[str, Any],
                   current: Mapping[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    """Keys whose value differs: key -> (saved, current).

    A key the saved config lacks (written before the key existed) is compared as its default,
    which is what that run used.
    """
    changes: Dict[str, Tuple[Any, Any]] = {}
    for key, new in current.items():
        if key in _NOT_COMPARED or key not in FIELDS:
            continue
        old = saved[key] if key in saved else _default(key)
        if _plain(old) != _plain(new):
            changes[key] = (old, new)
    return changes


def _default(key: str) -> Any:
    f = FIELDS[key][1]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def check_resume_config(saved: Mapping[str, Any], current: Mapping[str, Any], path: str,
                        overrides: Sequence[str]) -> Dict[str, Tuple[Any, Any]]:
    """The changes from the checkpoint's config, all of them allowed by ``overrides``.

    Raises:
        ConfigError: naming each change not allowed (old -> new) and the fix.
    """
    changes = config_changes(saved, current)
    refused = {k: v for k, v in changes.items() if k not in overrides}
    if refused:
        listed = ", ".join(f"{k} ({shown(old)} -> {shown(new)})"
                           for k, (old, new) in refused.items())
        may = [k for k in refused if k in OVERRIDABLE]
        fix = "resume with the run's own settings (its args.yaml and resume_history.yaml)"
        if may:
            fix += f", or allow the change with --resume-override {','.join(may)}"
        fixed = [k for k in refused if k not in OVERRIDABLE]
        if fixed:
            fix += f"; {', '.join(fixed)} cannot change within a run: start a new experiment"
        raise ConfigError("resume", f"the config differs from the one {path} was trained with: "
                          f"{listed}", fix)
    return changes


def record_resume(run_dir: str, *, path: str, epoch: int, step: int,
                  changes: Mapping[str, Tuple[Any, Any]]) -> None:
    """Append this resume (when, from where, what changed) to ``resume_history.yaml``."""
    history_path = Path(run_dir) / HISTORY
    history: List[Dict[str, Any]] = []
    if history_path.exists():
        history = yaml.safe_load(history_path.read_text()) or []
    history.append({"resumed": _now(), "checkpoint": str(path), "epoch": int(epoch),
                    "step": int(step),
                    "changed": {k: {"from": _plain(old), "to": _plain(new)}
                                for k, (old, new) in changes.items()}})
    atomic_write_text(history_path, yaml.safe_dump(history, sort_keys=False))


def write_args_if_missing(run_dir: str, saved: Mapping[str, Any]) -> None:
    """A resumed run keeps its ``args.yaml``; one resumed into a new folder gets the
    checkpoint's config."""
    path = Path(run_dir) / "args.yaml"
    if not path.exists():
        atomic_write_text(path, yaml.safe_dump({k: _plain(v) for k, v in saved.items()},
                                               sort_keys=False))


def link_best(run_dir: str) -> None:
    """Make ``best.pth`` the file ``last.pth`` is now, without a moment where it is half-written.

    A hard link to a temporary name, then ``os.replace``; where the file system has no hard links,
    an atomic copy.
    """
    folder = Path(run_dir)
    last, best = folder / LAST, folder / BEST
    tmp = folder / f".{BEST}.{os.getpid()}.link.tmp"
    try:
        if tmp.exists():
            tmp.unlink()
        os.link(last, tmp)
        os.replace(tmp, best)
    except OSError:
        if tmp.exists():
            tmp.unlink()
        with open(last, "rb") as src:
            atomic_write(best, lambda dst: shutil.copyfileobj(src, dst))
