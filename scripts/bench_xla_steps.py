#!/usr/bin/env python
"""Compiles and time per step of adversarial training on torch-xla (PJRT), steps 1..N.

For each case (FGSM-RS = 1 attack step, PGD-2 = 2 attack steps) a small XCiT (timm
``xcit_nano_12_p16_224`` at 32x32, cut to ``--depth`` XCA blocks, as tests/test_xla.py does) is
trained for ``--steps`` steps through ``advvit.engine.train_one_epoch`` with
``advvit.losses.AdversarialLoss(attack_mode="train", on_step=accel.barrier)`` and a linear eps
warm-up (eps changes every step, as in real training). After every step (when the engine asks
for the next batch) the script waits for the device (``xm.wait_device_ops``) and reads
``torch_xla.debug.metrics``: the CompileTime metric (count and total), ExecuteTime (graphs run)
and TransferFromDeviceTime (device-to-host copies). A step's wall time is the time between two
batch requests, execution included (the wait makes each step synchronous).

Each case runs in a fresh process, so the second case cannot reuse the first case's compiled
graphs. Needs torch_xla (the project's ``.venv-xla``); elsewhere it prints why and exits 3, or
with ``--output`` writes ``{"skipped": reason}``.

Examples::

    PJRT_DEVICE=CPU .venv-xla/bin/python scripts/bench_xla_steps.py \\
        --output runs/bench/xla_steps.json --markdown runs/bench/xla_steps.md
    .venv-xla/bin/python scripts/bench_xla_steps.py --cases pgd2 --steps 5 --depth 1 --batch 4
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import cpu_model, write_text  # noqa: E402

# torch-xla reads these when its runtime starts, so before it is imported. A low LLVM
# optimisation level makes each CPU compile much faster (the graphs run slower).
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
REPO = Path(__file__).resolve().parents[1]
CASES = {"fgsm": 1, "pgd2": 2}  # name -> attack steps
SKIP_EXIT = 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"subset of {','.join(CASES)}")
    p.add_argument("--steps", type=int, default=20, help="training steps per case")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--depth", type=int, default=1, help="XCA blocks of the XCiT-N12 (12: full)")
    p.add_argument("--eps", type=float, default=8 / 255)
    p.add_argument("--warmup-steps", type=int, default=20, help="linear eps warm-up length")
    p.add_argument("--log-interval", type=int, default=5,
                   help="steps between metric reads (one device-to-host copy each)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (host side)")
    p.add_argument("--optimized-compile", action="store_true",
                   help="leave XLA's LLVM optimisation on (slower compiles, faster graphs); by "
                        f"default XLA_FLAGS gets {FAST_COMPILE_FLAGS!r} unless already set")
    p.add_argument("--output", default=None, help="write results as JSON here")
    p.add_argument("--markdown", default=None, help="also write the tables as markdown here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # run one case, JSON to stdout
    return p.parse_args(argv)


def _xla_env(args) -> dict:
    env = dict(os.environ)
    env.setdefault("PJRT_DEVICE", "CPU")
    if not args.optimized_compile:
        env.setdefault("XLA_FLAGS", FAST_COMPILE_FLAGS)
    return env


# ------------------------------------------------------------------------------------------------
# One case, in its own process
# ------------------------------------------------------------------------------------------------

def run_case(args, case: str) -> dict:
    import advvit  # noqa: F401  (before timm: the torchvision guard)
    from advvit import accel
    import timm
    import torch
    import torch_xla
    import torch_xla.core.xla_model as xm
    import torch_xla.debug.metrics as met

    from advvit.engine import StepSettings, train_one_epoch
    from advvit.losses import AdversarialLoss
    from advvit.schedules import EpsSchedule

    torch.set_num_threads(args.threads)
    rt = accel.setup("xla")
    torch.manual_seed(0)
    model = timm.create_model("xcit_nano_12_p16_224", img_size=args.img_size,
                              num_classes=args.num_classes, depth=args.depth)
    model = accel.wrap_model(model, rt)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    barriers = [0]

    def on_step() -> None:
        barriers[0] += 1
        accel.barrier(rt)

    # attack_mode="train": torch-xla 2.9 has no backward for eval-mode BatchNorm (XCiT has it).
    loss_fn = AdversarialLoss(eps=args.eps, steps=CASES[case], attack_mode="train",
                              on_step=on_step)
    # Started one step in (eps 0 would skip the attack): eps differs at every step.
    schedule = EpsSchedule(eps=args.eps, shape="linear", warmup_steps=args.warmup_steps)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.rand(args.batch, 3, args.img_size, args.img_size, generator=gen),
                torch.randint(0, args.num_classes, (args.batch,), generator=gen))
               for _ in range(args.steps)]

    def metric(name: str) -> tuple:
        data = met.metric_data(name)
        return (int(data[0]), float(data[1]) / 1e9) if data else (0, 0.0)

    def snapshot() -> dict:
        xm.wait_device_ops()  # execution is asynchronous: count and time what really ran
        compiled, compile_s = metric("CompileTime")
        executed, execute_s = metric("ExecuteTime")
        to_host, _ = metric("TransferFromDeviceTime")
        return {"t": time.perf_counter(), "compiled": compiled, "compile_s": compile_s,
                "executed": executed, "execute_s": execute_s, "to_host": to_host,
                "barriers": barriers[0]}

    snaps = [snapshot()]

    def loader():
        for batch in batches:
            yield batch
            snaps.append(snapshot())  # the engine asks for the next batch once a step is done

    first_step = 1
    totals, _ = train_one_epoch(model=model, loss_fn=loss_fn, loader=loader(),
                                optimizer=optimizer, rt=rt, eps_schedule=schedule, epoch=0,
                                step=first_step,
                                settings=StepSettings(log_interval=args.log_interval))
    rows = []
    for i, (a, b) in enumerate(zip(snaps, snaps[1:]), start=1):
        rows.append({"step": i, "global_step": first_step + i, "eps": schedule(first_step + i - 1),
                     "wall_s": b["t"] - a["t"],
                     "compiles": b["compiled"] - a["compiled"],
                     "compiles_cum": b["compiled"] - snaps[0]["compiled"],
                     "compile_s": b["compile_s"] - a["compile_s"],
                     "executed": b["executed"] - a["executed"],
                     "execute_s": b["execute_s"] - a["execute_s"],
                     "to_host": b["to_host"] - a["to_host"],
                     "barriers": b["barriers"] - a["barriers"],
                     "metric_read": (first_step + i) % args.log_interval == 0})
    compiling = [r["step"] for r in rows if r["compiles"]]
    last = max(compiling) if compiling else 0
    steady = [r["wall_s"] for r in rows if r["step"] > last]
    steady_sorted = sorted(steady)
    return {
        "case": case, "attack_steps": CASES[case], "rows": rows,
        "compile_steps": compiling, "last_compile_step": last,
        "flat_after_warmup": bool(compiling) and last < len(rows),
        "compiles_total": rows[-1]["compiles_cum"] if rows else 0,
        "compile_s_total": sum(r["compile_s"] for r in rows),
        "steady_steps": len(steady),
        "steady_median_wall_s": steady_sorted[len(steady) // 2] if steady else None,
        "loss": totals.get("loss"),
        "versions": {"torch": torch.__version__, "torch_xla": torch_xla.__version__,
                     "timm": timm.__version__},
        "device": str(rt.device), "xla_device_kind": xm.xla_device_hw(rt.device),
    }


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------

def markdown(payload: dict) -> str:
    env = payload["env"]
    out = [f"Machine: {env['cpu']}, {env['cpu_count']} cores; {env['date_utc']}; "
           f"torch {env.get('torch')}, torch_xla {env.get('torch_xla')}, timm {env.get('timm')}, "
           f"PJRT_DEVICE={env['PJRT_DEVICE']}, XLA_FLAGS={env['XLA_FLAGS']!r}.",
           f"Command: `{env['command']}`", ""]
    s = payload["settings"]
    out.append(f"xcit_nano_12_p16_224 depth {s['depth']}, {s['img_size']}x{s['img_size']}, "
               f"batch {s['batch']}, AdamW, eps linear warm-up to {s['eps']:.5f} over "
               f"{s['warmup_steps']} steps, metric read every {s['log_interval']} steps.")
    out.append("")
    cases = payload["cases"]
    head = ["step"]
    for c in cases:
        head += [f"{c['case']} wall s", f"{c['case']} compiles (cum.)", f"{c['case']} compile s",
                 f"{c['case']} graphs run"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "|".join("---:" for _ in head) + "|")
    n = max(len(c["rows"]) for c in cases)
    for i in range(n):
        cells = [str(i + 1)]
        for c in cases:
            if i < len(c["rows"]):
                r = c["rows"][i]
                mark = "*" if r["metric_read"] else ""
                cells += [f"{r['wall_s']:.2f}", f"{r['compiles']} ({r['compiles_cum']})",
                          f"{r['compile_s']:.2f}", f"{r['executed']}{mark}"]
            else:
                cells += ["", "", "", ""]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out.append("`*`: a metric-read step (one device-to-host copy).")
    out.append("")
    for c in cases:
        verdict = (f"flat after step {c['last_compile_step']}" if c["flat_after_warmup"]
                   else "NOT flat: compiles up to the last step")
        med = c["steady_median_wall_s"]
        out.append(f"- {c['case']}: {c['compiles_total']} compiles in {c['compile_s_total']:.1f} s "
                   f"(steps {c['compile_steps']}); count {verdict}; median wall time of the "
                   f"{c['steady_steps']} steps after it: "
                   + (f"{med:.3f} s" if med is not None else "n/a"))
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print("@@RESULT@@" + json.dumps(run_case(args, args.child)))
        return 0
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        raise SystemExit(f"--cases: unknown {unknown}; use {','.join(CASES)}")
    env = _xla_env(args)
    probe = subprocess.run([sys.executable, "-c", "import torch_xla"], env=env,
                           capture_output=True, text=True)
    if probe.returncode != 0:
        reason = (f"torch_xla is not importable by {sys.executable}; run this with the XLA "
                  "environment (scripts/setup_xla_env.sh, then .venv-xla/bin/python)")
        print(reason, file=sys.stderr)
        write_text(args.output, json.dumps({"benchmark": "xla_steps", "skipped": reason}, indent=2) + "\n")
        return SKIP_EXIT
    results = []
    base = [a for a in (argv if argv is not None else sys.argv[1:])]
    for case in cases:
        cmd = [sys.executable, str(Path(__file__).resolve()), *base, "--child", case]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"case {case} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@"))
        res = json.loads(line[len("@@RESULT@@"):])
        res["process_wall_s"] = time.perf_counter() - t0
        results.append(res)
        print(f"{case}: {res['compiles_total']} compiles, last at step "
              f"{res['last_compile_step']}, {res['process_wall_s']:.0f} s", file=sys.stderr)
    versions = results[0]["versions"]
    payload = {
        "benchmark": "xla_steps",
        "env": {"date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                "python": platform.python_version(), **versions,
                "PJRT_DEVICE": env.get("PJRT_DEVICE"), "XLA_FLAGS": env.get("XLA_FLAGS", ""),
                "torch_threads": args.threads},
        "settings": {"steps": args.steps, "batch": args.batch, "img_size": args.img_size,
                     "num_classes": args.num_classes, "depth": args.depth, "eps": args.eps,
                     "warmup_steps": args.warmup_steps, "log_interval": args.log_interval},
        "cases": results,
    }
    write_text(args.output, json.dumps(payload, indent=2) + "\n")
    md = markdown(payload)
    write_text(args.markdown, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
