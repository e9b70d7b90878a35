#!/usr/bin/env python
"""The quickstart's training step under a controlled background load.

Each cell runs the quickstart's FGSM-RS step (xcit_nano_12_p8_224, 32x32 grayscale, 10 classes,
batch 128, Linf eps 0.1, AdamW; advvit's own model and loss factories, as the trainer builds
them) in a fresh process, while k busy processes (Python spin loops, started and stopped here)
compete for the cores. The grid is k x torch threads x OpenMP wait policy; the policy is read
when the OpenMP runtime starts, hence one process per cell.

For every cell it reports images/s and two ratios:

* ``vs fair``: images/s over the thread-fair share, ``alone x min(1, cores / (k + threads))``,
  where ``alone`` is the same threads and policy at k = 0: each runnable thread getting an equal
  slice of the cores. 1.0 means the load costs exactly its share; far below 1 means the threads
  lose more than the cores they give up (waiting at OpenMP barriers for a descheduled partner).
* ``vs best alone``: images/s over the fastest k = 0 cell, to compare settings directly.

The step runs on one fixed random batch (no data loader). The k = 0 cells are run again at the
end (``--no-repeat-alone`` to skip) so that a change in the machine's own load shows.

Example (about 12 minutes on 2 cores)::

    python scripts/bench_contention.py --output runs/bench/contention.json \\
        --markdown runs/bench/contention.md
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import write_text  # noqa: E402

MODEL = "xcit_nano_12_p8_224"
POLICIES = ("default", "passive")
SPIN = "while True: pass"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loads", default="0,1,2,3,4", help="background busy processes, comma list")
    p.add_argument("--threads", default="1,2", help="torch threads, comma list")
    p.add_argument("--policies", default=",".join(POLICIES),
                   help="OpenMP wait policy: default (the runtime's own) and/or passive "
                        "(OMP_WAIT_POLICY=PASSIVE)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (at most "
                   "--warmup-seconds of them)")
    p.add_argument("--warmup-seconds", type=float, default=20.0)
    p.add_argument("--seconds", type=float, default=15.0,
                   help="time steps until this much has passed (at least one step)")
    p.add_argument("--cell-timeout", type=float, default=240.0,
                   help="a cell still running after this many seconds is recorded as timed out")
    p.add_argument("--no-repeat-alone", action="store_true",
                   help="do not run the k = 0 cells again at the end")
    p.add_argument("--output", default=None, help="write results as JSON here")
    p.add_argument("--markdown", default=None, help="also write the table as markdown here")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only print (and --markdown) the table of an earlier --output file")
    p.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # threads, in a child
    return p.parse_args(argv)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _loadavg() -> Optional[List[float]]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


# ------------------------------------------------------------------------------------------------
# One cell, in a child process
# ------------------------------------------------------------------------------------------------

def run_cell(args) -> dict:
    import bench_common as bc  # imports torch: after the parent set OMP_WAIT_POLICY
    import torch
    from advvit import accel
    from advvit.losses import create_loss

    threads = accel.apply_threads(int(args.cell))
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = bc.build_model(MODEL, img_size=args.img_size, num_classes=10, device=device,
                           in_chans=1, normalize=((0.2860,), (0.3530,)))
    opt = bc.adamw(model)
    # The trainer's FGSM-RS: plain cross-entropy (smoothing 0), no input range check.
    loss = create_loss("fgsm", eps=args.eps, criterion=torch.nn.CrossEntropyLoss(),
                       check_range=False)
    step = bc.advvit_step(model, opt, loss, lambda: bc.autocast(device, None))
    x, y = bc.random_batch(args.batch, args.img_size, 10, device, in_chans=1)
    started = time.perf_counter()
    warm = 0
    while warm < args.warmup and time.perf_counter() - started < args.warmup_seconds:
        step(x, y)
        warm += 1
    times: List[float] = []
    unix0 = time.time()
    cpu0, t0 = time.process_time(), time.perf_counter()
    while not times or time.perf_counter() - t0 < args.seconds:
        s = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - s)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"threads": threads, "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "warmup_steps": warm, "steps": len(times), "wall_s": wall,
            "timed_from_unix": unix0, "timed_to_unix": unix0 + wall,
            "images_per_s": args.batch * len(times) / wall,
            "median_step_s": statistics.median(times), "min_step_s": min(times),
            "max_step_s": max(times), "step_s": times,
            # CPU seconds per wall second: above the useful work when threads spin-wait.
            "cpu_per_wall": cpu / wall}


# ------------------------------------------------------------------------------------------------
# The grid, in the parent
# ------------------------------------------------------------------------------------------------

def start_spinners(k: int) -> List[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", SPIN], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(k)]


def stop_spinners(procs: Sequence[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def cell_command(args, threads: int) -> List[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--cell", str(threads),
            "--batch", str(args.batch), "--img-size", str(args.img_size), "--eps", repr(args.eps),
            "--warmup", str(args.warmup), "--warmup-seconds", str(args.warmup_seconds),
            "--seconds", str(args.seconds)]


def cell_env(policy: str) -> Dict[str, str]:
    env = dict(os.environ)
    # The cell's threads come from --cell alone, and the policy from this table.
    env.pop("OMP_NUM_THREADS", None)
    env.pop("OMP_WAIT_POLICY", None)
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def _procs_running() -> Optional[int]:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("procs_running"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class RunQueueSampler:
    """Samples the machine's runnable thread count (/proc/stat procs_running) in a thread, so
    the load that other work adds beside the k busy processes can be read for any window."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            n = _procs_running()
            if n is not None:
                self.samples.append((time.time(), n))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def mean(self, start: float, end: float) -> Optional[float]:
        inside = [n for t, n in self.samples if start <= t <= end]
        return statistics.mean(inside) if inside else None


def measure(args, k: int, threads: int, policy: str) -> dict:
    rec = {"load": k, "threads": threads, "policy": policy, "loadavg_before": _loadavg()}
    try:
        with RunQueueSampler() as sampler:
            proc = subprocess.run(cell_command(args, threads), env=cell_env(policy),
                                  capture_output=True, text=True, timeout=args.cell_timeout)
    except subprocess.TimeoutExpired:
        rec.update(error=f"timed out after {args.cell_timeout:g} s")
    else:
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()
            rec.update(error=tail[-1] if tail else f"exit {proc.returncode}")
        else:
            rec.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            rec["threads"] = threads
            running = sampler.mean(rec["timed_from_unix"], rec["timed_to_unix"])
            # The sampler counts itself; the cell's threads count while they run or wait
            # for a core (spinning included), not while they sleep in a passive wait.
            rec["runnable_mean"] = running
            rec["others_runnable"] = None if running is None else \
                max(0.0, running - 1 - threads)
    rec["loadavg_after"] = _loadavg()
    return rec


def grid_cells(loads: Sequence[int], threads: Sequence[int], policies: Sequence[str],
               repeat_alone: bool) -> List[tuple]:
    """(k, threads, policy, pass) in run order: every k's settings together, their order
    rotating from k to k so that no setting always runs first after the load changes."""
    combos = [(t, p) for t in threads for p in policies]
    out = []
    for i, k in enumerate(loads):
        r = i % len(combos)
        out += [(k, t, p, 0) for t, p in combos[r:] + combos[:r]]
    if repeat_alone and 0 in loads:
        out += [(0, t, p, 1) for t, p in combos[::-1]]
    return out


def fair_share(alone: float, k: float, threads: int, cores: int) -> float:
    """Images/s if each runnable thread (k busy processes + ours) got an equal slice of the
    cores: ``alone * min(1, cores / (k + threads))``."""
    return alone * min(1.0, cores / (k + threads))


def add_ratios(cells: List[dict], cores: int) -> None:
    """``vs_fair`` and ``vs_best_alone`` on each cell with a result (first-pass k = 0 cells are
    the reference)."""
    refs = {(c["threads"], c["policy"]): c for c in cells
            if c["load"] == 0 and c.get("pass", 0) == 0 and "images_per_s" in c}
    alone = {key: c["images_per_s"] for key, c in refs.items()}
    best = max(alone.values()) if alone else None
    for c in cells:
        ref = alone.get((c["threads"], c["policy"]))
        ok = "images_per_s" in c
        c["fair_images_per_s"] = fair_share(ref, c["load"], c["threads"], cores) \
            if ref and ok else None
        c["vs_fair"] = c["images_per_s"] / c["fair_images_per_s"] \
            if c["fair_images_per_s"] else None
        c["vs_best_alone"] = c["images_per_s"] / best if best and ok else None
        # The same share with the measured runnable threads of everything else (the k busy
        # processes and the machine's other work) in place of k, for this cell and for its
        # k = 0 reference alike: the machine is never idle, so the reference shares it too.
        others = c.get("others_runnable")
        ref_others = refs[(c["threads"], c["policy"])].get("others_runnable") if ref else None
        c["fair_measured_images_per_s"] = (
            fair_share(ref, others, c["threads"], cores)
            / fair_share(1.0, ref_others, c["threads"], cores)
            if ok and ref and others is not None and ref_others is not None else None)
        c["vs_fair_measured"] = c["images_per_s"] / c["fair_measured_images_per_s"] \
            if c["fair_measured_images_per_s"] else None


def render_markdown(payload: dict) -> str:
    s, env = payload["settings"], payload["env"]
    lines = [f"{MODEL}, {s['img_size']}x{s['img_size']}x1, batch {s['batch']}, FGSM-RS eps "
             f"{s['eps']:g}; {env['usable_cores']} usable cores; {s['warmup']} warm-up steps "
             f"(at most {s['warmup_seconds']:g} s), then steps for {s['seconds']:g} s; "
             "`vs fair` = images/s / (alone x min(1, cores / (k + threads))); `others "
             "runnable`: the mean runnable threads besides the cell's while it was timed (the "
             "k busy processes and the machine's other work, from /proc/stat); `vs fair "
             "(measured)`: the same share with that count in place of k, in the cell and in its "
             "k = 0 reference alike", ""]
    header = ["k busy", "threads", "OMP wait", "images/s", "median step s", "vs fair",
              "others runnable", "vs fair (measured)", "vs best alone", "CPU s / s"]
    rows = []
    for c in payload["cells"]:
        k = f"{c['load']}" + (" (again)" if c.get("pass") else "")
        if "images_per_s" not in c:
            rows.append([k, c["threads"], c["policy"], c.get("error", "-"), *["-"] * 6])
            continue

        def num(key, fmt=".2f"):
            return "-" if c.get(key) is None else format(c[key], fmt)
        rows.append([k, c["threads"], c["policy"], num("images_per_s", ".1f"),
                     num("median_step_s"), num("vs_fair"), num("others_runnable", ".1f"),
                     num("vs_fair_measured"), num("vs_best_alone"), num("cpu_per_wall")])
    order = {p: i for i, p in enumerate(POLICIES)}
    rows.sort(key=lambda r: (int(str(r[0]).split()[0]), "again" in str(r[0]), r[1],
                             order.get(r[2], 9)))
    import bench_common as bc
    lines.append(bc.fmt_table(header, rows, "lll" + "r" * (len(header) - 3)))
    return "\n".join(lines)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def run_grid(args) -> dict:
    import bench_common as bc
    import torch
    from advvit import accel
    loads, threads = _ints(args.loads), _ints(args.threads)
    policies = [p for p in args.policies.split(",") if p]
    for p in policies:
        if p not in POLICIES:
            raise SystemExit(f"--policies: unknown policy {p!r}; choose from {POLICIES}")
    cores = accel.usable_cores()
    env = {**bc.environment(torch.device("cpu")), "usable_cores": cores,
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "uptime_before": _uptime()}
    cells: List[dict] = []
    started = time.time()
    spinners: List[subprocess.Popen] = []
    current = None
    try:
        for k, t, policy, pass_ in grid_cells(loads, threads, policies, not args.no_repeat_alone):
            if k != current:
                stop_spinners(spinners)
                spinners, current = start_spinners(k), k
                time.sleep(1.0)  # the spinners reach the run queue before the cell starts
            rec = measure(args, k, t, policy)
            rec["pass"] = pass_
            cells.append(rec)
            _log(f"k={k} threads={t} {policy}{' (again)' if pass_ else ''}: "
                 + (f"{rec['images_per_s']:.1f} images/s" if "images_per_s" in rec
                    else rec.get("error", "?")) + f"  load {rec['loadavg_after']}")
    finally:
        stop_spinners(spinners)
    env["uptime_after"] = _uptime()
    add_ratios(cells, cores)
    settings = {k: v for k, v in vars(args).items() if k not in ("cell", "render", "output",
                                                                 "markdown")}
    payload = {"benchmark": "contention", "model": MODEL, "env": env, "settings": settings,
               "wall_s": time.time() - started, "cells": cells}
    bc.write_json(args.output, payload)
    return payload


def main(argv=None):
    args = parse_args(argv)
    if args.cell is not None:
        print(json.dumps(run_cell(args)))
        return None
    if args.render:
        payload = json.loads(Path(args.render).read_text())
    else:
        payload = run_grid(args)
    md = render_markdown(payload)
    print(md)
    write_text(args.markdown, md + "\n")
    return payload


if __name__ == "__main__":
    main()
