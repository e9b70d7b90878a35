"""The findings runner's child processes: they die with the runner, and a unit's time counts
every attempt."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

from advvit import rundir
from advvit.findings import plan, runner
from advvit.findings.plan import Unit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _eval_unit(tmp_path, script: str) -> Unit:
    return Unit(kind="eval", key="eval x s0", command=["-c", script], output=str(tmp_path / "r.json"),
                folder=str(tmp_path), minutes=1.0, setting="x", seed=0)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _wait_for(path, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


# The unit's command: the first attempt writes its pid and sleeps; a later one writes the report.
CHILD = textwrap.dedent("""
    import json, os, sys, time
    here = {folder!r}
    if os.path.exists(os.path.join(here, "started")):
        json.dump({{"format": "advvit-eval/1"}}, open(os.path.join(here, "r.json"), "w"))
        sys.exit(0)
    open(os.path.join(here, "started"), "w").write(str(os.getpid()))
    time.sleep(120)
""")

RUNNER = textwrap.dedent("""
    import pickle, sys
    from advvit.findings import runner
    runner.HEARTBEAT_SECONDS = 0.2
    runner.run_unit(pickle.load(open(sys.argv[1], "rb")))
""")


def test_a_sigkilled_runner_takes_its_child_with_it_and_its_time_is_kept(tmp_path):
    import pickle
    unit = _eval_unit(tmp_path, CHILD.format(folder=str(tmp_path)))
    with open(tmp_path / "unit.pkl", "wb") as fh:
        pickle.dump(unit, fh)
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(tmp_path / "unit.pkl")], cwd=ROOT)
    _wait_for(tmp_path / "started")
    child = int((tmp_path / "started").read_text())
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while not _gone(child):
        assert time.monotonic() < deadline, "the unit's process outlived the killed runner"
        time.sleep(0.05)
    first, attempts = plan.read_journal(unit)
    assert attempts == 1 and first >= 0.8   # the killed attempt's time, to a heartbeat
    total = runner.run_unit(unit, say=lambda s: None)
    assert os.path.isfile(unit.output)
    assert plan.read_journal(unit)[1] == 2 and total >= first
    assert plan._seconds_done(unit) == plan.read_journal(unit)[0] == round(total, 3)


def test_a_unit_waits_for_a_stopping_run_to_release_its_folder(tmp_path):
    folder = str(tmp_path / "run")
    lock = rundir.acquire(folder)
    threading.Timer(0.6, lock.release).start()
    said = []
    start = time.monotonic()
    runner._wait_for_lock(folder, said.append, timeout=20)
    assert 0.5 <= time.monotonic() - start < 10
    assert said and "locked by a run that is stopping" in said[0]
    held = rundir.acquire(folder)   # free now
    try:
        start = time.monotonic()
        runner._wait_for_lock(folder, lambda s: None, timeout=0.3)   # gives up: train will refuse
        assert time.monotonic() - start < 5
    finally:
        held.release()
