"""``python -m advvit.findings {plan,run,report,verify} [EXPERIMENT ...]``.

``plan`` prints every unit with its state and estimated minutes; ``run`` runs what is not done
(then writes the results; an experiment that ``waits_for`` something is skipped); ``report``
writes ``docs/findings/<id>.json`` and its figure from what has finished, and
``docs/findings.md`` from every record; ``verify`` measures one of a record's measurements
again from nothing (its training included) under ``ROOT/verify`` and names what differs from
the record (exit 1 when a number is outside the record's band). EXPERIMENT is a file stem
(``02_eps_warmup``) or a claim number; none: all.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from typing import Optional, Sequence

from ..io import atomic_write_text
from .markdown import render
from .plan import plan_lines
from .results import (build_result, compare_measurement, measurement_unit, rebuild_result,
                      validate_result, write_result)
from .runner import RunFailed, check_configs, run_experiment
from .spec import FindingsError, add_suite_options, load_experiments, run_env


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m advvit.findings", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("plan", "run", "report", "verify"))
    add_suite_options(p)
    p.add_argument("--yes", action="store_true", help="run without printing the plan first")
    p.add_argument("--measurement", type=int, default=0,
                   help="verify: which of the record's measurements (its index, default 0)")
    return p


def _command(args: argparse.Namespace, exp_id: str) -> str:
    words = ["python", "-m", "advvit.findings", "run", exp_id]
    if args.configs != "configs/findings":
        words += ["--configs", args.configs]
    return " ".join(shlex.quote(w) for w in words)


def _report(exps, args) -> None:
    """Write each experiment's record, then findings.md from every record. Where the file
    already there holds more measurements than the runs under --root (a fresh checkout has the
    records but not the runs), its measurements are judged anew instead."""
    for exp in exps:
        data = build_result(exp, args.root, _command(args, exp.id))
        path = os.path.join(args.results, f"{exp.id}.json")
        if os.path.isfile(path):
            with open(path) as fh:
                old = json.load(fh)
            if len(old.get("measurements", [])) > len(data["measurements"]):
                print(f"claim {exp.claim} ({exp.id}): judged anew from the "
                      f"{len(old['measurements'])} measurements in {path} "
                      f"({len(data['measurements'])} under {args.root})")
                data = rebuild_result(exp, old, _command(args, exp.id))
        path = write_result(data, args.results)
        print(f"claim {exp.claim} ({exp.id}): {data['verdict']} -> {path}")
    records = []
    for exp in load_experiments(args.configs):
        path = os.path.join(args.results, f"{exp.id}.json")
        if os.path.isfile(path):
            with open(path) as fh:
                records.append(json.load(fh))
    for record in records:
        validate_result(record)
    page = os.path.join(os.path.dirname(os.path.abspath(args.results)), "findings.md")
    atomic_write_text(page, render(records))
    print(f"{len(records)} records -> {page}")


def _run(exp, root, env, only=None) -> Optional[int]:
    """Run an experiment's units (``only`` these, when given): None when done, else the exit
    status, its message printed (1 a failed unit, 130 stopped; a rerun resumes)."""
    try:
        run_experiment(exp, root, env=env, only=only)
    except RunFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        print(f"stopped ({err or 'interrupted'}); run again to resume", file=sys.stderr)
        return 130
    return None


def _verify(exps, args) -> int:
    root = os.path.join(args.root, "verify")
    env = run_env(args)
    _stop_on_signals()
    status = 0
    for exp in exps:
        with open(os.path.join(args.results, f"{exp.id}.json")) as fh:
            record = json.load(fh)
        validate_result(record)
        key = measurement_unit(exp, record, args.measurement, root)
        print(f"claim {exp.claim} ({exp.id}): measuring {key} again under {root}")
        failed = _run(exp, root, env, only=[key])
        if failed is not None:
            return failed
        ok, lines = compare_measurement(exp, record, args.measurement, root)
        print("\n".join(lines) if lines else "identical to the record")
        status = status if ok else 1
    return status


def _stop_on_signals() -> None:
    """SIGTERM (and SIGINT, which a shell ignores in background jobs) stop the runner as ^C
    does: the running unit's process group is stopped with it, nothing is marked done."""
    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        exps = load_experiments(args.configs, args.experiments)
    except FindingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.action == "report":
        _report(exps, args)
        return 0
    if args.action == "verify":
        return _verify(exps, args)
    try:
        for exp in exps:
            if not exp.waits_for:
                check_configs(exp, args.root)
    except FindingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.action == "plan" or not args.yes:
        lines, _ = plan_lines(exps, args.root)
        print("\n".join(lines))
    if args.action == "plan":
        return 0
    env = run_env(args)
    _stop_on_signals()
    for exp in exps:
        if exp.waits_for:
            print(f"claim {exp.claim} ({exp.id}): skipped, waits for {exp.waits_for}")
            continue
        print(f"claim {exp.claim} ({exp.id})")
        failed = _run(exp, args.root, env)
        if failed is not None:
            return failed
        _report([exp], args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
