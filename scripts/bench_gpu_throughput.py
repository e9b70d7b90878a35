#!/usr/bin/env python
"""Images/s of FGSM-RS adversarial training on one GPU, with the clean step and the attack alone.

Defaults are the H100 anchor setting of docs/benchmarks.md: xcit_small_12_p16_224 at 224x224,
1000 classes, batch 256, random data, AdamW, bf16 autocast. Every variant is built first (and, where
compiled, compiled and warmed up), then all are timed round-robin in one process and the median per
variant is reported.

A variant is ``WHAT:OPTS`` with WHAT one of

* ``fgsm-rs``: advvit's AdversarialLoss (FGSM-RS, eps 4/255) forward + backward + AdamW step;
* ``fgsm-rs-thesis``: the same step as a plain loop in the public thesis code's style (parameter
  gradients on during the attack, a grad-enabled clean forward), for reference;
* ``clean``: advvit's CleanLoss step;
* ``attack``: the attack alone (advvit.attacks.fgsm with a random start);

and OPTS ``+``-joined from ``eager`` / ``compile`` (torch.compile of the model, one compiled module
serving the attack and the training passes), ``fused`` (fused AdamW), ``cl`` (channels-last model and
input), ``check`` (keep the attack's input-range check, one host read per step; off otherwise).

On CUDA a second section evaluates as ``advvit.eval`` does (``scripts/bench_eval_precision.py``'s
functions): APGD-CE on ``--eval-n`` examples in fp32 eager, bf16 + compile and raw pyautoattack,
with seconds per example, the ratio to raw AutoAttack, robust accuracy and the examples whose
outcome differs from fp32's. Its model is ``--eval-checkpoint`` on its test examples, else the
benchmark's own model (random weights) on random inputs labelled by its own predictions.
``--eval-variants`` runs the section on the CPU too.

On the CPU the compiled variants are left out of the default list. Smoke run::

    python scripts/bench_gpu_throughput.py --device cpu --model xcit_nano_12_p16_224 --img-size 32 \\
        --batch 8 --steps 2 --rounds 1 --num-classes 10 --output /tmp/tp.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402  (imports advvit before timm)
import bench_eval_precision as bep  # noqa: E402

import torch  # noqa: E402

from advvit.attacks import fgsm  # noqa: E402
from advvit.losses import create_loss  # noqa: E402

DEFAULT_VARIANTS = (
    "clean:eager", "clean:compile+fused",
    "attack:eager", "attack:compile",
    "fgsm-rs-thesis:eager", "fgsm-rs-thesis:compile+fused",
    "fgsm-rs:eager", "fgsm-rs:eager+check", "fgsm-rs:eager+fused", "fgsm-rs:eager+cl",
    "fgsm-rs:compile", "fgsm-rs:compile+fused", "fgsm-rs:compile+fused+check",
    "fgsm-rs:compile+fused+cl",
)
EVAL_VARIANTS = "fp32,bf16+compile,raw"
WHATS = ("fgsm-rs", "fgsm-rs-thesis", "clean", "attack")
OPTS = ("eager", "compile", "fused", "cl", "check")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="xcit_small_12_p16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--eps", type=float, default=4 / 255)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds (median over them)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--device", default="cuda")
    p.add_argument("--amp", default="bf16", choices=["none", "bf16", "fp16"])
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode (default: torch's default; e.g. max-autotune-no-cudagraphs)")
    p.add_argument("--variants", default=None,
                   help="comma-separated WHAT:OPTS list (default: all; on the CPU all but compiled)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on the CPU")
    p.add_argument("--eval-variants", default=None,
                   help=f"evaluation section variants, of {','.join(bep.VARIANTS)} (default on "
                        f"CUDA: {EVAL_VARIANTS}; on the CPU: no section)")
    p.add_argument("--eval-n", type=int, default=256, help="evaluation section: examples")
    p.add_argument("--eval-batch", type=int, default=256, help="evaluation section: batch size")
    p.add_argument("--eval-steps", type=int, default=None,
                   help="evaluation section: APGD-CE iterations (default AutoAttack's 100)")
    p.add_argument("--eval-checkpoint", default=None,
                   help="evaluation section: an advvit checkpoint (default: the benchmark's model "
                        "with random weights on random inputs)")
    p.add_argument("--output", default=None, help="write results as JSON here")
    p.add_argument("--markdown", default=None, help="also write the table as markdown here")
    return p.parse_args(argv)


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def parse_variant(v):
    what, _, opts = v.partition(":")
    opts = set(o for o in (opts or "eager").split("+") if o)
    if what not in WHATS or not opts <= set(OPTS):
        raise SystemExit(f"bad variant {v!r}: WHAT in {WHATS}, OPTS from {OPTS}")
    if "eager" in opts and "compile" in opts:
        raise SystemExit(f"bad variant {v!r}: eager and compile")
    return what, opts


def _compile_stats():
    try:
        from torch._dynamo.utils import counters
        return {"unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
                "frames_ok": int(counters["frames"].get("ok", 0)),
                "recompiles": int(sum(counters["recompiles"].values()))
                if "recompiles" in counters else None}
    except Exception:  # pragma: no cover
        return {}


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.variants:
        names = [v for v in args.variants.split(",") if v]
    else:
        names = [v for v in DEFAULT_VARIANTS
                 if device.type != "cpu" or "compile" not in v.split(":")[1]]
    specs = {n: parse_variant(n) for n in names}
    env = bc.environment(device)
    amp_ctx = lambda: bc.autocast(device, args.amp)  # noqa: E731

    models = {}  # (compile, channels_last) -> (module, compiled-or-same module)

    def model_for(compiled, cl):
        key = (compiled, cl)
        if key not in models:
            torch.manual_seed(0)
            m = bc.build_model(args.model, img_size=args.img_size, num_classes=args.num_classes,
                               device=device, channels_last=cl)
            models[key] = (m, torch.compile(m, mode=args.compile_mode) if compiled else m)
        return models[key]

    steps, batches = {}, {}
    for name, (what, opts) in specs.items():
        cl = "cl" in opts
        base, run = model_for("compile" in opts, cl)
        batches[name] = bc.random_batch(args.batch, args.img_size, args.num_classes, device,
                                        channels_last=cl)
        if what == "attack":
            eps = args.eps
            check = "check" in opts

            def step(x, y, run=run, eps=eps, check=check):
                with amp_ctx():
                    fgsm(run, x, y, eps=eps, check_range=check)
        else:
            opt = bc.adamw(base, fused="fused" in opts)
            if what == "clean":
                step = bc.advvit_step(run, opt, create_loss("clean"), amp_ctx)
            elif what == "fgsm-rs":
                loss = create_loss("fgsm", eps=args.eps, check_range="check" in opts)
                step = bc.advvit_step(run, opt, loss, amp_ctx)
            else:
                step = bc.thesis_step(run, opt, kind="adversarial", steps=1, eps=args.eps,
                                      amp_ctx=amp_ctx)
        steps[name] = step

    t0 = time.time()
    # Warm up (and compile) every variant before any timing; record what compiling produced.
    for name in names:
        x, y = batches[name]
        t = time.time()
        for _ in range(args.warmup):
            steps[name](x, y)
        bc.sync(device)
        _log(f"  warm-up {name}: {time.time() - t:.1f}s")
    after_warmup = _compile_stats()
    times = bc.interleaved_times(steps, lambda n: batches[n], device=device, rounds=args.rounds,
                                 iters=args.steps, warmup=0, log=_log)
    after_timing = _compile_stats()
    rows = []
    for name in names:
        what, opts = specs[name]
        t = times[name]
        rows.append({"variant": name, "what": what, "opts": sorted(opts),
                     "median_s": t["median_s"], "images_per_s": args.batch / t["median_s"],
                     "min_s": t["min_s"], "max_s": t["max_s"], "samples_s": t["samples_s"]})
    peak = None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    eval_variants = args.eval_variants or (EVAL_VARIANTS if device.type == "cuda" else None)
    evaluation = eval_section(args, device, eval_variants) if eval_variants else None
    payload = {"benchmark": "gpu_throughput", "env": env,
               "settings": {k: v for k, v in vars(args).items() if k not in ("output", "markdown")},
               "compile_stats": {"after_warmup": after_warmup, "after_timing": after_timing,
                                 "graphs_added_while_timing":
                                     (after_timing.get("unique_graphs", 0)
                                      - after_warmup.get("unique_graphs", 0))},
               "max_memory_allocated_gib": peak, "wall_s": time.time() - t0, "results": rows,
               "eval_precision": evaluation}
    bc.write_json(args.output, payload)
    md = render_markdown(payload)
    print(md)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(md + "\n")
    return payload


def eval_section(args, device, variants):
    """APGD-CE as ``advvit.eval`` runs it, per variant of ``bench_eval_precision``."""
    # The training timing ran with TF32 matmuls; fp32 here means what the eval CLI runs (torch's
    # default, TF32 off), so the fp32 outcomes are the reference they are everywhere else.
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        if args.eval_checkpoint:
            model, spec = bep.load_model(args.eval_checkpoint, device)
            x, y = bep.load_test_examples(args.eval_checkpoint, spec, args.eval_n)
            source = args.eval_checkpoint
        else:
            torch.manual_seed(0)
            model = bc.build_model(args.model, img_size=args.img_size,
                                   num_classes=args.num_classes, device=device).eval()
            x, _ = bc.random_batch(args.eval_n, args.img_size, args.num_classes,
                                   torch.device("cpu"))
            with torch.no_grad():  # its own predictions: every example starts clean
                y = torch.cat([model(xb.to(device)).argmax(1).cpu()
                               for xb in x.split(args.eval_batch)])
            source = f"{args.model}, random weights, random inputs"
        parts = bep.run_variants(model, x, y, attacks=["apgd-ce"],
                                 variants=bep.parse_variants(variants), eps=args.eps,
                                 batch_size=args.eval_batch, device=device,
                                 steps=args.eval_steps)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return {"model": source, "eps": args.eps, "steps": args.eval_steps or 100, "parts": parts}


def render_markdown(payload):
    s = payload["settings"]
    ref = {r["variant"]: r for r in payload["results"]}
    base = ref.get("fgsm-rs:eager")
    lines = [f"**{s['model']}**, {s['img_size']}x{s['img_size']}, batch {s['batch']}, "
             f"{s['num_classes']} classes, amp {s['amp']}, device {s['device']}, "
             f"{s['rounds']} rounds x {s['steps']} steps", ""]
    rows = []
    for r in payload["results"]:
        rel = f"{base['median_s'] / r['median_s']:.2f}x" if base and r["what"] == "fgsm-rs" else "-"
        rows.append([r["variant"], f"{r['median_s'] * 1000:.1f}", f"{r['images_per_s']:,.0f}", rel])
    lines.append(bc.fmt_table(["variant", "ms / step", "images/s", "vs fgsm-rs:eager"], rows,
                              "lrrr"))
    cs = payload["compile_stats"]
    lines.append("")
    lines.append(f"Compiled graphs after warm-up: {cs['after_warmup'].get('unique_graphs')}; "
                 f"added while timing: {cs['graphs_added_while_timing']}.")
    ev = payload.get("eval_precision")
    if ev:
        lines += ["", f"Evaluation, APGD-CE 1 restart x {ev['steps']}, Linf eps {ev['eps']:.4g}, "
                      f"{ev['model']}:", "", bep.render_table(ev["parts"])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
