#!/usr/bin/env python
"""Time to robustness: clean and PGD accuracy against training wall-clock time on Fashion-MNIST.

Trains each model with the quickstart recipe (FGSM-RS, Linf eps 0.1) through ``advvit.train`` in
short "epochs" of ``--chunk`` steps, evaluating clean and PGD-10 accuracy on the same held-out
images after each chunk, and reports accuracy against the cumulative training time (evaluation
time excluded). Writes a JSON file, a markdown table and a PNG plot.

    python scripts/bench_time_to_robustness.py --minutes 4 --output docs/time_to_robustness
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time

import advvit  # noqa: F401  (before timm)
import torch

from advvit.config import load_config
from advvit.trainer import train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_env import cpu_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart_fashion_mnist.yaml")


def _throughput_probe(model: str, img_size: int) -> float:
    """Seconds of one FGSM-RS training step at batch 128 (to size the chunks alike)."""
    from advvit import models
    from advvit.losses import AdversarialLoss
    net = models.create_model(model, num_classes=10, in_chans=1, img_size=img_size)
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    loss_fn = AdversarialLoss(eps=0.1)
    x, y = torch.rand(128, 1, img_size, img_size), torch.randint(0, 10, (128,))
    times = []
    for _ in range(4):
        start = time.perf_counter()
        out = loss_fn(net, x, y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[1]


def run_one(model: str, *, minutes: float, chunk: int, eval_batches: int, workdir: str) -> list:
    step_s = _throughput_probe(model, 32)
    chunks = max(1, int(minutes * 60 / (step_s * chunk)))
    argv = ["--config", QUICKSTART, "--model", model, "--epochs", str(chunks),
            "--max-steps-per-epoch", str(chunk), "--eval-batches", str(eval_batches),
            "--eval-attack", "pgd", "--eval-steps", "10", "--co-check", "off",
            # The quickstart's 0.3-epoch warm-up (of 469 steps), in chunks; a budget shorter than
            # that warms up over the whole run (a longer warm-up is refused).
            "--eps-warmup-epochs", str(min(0.3 * 469 / chunk, chunks)),
            "--output", workdir, "--experiment", model, "--log-interval", "1000",
            "--no-tensorboard", "--workers", "1"]
    train(load_config(argv))
    rows, elapsed = [], 0.0
    with open(os.path.join(workdir, model, "summary.csv")) as fh:
        for row in csv.DictReader(fh):
            elapsed += float(row["train_seconds"])
            rows.append({"model": model, "epoch": int(row["epoch"]), "step": int(row["step"]),
                         "train_seconds": elapsed, "clean_acc": float(row["val_clean_acc"]),
                         "pgd_acc": float(row["val_robust_acc"])})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="xcit_nano_12_p8_224,resnet18_gelu")
    p.add_argument("--minutes", type=float, default=4.0, help="training time per model")
    p.add_argument("--chunk", type=int, default=50, help="training steps between evaluations")
    p.add_argument("--eval-batches", type=int, default=4, help="held-out batches of 128")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", required=True, help="path prefix for .json, .md and .png")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for model in args.models.split(","):
            results += run_one(model, minutes=args.minutes, chunk=args.chunk,
                               eval_batches=args.eval_batches, workdir=workdir)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{cpu_model()} x{os.cpu_count()}", "threads": args.threads,
            "torch": torch.__version__,
            "python": platform.python_version(), "command": " ".join(sys.argv)}
    with open(args.output + ".json", "w") as fh:
        json.dump({"meta": meta, "rows": results}, fh, indent=1)
    with open(args.output + ".md", "w") as fh:
        fh.write("| model | steps | train time (s) | clean acc | PGD-10 acc |\n|---|---|---|---|---|\n")
        for r in results:
            fh.write(f"| {r['model']} | {r['step']} | {r['train_seconds']:.0f} | "
                     f"{100 * r['clean_acc']:.1f}% | {100 * r['pgd_acc']:.1f}% |\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return 0
    fig, ax = plt.subplots(figsize=(6, 4))
    for model in dict.fromkeys(r["model"] for r in results):
        pts = [r for r in results if r["model"] == model]
        t = [r["train_seconds"] for r in pts]
        line, = ax.plot(t, [100 * r["clean_acc"] for r in pts], "--", label=f"{model} clean")
        ax.plot(t, [100 * r["pgd_acc"] for r in pts], "-", color=line.get_color(),
                label=f"{model} PGD-10")
    ax.set_xlabel("training time (s), 2 CPU threads")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Fashion-MNIST, FGSM-RS training, Linf eps 0.1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output + ".png", dpi=120)
    return 0



if __name__ == "__main__":
    sys.exit(main())
