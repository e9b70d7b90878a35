#!/usr/bin/env python
"""What ``advvit.eval --amp bf16`` and ``--compile`` gain over fp32 eager and over raw AutoAttack,
and whether they decide the same examples.

One process, one model, the same examples and seed; each variant runs once, in this order:

* ``fp32``: ``advvit.suites.run_attack`` as ``python -m advvit.eval`` calls it;
* ``fp32+compile``: the same on the model compiled once (``advvit.compiled.compile_model``);
* ``bf16``: the attacks under bf16 autocast, every break re-checked in fp32 (``--amp bf16``);
* ``bf16+compile``: both, on the same compiled module as ``fp32+compile``;
* ``raw``: the ``pyautoattack`` package's own ``AutoAttack`` on the model, fp32 eager.

A compiled variant first compiles what its run calls (a forward and backward at the batch size
and at one other size, so the batch dimension turns symbolic, and a forward without gradients,
as the fp32 check makes); that warm-up is timed apart, and the counters of
:class:`advvit.compiled.DynamoCounters` show whether the timed run compiled again. Per variant:
seconds per example, the ratio to raw AutoAttack, robust accuracy, and how many examples its
outcome differs from fp32's on (robust here but broken in fp32, and the other way).

Attacks: ``apgd-ce`` (APGD-CE, ``--apgd-restarts`` x 100 iterations) and ``autoattack`` (standard:
APGD-CE, APGD-T, FAB-T, Square), the latter on the first ``--aa-n-examples``.

The model is an advvit checkpoint (``--checkpoint``; the quickstart's ``best.pth``); none is
trained here. Example::

    python scripts/bench_eval_precision.py --checkpoint output/quickstart/best.pth \\
        --n-examples 64 --aa-n-examples 16 --threads 1 --output runs/bench/precision.json \\
        --markdown runs/bench/precision.md
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402  (imports advvit before timm)
from bench_env import write_text  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from advvit import data as advdata  # noqa: E402
from advvit.attack_names import AttackSpec, parse_attack  # noqa: E402
from advvit.autoattack_adapter import backend_version  # noqa: E402
from advvit.checkpoint import create_model_from_checkpoint, load_checkpoint  # noqa: E402
from advvit.compiled import DynamoCounters, check_compile, compile_model  # noqa: E402
from advvit.suites import AMP_DTYPES, Autocast, run_attack  # noqa: E402

VARIANTS = ("fp32", "fp32+compile", "bf16", "bf16+compile", "raw")
ATTACKS = ("apgd-ce", "autoattack")
REFERENCE = "fp32"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="advvit checkpoint (its data set's test "
                   "examples are attacked)")
    p.add_argument("--attacks", default=",".join(ATTACKS), help=f"subset of {','.join(ATTACKS)}")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"subset of {','.join(VARIANTS)} ({REFERENCE} always runs: the outcomes "
                        "are compared with it)")
    p.add_argument("--n-examples", type=int, default=64, help="first N test examples (APGD-CE)")
    p.add_argument("--aa-n-examples", type=int, default=None,
                   help="first N for standard AutoAttack (default --n-examples)")
    p.add_argument("--batch-size", type=int, default=None, help="default: --n-examples")
    p.add_argument("--eps", type=float, default=0.1, help="Linf radius (the quickstart's 0.1)")
    p.add_argument("--apgd-restarts", type=int, default=1)
    p.add_argument("--apgd-steps", type=int, default=None, help="APGD-CE iterations (default "
                   "AutoAttack's 100)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on the CPU")
    p.add_argument("--output", default=None, help="write results as JSON here")
    p.add_argument("--markdown", default=None, help="also write the table as markdown here")
    return p.parse_args(argv)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_variants(text: str) -> list[str]:
    """``--variants`` -> the variants in run order, fp32 first (the outcomes' reference)."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variants {bad}: choose from {', '.join(VARIANTS)}")
    return [REFERENCE] + [v for v in VARIANTS if v in names and v != REFERENCE]


def attack_spec(attack: str, *, restarts: int, steps: int | None) -> AttackSpec:
    """The spec advvit's variants run: standard AutoAttack, or APGD-CE at these settings."""
    if attack == "autoattack":
        return parse_attack("autoattack")
    return parse_attack("apgd-ce", restarts=restarts, steps=steps)


def load_model(checkpoint: str | Path, device: torch.device) -> tuple[nn.Module, Any]:
    """An advvit checkpoint's model (eval mode, on ``device``) and its ``ModelSpec``."""
    model, spec = create_model_from_checkpoint(load_checkpoint(Path(checkpoint)))
    return model.eval().to(device), spec


def load_test_examples(checkpoint: str | Path, spec: Any, n: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n examples of the checkpoint's data set, as ``advvit.eval`` loads them."""
    config = load_checkpoint(Path(checkpoint)).get("config") or {}
    ex = advdata.load_examples(config.get("dataset", "fashion_mnist"), config.get("data_dir"),
                               split="val", in_chans=spec.in_chans, img_size=spec.img_size,
                               n_examples=n, batch_size=n)
    return ex.x, ex.y


def warm_up(model: nn.Module, x: torch.Tensor, amp: str | None, device: torch.device) -> float:
    """Compile what an attack run calls; returns the seconds it took.

    A forward and backward at the batch size and at one other size (so the batch dimension turns
    symbolic, as the attacks' shrinking work lists make it anyway), then a forward without
    gradients (the fp32 check and the clean pass: another graph)."""
    attacked = model if amp is None else Autocast(model, AMP_DTYPES[amp], device.type)
    start = time.perf_counter()
    for n in dict.fromkeys((len(x), max(1, len(x) - 1))):
        xb = x[:n].to(device).requires_grad_(True)
        attacked(xb).sum().backward()
    with torch.no_grad():
        model(x.to(device))
    model.zero_grad(set_to_none=True)  # the attacks read input gradients only
    bc.sync(device)
    return time.perf_counter() - start


def raw_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec, *,
                   eps: float, batch_size: int, device: torch.device, seed: int = 0
                   ) -> torch.Tensor:
    """The ``pyautoattack`` package's own AutoAttack on (x, y), fp32 eager -> robust flags."""
    import pyautoattack
    if spec.version == "standard":
        aa = pyautoattack.AutoAttack(model, norm="Linf", eps=eps, version="standard",
                                     device=str(device), seed=seed)
    else:
        aa = pyautoattack.AutoAttack(model, norm="Linf", eps=eps, version="custom",
                                     attacks=list(spec.attacks), device=str(device), seed=seed)
        aa.apgd.n_restarts = spec.restarts
        if spec.steps is not None:
            aa.apgd.n_iter = spec.steps
    _, y_adv = aa.run_standard_evaluation(x.to(device), y.to(device), batch_size=batch_size)
    return y_adv.cpu() == y.cpu()


def run_variant(model: nn.Module, compiled: nn.Module | None, x: torch.Tensor, y: torch.Tensor,
                variant: str, spec: AttackSpec, *, eps: float, batch_size: int,
                device: torch.device, seed: int = 0) -> dict[str, Any]:
    """One variant on (x, y) -> seconds (the attack run), warm-up seconds (compiled variants),
    robust flags and what compiling did during the run."""
    amp = "bf16" if variant.startswith("bf16") else None
    target = compiled if variant.endswith("+compile") else model
    warm = warm_up(target, x[:batch_size], amp, device) if target is compiled else 0.0
    if warm:
        _log(f"  {variant}: warm-up (compiling) {warm:.1f} s")
    before = DynamoCounters.now()
    start = time.perf_counter()
    if variant == "raw":
        robust = raw_autoattack(model, x, y, spec, eps=eps, batch_size=batch_size,
                                device=device, seed=seed)
    else:
        robust = run_attack(target, x, y, spec, eps=eps, norm="linf", seed=seed,
                            batch_size=batch_size, device=device, num_classes=None,
                            backend="pyautoattack", amp=amp).robust
    bc.sync(device)
    seconds = time.perf_counter() - start
    counts = DynamoCounters.now().since(before) if target is compiled else None
    return {"variant": variant, "seconds": seconds, "warmup_s": warm, "robust": robust.bool(),
            "compile_during_run": counts}


def compare(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Each row with seconds per example, its ratio to raw AutoAttack's seconds, robust
    accuracy and its disagreements with fp32's outcomes; JSON-ready (flags as lists)."""
    ref = next(r["robust"] for r in rows if r["variant"] == REFERENCE)
    raw = next((r["seconds"] for r in rows if r["variant"] == "raw"), None)
    out = []
    for r in rows:
        flags = r["robust"]
        out.append({**{k: v for k, v in r.items() if k != "robust"},
                    "seconds_per_example": r["seconds"] / n,
                    "ratio_to_raw": r["seconds"] / raw if raw else None,
                    "robust_accuracy": float(flags.float().mean()),
                    "robust_here_only": int((flags & ~ref).sum()),
                    "broken_here_only": int((~flags & ref).sum()),
                    "robust": flags.tolist()})
    return out


def run_variants(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, attacks: Sequence[str],
                 variants: Sequence[str], eps: float, batch_size: int, device: torch.device,
                 restarts: int = 1, steps: int | None = None, aa_n: int | None = None,
                 on_part: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every variant of every attack on (x, y) (standard AutoAttack on the first ``aa_n``),
    one compiled module shared by the compiled variants -> a part per attack; ``on_part`` gets
    the parts so far after each attack (a long run keeps what it finished)."""
    compiled = None
    if any(v.endswith("+compile") for v in variants):
        check_compile(device)
        compiled = compile_model(model)
    parts = {}
    for attack in attacks:
        spec = attack_spec(attack, restarts=restarts, steps=steps)
        n = min(aa_n or len(y), len(y)) if attack == "autoattack" else len(y)
        rows = []
        for v in variants:
            rows.append(run_variant(model, compiled, x[:n], y[:n], v, spec, eps=eps,
                                    batch_size=min(batch_size, n), device=device))
            _log(f"  {attack} {v}: {rows[-1]['seconds']:.1f} s (warm-up "
                 f"{rows[-1]['warmup_s']:.1f} s), robust {rows[-1]['robust'].float().mean():.1%}, "
                 f"compiled in the run: {rows[-1]['compile_during_run']}")
        with torch.no_grad():
            clean = float((model(x[:n].to(device)).argmax(1).cpu() == y[:n]).float().mean())
        parts[attack] = {"n": n, "clean_accuracy": clean, "rows": compare(rows, n)}
        if on_part is not None:
            on_part(parts)
    return parts


def render_table(parts: dict[str, Any]) -> str:
    """The parts as one markdown table."""
    rows = []
    for attack, part in parts.items():
        for r in part["rows"]:
            c = r["compile_during_run"]
            rows.append([attack, part["n"], r["variant"], f"{r['seconds_per_example']:.3f}",
                         f"{r['ratio_to_raw']:.2f}x" if r["ratio_to_raw"] else "-",
                         f"{r['warmup_s']:.1f}" if c is not None else "-",
                         "-" if c is None else f"{c['frames_compiled']} / {c['recompiles']}",
                         f"{r['robust_accuracy']:.1%}",
                         f"{r['robust_here_only']} / {r['broken_here_only']}"])
    return bc.fmt_table(["attack", "n", "variant", "s / example", "vs raw AutoAttack",
                         "warm-up s", "compiles / recompiles in run", "robust acc.",
                         "differ from fp32: robust here / broken here"], rows, "lrlrrrrrr")


def render_markdown(payload: dict[str, Any]) -> str:
    env, s = payload["env"], payload["settings"]
    head = (f"Machine: {env['cpu']}, {env['cpu_count']} cores, torch threads "
            f"{env['torch_threads']}, device {env['device']}; {env['date_utc']}; torch "
            f"{env['torch']}, pyautoattack {payload['pyautoattack']}.\n\n"
            f"Command: `{env['command']}`\n\n"
            f"Model: {s['checkpoint']}; Linf eps {s['eps']}, batch {s['batch_size']}, seed 0, "
            f"APGD-CE {s['apgd_restarts']} restart(s) x {s['apgd_steps'] or 100}; clean "
            + ", ".join(f"{p['clean_accuracy']:.1%} ({a}, n={p['n']})"
                        for a, p in payload["parts"].items()) + ".\n")
    return head + "\n" + render_table(payload["parts"])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    if any(a not in ATTACKS for a in attacks):
        raise SystemExit(f"unknown attacks in {args.attacks!r}: choose from {', '.join(ATTACKS)}")
    variants = parse_variants(args.variants)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    model, spec = load_model(args.checkpoint, device)
    x, y = load_test_examples(args.checkpoint, spec, args.n_examples)
    t0 = time.time()
    payload = {"benchmark": "eval_precision", "env": bc.environment(device),
               "pyautoattack": backend_version("pyautoattack"),
               "settings": {**{k: v for k, v in vars(args).items()
                               if k not in ("output", "markdown")},
                            "batch_size": args.batch_size or args.n_examples}}

    def write(parts: dict[str, Any]) -> None:
        payload.update(wall_s=time.time() - t0, parts=parts)
        bc.write_json(args.output, payload)

    run_variants(model, x, y, attacks=attacks, variants=variants, eps=args.eps,
                 batch_size=args.batch_size or args.n_examples, device=device,
                 restarts=args.apgd_restarts, steps=args.apgd_steps, aa_n=args.aa_n_examples,
                 on_part=write)
    md = render_markdown(payload)
    write_text(args.markdown, md + "\n")
    print(md)
    return payload


if __name__ == "__main__":
    main()
