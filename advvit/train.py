"""Adversarial training CLI: ``python -m advvit.train --config configs/xcit_s12_adv.yaml``.

The config is loaded and validated once (``advvit.config``, ``advvit.preflight``); the run itself
is ``advvit.trainer``. This module maps its outcomes to one message and an exit code, and starts
one process per TPU device under ``device: xla``.
"""
from __future__ import annotations

import shlex
import signal
import sys
from typing import Optional, Sequence

from . import accel, checkpoint, data, engine, rundir
from .config import ConfigError, load_config
from .io import WriteError
from .preflight import validate
from .trainer import StopRequest, Trainer, TrainingStopped, train

__all__ = ["main", "train", "Trainer", "StopRequest", "TrainingStopped", "validate"]


def _xla_process(index: int, argv: Sequence[str]) -> None:
    # Runs in each process torch_xla.launch starts; the config was validated before the launch.
    train(load_config([*argv, "--no-xla-spawn"]))


def _kept(run_dir: str) -> str:
    """What a run stopped by a failed write leaves, and how to go on."""
    path = rundir.choose_resume(run_dir, "auto")
    if path is None:
        return (f"no checkpoint had been written yet: fix the cause, then remove {run_dir} and "
                "start again")
    return (f"{path}, the newest checkpoint, is intact (a failed write leaves the file before "
            "it whole): fix the cause (free space) and resume with --resume auto")


def _resume_command(argv: Sequence[str], distributed: bool) -> str:
    """This run's command line, resuming: any --resume dropped, --resume auto added."""
    command = shlex.join(["python", "-m", "advvit.train", *rundir.resume_auto_args(argv)])
    return command + (" (under the launcher this run had, e.g. torchrun)" if distributed else "")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The CLI: returns 0 on success, 2 on a bad config / data / checkpoint, 1 on a failed run,
    143 (128 + SIGTERM) when SIGTERM stopped it at a safe point, its recovery point written.

    With ``device: xla`` (and ``xla_spawn``) one process per local TPU device is started through
    ``accel.launch_xla``; each builds its own parts and takes its share of the data.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(argv)
        if cfg.run.device == "xla" and cfg.run.xla_spawn:
            validate(cfg, world_size=None)  # each process validates again, knowing its world
            accel.launch_xla(_xla_process, args=(argv,))
            return 0
        train(cfg)
    except (ConfigError, data.DataNotFoundError, data.DataError, checkpoint.CheckpointError,
            accel.AccelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except engine.NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except WriteError as err:
        print(f"error: {err}; training stopped. {_kept(rundir.run_dir_for(cfg))}", file=sys.stderr)
        return 1
    except TrainingStopped as stopped:
        if stopped.is_main:
            print(f"{stopped}; resume with: {_resume_command(argv, stopped.distributed)}",
                  file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
