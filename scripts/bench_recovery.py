#!/usr/bin/env python
"""Cost of a mid-epoch recovery checkpoint against a training step, for the quickstart run.

Runs the quickstart config (``configs/quickstart_fashion_mnist.yaml``: XCiT-N12 p8 at 32x32,
batch 128, FGSM-RS, AdamW) through the real trainer for ``--steps`` steps with a recovery
checkpoint every ``--every`` steps, and times, side by side in the one run:

* a step: the time between two log points (data, FGSM-RS, backward, AdamW, metric read), less
  any recovery save in between;
* a recovery save: ``Trainer.save_recovery`` (finite-weights check, TensorBoard flush, the
  checkpoint built and written with fsync and an atomic rename).

It reports the medians, the checkpoint's size and the overhead at a few recovery intervals.

Example::

    python scripts/bench_recovery.py --steps 20 --every 2 --output runs/bench/recovery.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402  (imports advvit before timm)

import torch  # noqa: E402

from advvit.trainer import Trainer, build  # noqa: E402
from advvit.config import load_config  # noqa: E402

CONFIG = bc.REPO / "configs" / "quickstart_fashion_mnist.yaml"


def measure(steps: int, every: int, out_dir: str) -> dict:
    """Median step and recovery-save seconds over one run of ``steps`` steps."""
    cfg = load_config(["--config", str(CONFIG), "--output", out_dir, "--experiment", "bench",
                       "--device", "cpu", "--max-steps-per-epoch", str(steps),
                       "--log-interval", "1", "--recovery-interval-steps", str(every),
                       "--eval-batches", "1", "--co-check", "off", "--no-tensorboard"])
    trainer = Trainer(build(cfg))
    logs, saves = [], []
    step_log, save = trainer.monitor.step, trainer.save_recovery

    def timed_log(epoch, step, metrics):
        logs.append((time.perf_counter(), len(saves)))
        step_log(epoch, step, metrics)

    def timed_save(epoch, progress):
        start = time.perf_counter()
        save(epoch, progress)
        saves.append(time.perf_counter() - start)

    trainer.monitor.step, trainer.save_recovery = timed_log, timed_save
    try:
        trainer.fit()
    finally:
        trainer.p.lock.release()
    # Step i+1's time: from log point i to log point i+1, less the saves written in between.
    step_s = [t1 - t0 - sum(saves[n0:n1]) for (t0, n0), (t1, n1) in zip(logs[1:], logs[2:])]
    size = os.path.getsize(os.path.join(out_dir, "bench", "last.pth"))
    return {"steps_timed": len(step_s), "saves_timed": len(saves),
            "step_s_median": statistics.median(step_s), "save_s_median": statistics.median(saves),
            "save_s_all": saves, "checkpoint_mb": size / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps (one epoch cut)")
    parser.add_argument("--every", type=int, default=2, help="recovery checkpoint every N steps")
    parser.add_argument("--threads", type=int, default=None, 
                        help="torch threads (default: torch's)")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out_dir:
        result = measure(args.steps, args.every, out_dir)
    result["environment"] = bc.environment(torch.device("cpu"))
    ratio = result["save_s_median"] / result["step_s_median"]
    result["save_per_step"] = ratio
    result["overhead_at"] = {str(n): ratio / n for n in (10, 100, 1000)}
    print(f"step {result['step_s_median'] * 1e3:.0f} ms (median of {result['steps_timed']}), "
          f"recovery save {result['save_s_median'] * 1e3:.0f} ms (median of "
          f"{result['saves_timed']}), checkpoint {result['checkpoint_mb']:.1f} MiB: "
          f"one save = {ratio:.2f} steps; overhead every 10 / 100 / 1000 steps: "
          + " / ".join(f"{100 * v:.2f}%" for v in result["overhead_at"].values()))
    bc.write_json(args.output, result)


if __name__ == "__main__":
    main()
