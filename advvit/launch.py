"""Training and evaluation on a cluster through submitit: ``python -m advvit.launch``.

    python -m advvit.launch train --nodes 2 --gpus-per-node 8 --partition gpu \\
        --timeout-min 1440 -- --config configs/xcit_s12_adv.yaml --data-dir /data/imagenet
    python -m advvit.launch eval --gpus-per-node 4 -- --checkpoint run/best.pth ...
    python -m advvit.launch train --cluster local --tasks-per-node 2 -- --config ...
    python -m advvit.launch findings --gpus-per-node 1 --partition gpu -- run --root out/f

The launcher's own options come before ``--``, the command's own after it. The command's own
validation runs here first (train: the config and its preflight; eval: ``--check-only``, the
model reference and the examples on this machine's CPU), so a bad config is refused with one
message (exit 2) and never reaches the queue.

``findings`` runs the findings suite's units that are not done as job arrays, one process
each, in waves by what they need (:mod:`advvit.findings.jobs`; its own checks first, as
``python -m advvit.findings run`` makes them).

Each of the nodes x tasks-per-node tasks reads its place from submitit's job environment, sets
the variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) and runs ``python -m advvit.train`` / ``advvit.eval`` with them, so
``accel.setup`` joins the process group exactly as under torchrun: one process per rank, the
same run folder, lock, logs and checkpoints. On preemption or time-out (submitit's signal,
SIGUSR2 by default) every task stops its command with SIGTERM and rank 0 requeues the job
through submitit's checkpointing hook: a training job goes on with ``--resume auto`` from the
run folder's last recovery point or epoch checkpoint, an evaluation reruns as it was asked
(resuming from its ``--state-path`` files when it has them).

``--cluster``: ``slurm`` (the default where ``sbatch`` is on PATH), ``local`` (submitit's
LocalExecutor: the same tasks as processes on this machine, one node) or ``debug`` (one task,
run in this process). Any ``--slurm-KEY VALUE`` goes to submitit's Slurm executor as ``KEY``
(e.g. ``--slurm-account proj --slurm-constraint a100``).
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import accel, checkpoint, data
from .cli.options import eval_parser
from .config import ConfigError, load_config
from .findings import FindingsError
from .findings import jobs as findings_jobs
from .findings.plan import jobs_path
from .preflight import validate
from .rundir import resume_auto_args, run_dir_for

__all__ = ["Task", "main"]

COMMANDS = ("train", "eval", "findings")
CLUSTERS = ("slurm", "local", "debug")
INSTALL_HINT = "pip install 'advvit[slurm]' (or pip install submitit)"
# A stopped command has this long to write its recovery point before the job is requeued;
# inside submitit's Slurm signal delay (90 s before the time limit).
STOP_GRACE_S = 60


class LaunchError(ValueError):
    """A launcher option that cannot work; the message names it and the fix."""


def _ignore_preemption_signal() -> None:
    # Slurm signals every process of the job step: the command must hear only the task's SIGTERM,
    # as SIGUSR2's default action would kill it before its recovery point is written.
    import submitit
    signal.signal(submitit.JobEnvironment._usr_sig(), signal.SIG_IGN)


class Task:
    """One task of a job: the command as one torchrun rank, in a child process.

    submitit pickles it, runs it on every task and, on its preemption signal, calls
    ``checkpoint`` on rank 0 for the submission that replaces it.
    """

    def __init__(self, command: str, argv: Sequence[str]) -> None:
        self.command = command
        self.argv = list(argv)
        self._child: Optional[subprocess.Popen] = None
        self._stopping = False

    def __getstate__(self) -> Dict[str, Any]:
        return {"command": self.command, "argv": self.argv}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(state["command"], state["argv"])

    def __call__(self) -> int:
        import submitit
        dist_env = submitit.helpers.TorchDistributedEnvironment()
        # Each task binds its own GPU from LOCAL_RANK (accel.setup), as under torchrun.
        dist_env.export(set_cuda_visible_devices=False, overwrite=True)
        usr_sig = submitit.JobEnvironment._usr_sig()
        submitit_handler = signal.getsignal(usr_sig)

        def on_preemption(signum: int, frame: Any) -> None:
            self._stop_child()
            if callable(submitit_handler):
                submitit_handler(signum, frame)  # rank 0: checkpoint() and the requeue

        cmd = [sys.executable, "-m", f"advvit.{self.command}", *self.argv]
        print(f"rank {dist_env.rank} of {dist_env.world_size} (master "
              f"{dist_env.master_addr}:{dist_env.master_port}): {' '.join(cmd)}", flush=True)
        self._child = subprocess.Popen(cmd, preexec_fn=_ignore_preemption_signal)
        signal.signal(usr_sig, on_preemption)
        # Polled, not waited on: the signal handler may need the child's exit status itself.
        while (code := self._child.poll()) is None:
            time.sleep(0.5)
        if self._stopping:
            print(f"python -m advvit.{self.command} stopped for the requeue (exit {code})",
                  flush=True)
            return code
        if code != 0:
            raise RuntimeError(f"python -m advvit.{self.command} exited with status {code}")
        return code

    def _stop_child(self) -> None:
        self._stopping = True
        if self._child is not None and self._child.poll() is None:
            self._child.send_signal(signal.SIGTERM)

    def checkpoint(self) -> Any:
        """The submission that continues this job after a preemption or time-out."""
        from submitit.helpers import DelayedSubmission
        self._stop_child()
        if self._child is not None:
            try:
                self._child.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                print(f"python -m advvit.{self.command} did not stop within {STOP_GRACE_S} s; "
                      "requeued all the same", flush=True)
        argv = resume_auto_args(self.argv) if self.command == "train" else self.argv
        return DelayedSubmission(Task(self.command, argv))


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------

def _default_cluster() -> str:
    return "slurm" if shutil.which("sbatch") else "local"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m advvit.launch",
        description="Run advvit.train or advvit.eval as a submitit job, or the findings suite "
                    "as job arrays (Slurm, local processes or in this process). The command's "
                    "own arguments follow `--`.",
        epilog="Any --slurm-KEY VALUE is passed to submitit's Slurm executor as KEY.")
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("--cluster", choices=CLUSTERS, default=None,
                   help="default: slurm where sbatch is on PATH, else local")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0,
                   help="GPUs per node, one task each (default 0: CPU tasks)")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="processes per node (default: --gpus-per-node, or 1 without GPUs)")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--mem-gb", type=float, default=None, help="memory per node")
    p.add_argument("--partition", default=None, help="Slurm partition")
    p.add_argument("--timeout-min", type=int, default=24 * 60,
                   help="the job's time limit; it is requeued when reached (default 1440)")
    p.add_argument("--job-name", default=None, help="default: advvit-<command>")
    p.add_argument("--log-dir", default=None,
                   help="submitit's folder of logs and pickles, named by job id (default: "
                        "<run folder>/submitit for train, <--output's folder>/submitit for eval, "
                        "<--root>/submitit for findings)")
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=None,
                   help="wait for the job to end (default: with local and debug only)")
    return p


def _value(text: str) -> Any:
    return int(text) if text.isdigit() else text


def slurm_options(unknown: Sequence[str]) -> Dict[str, Any]:
    """``--slurm-KEY VALUE`` / ``--slurm-KEY=VALUE`` / a bare ``--slurm-FLAG`` -> {KEY: VALUE}.

    Raises:
        LaunchError: an option that is not ``--slurm-*``, or a key submitit's Slurm executor
            does not know.
    """
    from submitit.slurm.slurm import SlurmExecutor
    valid = SlurmExecutor._valid_parameters()
    options: Dict[str, Any] = {}
    i = 0
    while i < len(unknown):
        arg = unknown[i]
        if not arg.startswith("--slurm-"):
            raise LaunchError(f"unknown option {arg}: the command's own options go after `--`")
        name, eq, value = arg[len("--slurm-"):].partition("=")
        key = name.replace("-", "_")
        if key not in valid:
            raise LaunchError(f"{arg}: submitit's Slurm executor has no parameter {key!r} "
                              f"(it has: {', '.join(sorted(valid))})")
        if not eq:
            following = unknown[i + 1] if i + 1 < len(unknown) else None
            if following is None or following.startswith("--"):
                value = True
            else:
                value, i = following, i + 1
        options[key] = value if value is True else _value(value)
        i += 1
    return options



def _layout(args: argparse.Namespace, cluster: str, slurm: Dict[str, Any]) -> int:
    """Tasks per node, checked against the cluster.

    Raises:
        LaunchError: a layout or option the cluster cannot take.
    """
    for name in ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "timeout_min"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "gpus_per_node" else 1):
            raise LaunchError(f"--{name.replace('_', '-')} must be "
                              f"{'>= 0' if name == 'gpus_per_node' else '>= 1'}, got {value}")
    tasks = args.tasks_per_node or max(1, args.gpus_per_node)
    if args.gpus_per_node and tasks != args.gpus_per_node:
        raise LaunchError(f"--tasks-per-node {tasks} with --gpus-per-node {args.gpus_per_node}: "
                          "each task drives one GPU, drop --tasks-per-node")
    if cluster != "slurm":
        given = [f"--slurm-{k.replace('_', '-')}" for k in slurm]
        given += ["--partition"] if args.partition is not None else []
        if given:
            raise LaunchError(f"{', '.join(given)} need a Slurm cluster, not --cluster {cluster}:"
                              " drop them or use --cluster slurm")
        if args.nodes > 1:
            raise LaunchError(f"--nodes {args.nodes}: --cluster {cluster} runs on this machine "
                              "only (--nodes 1)")
    if cluster == "debug" and tasks > 1:
        raise LaunchError(f"--cluster debug runs one task in this process, not {tasks}: use "
                          "--cluster local for several")
    if cluster == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise LaunchError("--cluster slurm: sbatch / srun are not on PATH (no Slurm here); use "
                          "--cluster local to run the job on this machine")
    return tasks


def _check_train(argv: Sequence[str], world: int) -> str:
    """train's own validation (config and preflight) for ``world`` processes -> the run folder."""
    cfg = load_config(list(argv))
    if cfg.run.device == "xla":
        raise ConfigError("device", "xla runs start their own processes (torch_xla.launch), not "
                          "submitit tasks", "use device cuda or cpu, or run advvit.train itself")
    validate(cfg, world)
    return run_dir_for(cfg)


def _check_eval(argv: Sequence[str]) -> Optional[str]:
    """eval's own checks -> the report's path, if any: its parser (exits 2 on a bad option),
    then ``advvit.eval --check-only`` (the model reference, the data set and the examples, on
    this machine's CPU) in a child process, exiting 2 with its message when it fails."""
    parser = eval_parser()
    parser.prog = "python -m advvit.launch eval ... --"
    output = parser.parse_args(list(argv)).output
    checked = subprocess.run([sys.executable, "-m", "advvit.eval", *argv, "--check-only"])
    if checked.returncode != 0:
        print("error: python -m advvit.eval refused the command line (above): nothing was "
              "submitted", file=sys.stderr)
        raise SystemExit(2)
    return output


def _executor(args: argparse.Namespace, cluster: str, folder: Path, tasks: int,
              slurm: Dict[str, Any]) -> Any:
    import submitit
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params: Dict[str, Any] = dict(
        name=args.job_name or f"advvit-{args.command}", nodes=args.nodes,
        tasks_per_node=tasks, gpus_per_node=args.gpus_per_node, timeout_min=args.timeout_min,
        cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb)
    if cluster == "slurm":
        params.update({f"slurm_{k}": v for k, v in
                       {"partition": args.partition, **slurm}.items() if v is not None})
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def _findings_layout(args: argparse.Namespace, cluster: str, tasks: int) -> None:
    """A findings unit is one process; and waves wait for each other only through Slurm.

    Raises:
        LaunchError: several nodes or tasks per unit, or not waiting where waves must.
    """
    if args.nodes > 1 or tasks > 1:
        raise LaunchError(f"findings: each unit is one process, not --nodes {args.nodes} x "
                          f"{tasks} task(s): use --nodes 1 and at most --gpus-per-node 1")
    if cluster != "slurm" and args.wait is False:
        raise LaunchError(f"--no-wait: --cluster {cluster} has no job dependencies, so the "
                          "launcher submits each wave when the one before it has ended")


def _findings(args: argparse.Namespace, cluster: str, slurm: Dict[str, Any],
              argv: Sequence[str]) -> int:
    """The findings suite as job arrays: 0 when submitted (or, waiting, all finished), 1 when a
    unit did not finish, 2 on a bad experiment or config (nothing submitted)."""
    run_args = findings_jobs.parse_run(argv)
    try:
        exps = findings_jobs.experiments(run_args)
    except FindingsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    todo = findings_jobs.waves(exps, run_args.root)
    if not todo:
        print("nothing to run: every unit is done")
        return 0
    log_root = Path(args.log_dir or Path(run_args.root) / "submitit")
    executor = _executor(args, cluster, log_root, 1, slurm)
    wait = args.wait if args.wait is not None else cluster != "slurm"
    code = findings_jobs.run_waves(executor, cluster, todo, run_args, wait=wait)
    same = shlex.join(list(argv)[1:])
    print(f"job ids: {jobs_path(run_args.root)}\nstates: python -m advvit.findings plan {same}\n"
          f"records, once finished: python -m advvit.findings report {same}")
    return code


def _log_files(job: Any, tasks: int) -> List[str]:
    folder = job.paths.folder
    names = [f"{folder}/{job.job_id}_0_log.out", f"{folder}/{job.job_id}_0_log.err"]
    if tasks > 1:
        names.append(f"(task k: {job.job_id}_k_log.out/.err, k < {tasks})")
    return names


def _split(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    at = argv.index("--")
    return argv[:at], argv[at + 1:]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The CLI: 0 once submitted (or, when waiting, finished), 2 on bad input, 1 on a failed job."""
    own, command_argv = _split(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(own)
    try:
        import submitit  # noqa: F401
    except ImportError:
        parser.error(f"launching needs submitit: {INSTALL_HINT}")
    cluster = args.cluster or _default_cluster()
    try:
        slurm = slurm_options(unknown)
        tasks = _layout(args, cluster, slurm)
        if args.command == "findings":
            _findings_layout(args, cluster, tasks)
    except LaunchError as err:
        parser.error(str(err))
    if args.command == "findings":
        return _findings(args, cluster, slurm, command_argv)
    world = args.nodes * tasks
    if args.command == "train":
        try:
            run_dir: Optional[str] = _check_train(command_argv, world)
        except (ConfigError, data.DataNotFoundError, data.DataError, checkpoint.CheckpointError,
                accel.AccelError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        log_root = Path(args.log_dir or Path(run_dir) / "submitit")
    else:
        output = _check_eval(command_argv)
        run_dir = None
        log_root = Path(args.log_dir or (Path(output).parent if output else Path(".")) / "submitit")

    job = _executor(args, cluster, log_root, tasks, slurm).submit(
        Task(args.command, command_argv))
    print(f"job {job.job_id} ({cluster}, {args.nodes} node(s) x {tasks} task(s)): "
          f"python -m advvit.{args.command} {' '.join(command_argv)}")
    print("logs: " + " ".join(_log_files(job, tasks)))
    if run_dir is not None:
        print(f"run folder: {run_dir}")
    wait = args.wait if args.wait is not None else cluster != "slurm"
    if not wait:
        return 0
    try:
        job.results()
    except Exception as err:  # submitit wraps the task's own error
        print(f"error: job {job.job_id} failed: {err}\nsee {_log_files(job, tasks)[1]}",
              file=sys.stderr)
        return 1
    print(f"job {job.job_id} finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
