"""The findings suite as submitit job arrays: ``python -m advvit.launch findings -- run ...``.

Every unit that is not done is one element of a job array, and the arrays are waves by
dependency depth: first what needs nothing still to run (training), then what reads those
units' checkpoints (evaluations, analyses, a fine-tuning after the training it starts from),
and so on. On Slurm every wave is submitted at once, each after the one before it
(``--dependency=afterany:``, so that one failed unit does not cancel the others); submitit's
local and debug executors have no dependencies, so there a wave is submitted when the one before
it has ended, without the units whose needs did not finish. A unit that several experiments
share (one training run) is submitted once.

An element (:class:`UnitJob`) holds names, not the unit: in the job it reads the experiment file
and plans again, so it runs against the files there, refuses to run when what its unit needs is
not done (:class:`NotRun`), and runs the unit as ``findings run`` does (a stale measurement is
measured again, a killed one resumed, nothing is marked done but on success). On preemption or
time-out submitit requeues it through :meth:`UnitJob.checkpoint`: its unit's child is stopped with
SIGTERM (a training writes its recovery point) and the requeued element resumes the unit.

The job ids go to ``ROOT/jobs.json`` (experiment id -> unit key -> job id, cluster, submitted
time), which ``python -m advvit.findings plan`` reads.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from ..io import atomic_write_json
from .plan import Unit, jobs_path, log_path, read_jobs, status, units
from .runner import Say, check_configs, run_experiment
from .spec import Experiment, add_suite_options, load_experiment, load_experiments, run_env

__all__ = ["NotRun", "UnitJob", "Element", "parse_run", "experiments", "waves", "run_waves"]


class NotRun(RuntimeError):
    """A unit whose needs did not finish, so it was not run."""


def _needs(todo: Sequence[Unit], unit: Unit) -> List[str]:
    """The keys of the units ``unit`` waits for: its own needs and the experiment's preparation,
    which makes the data its other units read (the sequential runner runs it first)."""
    return [*(u.key for u in todo if u.kind == "prepare" and u is not unit), *unit.needs]


class UnitJob:
    """One element of a findings job array: a unit, named by its experiment file and key.

    submitit pickles it, calls it in the job and, on its preemption signal, calls
    ``checkpoint`` for the submission that replaces it.

    Args:
        path: the experiment's file (relative paths in it are read from ``cwd``).
        root: the suite's root folder (``--root``).
        key: the unit's key in the experiment.
        env: extra environment of the unit's command (``--threads``).
        cwd: the folder the suite was launched from (default: this one).
    """

    def __init__(self, path: str, root: str, key: str, env: Optional[Mapping[str, str]] = None,
                 cwd: Optional[str] = None) -> None:
        self.path, self.root, self.key = path, root, key
        self.env = dict(env) if env else None
        self.cwd = cwd or os.getcwd()

    def __call__(self) -> float:
        """Run the unit in the job; returns the seconds it ran (0 when it was done already).

        Raises:
            NotRun: a unit it needs is not done.
            RunFailed: the unit's command failed (its message ends with the log's tail).
        """
        # The experiment files name their training config relative to where the suite runs.
        os.chdir(self.cwd)
        exp = load_experiment(self.path)
        todo = units(exp, self.root)
        by_key = {u.key: u for u in todo}
        missing = [k for k in _needs(todo, by_key[self.key]) if status(by_key[k]) != "done"]
        if missing:
            raise NotRun(f"{exp.id}: {self.key} not run: it needs {', '.join(missing)}, "
                         "which did not finish")
        return run_experiment(exp, self.root, env=self.env, only=[self.key]).get(self.key, 0.0)

    def checkpoint(self) -> Any:
        """The submission that goes on after a preemption or time-out: the same unit, resumed."""
        from submitit.helpers import DelayedSubmission
        return DelayedSubmission(self)


class Element:
    """A unit to submit, the outputs of the units it needs, and every (experiment id, unit key)
    that names it (a shared unit has one per experiment)."""

    def __init__(self, exp: Experiment, unit: Unit, needs: Sequence[str]) -> None:
        self.exp, self.unit, self.needs = exp, unit, tuple(needs)
        self.names: List[Tuple[str, str]] = [(exp.id, unit.key)]

    def __str__(self) -> str:
        return f"{self.exp.id}: {self.unit.key}"


def parse_run(argv: Sequence[str]) -> argparse.Namespace:
    """The arguments after ``--``: ``run [EXPERIMENT ...]`` and the suite's options (a bad one
    exits 2)."""
    p = argparse.ArgumentParser(prog="python -m advvit.launch findings ... --",
                                description="The findings suite as submitit job arrays.")
    p.add_argument("action", choices=("run",))
    add_suite_options(p)
    return p.parse_args(list(argv))


def experiments(args: argparse.Namespace, say: Say = print) -> List[Experiment]:
    """The experiments to run, with every config checked as ``findings run`` checks them.

    Raises:
        FindingsError: an unknown experiment, a bad experiment file or training config.
    """
    exps = load_experiments(args.configs, args.experiments)
    chosen = []
    for exp in exps:
        if exp.waits_for:
            say(f"claim {exp.claim} ({exp.id}): skipped, waits for {exp.waits_for}")
            continue
        check_configs(exp, args.root)
        chosen.append(exp)
    return chosen


def waves(exps: Sequence[Experiment], root: str) -> List[List[Element]]:
    """Every unit not done, once per output, by dependency depth (needs that are done count
    for nothing); empty when everything is done."""
    depth: Dict[str, int] = {}
    found: Dict[str, Element] = {}
    for exp in exps:
        todo = units(exp, root)
        by_key = {u.key: u for u in todo}
        for unit in todo:  # in run order: a unit's needs come before it
            if unit.output in found:
                found[unit.output].names.append((exp.id, unit.key))
                continue
            if status(unit) == "done":
                continue
            needs = [by_key[k].output for k in _needs(todo, unit) if by_key[k].output in depth]
            depth[unit.output] = max((depth[n] + 1 for n in needs), default=0)
            found[unit.output] = Element(exp, unit, needs)
    out: List[List[Element]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for output, element in found.items():
        out[depth[output]].append(element)
    return out


def _record(root: str, cluster: str, submitted: Sequence[Tuple[Element, Any]]) -> None:
    """Add (element, job) pairs to ``ROOT/jobs.json``, the records of other units kept."""
    records = read_jobs(root)
    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for element, job in submitted:
        for exp_id, key in element.names:
            records.setdefault(exp_id, {})[key] = {"job": str(job.job_id), "cluster": cluster,
                                                   "submitted": when}
    os.makedirs(root, exist_ok=True)
    atomic_write_json(jobs_path(root), records, indent=1)


def _outcome(element: Element, job: Any, say: Say) -> bool:
    """Wait for one element's job; True when its unit finished."""
    # exception(), not result(): the debug executor's result() opens pdb on an error.
    try:
        err = job.exception()  # the element's own error, in a cluster's job with its traceback
    except Exception as stopped:  # a job that ended without a result: cancelled, killed
        err = stopped
    if err is not None:
        say(f"error: {element} (job {job.job_id}) did not finish:\n{err}")
        return False
    say(f"done  {element} (job {job.job_id})")
    return True


def run_waves(executor: Any, cluster: str, todo: Sequence[Sequence[Element]],
              args: argparse.Namespace, *, wait: bool, say: Say = print) -> int:
    """Submit the waves as job arrays: on Slurm all at once, each after the one before it;
    elsewhere each when the one before it has ended (``wait`` is then implied).

    Returns:
        0 when every unit finished (or, not waiting, was submitted), 1 when one did not.
    """
    chained = cluster == "slurm"
    env = run_env(args)
    failed: Set[str] = set()
    previous: Optional[str] = None
    pending: List[Tuple[Element, Any]] = []
    for k, wave in enumerate(todo):
        ready = []
        for element in wave:
            if any(n in failed for n in element.needs):
                say(f"not run  {element}: what it needs did not finish")
                failed.add(element.unit.output)
            else:
                ready.append(element)
        if not ready:
            continue
        if chained and previous is not None:
            executor.update_parameters(slurm_dependency=f"afterany:{previous}")
        with executor.batch():
            jobs = [executor.submit(UnitJob(e.exp.path, args.root, e.unit.key, env))
                    for e in ready]
        submitted = list(zip(ready, jobs))
        _record(args.root, cluster, submitted)
        after = f", after job array {previous}" if chained and previous else ""
        say(f"wave {k}: {len(jobs)} unit(s) ({cluster}{after}); submitit's logs in "
            f"{jobs[0].paths.folder}")
        # A Slurm array's elements are <array id>_<index>; afterany on the array waits for all.
        previous = str(jobs[0].job_id).split("_")[0]
        for element, job in submitted:
            say(f"  job {job.job_id}  {element}  log {log_path(element.unit)}")
        if chained:
            pending += submitted
        else:
            failed |= {e.unit.output for e, job in submitted if not _outcome(e, job, say)}
    if chained and wait:
        failed |= {e.unit.output for e, job in pending if not _outcome(e, job, say)}
    return 1 if failed else 0
