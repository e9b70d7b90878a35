"""Runs an experiment's units one at a time, skipping the done ones and resuming the killed ones.

Each unit is a child process (``python -m advvit.train`` / ``advvit.eval`` / ``advvit.analyze``)
with its output in a log file beside what it writes, so a run of many hours can be followed
with ``tail -f`` and a failure is reported with the end of its log. A killed runner loses
nothing: its child is stopped with it (even by SIGKILL: the child asks the kernel for SIGTERM when
its parent dies, and a training child writes a recovery point on SIGTERM), training resumes from
its last checkpoint or recovery point, an evaluation from its state file, and a finished unit is
never run again. A unit's time is that of all its attempts: a journal beside its log is updated
every few seconds while it runs, so a killed attempt's time is counted too.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Collection, Dict, List, Mapping, Optional

import yaml

from .. import rundir
from ..config import ConfigError
from ..io import atomic_write_json, atomic_write_text
from .plan import Unit, journal_path, log_path, read_journal, status, units
from .spec import Experiment, FindingsError

__all__ = ["RunFailed", "run_unit", "run_experiment", "check_configs", "log_path",
           "set_aside_leftovers"]

Say = Callable[[str], None]

# How often a running unit's time is written down: what a SIGKILLed runner can lose of it.
HEARTBEAT_SECONDS = 5.0
# How long a unit waits for a run folder whose lock is still held by a stopping run (a child of
# a runner that was killed, writing its recovery point).
LOCK_WAIT_SECONDS = 120.0
_PR_SET_PDEATHSIG = 1


class RunFailed(RuntimeError):
    """A unit's command exited non-zero: names the unit, its exit status and its log."""

    def __init__(self, unit: Unit, returncode: int, log: str) -> None:
        self.unit, self.returncode, self.log = unit, returncode, log
        super().__init__(f"{unit.key} failed (exit {returncode}); the end of {log}:\n{_tail(log)}")


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError:
        return "(no log)"


def _record_seconds(unit: Unit, seconds: float, attempts: int) -> None:
    atomic_write_json(journal_path(unit), {"seconds": round(seconds, 3), "attempts": attempts})


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGTERM when the runner dies, SIGKILL included.

    The child has its own session (so the runner can stop its whole tree), which also takes it
    out of the terminal's and the scheduler's reach: without this a killed runner leaves it
    running as an orphan, holding its run folder's lock.

    It also ignores SIGUSR2: Slurm sends submitit's preemption warning to every process of a job,
    and its default action would kill a training before its recovery point is written; the job's
    own process (advvit.findings.jobs) stops the child with SIGTERM instead.
    """
    def setup() -> None:
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):  # not Linux: the runner's own handlers still stop it
            return
        if os.getppid() != parent:  # the runner died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)
    return setup


def _wait_for_lock(folder: str, say: Say, timeout: float = LOCK_WAIT_SECONDS) -> None:
    """Wait while a stopping run still holds ``folder``'s lock (at most ``timeout`` seconds).

    If it is still held then, ``advvit.train`` refuses the folder with its own message.
    """
    if not os.path.isfile(os.path.join(folder, rundir.LOCK)):
        return
    deadline = time.monotonic() + timeout
    told = False
    while True:
        try:
            rundir.acquire(folder).release()
            return
        except ConfigError:
            if time.monotonic() >= deadline:
                return
            if not told:
                say(f"  wait  {folder} is locked by a run that is stopping: up to {timeout:g} s")
                told = True
        time.sleep(0.5)


def set_aside_leftovers(unit: Unit) -> Optional[str]:
    """A training run killed before its first checkpoint has nothing to resume, and
    ``advvit.train`` refuses a folder with run files but no checkpoint: its folder is renamed
    (kept, with its log) so the run starts over. Returns the new name, or None."""
    folder = unit.folder
    if unit.kind != "train" or not os.path.isdir(folder) or status(unit) != "pending":
        return None
    if not os.listdir(folder):
        return None
    # A run still training there holds the folder's lock: leave it to advvit.train to name.
    try:
        lock = rundir.acquire(folder)
    except ConfigError:
        return None
    try:
        aside = f"{folder}.abandoned-{time.strftime('%Y%m%dT%H%M%S')}"
        os.replace(folder, aside)
    finally:
        lock.release()
    return aside


def _prepare(unit: Unit) -> None:
    os.makedirs(unit.folder, exist_ok=True)
    if unit.kind == "train":
        config_path = unit.command[unit.command.index("--config") + 1]
        os.makedirs(os.path.dirname(config_path), exist_ok=True)
        atomic_write_text(config_path, yaml.safe_dump(unit.config, sort_keys=False))


def _run(argv: List[str], log: str, env: Optional[Mapping[str, str]],
         heartbeat: Callable[[], None]) -> int:
    with open(log, "a") as fh:
        fh.write(f"\n# {time.strftime('%Y-%m-%dT%H:%M:%S%z')} {' '.join(argv)}\n")
        fh.flush()
        # Its own process group, so an interrupted runner stops the whole child tree (loader
        # workers included) and leaves no orphan writing into a run folder.
        # Unbuffered, so the log shows progress as it happens, not in 8 KB blocks.
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                start_new_session=True, preexec_fn=_die_with_parent(os.getpid()))
        try:
            while True:
                try:
                    return proc.wait(timeout=HEARTBEAT_SECONDS)
                except subprocess.TimeoutExpired:
                    heartbeat()
        except BaseException:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            raise


def run_unit(unit: Unit, *, python: str = sys.executable,
             env: Optional[Mapping[str, str]] = None, say: Say = print) -> float:
    """Run one unit to completion; returns the wall seconds of all its attempts.

    Raises:
        RunFailed: the command exited non-zero (nothing is marked done).
    """
    if unit.kind == "train":
        _wait_for_lock(unit.folder, say)
    aside = set_aside_leftovers(unit)
    _prepare(unit)
    log = log_path(unit)
    if aside is not None:
        with open(log, "a") as fh:
            fh.write(f"# the files of a run killed before its first checkpoint: {aside}\n")
    before, attempts = read_journal(unit)
    attempts += 1
    start = time.monotonic()

    def heartbeat() -> None:
        _record_seconds(unit, before + time.monotonic() - start, attempts)

    try:
        rc = _run([python, *unit.command], log, env, heartbeat)
    finally:
        seconds = before + time.monotonic() - start
        _record_seconds(unit, seconds, attempts)
    if rc != 0:
        raise RunFailed(unit, rc, log)
    if unit.kind == "train":
        if not os.path.isfile(os.path.join(unit.folder, "best.pth")):
            raise RunFailed(unit, rc, log)
        from ..report import versions
        # The code and threads of the run: what a re-run must match to give the same weights.
        threads = (env or {}).get("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS"))
        atomic_write_json(unit.output, {"seconds": round(seconds, 3), "command": unit.command,
                                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                        "config": unit.config, "versions": versions(),
                                        "omp_num_threads": threads}, indent=1)
    elif not os.path.isfile(unit.output):
        raise RunFailed(unit, rc, log)
    return seconds


def _discard(unit: Unit) -> None:
    """Remove a stale measurement's report, its AutoAttack state (it holds the old checkpoint's
    results and would be resumed against the new one) and its time journal."""
    for path in (unit.output, unit.output + ".state", journal_path(unit)):
        if os.path.isfile(path):
            os.remove(path)


def _check_options(exp: Experiment, unit: Unit) -> None:
    """Parse a measurement's command line as its command will, so a misspelt option fails now
    rather than after the training runs it waits for."""
    import contextlib
    import io
    from ..cli.analyses import analyze_parser
    from ..cli.options import eval_parser
    parser = (eval_parser if unit.kind == "eval" else analyze_parser)()
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            parser.parse_args(unit.command[2:])
    except SystemExit:
        key = f"{'evals' if unit.kind == 'eval' else 'analyses'}.{unit.source}.args"
        message = errors.getvalue().strip().splitlines()
        raise FindingsError(exp.path, key, message[-1] if message else "bad options") from None


def check_configs(exp: Experiment, root: str) -> None:
    """Validate every training config of ``exp`` as ``advvit.train`` would, before any run.

    Raises:
        FindingsError: naming the experiment, the setting and the config error.
    """
    from ..config import config_from_dict
    from ..preflight import finetune_normalization, validate
    # The statistics each training run's model sees, by run folder: a fine-tuned run must see
    # its source's, which the source's checkpoint would tell only after it has trained.
    normalization: Dict[str, object] = {}
    for u in units(exp, root):
        if u.kind in ("eval", "analysis"):
            _check_options(exp, u)
        if u.kind != "train":
            continue
        values = {k: v for k, v in u.config.items() if k != "finetune"}
        try:
            cfg = config_from_dict(values)
            spec = validate(cfg, world_size=1)[1]
            source = u.config.get("finetune")
            if source is not None and os.path.dirname(source) in normalization:
                finetune_normalization(cfg.model.normalize, spec.normalize,
                                       normalization[os.path.dirname(source)], spec.in_chans,
                                       source)
        except ConfigError as err:
            raise FindingsError(exp.path, f"settings.{u.setting}.train", str(err)) from None
        normalization[u.folder] = spec.normalize


def run_experiment(exp: Experiment, root: str, *, say: Say = print, python: str = sys.executable,
                   env: Optional[Mapping[str, str]] = None,
                   runner: Callable[..., float] = run_unit,
                   only: Optional[Collection[str]] = None) -> Dict[str, float]:
    """Run every unit of ``exp`` that is not done, in order; returns seconds per unit key run.

    ``runner`` runs one unit (tests give a fake one); ``only``: these unit keys and what they
    need, not the rest.
    """
    ran: Dict[str, float] = {}
    todo = units(exp, root)
    by_key = {u.key: u for u in todo}
    if only is not None:
        wanted, stack = set(), list(only)
        while stack:
            key = stack.pop()
            if key not in wanted:
                wanted.add(key)
                stack += by_key[key].needs
        todo = [u for u in todo if u.key in wanted]
    for unit in todo:
        state = status(unit)
        if state == "done":
            say(f"  skip  {unit.key} (done)")
            continue
        missing = [k for k in unit.needs if status(by_key[k]) != "done"]
        if missing:
            raise RuntimeError(f"{unit.key} needs {', '.join(missing)} first")
        if state == "stale":
            _discard(unit)
        verb = {"partial": "resume", "stale": "rerun (its checkpoint changed)"}.get(state, "run")
        say(f"  {verb}   {unit.key} (~{unit.minutes:g} min), log {log_path(unit)}")
        ran[unit.key] = runner(unit, python=python, env=env, say=say)
        say(f"  done  {unit.key} in {ran[unit.key] / 60:.1f} min")
    return ran
