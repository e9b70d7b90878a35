#!/usr/bin/env python
"""Cost of one adversarial training step, against its floor and against plain loops.

For each model and each case (clean, FGSM-RS, PGD-2, PGD-10, TRADES-10) it times, side by side in
one process (round-robin over rounds, median per variant):

* ``advvit``: advvit.losses forward + backward + AdamW step, as the trainer runs it;
* ``floor``: k forward + input-gradient passes with frozen parameters in eval mode (k = attack
  steps; TRADES adds its no-grad clean forward), then one training step (TRADES: two forwards,
  clean and adversarial) - the least work the step needs;
* ``thesis``: a straightforward loop in the public thesis code's style (parameter gradients on
  during the attack, ``loss.backward()`` for the input gradient, a grad-enabled clean forward);
* ``torchattacks``: torchattacks FFGSM / PGD / TPGD, then the same training step (skipped with a
  note when torchattacks is not installed);
* ``compiled`` (only when named): the ``advvit`` step on ``torch.compile(model)`` of the same
  module (the trainer's ``compile: true``), beside the eager variants in the same rounds.

Then, unless ``--no-memory``, the peak memory of one step of each (case, variant): on CUDA
``torch.cuda.max_memory_allocated``; on the CPU the peak RSS delta in a fresh process per case.

Examples::

    python scripts/bench_train_step.py --output runs/bench/train_step_cpu.json
    python scripts/bench_train_step.py --device cuda --amp bf16 --compile --batch 256 \\
        --output runs/bench/train_step_cuda.json

A model may carry timm arguments as ``name:key=value[:key=value]``; FAN-T, XCiT-N12 and DeiT-T at
32x32 with 8x8 tokens each (docs/benchmarks.md)::

    python scripts/bench_train_step.py --cases fgsm-rs --variants advvit,floor --batch 32 \\
        --models fan_tiny_12_p4_32,xcit_nano_12_p4_32,deit_tiny_patch16_224:patch_size=4
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402  (imports advvit before timm)

import torch  # noqa: E402

from advvit.losses import create_loss  # noqa: E402
from advvit.models import create_model  # noqa: E402

CASES = {  # name -> (loss name, attack steps)
    "clean": ("clean", 0),
    "fgsm-rs": ("adversarial", 1),
    "pgd-2": ("adversarial", 2),
    "pgd-10": ("adversarial", 10),
    "trades-10": ("trades", 10),
}
VARIANTS = ("advvit", "floor", "thesis", "torchattacks", "compiled")
DEFAULT_VARIANTS = VARIANTS[:4]
DEFAULT_MODELS = ("xcit_nano_12_p16_224", "resnet18")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help="comma-separated timm / advvit model names, each optionally with timm "
                        "arguments as name:key=value[:key=value] (e.g. deit_tiny_patch16_224:patch_size=4)")
    p.add_argument("--cases", default=",".join(CASES), help=f"subset of {','.join(CASES)}")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--in-chans", type=int, default=3, help="input channels (1: grayscale)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--eps", type=float, default=8 / 255)
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds (median over them)")
    p.add_argument("--iters", type=int, default=1, help="steps per variant per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                   help="autocast dtype (all variants alike)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model once; every variant calls the same module "
                        "(the compiled variant compares compiled with eager in one run)")
    p.add_argument("--no-check-range", action="store_true",
                   help="advvit losses with check_range=False (no host read per attack)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on the CPU")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--no-timing", action="store_true", help="skip the timings (memory only)")
    p.add_argument("--output", default=None, help="write results as JSON here")
    p.add_argument("--markdown", default=None, help="also write the tables as markdown here")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only print (and --markdown) the tables of an earlier --output file")
    p.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)  # model|case|variant
    return p.parse_args(argv)


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def parse_model(spec):
    """``"name:key=value:..."`` -> (name, timm keyword arguments); values are Python literals
    (numbers, booleans, tuples) or else strings.

    Raises:
        SystemExit: an option that is not ``key=value``.
    """
    name, *options = spec.split(":")
    kwargs = {}
    for opt in options:
        key, sep, value = opt.partition("=")
        if not sep or not key.isidentifier():
            raise SystemExit(f"--models: option {opt!r} of {spec!r} is not key=value "
                             "(e.g. deit_tiny_patch16_224:patch_size=4)")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return name, kwargs


def build_model(spec, args, device):
    """The model a ``--models`` entry names, for [0, 1] inputs, in train mode on ``device``."""
    name, kwargs = parse_model(spec)
    model = create_model(name, num_classes=args.num_classes, img_size=args.img_size,
                         in_chans=args.in_chans, **kwargs)
    return model.to(device).train()


class Bench:
    """One model, its optimizer and batch, and the step of every (case, variant)."""

    def __init__(self, arch, args, device):
        self.arch = arch
        self.device = device
        torch.manual_seed(0)
        self.model = build_model(arch, args, device)
        self.run_model = torch.compile(self.model) if args.compile else self.model
        self._compiled = None
        self.opt = bc.adamw(self.model)
        self.x, self.y = bc.random_batch(args.batch, args.img_size, args.num_classes, device,
                                         in_chans=args.in_chans)
        self.amp_ctx = lambda: bc.autocast(device, args.amp)
        self.args = args

    def compiled(self):
        """One compiled module for every case: it shares the eager model's parameters (and so
        its optimizer), as ``compile: true`` in the trainer does."""
        if self._compiled is None:
            self._compiled = torch.compile(self.model)
        return self._compiled

    def step(self, case, variant):
        loss_name, k = CASES[case]
        m, opt, amp, eps = self.run_model, self.opt, self.amp_ctx, self.args.eps
        if variant == "compiled":
            m, variant = self.compiled(), "advvit"
        if variant == "advvit":
            kw = {}
            if loss_name != "clean":
                kw = dict(eps=eps, steps=k, check_range=not self.args.no_check_range)
            return bc.advvit_step(m, opt, create_loss(loss_name, **kw), amp)
        if variant == "floor":
            return bc.floor_step(m, opt, k=k, extra_clean_forward=loss_name == "trades",
                                 train_forwards=2 if loss_name == "trades" else 1, amp_ctx=amp)
        if loss_name == "clean":
            return None  # no attack: the plain loops are the clean step itself
        kind = "trades" if loss_name == "trades" else "adversarial"
        if variant == "thesis":
            return bc.thesis_step(m, opt, kind=kind, steps=k, eps=eps, amp_ctx=amp)
        if variant == "torchattacks":
            return bc.torchattacks_step(m, opt, kind=kind, steps=k, eps=eps, amp_ctx=amp)
        raise ValueError(variant)


def _compile_counts():
    try:
        from torch._dynamo.utils import counters
        return {"unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
                "calls_captured": int(counters["stats"].get("calls_captured", 0))}
    except Exception:  # pragma: no cover - dynamo absent
        return {}


def _ratios(t, floor):
    """Ratio to the floor: the median over rounds of the per-round ratio (the two ran moments
    apart in the same round, so a load change between rounds cancels), and the ratio of medians."""
    if not floor:
        return {"ratio_to_floor": None, "ratio_of_medians": None}
    per_round = [a / b for a, b in zip(t["samples_s"], floor["samples_s"])]
    return {"ratio_to_floor": statistics.median(per_round),
            "ratio_of_medians": t["median_s"] / floor["median_s"],
            "ratio_per_round": per_round}


def memory_case(args, device):
    arch, case, variant = args.memory_case.split("|")
    b = Bench(arch, args, device)
    step = b.step(case, variant)
    print(json.dumps(bc.peak_memory_mib(step, b.x, b.y, device)))


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.memory_case:
        return memory_case(args, device)
    if args.render:
        payload = json.loads(Path(args.render).read_text())
        md = render_markdown(payload)
        print(md)
        if args.markdown:
            Path(args.markdown).write_text(md + "\n")
        return payload
    models = [m for m in args.models.split(",") if m]
    cases = [c for c in args.cases.split(",") if c]
    variants = [v for v in args.variants.split(",") if v]
    for c in cases:
        if c not in CASES:
            raise SystemExit(f"unknown case {c!r}; choose from {list(CASES)}")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {list(VARIANTS)}")

    env = bc.environment(device)
    settings = {k: v for k, v in vars(args).items() if k not in ("memory_case", "output",
                                                                 "markdown")}
    notes = []
    if "torchattacks" in variants and env["torchattacks"] is None:
        notes.append("torchattacks is not installed: its rows are skipped "
                     "(pip install --no-deps torchattacks==3.5.1)")
    results = []
    t_start = time.time()
    for arch in (models if not args.no_timing else ()):
        _log(f"{arch}: building")
        b = Bench(arch, args, device)
        steps = {}
        for c in cases:
            for v in variants:
                s = b.step(c, v)
                if s is not None:
                    steps[(c, v)] = s
        before = _compile_counts()
        named = {f"{c}/{v}": s for (c, v), s in steps.items()}
        times = bc.interleaved_times(named, lambda _n: (b.x, b.y), device=device,
                                     rounds=args.rounds, iters=args.iters, warmup=args.warmup,
                                     log=_log)
        after = _compile_counts()
        for c in cases:
            floor = times.get(f"{c}/floor")
            for v in variants:
                t = times.get(f"{c}/{v}")
                if t is None:
                    continue
                results.append({
                    "model": arch, "case": c, "variant": v,
                    "median_s": t["median_s"], "min_s": t["min_s"], "max_s": t["max_s"],
                    "images_per_s": args.batch / t["median_s"],
                    **_ratios(t, floor),
                    "samples_s": t["samples_s"],
                })
        if args.compile or "compiled" in variants:
            results.append({"model": arch, "compile_counts": {"before": before, "after": after}})
        del b

    memory = []
    if not args.no_memory:
        for arch in models:
            for c in cases:
                for v in variants:
                    if CASES[c][0] == "clean" and v in ("thesis", "torchattacks"):
                        continue
                    if v == "torchattacks" and env["torchattacks"] is None:
                        continue
                    rec = _measure_memory(args, arch, c, v, device)
                    memory.append({"model": arch, "case": c, "variant": v, **rec})
                    _log(f"  memory {arch} {c} {v}: {rec.get('peak_mib', rec.get('error'))}")

    payload = {"benchmark": "train_step", "env": env, "settings": settings, "notes": notes,
               "wall_s": time.time() - t_start, "timing": results, "memory": memory}
    bc.write_json(args.output, payload)
    md = render_markdown(payload)
    print(md)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(md + "\n")
    return payload


def _measure_memory(args, arch, case, variant, device):
    if device.type == "cuda":
        b = Bench(arch, args, device)
        rec = bc.peak_memory_mib(b.step(case, variant), b.x, b.y, device)
        del b
        torch.cuda.empty_cache()
        return rec
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-case", f"{arch}|{case}|{variant}",
           "--img-size", str(args.img_size), "--num-classes", str(args.num_classes),
           "--batch", str(args.batch), "--in-chans", str(args.in_chans),
           "--eps", repr(args.eps), "--device", args.device,
           "--amp", args.amp, "--threads", str(args.threads)]
    if args.no_check_range:
        cmd.append("--no-check-range")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def render_markdown(payload):
    timing = [r for r in payload["timing"] if "case" in r]
    mem = {(r["model"], r["case"], r["variant"]): r for r in payload["memory"]}
    s = payload["settings"]
    lines = []
    both = timing + list(payload["memory"])
    compiled = any(r["variant"] == "compiled" for r in timing)
    for arch in dict.fromkeys(r["model"] for r in both):
        chans = s.get("in_chans", 3)
        lines.append(f"**{arch}**, {s['img_size']}x{s['img_size']}"
                     + (f"x{chans}" if chans != 3 else "") + f", batch {s['batch']}, "
                     f"{s['num_classes']} classes, device {s['device']}, amp {s['amp']}, "
                     f"compile {s['compile']}, {s['rounds']} rounds x {s['iters']} steps")
        lines.append("")
        rows = []
        for case in dict.fromkeys(r["case"] for r in both if r["model"] == arch):
            by_v = {r["variant"]: r for r in timing if r["model"] == arch and r["case"] == case}

            def cell_t(v):
                r = by_v.get(v)
                return "-" if r is None else f"{r['median_s'] * 1000:.0f}"

            def cell_r(v):
                r = by_v.get(v)
                return "-" if r is None or r["ratio_to_floor"] is None else \
                    f"{r['ratio_to_floor']:.3f}x"

            def cell_m(v):
                r = mem.get((arch, case, v))
                return "-" if r is None or "peak_mib" not in r else f"{r['peak_mib']:.0f}"

            rows.append([case, cell_t("floor"), cell_t("advvit"), cell_r("advvit"),
                         cell_t("thesis"), cell_r("thesis"), cell_t("torchattacks"),
                         cell_r("torchattacks")]
                        + ([cell_t("compiled"), cell_r("compiled")] if compiled else [])
                        + ([cell_m("floor"), cell_m("advvit"), cell_m("thesis"),
                            cell_m("torchattacks")] if payload["memory"] else []))
        header = ["case", "floor ms", "advvit ms", "advvit / floor", "thesis ms",
                  "thesis / floor", "torchattacks ms", "torchattacks / floor"]
        if compiled:
            header += ["compiled ms", "compiled / floor"]
        if payload["memory"]:
            header += ["floor MiB", "advvit MiB", "thesis MiB", "torchattacks MiB"]
        lines.append(bc.fmt_table(header, rows, "l" + "r" * (len(header) - 1)))
        lines.append("")
    if payload["memory"]:
        lines.append(f"Memory: {payload['memory'][0].get('method', '')}.")
    for r in payload["timing"]:
        if "compile_counts" in r:
            lines.append(f"torch.compile counters for {r['model']}: {r['compile_counts']}")
    for n in payload["notes"]:
        lines.append(f"Note: {n}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
