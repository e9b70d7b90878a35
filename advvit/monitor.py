"""Where a run reports: console lines, TensorBoard scalars (and the same scalars to Weights &
Biases with ``log_wandb``) and a CSV summary per epoch.

Only the main process writes; the others call the same methods and nothing happens. Every
TensorBoard scalar is logged against the global optimizer step (the epoch scalars at the epoch's
last step), so that a resumed run hides everything logged after its checkpoint with one
``purge_step``; ``drop_rows_after`` does the same for ``summary.csv``. The logs of a run killed
and resumed then read as an uninterrupted run's.
"""
from __future__ import annotations

import csv
import logging
import os
from io import StringIO
from typing import Any, Dict, Mapping, Optional

from .io import atomic_write_text, naming_write_errors

__all__ = ["Monitor", "get_logger"]

_LOGGER_NAME = "advvit"


def get_logger() -> logging.Logger:
    """The package logger, printing plain lines to stderr once configured by the CLIs."""
    logger = logging.getLogger(_LOGGER_NAME)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def _fmt(metrics: Dict[str, float]) -> str:
    parts = []
    for key, value in metrics.items():
        if key == "eps":
            parts.append(f"eps {value * 255:.2f}/255")
        elif key == "lr":
            parts.append(f"lr {value:.3g}")
        elif key.endswith("acc"):
            parts.append(f"{key} {100 * value:.2f}%")
        elif key == "images_per_s":
            parts.append(f"{value:.0f} img/s")
        else:
            parts.append(f"{key} {value:.4g}")
    return "  ".join(parts)


class Monitor:
    """Console progress, TensorBoard scalars and ``summary.csv`` for one run.

    Args:
        run_dir: the run folder.
        is_main: whether this process writes.
        tensorboard: also write TensorBoard event files under ``run_dir/tb``.
        purge_step: on resume, the first step after the checkpoint: TensorBoard hides the
            events an earlier process logged from this step on.
        log_wandb: also log the same scalars to a Weights & Biases run (files under
            ``run_dir/wandb``; project ``$WANDB_PROJECT``, else advvit). W&B cannot hide what
            was logged before a resume, so each process start is a run of its own, named after
            the run folder and its first step.
        config: the run's config, recorded with the W&B run.
    """

    def __init__(self, run_dir: str, *, is_main: bool = True, tensorboard: bool = True,
                 purge_step: Optional[int] = None, log_wandb: bool = False,
                 config: Optional[Mapping[str, Any]] = None) -> None:
        self.run_dir = run_dir
        self.is_main = is_main
        self.log = get_logger()
        self.writer = None
        if is_main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=purge_step)
        self.wandb = None
        if is_main and log_wandb:
            import wandb
            name = os.path.basename(os.path.normpath(run_dir))
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "advvit"),
                                    dir=run_dir, config=dict(config or {}),
                                    name=name if not purge_step else f"{name}@{purge_step}")
        self.csv_path = os.path.join(run_dir, "summary.csv")

    def _scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{key}": value for key, value in values.items()},
                           step=step)

    def info(self, message: str) -> None:
        """A plain console line (main process only)."""
        if self.is_main:
            self.log.info(message)

    def warning(self, message: str) -> None:
        """A warning line (main process only)."""
        if self.is_main:
            self.log.warning("WARNING: %s", message)

    def step(self, epoch: int, step: int, metrics: Dict[str, float]) -> None:
        """A progress line and per-step scalars."""
        if not self.is_main:
            return
        self.log.info("epoch %d step %d  %s", epoch, step, _fmt(metrics))
        self._scalars("train", metrics, step)

    def epoch(self, epoch: int, step: int, train: Dict[str, float], val: Dict[str, float],
              extra: Optional[Dict[str, float]] = None) -> None:
        """The end-of-epoch line, scalars, and one CSV row (columns fixed by the first row).

        Raises:
            WriteError: the row could not be written (a full disk).
        """
        if not self.is_main:
            return
        row = {"epoch": epoch, "step": step}
        row.update({f"train_{k}" if not k.startswith("train_") else k: v for k, v in train.items()})
        row.update({f"val_{k}": v for k, v in val.items()})
        row.update(extra or {})
        self.log.info("epoch %d done  train: %s  |  val: %s", epoch, _fmt(train), _fmt(val))
        self._scalars("epoch", {k: v for k, v in row.items() if k not in ("epoch", "step")},
                      step)
        if self.writer is not None:
            self.writer.flush()
        write_header = not os.path.exists(self.csv_path)
        fields = list(row) if write_header else _header(self.csv_path)
        with naming_write_errors(self.csv_path), open(self.csv_path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            if write_header:
                writer.writeheader()
            writer.writerow(row)
            fh.flush()
            os.fsync(fh.fileno())

    def drop_rows_after(self, epoch: int) -> int:
        """Remove the ``summary.csv`` rows of epochs after ``epoch`` (atomically); returns how many.

        A kill between an epoch's row and its checkpoint leaves a row the resumed run writes
        again; a kill inside the append can leave a cut-off last row.
        """
        if not self.is_main or not os.path.exists(self.csv_path):
            return 0
        with open(self.csv_path, newline="") as fh:
            rows = list(csv.reader(fh))
        if not rows:
            return 0
        header, body = rows[0], rows[1:]
        at = header.index("epoch") if "epoch" in header else 0
        keep = [r for r in body if len(r) == len(header) and _int(r[at]) is not None
                and _int(r[at]) <= epoch]
        if len(keep) == len(body):
            return 0
        text = StringIO()
        csv.writer(text).writerows([header, *keep])  # the appends' dialect: \r\n line ends
        with naming_write_errors(self.csv_path):
            atomic_write_text(self.csv_path, text.getvalue())
        return len(body) - len(keep)

    def flush(self) -> None:
        """Write out the TensorBoard events so far (before a checkpoint)."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush and close TensorBoard (and finish the W&B run)."""
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def _int(text: str) -> Optional[int]:
    try:
        return int(text)
    except ValueError:
        return None


def _header(path: str) -> list:
    with open(path, newline="") as fh:
        return next(csv.reader(fh), [])
