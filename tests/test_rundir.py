"""The run folder: one run at a time, stale locks, leftovers of other runs, temporary files."""
import json
import os
import signal
import subprocess
import sys

import pytest

from advvit import rundir
from advvit.config import ConfigError
from advvit.train import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLD = """
import sys, time
from advvit import rundir
lock = rundir.acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def _holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _args(tmp_path, *extra):
    # Stops before any data is read, so no data set is needed.
    return ["--dataset", "fashion_mnist", "--data-dir", str(tmp_path / "nodata"), "--img-size", "32",
            "--output", str(tmp_path / "runs"), "--experiment", "run", "--device", "cpu", *extra]


@pytest.mark.slow
def test_a_second_run_into_a_locked_folder_stops_with_one_message(tmp_path, capsys):
    run = tmp_path / "runs" / "run"
    proc = _holder(run)
    try:
        assert main(_args(tmp_path)) == 2
        err = capsys.readouterr().err
        assert "in use by another training run" in err and f"pid {proc.pid}" in err
        assert sorted(os.listdir(run)) == [".lock"]  # nothing written, nothing read
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(tmp_path, capsys):
    run = tmp_path / "run"
    proc = _holder(run)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lock = rundir.lock_run_dir(str(run), is_main=True)
    try:
        assert f"pid {proc.pid}" in lock.stale
        assert "did not exit cleanly" in capsys.readouterr().out
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    # A clean release empties the file: the next run finds nothing stale.
    assert (run / ".lock").read_text() == ""
    again = rundir.lock_run_dir(str(run), is_main=True)
    assert again.stale is None
    again.release()


def test_the_lock_is_exclusive_and_released(tmp_path):
    lock = rundir.acquire(str(tmp_path))
    with pytest.raises(ConfigError, match="in use"):
        rundir.acquire(str(tmp_path))
    lock.release()
    lock.release()  # twice is harmless
    rundir.acquire(str(tmp_path)).release()


def test_only_the_main_process_locks(tmp_path):
    lock = rundir.lock_run_dir(str(tmp_path / "run"), is_main=False)
    assert not (tmp_path / "run").exists()
    lock.release()


@pytest.mark.parametrize("resume", [[], ["--resume", "auto"]], ids=["new", "auto"])
def test_a_folder_with_run_files_but_no_checkpoint_is_refused(tmp_path, capsys, resume):
    run = tmp_path / "runs" / "run"
    run.mkdir(parents=True)
    (run / "summary.csv").write_text("epoch,step\n0,6\n")
    (run / "tb").mkdir()
    assert main(_args(tmp_path, *resume)) == 2
    err = capsys.readouterr().err
    assert "summary.csv, tb" in err and f"rm -r {run}" in err
    assert (run / "summary.csv").read_text() == "epoch,step\n0,6\n"


def test_stale_temporary_files_are_removed_when_the_folder_is_locked(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    stale = [run / ".last.pth.k2j3h4.tmp", run / ".args.yaml.x9.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    (run / "notes.tmp").write_text("not ours")
    lock = rundir.lock_run_dir(str(run), is_main=True)
    lock.release()
    assert not any(p.exists() for p in stale) and (run / "notes.tmp").exists()
    assert "removed 2 temporary file(s)" in capsys.readouterr().out


@pytest.mark.slow
def test_under_torchrun_rank_0_locks_and_every_rank_stops_alike(tmp_path):
    run = tmp_path / "runs" / "run"
    proc = _holder(run)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    try:
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc-per-node=2", "-m", "advvit.train", *_args(tmp_path)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        proc.kill()
        proc.wait()
    assert out.returncode != 0
    assert "in use by another training run" in out.stderr  # rank 0
    assert "the main process refused the run folder" in out.stderr  # rank 1, not left waiting


def test_a_folder_given_to_resume_is_named_a_folder(tmp_path):
    with pytest.raises(ConfigError) as e:
        rundir.choose_resume(str(tmp_path / "run"), str(tmp_path))
    assert f"{tmp_path} is a folder, not a file" in str(e.value)
    assert str(tmp_path / "last.pth") in str(e.value) and "'auto'" in str(e.value)


@pytest.mark.parametrize("where, key", [("output", "output"), ("run", "experiment"),
                                        ("parent", "output")])
def test_a_file_where_the_run_folder_goes_is_one_message(tmp_path, capsys, where, key):
    output = tmp_path / "runs"
    target = {"output": output, "run": output / "run", "parent": tmp_path / "runs"}[where]
    args = _args(tmp_path)
    if where == "parent":  # output below a file
        args[args.index("--output") + 1] = str(output / "deeper")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("a file")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"config key '{key}': {target} is a file, not a folder" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert target.read_text() == "a file"


def test_an_output_folder_that_cannot_be_written_is_one_message(tmp_path, capsys, monkeypatch):
    output = tmp_path / "runs"
    output.mkdir()
    output.chmod(0o555)
    if os.access(output, os.W_OK):
        # root writes through permission bits: the check sees the folder as another user would.
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: os.fspath(p) != str(output)
                            and access(p, mode, **kw))
    try:
        assert main(_args(tmp_path)) == 2
        err = capsys.readouterr().err
        assert f"config key 'output': {output} is not writable by this user" in err
        assert "give an output folder this user can write to" in err
        assert os.listdir(output) == []
    finally:
        output.chmod(0o755)
