#!/usr/bin/env python
"""What the quickstart's APGD-CE number depends on beyond the seed: torch threads and the CPU
instruction set torch's kernels dispatch to.

For each torch thread count and each instruction set this CPU runs (``ATEN_CPU_CAPABILITY`` =
default / avx2 / avx512, those /proc/cpuinfo allows; avx2-mkl also caps MKL and oneDNN at AVX2),
it runs, in a fresh process each,

* the quickstart's evaluation: ``python -m advvit.eval --checkpoint CKPT --attack apgd-ce
  --restarts 1 --eps 0.1 --n-examples 250 --batch-size 250 --per-example --threads T``;
* a probe of the same model on the same examples: its clean logits and the input gradient of
  the summed cross-entropy (the direction of APGD's first step), saved to compare across cells.

It reports clean and APGD-CE accuracy per cell, the examples whose outcome differs from the
first cell's, and how far the logits and gradients are from the first cell's. The first cell is
run again at the end (``--no-repeat``), which tells whether one setting repeats itself.

Example (about 10 minutes on 2 cores)::

    python scripts/check_reproducibility.py --checkpoint output/quickstart/best.pth \\
        --out-dir output/reproducibility
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import cpu_model, write_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_AVX2 = ("avx2", "fma")
_AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq")
# name -> (the /proc/cpuinfo flags it needs, the environment that selects it). ATen's own
# vectorized kernels (element-wise, reductions, softmax) follow ATEN_CPU_CAPABILITY; the matrix
# products go to MKL / oneDNN, which pick their instruction set themselves: avx2-mkl caps those
# too, which is how far the environment can imitate a CPU without AVX-512.
CAPABILITIES = {
    "default": ((), {"ATEN_CPU_CAPABILITY": "default"}),
    "avx2": (_AVX2, {"ATEN_CPU_CAPABILITY": "avx2"}),
    "avx512": (_AVX512, {"ATEN_CPU_CAPABILITY": "avx512"}),
    "avx2-mkl": (_AVX2, {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                         "ONEDNN_MAX_CPU_ISA": "AVX2"}),
}
EVAL_ARGS = ("--dataset", "fashion_mnist", "--attack", "apgd-ce", "--restarts", "1",
             "--eps", "0.1", "--batch-size", "250")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="output/quickstart/best.pth")
    p.add_argument("--out-dir", default="output/reproducibility",
                   help="each cell's eval report and probe go here")
    p.add_argument("--threads", default="1,2", help="torch threads, comma list")
    p.add_argument("--capabilities", default="available",
                   help=f"comma list of {', '.join(CAPABILITIES)}, or 'available': those this "
                        "CPU runs")
    p.add_argument("--n-examples", type=int, default=250)
    p.add_argument("--no-repeat", action="store_true", help="do not rerun the first cell")
    p.add_argument("--output", default=None, help="summary JSON (default: OUT_DIR/summary.json)")
    p.add_argument("--markdown", default=None, help="also write the tables as markdown here")
    p.add_argument("--render", default=None, metavar="JSON", help="only print (and --markdown) "
                   "the tables of an earlier summary")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # output file, in a child
    p.add_argument("--probe-threads", type=int, default=1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_flags(text: Optional[str] = None) -> set:
    """The flags line of /proc/cpuinfo (or of ``text``) as a set."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def available_capabilities(flags: Iterable[str]) -> List[str]:
    """The names of :data:`CAPABILITIES` a CPU with ``flags`` can run."""
    have = set(flags)
    return [cap for cap, (need, _) in CAPABILITIES.items() if all(f in have for f in need)]


# ------------------------------------------------------------------------------------------------
# The probe, in a child process
# ------------------------------------------------------------------------------------------------

def probe(args) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from advvit import accel
    from advvit import eval as E

    accel.apply_threads(args.probe_threads)
    loaded = E.load_checkpoint_model(args.checkpoint)
    ex = E.load_examples("fashion_mnist", loaded.trained_on.get("data_dir"), split="val",
                         in_chans=loaded.in_chans, img_size=loaded.img_size,
                         n_examples=args.n_examples)
    x = ex.x.clone().requires_grad_(True)
    logits = loaded.model(x)
    grad, = torch.autograd.grad(F.cross_entropy(logits, ex.y, reduction="sum"), x)
    np.savez(args.probe, logits=logits.detach().numpy(), grad=grad.numpy(),
             capability=torch.backends.cpu.get_cpu_capability(),
             threads=torch.get_num_threads())


# ------------------------------------------------------------------------------------------------
# The grid, in the parent
# ------------------------------------------------------------------------------------------------

def cell_env(capability: str) -> Dict[str, str]:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "ATEN_CPU_CAPABILITY",
                 "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA"):
        env.pop(name, None)  # the cell's --threads and capability decide
    env.update(CAPABILITIES[capability][1])
    # Idle OpenMP threads sleep instead of spinning: on a shared machine two spinning threads
    # stall each other (docs/benchmarks.md); the policy decides how threads wait, not how the
    # work is split, so the numbers do not depend on it.
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_cell(args, threads: int, capability: str, name: str) -> dict:
    out = Path(args.out_dir).resolve()
    report, probe_file = out / f"{name}.json", out / f"{name}_probe.npz"
    rec = {"name": name, "threads": threads, "capability": capability,
           "report": str(report), "probe": str(probe_file)}
    env = cell_env(capability)
    started = time.time()
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--probe", str(probe_file),
                        "--probe-threads", str(threads),
                        "--checkpoint", str(Path(args.checkpoint).resolve()),
                        "--n-examples", str(args.n_examples)], env=env, capture_output=True,
                       text=True)
    if p.returncode != 0:
        rec["error"] = "probe: " + (p.stderr.strip().splitlines() or ["failed"])[-1]
        return rec
    cmd = [sys.executable, "-m", "advvit.eval", "--checkpoint",
           str(Path(args.checkpoint).resolve()), *EVAL_ARGS,
           "--n-examples", str(args.n_examples), "--per-example", "--threads", str(threads),
           "--output", str(report)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    rec["seconds"] = round(time.time() - started, 1)
    if p.returncode != 0:
        rec["error"] = "eval: " + (p.stderr.strip().splitlines() or ["failed"])[-1]
    return rec


def read_cell(rec: dict) -> dict:
    """The cell's numbers from its eval report: accuracies, what the process ran with, and
    each example's (clean, robust) outcome by index."""
    report = json.loads(Path(rec["report"]).read_text())
    env = report.get("environment", {})
    return {**rec, "clean_accuracy": report["clean_accuracy"],
            "robust_accuracy": report["robust_accuracy"]["value"],
            "torch_threads": env.get("torch_threads"),
            "cpu_capability_seen": env.get("cpu_capability"),
            "outcomes": {int(e["index"]): [bool(e["clean"]), bool(e["robust"])]
                         for e in report["per_example"]}}


def compare(cells: List[dict]) -> None:
    """Adds, to each cell, the examples whose clean or robust outcome differs from the first
    cell's (``clean_flips`` / ``robust_flips``: indices)."""
    ref = cells[0]["outcomes"]
    for c in cells:
        out = c["outcomes"]
        c["clean_flips"] = sorted(i for i in ref if out.get(i, [None])[0] != ref[i][0])
        c["robust_flips"] = sorted(i for i in ref if out.get(i, [None, None])[1] != ref[i][1])


def compare_probes(cells: List[dict]) -> None:
    """Max |difference| of logits and input gradients from the first cell's, and the number
    of examples whose predicted class differs."""
    import numpy as np
    ref = np.load(cells[0]["probe"])
    for c in cells:
        q = np.load(c["probe"])
        c["logits_max_abs_diff"] = float(np.abs(q["logits"] - ref["logits"]).max())
        c["grad_max_abs_diff"] = float(np.abs(q["grad"] - ref["grad"]).max())
        c["grad_sign_changes"] = int((np.sign(q["grad"]) != np.sign(ref["grad"])).sum())
        c["argmax_changes"] = int((q["logits"].argmax(1) != ref["logits"].argmax(1)).sum())
        c["probe_capability"] = str(q["capability"])


def summarize(cells: List[dict]) -> dict:
    """Which numbers agree across the cells that ran, to the digit, and the spread of those
    that do not."""
    ok = [c for c in cells if "robust_accuracy" in c]
    out = {}
    for key in ("clean_accuracy", "robust_accuracy"):
        values = sorted({round(c[key] * 100, 2) for c in ok})
        out[key] = {"values_pct": values, "same_everywhere": len(values) <= 1,
                    "spread_pct": round(values[-1] - values[0], 2) if values else None}
    flipped = sorted({i for c in ok for i in c.get("robust_flips", [])})
    out["robust_flipped_examples"] = {
        str(i): [c["name"] for c in ok if c["outcomes"][i][1]] for i in flipped}
    return out


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def render_markdown(payload: dict) -> str:
    import bench_common as bc
    rows = []
    for c in payload["cells"]:
        if "robust_accuracy" not in c:
            rows.append([c["name"], c["threads"], c["capability"], c.get("error", "-"),
                         *["-"] * 7])
            continue
        flips = c["robust_flips"]
        rows.append([c["name"], c["torch_threads"], c["cpu_capability_seen"],
                     _pct(c["clean_accuracy"]), _pct(c["robust_accuracy"]),
                     len(c["clean_flips"]), len(flips),
                     ", ".join(map(str, flips[:8])) + (" ..." if len(flips) > 8 else "") or "-",
                     f"{c.get('logits_max_abs_diff', float('nan')):.2e}",
                     f"{c.get('grad_max_abs_diff', float('nan')):.2e}",
                     c.get("seconds", "-")])
    header = ["cell", "threads", "ATen kernels", "clean", "APGD-CE", "clean flips",
              "APGD-CE flips", "flipped examples", "max logit diff", "max grad diff", "s"]
    s = payload["summary"]
    lines = [bc.fmt_table(header, rows, "lll" + "r" * 8), "",
             "Flips, logit and gradient differences are against the first cell. "
             f"Clean accuracy: {', '.join(f'{v:.2f}%' for v in s['clean_accuracy']['values_pct'])}"
             f"; APGD-CE: {', '.join(f'{v:.2f}%' for v in s['robust_accuracy']['values_pct'])}"
             f" (spread {s['robust_accuracy']['spread_pct']} points)."]
    if s["robust_flipped_examples"]:
        lines.append("")
        lines.append(bc.fmt_table(["example", "robust in"], [
            [i, ", ".join(names) or "none"] for i, names in s["robust_flipped_examples"].items()]))
    return "\n".join(lines)


def grid(threads: Sequence[int], capabilities: Sequence[str], repeat: bool) -> List[tuple]:
    """(threads, capability, name) in run order; the first cell again at the end."""
    cells = [(t, cap, f"t{t}_{cap}") for cap in capabilities for t in threads]
    if repeat and cells:
        t, cap, name = cells[0]
        cells.append((t, cap, f"{name}_again"))
    return cells


def main(argv=None):
    args = parse_args(argv)
    if args.probe:
        return probe(args)
    if args.render:
        payload = json.loads(Path(args.render).read_text())
    else:
        threads = [int(v) for v in args.threads.split(",") if v.strip()]
        available = available_capabilities(cpu_flags())
        caps = available if args.capabilities == "available" else \
            [c for c in args.capabilities.split(",") if c]
        for c in caps:
            if c not in CAPABILITIES:
                raise SystemExit(f"--capabilities: unknown {c!r}; choose from "
                                 f"{list(CAPABILITIES)}")
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        import torch
        env = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "native_capability": torch.backends.cpu.get_cpu_capability(),
               "available_capabilities": available, "checkpoint": args.checkpoint,
               "eval_args": [*EVAL_ARGS, "--n-examples", str(args.n_examples)],
               "date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        cells = []
        for t, cap, name in grid(threads, caps, not args.no_repeat):
            _log(f"{name}: running")
            rec = run_cell(args, t, cap, name)
            if "error" not in rec:
                rec = read_cell(rec)
                _log(f"{name}: clean {_pct(rec['clean_accuracy'])}, APGD-CE "
                     f"{_pct(rec['robust_accuracy'])} ({rec['seconds']} s)")
            else:
                _log(f"{name}: {rec['error']}")
            cells.append(rec)
        good = [c for c in cells if "robust_accuracy" in c]
        if good:
            compare(good)
            compare_probes(good)
        payload = {"check": "reproducibility", "env": env, "cells": cells,
                   "summary": summarize(cells)}
        out = args.output or str(Path(args.out_dir) / "summary.json")
        Path(out).write_text(json.dumps(payload, indent=2) + "\n")
    md = render_markdown(payload)
    print(md)
    write_text(args.markdown, md + "\n")
    return payload


if __name__ == "__main__":
    main()
