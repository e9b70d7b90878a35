"""`python -m advvit.launch`: submitit jobs that compute what torchrun runs compute.

The Slurm path is checked on the sbatch script submitit writes (a stand-in ``sbatch`` keeps it);
the local path runs real processes: 2 gloo tasks through submitit's LocalExecutor.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("submitit")

from advvit import checkpoint, launch, rundir  # noqa: E402
from advvit.trainer import KILL_ENV  # noqa: E402
from test_cli_eval import _base as _eval_args, ckpt_path  # noqa: E402,F401  (a fixture)
from test_train import _assert_same_weights, _tiny_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN and not k.startswith("SUBMITIT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    return env


def _fake_slurm(tmp_path: Path) -> Path:
    """``sbatch`` keeping the script it is given, and an ``srun`` that is only found."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        f"#!/bin/sh\ncp \"$1\" {tmp_path}/submitted.sh\necho 'Submitted batch job 4242'\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for name in ("sbatch", "srun"):
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_resume_auto_args_replaces_any_resume():
    assert rundir.resume_auto_args(["--config", "c.yaml"]) == ["--config", "c.yaml", "--resume", "auto"]
    assert rundir.resume_auto_args(["--resume", "x.pth", "--epochs", "3", "--resume=y"]) == [
        "--epochs", "3", "--resume", "auto"]


def test_a_requeued_training_task_resumes_and_an_evaluation_reruns_as_asked():
    train = launch.Task("train", ["--config", "c.yaml"]).checkpoint()
    assert (train.function.command, train.function.argv) == ("train", ["--config", "c.yaml", "--resume", "auto"])
    evaluation = launch.Task("eval", ["--checkpoint", "b.pth"]).checkpoint()
    assert evaluation.function.argv == ["--checkpoint", "b.pth"]


def test_slurm_options_pass_through_and_unknown_ones_are_refused():
    assert launch.slurm_options(["--slurm-account", "proj", "--slurm-exclusive",
                                 "--slurm-constraint=a100", "--slurm-array-parallelism", "4"]) == {
        "account": "proj", "exclusive": True, "constraint": "a100", "array_parallelism": 4}
    with pytest.raises(launch.LaunchError, match="no parameter 'acount'"):
        launch.slurm_options(["--slurm-acount", "proj"])
    with pytest.raises(launch.LaunchError, match="go after `--`"):
        launch.slurm_options(["--epochs", "3"])


@pytest.mark.parametrize("options, match", [
    (["--cluster", "local", "--partition", "gpu"], "--partition need a Slurm cluster"),
    (["--cluster", "local", "--slurm-account", "p"], "--slurm-account need a Slurm cluster"),
    (["--cluster", "local", "--nodes", "2"], "runs on this machine only"),
    (["--cluster", "debug", "--tasks-per-node", "2"], "--cluster debug runs one task"),
    (["--cluster", "local", "--gpus-per-node", "2", "--tasks-per-node", "3"], "one GPU"),
    (["--cluster", "pbs"], "invalid choice: 'pbs'"),
])
def test_bad_launcher_options_are_refused_before_anything_is_submitted(tmp_path, capsys, options,
                                                                       match):
    with pytest.raises(SystemExit) as stop:
        launch.main(["train", *options, "--log-dir", str(tmp_path / "logs"), "--",
                     *_tiny_args(tmp_path)])
    assert stop.value.code == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "logs").exists() and not (tmp_path / "runs").exists()


def test_an_evaluation_with_a_bad_option_is_refused_by_evals_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        launch.main(["eval", "--cluster", "local", "--", "--checkpoint", "b.pth",
                     "--output", str(tmp_path / "r.json"), "--attakc", "pgd"])
    assert stop.value.code == 2
    assert "unrecognized arguments: --attakc" in capsys.readouterr().err
    assert not (tmp_path / "submitit").exists()


def test_an_evaluation_of_a_model_that_is_not_there_never_reaches_the_queue(tmp_path, capfd):
    with pytest.raises(SystemExit) as stop:
        launch.main(["eval", "--cluster", "local", "--", "--checkpoint",
                     str(tmp_path / "absent.pth"), "--dataset", "fashion_mnist",
                     "--output", str(tmp_path / "r.json"), "--attack", "pgd"])
    assert stop.value.code == 2
    err = capfd.readouterr().err
    assert "absent.pth does not exist" in err and "nothing was submitted" in err
    assert not (tmp_path / "submitit").exists() and not (tmp_path / "r.json").exists()


def test_check_only_checks_the_model_and_examples_and_attacks_nothing(ckpt_path, tmp_path,
                                                                       capsys):
    from advvit import eval as E
    args = _eval_args(ckpt_path, tmp_path, "--attack", "pgd")
    assert E.main([*args, "--check-only"]) == 0
    assert "nothing was attacked" in capsys.readouterr().out
    assert not (tmp_path / "report.json").exists()
    with pytest.raises(SystemExit) as stop:  # more examples than the split has: eval's message
        E.main([*args, "--check-only", "--n-examples", "100000"])
    assert stop.value.code == 2 and "--n-examples" in capsys.readouterr().err


def test_slurm_without_sbatch_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SystemExit):
        launch.main(["train", "--cluster", "slurm", "--", *_tiny_args(tmp_path)])
    assert "sbatch / srun are not on PATH" in capsys.readouterr().err


def test_a_bad_config_never_reaches_the_queue(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", f"{_fake_slurm(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    code = launch.main(["train", "--nodes", "2", "--gpus-per-node", "4", "--",
                        *_tiny_args(tmp_path, "--model", "xcit_nano_12_p8_33")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "config key 'model'" in err
    assert not (tmp_path / "submitted.sh").exists() and not (tmp_path / "runs").exists()


def test_the_sbatch_script_holds_the_options_given(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", f"{_fake_slurm(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    args = _tiny_args(tmp_path)
    assert launch.main(["train", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
                        "--timeout-min", "90", "--cpus-per-task", "10", "--mem-gb", "64",
                        "--slurm-account", "proj", "--", *args]) == 0  # no --cluster: sbatch found
    script = (tmp_path / "submitted.sh").read_text()
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", script, re.M))
    logs = tmp_path / "runs" / "run" / "submitit"
    assert flags == {"nodes": "2", "ntasks-per-node": "4", "gpus-per-node": "4",
                     "partition": "gpu", "time": "90", "cpus-per-task": "10", "mem": "64GB",
                     "account": "proj", "job-name": "advvit-train", "signal": "USR2@90",
                     "output": f"{logs}/%j_0_log.out", "error": f"{logs}/%j_0_log.err",
                     "open-mode": "append", "wckey": "submitit"}
    assert re.search(rf"^srun --unbuffered --output {logs}/%j_%t_log.out --error "
                     rf"{logs}/%j_%t_log.err .* -m submitit.core._submit {logs}$", script, re.M)
    out = capsys.readouterr().out
    assert "job 4242 (slurm, 2 node(s) x 4 task(s))" in out
    assert f"logs: {logs}/4242_0_log.out {logs}/4242_0_log.err" in out
    assert f"run folder: {tmp_path / 'runs' / 'run'}" in out
    with open(logs / "4242_submitted.pkl", "rb") as fh:
        task = pickle.load(fh).function
    assert (task.command, task.argv) == ("train", args)


# ---------------------------------------------------------------------------------------------
# real processes
# ---------------------------------------------------------------------------------------------

# 48 training images, 2 ranks x 4: 6 steps an epoch; recovery points every 2 steps.
RUN = ("--epochs", "2", "--batch-size", "4", "--device", "cpu", "--recovery-interval-steps", "2")
# The preemption test: a recovery point every step, so the job resumes where it was stopped.
EVERY_STEP = ("--recovery-interval-steps", "1")


def _launch(*options: str, args, **popen):
    cmd = [sys.executable, "-m", "advvit.launch", "train", "--cluster", "local",
           "--tasks-per-node", "2", "--timeout-min", "30", *options, "--", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def _torchrun(tmp: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", "-m", "advvit.train",
                           *_tiny_args(tmp, *RUN, *extra)],
                          cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=600)


def _two_ranks(args, rank0_env) -> list:
    """``python -m advvit.train`` as the two ranks torchrun starts, started here so that only
    rank 0 has ``rank0_env``; their exit codes."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(2):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), **(rank0_env if rank == 0 else {}))
        procs.append(subprocess.Popen([sys.executable, "-m", "advvit.train", *args], cwd=ROOT,
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        return [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()


def _torchrun_weights(tmp: Path, *extra: str) -> dict:
    out = _torchrun(tmp, *extra)
    assert out.returncode == 0, out.stderr[-3000:]
    return checkpoint.load_checkpoint(tmp / "runs" / "run" / "last.pth")


@pytest.mark.slow
def test_two_local_tasks_train_the_weights_torchrun_trains(tmp_path):
    torchrun_weights = _torchrun_weights(tmp_path / "torchrun")
    proc = _launch(args=_tiny_args(tmp_path, *RUN))
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out
    run = tmp_path / "runs" / "run"
    assert f"run folder: {run}" in out and re.search(r"job \d+ finished", out)
    for name in ("args.yaml", "summary.csv", "last.pth", "best.pth"):
        assert (run / name).exists(), name
    logs = sorted((run / "submitit").glob("*_log.out"))
    assert len(logs) == 2 and "rank 1 of 2" in logs[1].read_text()
    b = checkpoint.load_checkpoint(run / "last.pth")
    assert (b["epoch"], b["step"]) == (torchrun_weights["epoch"], torchrun_weights["step"]) == (1, 12)
    _assert_same_weights(torchrun_weights, b)


def _task_pids(folder: Path) -> list:
    """The submitit task processes of the job whose folder is ``folder``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in cmdline and str(folder).encode() in cmdline:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_a_preempted_local_job_is_requeued_and_ends_as_torchrun_resumed_from_the_same_point(
        tmp_path):
    run = tmp_path / "runs" / "run"
    proc = _launch(args=_tiny_args(tmp_path, *RUN, *EVERY_STEP))
    try:
        deadline = time.monotonic() + 300
        while not (run / "recovery.pth").exists():  # inside the first epoch
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.05)
        tasks = _task_pids(run / "submitit")
        assert len(tasks) == 2
        for pid in tasks:  # as Slurm signals every task of the job
            os.kill(pid, signal.SIGUSR2)
        out = proc.communicate(timeout=600)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    rank0 = next((run / "submitit").glob("*_0_log.out")).read_text()
    assert "this job is preempted" in rank0 and "Requeued job" in rank0
    assert rank0.count("--resume auto") == 1
    rank0_err = next((run / "submitit").glob("*_0_log.err")).read_text()
    resumed = re.search(r"resumed from \S+recovery.pth at epoch 0 after (\d+) of its steps",
                        rank0_err)
    assert resumed, rank0_err
    steps = int(resumed.group(1))
    assert 0 < steps < 6

    # The torchrun path stopped at the same recovery point (rank 0 killed right after writing
    # it; rank 1 then fails at its next collective), resumed with --resume auto.
    ref = tmp_path / "torchrun"
    cut = _two_ranks(_tiny_args(ref, *RUN, *EVERY_STEP), rank0_env={KILL_ENV: f"log:{steps}"})
    assert cut[0] == -signal.SIGKILL and cut[1] != 0
    again = _torchrun(ref, *EVERY_STEP, "--resume", "auto")
    assert again.returncode == 0 and f"at epoch 0 after {steps} of its steps" in again.stderr
    a = checkpoint.load_checkpoint(ref / "runs" / "run" / "last.pth")
    b = checkpoint.load_checkpoint(run / "last.pth")
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (1, 12)
    _assert_same_weights(a, b)


def _without_timing(report):
    """The report without what differs between two runs of one evaluation: clocks, the
    command line it was started with."""
    if isinstance(report, dict):
        return {k: _without_timing(v) for k, v in report.items()
                if k not in ("created", "command") and "seconds" not in k}
    if isinstance(report, list):
        return [_without_timing(v) for v in report]
    return report


@pytest.mark.slow
def test_two_local_tasks_evaluate_the_shards_torchrun_evaluates(ckpt_path, tmp_path):
    args = _eval_args(ckpt_path, tmp_path, "--attack", "pgd", "--steps", "3", "--eps", "2/255",
                      "--per-example")
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc-per-node=2", "-m", "advvit.eval", *args], cwd=ROOT,
                              env=_env(), capture_output=True, text=True, timeout=600)
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    expected = json.loads((tmp_path / "report.json").read_text())
    (tmp_path / "report.json").unlink()
    launched = subprocess.run([sys.executable, "-m", "advvit.launch", "eval", "--cluster", "local",
                               "--tasks-per-node", "2", "--", *args], cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    assert f"logs: {tmp_path / 'submitit'}/" in launched.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["world_size"] == 2 and report["n"] == 24
    assert _without_timing(report) == _without_timing(expected)


# ---------------------------------------------------------------------------------------------
# the findings suite as job arrays
# ---------------------------------------------------------------------------------------------

def _two_experiments(tmp_path: Path) -> Path:
    """t1: two settings trained and evaluated; t2: claim 98, whose base is t1's wd0 (one shared
    run and evaluation) and a fine-tuning of it: 6 units in 3 waves of depth."""
    from test_findings import _tiny_experiment
    t1 = Path(_tiny_experiment(tmp_path))
    raw = yaml.safe_load(t1.read_text())
    raw.update(claim=98, settings={"base": {"train": {"weight_decay": 0.0}, "minutes": 0.2},
                                   "tuned": {"finetune_from": "base", "train": {"lr": 1e-4},
                                             "minutes": 0.2}},
               tests=[{"name": "robust", "higher": "pgd.robust@tuned", "lower": "pgd.robust@base"}])
    (t1.parent / "t2_tuned.yaml").write_text(yaml.safe_dump(raw))
    return t1.parent


def _numbered_slurm(tmp_path: Path) -> Path:
    """``sbatch`` keeping each script as submitted-N.sh and answering job 4242 + N."""
    bin_dir = _fake_slurm(tmp_path)
    (bin_dir / "sbatch").write_text(
        f"#!/bin/sh\nn=$(ls {tmp_path} | grep -c '^submitted-')\n"
        f"cp \"$1\" {tmp_path}/submitted-$n.sh\necho \"Submitted batch job $((4242 + n))\"\n")
    return bin_dir


def _sbatch_flags(path: Path) -> dict:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", path.read_text(), re.M))


def test_findings_waves_are_slurm_arrays_each_after_the_one_before(tmp_path, capsys, monkeypatch):
    from advvit.findings.jobs import UnitJob
    from advvit.findings.plan import journal_path, jobs_path, plan_lines, units
    from advvit.findings.spec import load_experiments
    monkeypatch.setenv("PATH", f"{_numbered_slurm(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    configs, root = _two_experiments(tmp_path), tmp_path / "root"
    assert launch.main(["findings", "--gpus-per-node", "1", "--partition", "gpu",
                        "--timeout-min", "60", "--", "run", "--configs", str(configs),
                        "--root", str(root), "--threads", "2"]) == 0
    scripts = [_sbatch_flags(tmp_path / f"submitted-{n}.sh") for n in range(3)]
    assert not (tmp_path / "submitted-3.sh").exists()
    # Wave 0 trains wd0 (t2's base too) and wd05; wave 1 evaluates them and fine-tunes wd0;
    # wave 2 evaluates the fine-tuning, one unit: submitit submits it as a plain job.
    assert [s.get("array") for s in scripts] == ["0-1%2", "0-2%3", None]
    assert [s.get("dependency") for s in scripts] == [None, "afterany:4242", "afterany:4243"]
    logs = root / "submitit"
    for s, name in zip(scripts, ("%A_%a", "%A_%a", "%j")):
        assert (s["partition"], s["gpus-per-node"], s["time"], s["job-name"]) == (
            "gpu", "1", "60", "advvit-findings")
        assert s["output"] == f"{logs}/{name}_0_log.out"
    with open(logs / "4243_2_submitted.pkl", "rb") as fh:
        element = pickle.load(fh).function
    assert isinstance(element, UnitJob) and element.key == "train tuned s0"
    assert (element.path, element.root, element.env) == (
        str(configs / "t2_tuned.yaml"), str(root), {"OMP_NUM_THREADS": "2"})
    assert element.checkpoint().function.key == "train tuned s0"   # requeued as it was
    jobs = json.loads(Path(jobs_path(str(root))).read_text())
    assert jobs["t1_tiny"]["train wd0 s0"]["job"] == jobs["t2_tuned"]["train base s0"]["job"] == "4242_0"
    assert jobs["t2_tuned"]["eval pgd tuned s0"] == {
        "job": "4244", "cluster": "slurm", "submitted": jobs["t1_tiny"]["train wd0 s0"]["submitted"]}
    out = capsys.readouterr().out
    assert "wave 2: 1 unit(s) (slurm, after job array 4243)" in out

    # plan: queued with the job id, running while the unit's journal is fresh
    exps = load_experiments(str(configs))
    first = units(exps[0], str(root))[0]
    Path(journal_path(first)).parent.mkdir(parents=True)
    Path(journal_path(first)).write_text('{"seconds": 1, "attempts": 1}')
    lines = plan_lines(exps, str(root))[0]
    assert re.search(r"train wd0 s0 +pending, running \(job 4242_0\)", "\n".join(lines))
    assert re.search(r"train wd05 s0 +pending, queued \(job 4242_1\)", "\n".join(lines))
    old = time.time() - 60
    os.utime(journal_path(first), (old, old))
    assert "pending, queued (job 4242_0)" in "\n".join(plan_lines(exps, str(root))[0])


def test_the_shipped_finetuning_experiment_waits_for_its_data_then_its_pretraining(tmp_path):
    from advvit.findings.jobs import waves
    from advvit.findings.spec import load_experiments
    exps = load_experiments(str(ROOT / "configs" / "findings"), ["07_finetune"])
    got = [sorted(e.unit.key for e in wave) for wave in waves(exps, str(tmp_path))]
    seeds = exps[0].seeds

    def keys(*names: str) -> list:
        return sorted(f"{name} s{seed}" for name in names for seed in seeds)
    assert got == [["prepare prepare_mnist5k.py"], keys("train pretrain", "train scratch"),
                   keys("eval apgd_mnist scratch", "train finetuned"),
                   keys("eval apgd_mnist finetuned")]


@pytest.mark.parametrize("run_args, match", [
    (["nope"], "no experiment 'nope'"),
    (["t1_tiny"], "config key 'model'"),
])
def test_findings_with_a_bad_experiment_or_config_submit_nothing(tmp_path, capsys, run_args, match):
    configs = _two_experiments(tmp_path)
    path = configs / "t1_tiny.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["settings"]["wd0"]["train"]["model"] = "xcit_nano_12_p8_33"
    path.write_text(yaml.safe_dump(raw))
    root = tmp_path / "root"
    assert launch.main(["findings", "--cluster", "local", "--", "run", *run_args,
                        "--configs", str(configs), "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and match in err
    assert not root.exists()


@pytest.mark.parametrize("options, match", [
    (["--gpus-per-node", "2"], "each unit is one process"),
    (["--tasks-per-node", "2"], "each unit is one process"),
    (["--no-wait"], "no job dependencies"),
])
def test_findings_layouts_a_unit_cannot_take_are_refused(tmp_path, capsys, options, match):
    with pytest.raises(SystemExit) as stop:
        launch.main(["findings", "--cluster", "local", *options, "--", "run",
                     "--root", str(tmp_path / "root")])
    assert stop.value.code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "root").exists()


def _records(results: Path, root: Path) -> dict:
    """Each experiment's record as ``report`` wrote it, its root named ROOT, without clocks.

    A fine-tuning's run name hashes the path of the checkpoint it starts from, which is under
    the root: run names lose their hash here. A checkpoint holds its run folder and the time it
    was written, so the checkpoints' sha256 differ between roots; `_assert_same_checkpoints`
    compares what they hold instead."""
    def text(path: Path) -> str:
        return re.sub(r"(-s\d+-)[0-9a-f]{8}\b", r"\1HASH",
                      path.read_text().replace(str(root), "ROOT"))

    def without_clocks(record: dict) -> dict:
        for run in record.get("runs", {}).values():
            run.pop("finished"), run.pop("sha256")
        for m in record.get("measurements", []):
            m["provenance"].pop("sha256")
        return _without_timing(record)
    return {p.stem: without_clocks(json.loads(text(p))) for p in sorted(results.glob("*.json"))}


def _assert_same_checkpoints(a: Path, b: Path) -> None:
    """Each run in the records under root ``a`` has the same best and last checkpoints (weights,
    step, best metric) as the run of that name in the records under root ``b``."""
    def folders(root: Path) -> dict:
        return {(p.stem, name): Path(run["folder"])
                for p in sorted((root / "docs").glob("*.json"))
                for name, run in json.loads(p.read_text())["runs"].items()}
    left, right = folders(a), folders(b)
    assert left.keys() == right.keys() and left, (sorted(left), sorted(right))
    for key, folder in left.items():
        for name in ("best.pth", "last.pth"):
            x = checkpoint.load_checkpoint(folder / name)
            y = checkpoint.load_checkpoint(right[key] / name)
            _assert_same_weights(x, y)
            assert (x["epoch"], x["step"], x["best_metric"]) == (
                y["epoch"], y["step"], y["best_metric"]), (key, name)


@pytest.mark.slow
def test_findings_as_local_job_arrays_give_the_sequential_runners_records(tmp_path):
    from advvit.findings.__main__ import main as findings_main
    from advvit.findings.plan import jobs_path
    configs = _two_experiments(tmp_path)
    suite = ["--configs", str(configs), "--threads", "1"]
    seq, arr = tmp_path / "sequential", tmp_path / "arrays"
    ran = subprocess.run([sys.executable, "-m", "advvit.findings", "run", *suite, "--yes",
                          "--root", str(seq), "--results", str(seq / "docs")],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    launched = subprocess.run([sys.executable, "-m", "advvit.launch", "findings", "--cluster",
                               "local", "--timeout-min", "30", "--", "run", *suite,
                               "--root", str(arr)],
                              cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    out = launched.stdout
    # The shared run and evaluation once; the fine-tuning after the training it starts from.
    assert re.search(r"wave 0: 2 unit\(s\) \(local\).*wave 1: 3 unit\(s\) \(local\).*"
                     r"wave 2: 1 unit\(s\) \(local\)", out, re.S), out
    assert out.count("done  ") == 6 and "error" not in out
    assert len(json.loads(Path(jobs_path(str(arr))).read_text())["t2_tuned"]) == 4
    assert findings_main(["report", *suite, "--root", str(arr), "--results",
                          str(arr / "docs")]) == 0
    expected, got = _records(seq / "docs", seq), _records(arr / "docs", arr)
    assert set(got) == {"t1_tiny", "t2_tuned"} and got == expected
    _assert_same_checkpoints(seq, arr)
    again = subprocess.run([sys.executable, "-m", "advvit.launch", "findings", "--cluster",
                            "local", "--", "run", *suite, "--root", str(arr)],
                           cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to run: every unit is done" in again.stdout


@pytest.mark.slow
def test_a_failed_findings_unit_is_reported_with_its_log_and_what_needs_it_is_not_run(tmp_path):
    configs = _two_experiments(tmp_path)
    root = tmp_path / "root"
    launched = subprocess.run([sys.executable, "-m", "advvit.launch", "findings", "--cluster",
                               "local", "--timeout-min", "30", "--", "run", "t1_tiny",
                               "--configs", str(configs), "--root", str(root), "--threads", "1"],
                              cwd=ROOT, env=_env(**{KILL_ENV: "log:1"}), capture_output=True,
                              text=True, timeout=600)
    out = launched.stdout
    assert launched.returncode == 1, out + launched.stderr
    # Both trainings were run, each killed at its first log line; their evaluations were not.
    assert out.count("error: t1_tiny: train") == 2 and "failed (exit -9); the end of" in out
    assert out.count("not run  t1_tiny: eval pgd") == 2 and "wave 1" not in out


def _pids_with(*words: str) -> list:
    """The processes whose command line holds every one of ``words``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if all(w.encode() in cmdline for w in words):
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_a_preempted_findings_element_is_requeued_and_resumes_its_training(tmp_path):
    configs = _two_experiments(tmp_path)
    raw = yaml.safe_load((tmp_path / "train.yaml").read_text())
    raw.update(max_steps_per_epoch=6, recovery_interval_steps=1)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(raw))
    root = tmp_path / "root"
    proc = subprocess.Popen([sys.executable, "-m", "advvit.launch", "findings", "--cluster",
                             "local", "--timeout-min", "30", "--", "run", "t1_tiny", "--configs",
                             str(configs), "--root", str(root), "--threads", "1"], cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 300
        while not (points := list(root.glob("runs/*/recovery.pth"))):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.05)
        run = points[0].parent
        # As Slurm warns every process of a job: the elements and their units' commands.
        elements = _pids_with("submitit.core._submit", str(root / "submitit"))
        commands = _pids_with("advvit.train", str(root))
        assert elements and commands
        for pid in elements + commands:
            os.kill(pid, signal.SIGUSR2)
        out = proc.communicate(timeout=600)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0 and out.count("done  ") == 4, out
    assert "Requeued job" in "".join(p.read_text() for p in (root / "submitit").glob("*_log.out"))
    # The command heard SIGUSR2 as nothing, stopped on its element's SIGTERM and was resumed.
    assert "stopped on SIGTERM" in (run / "findings_train.log").read_text()
    history = yaml.safe_load((run / "resume_history.yaml").read_text())
    assert history and history[0]["checkpoint"].endswith("recovery.pth")
