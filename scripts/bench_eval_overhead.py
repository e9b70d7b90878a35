#!/usr/bin/env python
"""Overhead of advvit's AutoAttack evaluation over calling AutoAttack directly.

Same model, same examples, same seed. In one process, round-robin over ``--rounds`` rounds (the
starting variant rotates each round), median per variant:

* ``direct``: ``pyautoattack.AutoAttack(model, ...).run_standard_evaluation(x, y)`` (the object
  is built inside the timed call, as the adapter builds its own);
* ``adapter``: ``advvit.autoattack_adapter.AutoAttackAdapter(...).run(x, y)``;
* ``run_attack``: ``advvit.suites.run_attack`` (what ``python -m advvit.eval`` calls per eps).

Two parts: ``apgd-ce`` (APGD-CE alone, ``--apgd-restarts`` x 100 iterations) and ``standard``
(AutoAttack standard: APGD-CE, APGD-T, FAB-T, Square). Each variant's robust flags are compared
with the direct call's (they must agree). Part ``cli`` times the whole ``python -m advvit.eval``
command (interpreter start-up, imports, checkpoint and data loading, model checks, attack,
report), interleaving its attacks round-robin, and reports the attack time recorded in its JSON
beside the wall time.

The model: timm ``resnet18_gelu`` cut to one block per stage and channels 8/16/32/64 (through the
checkpoint's ``model_args``), 28x28 grayscale, trained adversarially (FGSM-RS) on the real
Fashion-MNIST for ``--train-seconds`` through advvit.data and advvit.losses, then saved as an
advvit checkpoint that both the in-process variants and the CLI load. A random model would be
broken at once by APGD-CE, leaving the later attacks of the standard ensemble nothing to do.

Examples::

    python scripts/bench_eval_overhead.py --parts apgd-ce,cli --output runs/bench/eval_a.json
    python scripts/bench_eval_overhead.py --checkpoint runs/bench/eval_model.pth \\
        --parts standard --rounds 3 --output runs/bench/eval_b.json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import cpu_model, write_text  # noqa: E402
from typing import Callable, Dict, List

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
import advvit  # noqa: E402,F401  (before timm: the torchvision guard)
import advvit.models  # noqa: E402,F401

import torch  # noqa: E402

from advvit import data as advdata  # noqa: E402
from advvit.attack_names import parse_attack  # noqa: E402
from advvit import suites  # noqa: E402
from advvit.autoattack_adapter import AutoAttackAdapter, backend_version  # noqa: E402
from advvit.checkpoint import (ModelSpec, create_model_from_checkpoint, load_checkpoint,  # noqa: E402
                               make_checkpoint, save_checkpoint)

ARCH = "resnet18_gelu"
MODEL_ARGS = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8}
DATASET = "fashion_mnist"
PARTS = ("apgd-ce", "standard", "cli")
VARIANTS = ("direct", "adapter", "run_attack")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"in-process variants, subset of {','.join(VARIANTS)} (direct always runs)")
    p.add_argument("--checkpoint", default=None,
                   help="use this advvit checkpoint (Fashion-MNIST, 1x28x28) instead of training")
    p.add_argument("--save-checkpoint", default=None,
                   help="where the trained model is written (default: a temporary folder)")
    p.add_argument("--train-seconds", type=float, default=30.0,
                   help="FGSM-RS training time budget (0: random init)")
    p.add_argument("--train-eps", type=float, default=0.1)
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--n-examples", type=int, default=32, help="first N examples of the test split")
    p.add_argument("--batch-size", type=int, default=None, help="AutoAttack batch size (default N)")
    p.add_argument("--eps", type=float, default=0.1, help="evaluation Linf radius")
    p.add_argument("--apgd-restarts", type=int, default=1,
                   help="APGD-CE restarts in the apgd-ce part (the CLI's own default is 5)")
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds, apgd-ce part")
    p.add_argument("--standard-rounds", type=int, default=3, help="rounds, standard part")
    p.add_argument("--cli-rounds", type=int, default=2, help="rounds, cli part")
    p.add_argument("--cli-attacks", default="apgd-ce,autoattack",
                   help="comma list of --attack values the cli part runs")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed calls per variant before the apgd-ce part")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads here; OMP_NUM_THREADS for the CLI")
    p.add_argument("--output", default=None, help="write results as JSON here")
    p.add_argument("--markdown", default=None, help="also write the tables as markdown here")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def environment() -> dict:
    import timm
    return {"date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "timm": timm.__version__,
            "pyautoattack": backend_version("pyautoattack"), "advvit": advvit.__version__}


# ------------------------------------------------------------------------------------------------
# Model and examples
# ------------------------------------------------------------------------------------------------

def train_model(args, path: Path) -> dict:
    """FGSM-RS on real Fashion-MNIST for a time budget; writes an advvit checkpoint."""
    from advvit.losses import AdversarialLoss
    from advvit.models import create_model

    torch.manual_seed(0)
    model = create_model(ARCH, num_classes=10, in_chans=1, img_size=28, **MODEL_ARGS)
    spec = ModelSpec(ARCH, 10, 1, 28, None, dict(MODEL_ARGS))
    steps, seen, t0 = 0, 0, time.perf_counter()
    if args.train_seconds > 0:
        ds = advdata.create_dataset(DATASET, split="train")
        loader = advdata.create_loader(ds, img_size=28, in_chans=1, batch_size=args.train_batch,
                                       is_training=True, no_aug=True)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
        loss_fn = AdversarialLoss(eps=args.train_eps, steps=1)
        model.train()
        correct = 0
        t0 = time.perf_counter()  # the budget is for training steps, data set loading excluded
        while time.perf_counter() - t0 < args.train_seconds:
            for x, y in loader:
                out = loss_fn(model, x, y)
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                opt.step()
                steps += 1
                seen += len(y)
                correct += int((out.adv_logits.argmax(1) == y).sum())
                if time.perf_counter() - t0 >= args.train_seconds:
                    break
        log(f"trained {steps} FGSM-RS steps ({seen} images) in {time.perf_counter() - t0:.0f} s, "
            f"train adversarial accuracy {correct / max(seen, 1):.1%}")
    model.eval()
    ckpt = make_checkpoint(model, spec, config={"dataset": DATASET, "img_size": 28, "in_chans": 1},
                           epoch=0, step=steps, train_norm="linf", train_eps=args.train_eps,
                           rng=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, ckpt)
    return {"steps": steps, "images": seen, "seconds": time.perf_counter() - t0,
            "train_eps": args.train_eps, "attack": "FGSM-RS (advvit.losses.AdversarialLoss)"}


def load_examples(n: int):
    """The first n test examples as the CLI loads them (its default split, native size)."""
    ex = advdata.load_examples(DATASET, None, split="val", in_chans=1, img_size=28, n_examples=n,
                               batch_size=n)
    return ex.x, ex.y


# ------------------------------------------------------------------------------------------------
# Variants: each returns the per-example robust flags
# ------------------------------------------------------------------------------------------------

def make_variants(model, x, y, *, attacks: List[str] | None, restarts: int | None, eps: float,
                  batch_size: int, names) -> Dict[str, Callable[[], torch.Tensor]]:
    """attacks None: AutoAttack standard; else a custom list (restarts for APGD-CE)."""
    import pyautoattack
    version = "standard" if attacks is None else "custom"

    def direct():
        model.eval()
        if attacks is None:
            aa = pyautoattack.AutoAttack(model, device="cpu", eps=eps, norm="Linf", seed=0,
                                         version="standard")
        else:
            aa = pyautoattack.AutoAttack(model, attacks=list(attacks), device="cpu", eps=eps,
                                         norm="Linf", seed=0, version="custom")
            if restarts is not None:
                aa.apgd.n_restarts = restarts
        _, y_adv = aa.run_standard_evaluation(x, y, batch_size=batch_size)
        return y_adv == y

    def adapter():
        kw = {} if attacks is None else {"attacks": list(attacks), "n_restarts": restarts}
        ad = AutoAttackAdapter(model, eps=eps, norm="linf", version=version, seed=0,
                               device="cpu", num_classes=10, backend="pyautoattack", **kw)
        return ad.run(x, y, batch_size=batch_size, keep_adv=True).robust

    def run_attack():
        spec = parse_attack("autoattack" if attacks is None else ",".join(attacks),
                                    restarts=None if attacks is None else restarts)
        out = suites.run_attack(model, x, y, spec, eps=eps, norm="linf", seed=0,
                                 batch_size=batch_size, device="cpu", keep_adv=False,
                                 num_classes=10, backend="pyautoattack")
        return out.robust

    table = {"direct": direct, "adapter": adapter, "run_attack": run_attack}
    return {n: table[n] for n in names}


def per_call_checks_cost(model, x, y, *, batch_size: int, repeats: int = 10) -> dict:
    """What each ``run_standard_evaluation`` call repeats before attacking, on its first batch.

    pyautoattack's checks (check_randomized: 5 forwards; check_range_output: 1; check_dynamic: 1
    under ``sys.settrace``) and its clean-accuracy forward. A direct call pays them once per
    evaluation; the adapter calls ``run_standard_evaluation`` once per (attack, batch), so it pays
    them once per (attack, batch), plus its own clean pass over all examples (``clean_pass_s``).
    """
    import logging

    from pyautoattack import checks
    xb, yb = x[:batch_size], y[:batch_size]
    logger = logging.getLogger("auto-attack")
    model.eval()

    def checks_once():
        checks.check_randomized(model, xb, yb, bs=batch_size, logger=logger)
        checks.check_range_output(model, xb, logger=logger)
        checks.check_dynamic(model, xb, False, logger=logger)
        with torch.no_grad():
            model(xb).max(1)

    def clean_pass():
        with torch.no_grad():
            for s in range(0, len(x), batch_size):
                model(x[s:s + batch_size]).argmax(1)

    out = {}
    for name, fn in (("checks_and_clean_forward_s", checks_once), ("clean_pass_s", clean_pass)):
        fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        out[name] = statistics.median(ts)
    return out


def interleave(variants: Dict[str, Callable], *, rounds: int, warmup: int, label: str) -> dict:
    names = list(variants)
    flags: Dict[str, torch.Tensor] = {}
    for name in names:
        for _ in range(warmup):
            flags[name] = variants[name]()
    samples: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            flags[name] = variants[name]()
            samples[name].append(time.perf_counter() - t0)
        log(f"  {label} round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {samples[n][-1]:.2f} s" for n in names))
    ref = flags["direct"]
    med_ref = statistics.median(samples["direct"])
    rows = []
    for n in names:
        med = statistics.median(samples[n])
        rows.append({"variant": n, "median_s": med, "min_s": min(samples[n]),
                     "max_s": max(samples[n]), "samples_s": samples[n],
                     "ratio_to_direct": med / med_ref,
                     "robust_accuracy": float(flags[n].float().mean()),
                     "agrees_with_direct": bool(torch.equal(flags[n].bool(), ref.bool()))})
    return {"rows": rows}


# ------------------------------------------------------------------------------------------------
# The whole CLI
# ------------------------------------------------------------------------------------------------

def cli_part(args, ckpt: Path, batch_size: int) -> dict:
    attacks = [a.strip() for a in args.cli_attacks.split(",") if a.strip()]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    samples: Dict[str, list] = {a: [] for a in attacks}
    commands = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.cli_rounds):
            order = attacks[r % len(attacks):] + attacks[:r % len(attacks)]
            for attack in order:
                out = Path(tmp) / f"{attack}.json"
                cmd = [sys.executable, "-m", "advvit.eval", "--checkpoint", str(ckpt),
                       "--dataset", DATASET, "--n-examples", str(args.n_examples),
                       "--batch-size", str(batch_size), "--attack", attack,
                       "--eps", repr(args.eps), "--device", "cpu", "--backend", "pyautoattack",
                       "--output", str(out)]
                if attack == "apgd-ce":
                    cmd += ["--restarts", str(args.apgd_restarts)]
                commands[attack] = cmd
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if proc.returncode != 0:
                    raise RuntimeError(f"CLI failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
                rep = json.loads(out.read_text())
                samples[attack].append({"wall_s": wall, "attack_s": rep["seconds_total"],
                                        "robust_accuracy": rep["robust_accuracy"]["value"]})
                log(f"  cli round {r + 1}/{args.cli_rounds}: {attack} wall {wall:.2f} s, "
                    f"attacks {rep['seconds_total']:.2f} s")
    rows = []
    for attack, s in samples.items():
        wall = statistics.median(v["wall_s"] for v in s)
        att = statistics.median(v["attack_s"] for v in s)
        rows.append({"attack": attack, "median_wall_s": wall, "median_attack_s": att,
                     "median_outside_attack_s": statistics.median(
                         v["wall_s"] - v["attack_s"] for v in s),
                     "robust_accuracy": s[-1]["robust_accuracy"], "samples": s,
                     "command": " ".join(["python", *commands[attack][1:]])})
    return {"rows": rows}


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

def markdown(payload: dict) -> str:
    env, s = payload["env"], payload["settings"]
    out = [f"Machine: {env['cpu']}, {env['cpu_count']} cores, torch threads "
           f"{env['torch_threads']}; {env['date_utc']}; python {env['python']}, torch "
           f"{env['torch']}, timm {env['timm']}, pyautoattack {env['pyautoattack']}.",
           f"Command: `{env['command']}`", "",
           f"Model: {ARCH} {json.dumps(MODEL_ARGS)}, 1x28x28, "
           + (f"FGSM-RS eps {payload['training']['train_eps']} for "
              f"{payload['training']['steps']} steps ({payload['training']['seconds']:.0f} s)"
              if payload.get("training") else f"checkpoint {s['checkpoint']}")
           + f"; {s['n_examples']} Fashion-MNIST test examples, batch {s['batch_size']}, Linf eps "
           f"{s['eps']}, seed 0; clean accuracy {payload['clean_accuracy']:.1%}.", ""]
    for part in ("apgd-ce", "standard"):
        if part not in payload["parts"]:
            continue
        res = payload["parts"][part]
        title = (f"APGD-CE ({s['apgd_restarts']} restart(s) x 100)" if part == "apgd-ce"
                 else "AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square)")
        out += [f"{title}, in-process, {res['rounds']} interleaved rounds:", "",
                "| variant | median s | min s | max s | / direct | robust acc. | same flags |",
                "|---|---:|---:|---:|---:|---:|---|"]
        for r in res["rows"]:
            out.append(f"| {r['variant']} | {r['median_s']:.3f} | {r['min_s']:.3f} | "
                       f"{r['max_s']:.3f} | {r['ratio_to_direct']:.3f}x | "
                       f"{r['robust_accuracy']:.1%} | {'yes' if r['agrees_with_direct'] else 'NO'} |")
        out.append("")
        pc = res.get("per_call")
        if pc:
            n_batches = -(-s["n_examples"] // s["batch_size"])
            direct = next(r for r in res["rows"] if r["variant"] == "direct")["median_s"]
            out += [f"Work each `run_standard_evaluation` call repeats (pyautoattack's checks + "
                    f"clean forward, batch {s['batch_size']}): "
                    f"{pc['checks_and_clean_forward_s'] * 1e3:.1f} ms "
                    f"({pc['checks_and_clean_forward_s'] / (direct / n_batches):.1%} of the direct "
                    f"APGD-CE time per batch); the adapter's own clean pass: "
                    f"{pc['clean_pass_s'] * 1e3:.1f} ms.", ""]
    if "cli" in payload["parts"]:
        res = payload["parts"]["cli"]
        out += [f"Whole CLI (`python -m advvit.eval ...`), {s['cli_rounds']} interleaved rounds:",
                "", "| --attack | median wall s | median attack s (report) | median outside attack s | robust acc. |",
                "|---|---:|---:|---:|---:|"]
        for r in res["rows"]:
            out.append(f"| {r['attack']} | {r['median_wall_s']:.2f} | {r['median_attack_s']:.2f} | "
                       f"{r['median_outside_attack_s']:.2f} | {r['robust_accuracy']:.1%} |")
        out.append("")
        for r in res["rows"]:
            out.append(f"- `{r['command']}`")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> dict:
    args = parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    names = ["direct"] + [v.strip() for v in args.variants.split(",")
                          if v.strip() and v.strip() != "direct"]
    bad = [p for p in parts if p not in PARTS] + [v for v in names if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown parts/variants: {bad}")
    torch.set_num_threads(args.threads)
    batch_size = args.batch_size or args.n_examples
    training = None
    tmp = tempfile.TemporaryDirectory()
    if args.checkpoint:
        ckpt_path = Path(args.checkpoint)
    else:
        ckpt_path = Path(args.save_checkpoint or Path(tmp.name) / "model.pth")
        training = train_model(args, ckpt_path)
    model, _ = create_model_from_checkpoint(load_checkpoint(ckpt_path))
    model.eval()
    x, y = load_examples(args.n_examples)
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    log(f"clean accuracy on {len(y)} examples: {clean:.1%}")
    payload = {"benchmark": "eval_overhead", "env": environment(),
               "settings": {"n_examples": args.n_examples, "batch_size": batch_size,
                            "eps": args.eps, "apgd_restarts": args.apgd_restarts,
                            "rounds": args.rounds, "standard_rounds": args.standard_rounds,
                            "cli_rounds": args.cli_rounds, "warmup": args.warmup,
                            "checkpoint": str(args.checkpoint) if args.checkpoint else None,
                            "arch": ARCH, "model_args": MODEL_ARGS},
               "training": training, "clean_accuracy": clean, "parts": {}}
    try:
        if "apgd-ce" in parts:
            v = make_variants(model, x, y, attacks=["apgd-ce"], restarts=args.apgd_restarts,
                              eps=args.eps, batch_size=batch_size, names=names)
            res = interleave(v, rounds=args.rounds, warmup=args.warmup, label="apgd-ce")
            res["per_call"] = per_call_checks_cost(model, x, y, batch_size=batch_size)
            payload["parts"]["apgd-ce"] = {"rounds": args.rounds, **res}
        if "standard" in parts:
            v = make_variants(model, x, y, attacks=None, restarts=None, eps=args.eps,
                              batch_size=batch_size, names=names)
            res = interleave(v, rounds=args.standard_rounds, warmup=0, label="standard")
            payload["parts"]["standard"] = {"rounds": args.standard_rounds, **res}
        if "cli" in parts:
            payload["parts"]["cli"] = {"rounds": args.cli_rounds,
                                       **cli_part(args, ckpt_path, batch_size)}
    finally:
        tmp.cleanup()
    write_text(args.output, json.dumps(payload, indent=2) + "\n")
    md = markdown(payload)
    write_text(args.markdown, md)
    print(md)
    return payload


if __name__ == "__main__":
    main()
