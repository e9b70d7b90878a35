"""Where the code runs: CPU, CUDA (one GPU or many with torchrun + DDP) and XLA (TPU via PJRT).

Everything that differs between those back-ends sits here, so the training loop reads the same
on all of them::

    rt = accel.setup()                                  # "auto": xla > cuda > cpu
    model = accel.wrap_model(model, rt)                 # DDP where distributed on CPU / CUDA
    loss_fn.on_step = lambda: accel.barrier(rt)         # the XLA barrier after each attack step
    meter = accel.DeviceMetrics(rt)
    for x, y in loader:
        out = loss_fn(model, x, y, attack_model=accel.attack_model(model))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        accel.optimizer_step(optimizer, rt)             # xm.optimizer_step on XLA
        meter.add(loss=out.loss.detach() * len(y), count=len(y))  # stays on the device
        accel.barrier(rt)
        if step % log_interval == 0:
            print(meter.read())                         # one reduction, one host transfer
    accel.cleanup(rt)

torch-xla is optional: it is imported only when the XLA back-end is asked for (or found by
``setup("auto")`` because ``PJRT_DEVICE`` is set), and timm only for its gradient clipping modes
(``optimizer_step``), so importing this module loads torch and ``advvit.wrappers`` (for
``unwrap``) only.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Literal, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .io import OptionError
from .wrappers import unwrap

__all__ = [
    "Runtime", "AccelError", "AttackPolicy", "setup", "barrier", "wrap_model", "attack_model",
    "attack_policy", "optimizer_step", "all_reduce_sum", "DeviceMetrics", "wait_for_all",
    "launch_xla", "cleanup", "xla_available", "resolve_device", "check_amp", "torchrun_rank",
    "all_gather_objects", "ThreadsError", "parse_threads", "usable_cores", "resolve_threads",
    "apply_threads", "thread_facts", "add_threads_option",
]

Kind = Literal["cpu", "cuda", "xla"]
DEVICES = ("auto", "cpu", "cuda", "xla")

XLA_INSTALL_HINT = (
    "install torch-xla built for the installed torch: `pip install advvit[xla]` pulls the newest "
    "torch-xla, and each torch-xla X.Y needs torch X.Y (the newest, 2.9.0, needs "
    "`pip install torch==2.9.0 torchvision==0.24.0 torch-xla==2.9.0`); "
    "scripts/setup_xla_env.sh builds such an environment in .venv-xla"
)


class AccelError(RuntimeError):
    """A back-end was asked for that this machine or install cannot give; the message says why."""


@dataclass(frozen=True)
class Runtime:
    """Where this process runs and its place among the others.

    Attributes:
        kind: "cpu", "cuda" or "xla".
        device: the torch device tensors and the model go to.
        rank: global rank of this process (0 when alone).
        world_size: number of processes (XLA: of PJRT devices) taking part.
        local_rank: rank among the processes on this host.
        distributed: True when world_size > 1.
        owns_process_group: whether ``setup`` created the torch.distributed process group (and
            so ``cleanup`` destroys it).
    """

    kind: Kind
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        """True on the process that writes logs and checkpoints (global rank 0)."""
        return self.rank == 0


# --------------------------------------------------------------------------------------------
# torch-xla, imported lazily
# --------------------------------------------------------------------------------------------

def _import_xla() -> Any:
    """Imports torch_xla or raises AccelError with the install recipe."""
    try:
        import torch_xla  # noqa: F401
        import torch_xla.core.xla_model  # noqa: F401
        import torch_xla.runtime  # noqa: F401
    except Exception as err:  # ImportError, or an ABI mismatch surfacing as OSError / others
        raise AccelError(
            f"device='xla' needs torch-xla, which cannot be imported here "
            f"({type(err).__name__}: {err}); torch is {torch.__version__}. "
            f"To fix: {XLA_INSTALL_HINT}.") from err
    return torch_xla


def xla_available() -> bool:
    """True when torch_xla imports next to the installed torch."""
    try:
        _import_xla()
    except AccelError:
        return False
    return True


def _xla_sync() -> None:
    import torch_xla
    if hasattr(torch_xla, "sync"):
        torch_xla.sync()
    else:  # torch-xla < 2.6 only has the old name
        import torch_xla.core.xla_model as xm
        xm.mark_step()


# --------------------------------------------------------------------------------------------
# CPU threads
# --------------------------------------------------------------------------------------------

THREADS_HELP = ("torch CPU threads: a positive integer, or auto (OMP_NUM_THREADS when set, "
                "else the usable cores minus one, at least 1: see docs/benchmarks.md, threads "
                "under load)")


class ThreadsError(ValueError):
    """A threads setting that is neither ``auto`` nor a positive integer.

    Attributes:
        key: the setting's name (``threads``, ``--threads``).
        problem: what is wrong with the value, without the name.
    """

    def __init__(self, key: str, problem: str) -> None:
        self.key, self.problem = key, problem
        super().__init__(f"{key}: {problem}")


def parse_threads(value: Any, key: str = "threads") -> Union[str, int]:
    """``"auto"`` or a positive int, from a config or command-line value.

    Raises:
        ThreadsError: naming ``key``.
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    number: Optional[int] = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    if number is None or number < 1:
        raise ThreadsError(key, f"expected auto or a positive integer, got {value!r}")
    return number


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask: a container or taskset may allow
    fewer than the machine has)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity call (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def _omp_env_threads() -> Optional[int]:
    text = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not text:
        return None
    # OpenMP allows a list for nested levels; torch's pool is the outer one.
    first = text.split(",")[0].strip()
    if first.isdigit() and int(first) >= 1:
        return int(first)
    warnings.warn(f"OMP_NUM_THREADS={text!r} is not a positive integer; threads auto ignores it",
                  RuntimeWarning, stacklevel=3)
    return None


def resolve_threads(value: Any = "auto", key: str = "threads") -> int:
    """How many torch CPU threads a setting means.

    A positive integer is taken as it is. ``auto``: ``OMP_NUM_THREADS`` when the environment
    sets it, else the usable cores minus one, at least 1. Two threads on a loaded 2-core
    machine wait at every OpenMP barrier for a descheduled partner (docs/benchmarks.md), and a
    core left free keeps room for the data loader and the rest of the machine.

    Raises:
        ThreadsError: a value that is neither ``auto`` nor a positive integer (naming ``key``).
    """
    parsed = parse_threads(value, key)
    if parsed != "auto":
        return int(parsed)
    env = _omp_env_threads()
    if env is not None:
        return env
    return max(1, usable_cores() - 1)


def apply_threads(value: Any = "auto", key: str = "threads") -> int:
    """Sets torch's intra-op (and, while still allowed, inter-op) threads; returns the count.

    torch refuses a new inter-op count once inter-op work has started; the intra-op count,
    which runs the kernels, is always set.

    Raises:
        ThreadsError: a bad value (naming ``key``).
    """
    n = resolve_threads(value, key)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass
    return n


def thread_facts() -> Dict[str, Any]:
    """What decides CPU numerics and speed here, for reports: torch's thread counts, the
    vector instruction set its kernels dispatch to, the usable cores and OMP_NUM_THREADS."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001  (older torch)
        capability = None
    return {"torch_threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "cpu_capability": capability,
            "usable_cores": usable_cores(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def _threads_argument(text: str) -> Union[str, int]:
    try:
        return parse_threads(text, "--threads")
    except ThreadsError as err:
        raise argparse.ArgumentTypeError(err.problem) from None


def add_threads_option(parser: Any) -> None:
    """Registers ``--threads`` (default auto) on a parser or argument group; a bad value stops
    argparse with the option named."""
    parser.add_argument("--threads", type=_threads_argument, default="auto", help=THREADS_HELP)


# --------------------------------------------------------------------------------------------
# setup / cleanup
# --------------------------------------------------------------------------------------------

def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise AccelError(f"environment variable {name}={value!r} is not an integer") from None


def _resolve_kind(device: str) -> Kind:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        if os.environ.get("PJRT_DEVICE"):
            if xla_available():
                return "xla"
            warnings.warn(
                f"PJRT_DEVICE={os.environ['PJRT_DEVICE']} is set but torch_xla cannot be "
                f"imported; running on {'cuda' if torch.cuda.is_available() else 'cpu'} instead",
                RuntimeWarning, stacklevel=3)
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        built = torch.version.cuda
        raise AccelError(
            f"device='cuda' was asked but CUDA is not available (torch {torch.__version__}, "
            + (f"built for CUDA {built}: no GPU or driver is visible"
               if built else "a CPU-only build: install a CUDA build of torch")
            + "); use device='cpu' or 'auto'")
    if device == "xla":
        _import_xla()
    return device  # type: ignore[return-value]


def _setup_xla() -> Runtime:
    import torch_xla
    import torch_xla.runtime as xr
    # Under PJRT torch-xla knows the topology itself (no torchrun variables): gradients and
    # metrics are reduced with XLA collectives (xm.optimizer_step, xm.all_reduce) inside the
    # compiled graph. The "xla" process group is only there so that torch's DistributedSampler
    # can shard the data by rank.
    device = torch_xla.device() if hasattr(torch_xla, "device") else _legacy_xla_device()
    world = int(xr.world_size())
    threads = int(xr.addressable_device_count())
    if world > 1 and threads > 1:
        # torch.distributed has one default group per process, so every thread would read
        # the rank of whichever thread made it: the samplers would hand all of them the same
        # shard and never show the others' data.
        raise AccelError(
            f"this process drives {threads} XLA devices, one thread each (TPU v2/v3 cores, or "
            f"PJRT_DEVICE=CPU with CPU_NUM_DEVICES={os.environ.get('CPU_NUM_DEVICES', threads)});"
            " advvit shards the data by the torch.distributed rank, of which a process has only "
            "one, so the devices would all train on the same shard. Run one device per process "
            "(TPU v4 and later), or one device in all (--no-xla-spawn, or CPU_NUM_DEVICES=1)")
    owns = False
    if world > 1 and not dist.is_initialized():
        import torch_xla.distributed.xla_backend  # noqa: F401  (registers the backend)
        dist.init_process_group("xla", init_method="xla://")
        owns = True
    return Runtime(kind="xla", device=device, rank=int(xr.global_ordinal()), world_size=world,
                   local_rank=int(xr.local_ordinal()), distributed=world > 1,
                   owns_process_group=owns)


def _legacy_xla_device() -> torch.device:
    import torch_xla.core.xla_model as xm
    return xm.xla_device()


def setup(device: str = "auto", *, backend: Optional[str] = None,
          timeout: Optional[datetime.timedelta] = None) -> Runtime:
    """Picks the back-end, reads the launcher's environment and joins the process group.

    ``"auto"`` picks XLA when ``PJRT_DEVICE`` is set and torch_xla imports, else CUDA when a GPU
    is visible, else the CPU. On CPU / CUDA the torchrun variables ``RANK``, ``WORLD_SIZE`` and
    ``LOCAL_RANK`` (with ``MASTER_ADDR`` / ``MASTER_PORT``) decide the rank; with
    ``WORLD_SIZE > 1`` the default process group is initialised (nccl on CUDA, gloo on CPU)
    unless one already exists. Each CUDA process takes the GPU of its ``LOCAL_RANK``.

    Args:
        device: "auto", "cpu", "cuda" or "xla".
        backend: torch.distributed backend overriding the default (e.g. "gloo" on CUDA).
        timeout: process-group timeout; None keeps torch's default.

    Returns:
        The Runtime every other function here takes.

    Raises:
        AccelError: "cuda" without a visible GPU, "xla" without an importable torch_xla (the
            message says how to install it), a distributed launch missing its variables, or
            an XLA process driving several devices in threads (one rank per process cannot
            shard the data between them).
        ValueError: an unknown device name.
    """
    kind = _resolve_kind(device)
    if kind == "xla":
        return _setup_xla()

    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank if world > 1 else 0)
    if world < 1 or not 0 <= rank < world:
        raise AccelError(f"RANK={rank} and WORLD_SIZE={world} do not describe a process group")

    if kind == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise AccelError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are "
                "visible: start at most one process per GPU (torchrun --nproc-per-node)")
        # Before the process group: nccl binds each rank to the current device.
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")

    owns = False
    if world > 1 and not dist.is_initialized():
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise AccelError(
                f"WORLD_SIZE={world} but {', '.join(missing)} is not set: start the job with "
                "torchrun (e.g. `torchrun --nproc-per-node 2 -m advvit.train ...`)")
        kwargs: Dict[str, Any] = {}
        if timeout is not None:
            kwargs["timeout"] = timeout
        dist.init_process_group(backend or ("nccl" if kind == "cuda" else "gloo"),
                                init_method="env://", rank=rank, world_size=world, **kwargs)
        owns = True
    if dist.is_initialized():
        # A group set up by the caller wins over the environment.
        rank, world = dist.get_rank(), dist.get_world_size()
    return Runtime(kind=kind, device=torch_device, rank=rank, world_size=world,
                   local_rank=local_rank, distributed=world > 1, owns_process_group=owns)


def cleanup(rt: Runtime) -> None:
    """Leaves the process group ``setup`` created; flushes pending XLA work. Safe to call twice."""
    if rt.kind == "xla":
        _xla_sync()
    if rt.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# the step
# --------------------------------------------------------------------------------------------

def barrier(rt: Runtime) -> None:
    """The XLA step barrier (``torch_xla.sync()``); nothing on CPU / CUDA.

    torch-xla records operations lazily and compiles the whole recorded graph when it is cut.
    Cutting after every attack iteration and after the optimizer step keeps each graph one
    forward/backward large and identical from step to step, so each is compiled once; an attack
    left uncut becomes one huge graph per step count (hours to compile for PGD-10 / TRADES).
    This is not a barrier between processes: see ``wait_for_all``.
    """
    if rt.kind == "xla":
        _xla_sync()


def wrap_model(model: nn.Module, rt: Runtime, **ddp_kwargs: Any) -> nn.Module:
    """Moves the model to the runtime's device and wraps it for data parallelism.

    CPU / CUDA with several processes: ``DistributedDataParallel`` (gradients all-reduced during
    backward). XLA: the model itself, because ``optimizer_step`` reduces the gradients with
    ``xm.optimizer_step``. Single process: the model itself.

    Args:
        model: the model (its parameters identical on all ranks: DDP broadcasts rank 0's anyway).
        rt: from ``setup``.
        **ddp_kwargs: passed to DistributedDataParallel (e.g. ``find_unused_parameters``).
    """
    model = model.to(rt.device)
    if rt.distributed and rt.kind in ("cpu", "cuda"):
        device_ids = [rt.device.index] if rt.kind == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, **ddp_kwargs)
    return model


def attack_model(model: nn.Module) -> nn.Module:
    """The module attacks should call: the model without its DDP wrapper.

    Pass it as ``loss_fn(model, x, y, attack_model=accel.attack_model(model))``. Why the
    un-wrapped module rather than ``with model.no_sync():``:

    * Correct: attack gradients are taken w.r.t. the input only, with the parameters frozen, so
      nothing must reach DDP's reducer. The reducer only arms its gradient hooks in
      ``DistributedDataParallel.forward``; a forward/backward through ``model.module`` never
      arms them, so the attack can neither start an all-reduce nor leave the reducer expecting
      gradients that never come (which ``no_sync`` plus frozen parameters can still trip on with
      ``find_unused_parameters`` / static graphs). Buffers stay in step as well: attacks run in
      eval mode, and any buffer a train-mode attack did change is re-broadcast from rank 0 by
      the next DDP forward, the training forward that follows the attack.
    * Cheap: ``no_sync`` still runs DDP's forward pre-processing, including the buffer
      broadcast from rank 0 (a collective) on every attack iteration; the module alone runs no
      collective at all, so each rank attacks its own shard at single-process speed.

    This is ``wrappers.unwrap(model, "parallel")``: a compiled module inside DDP stays compiled
    (``compile(DDP(compile(m)))`` gives ``compile(m)``), the normalization wrapper stays, and a
    model without DDP (single process, XLA) is returned as it is.
    """
    return unwrap(model, "parallel")


@dataclass(frozen=True)
class AttackPolicy:
    """How attacks run on a back-end (training, evaluation and the overfitting check alike).

    Attributes:
        mode: the model's mode during the attack, ``advvit.attacks.pgd``'s ``model_mode``
            ("eval" or "train").
        on_step: called after every attack iteration (``pgd``'s ``on_step``), or None.
    """

    mode: Literal["eval", "train"] = "eval"
    on_step: Optional[Callable[[], None]] = None


def attack_policy(rt: Optional[Runtime]) -> AttackPolicy:
    """The one place that decides how attacks run on ``rt``'s back-end.

    XLA: train mode, because torch-xla 2.9 has no backward for eval-mode BatchNorm ("size of
    offset factor is 0"; XCiT has BatchNorm in its patch embedding and LPI), and the step
    barrier after every iteration (see ``barrier``). Attacks keep BatchNorm's running
    statistics as they were (``advvit.attacks.frozen_model``), so the only difference from eval
    mode is batch statistics inside the attack. Elsewhere, or without a runtime: eval mode and
    no hook.
    """
    if rt is None or rt.kind != "xla":
        return AttackPolicy()
    return AttackPolicy(mode="train", on_step=functools.partial(barrier, rt))


def optimizer_step(optimizer: torch.optim.Optimizer, rt: Runtime, *,
                   clip_grad: Optional[float] = None, clip_mode: str = "norm",
                   parameters: Optional[Iterable[torch.Tensor]] = None) -> None:
    """Takes the optimizer step the back-end's way, with the gradient reduction it needs.

    XLA: the gradients are all-reduced across the PJRT devices (``xm.reduce_gradients``, the
    first half of ``xm.optimizer_step``) before clipping, so every device clips the same global
    gradient; without clipping this is exactly ``xm.optimizer_step(optimizer)``. CPU / CUDA:
    DDP has already averaged the gradients during backward; this clips and steps.

    Args:
        optimizer: the optimizer.
        rt: from ``setup``.
        clip_grad: clipping threshold, or None for no clipping.
        clip_mode: "norm" (global L2 norm), or timm's "value" / "agc".
        parameters: what to clip; default all parameters of the optimizer.
    """
    if rt.kind == "xla":
        import torch_xla.core.xla_model as xm
        if clip_grad is None:
            xm.optimizer_step(optimizer)
            return
        xm.reduce_gradients(optimizer)
    if clip_grad is not None:
        params = list(parameters) if parameters is not None else [
            p for group in optimizer.param_groups for p in group["params"]]
        if clip_mode == "norm":
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
        else:
            from timm.utils import dispatch_clip_grad
            dispatch_clip_grad(params, clip_grad, mode=clip_mode)
    optimizer.step()


# --------------------------------------------------------------------------------------------
# reductions and metrics
# --------------------------------------------------------------------------------------------

def all_reduce_sum(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """The element-wise sum of ``t`` over all processes, as a new tensor (``t`` is untouched).

    On XLA the sum is one more lazy operation in the graph (``xm.all_reduce``): nothing is
    executed or read back here. Single process: ``t`` itself.
    """
    if not rt.distributed:
        return t
    if rt.kind == "xla":
        import torch_xla.core.xla_model as xm
        return xm.all_reduce(xm.REDUCE_SUM, t)
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


class DeviceMetrics:
    """Sums of per-step metrics kept on the device, reduced and read once per log interval.

    ``add`` only records tensor additions (lazy on XLA, asynchronous on CUDA), so logging costs
    no host synchronisation per step; ``read`` all-reduces every sum over the processes in one
    collective and copies them to the host in one transfer. Add sums (``loss * batch``,
    ``correct`` counts, ``count``), not means, so the ratios come out right across ranks and
    unequal batches. Every rank must add the same names (the collective pairs them by name).

    On XLA the additions join the next graph that is cut (the step's, or the read's). The
    first value after a reset is kept as it is (no zero tensor made for it, which would enter
    the graph as a constant or as an extra input); every log interval then produces the same
    sequence of graphs, so they are all compiled during the first interval. Plain numbers (a
    batch size) are summed on the host and join the device sums at ``read``.
    """

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        # float32: TPUs have no fast float64, and counts stay exact up to 2**24 per interval.
        self.dtype = torch.float32 if rt.kind == "xla" else torch.float64
        self._sums: Dict[str, torch.Tensor] = {}
        self._host: Dict[str, float] = {}

    def add(self, **values: Union[torch.Tensor, float, int]) -> None:
        """Adds each value (a tensor on the device, summed, or a number) to its running sum."""
        for name, value in values.items():
            if torch.is_tensor(value):
                if name in self._host:
                    raise ValueError(f"metric {name!r} was added as a number before, now a tensor")
                v = value.detach().to(self.dtype).sum()
                prev = self._sums.get(name)
                self._sums[name] = v if prev is None else prev + v
            else:
                if name in self._sums:
                    raise ValueError(f"metric {name!r} was added as a tensor before, now a number")
                self._host[name] = self._host.get(name, 0.0) + float(value)

    def names(self) -> Sequence[str]:
        """The metric names added since the last reset, sorted."""
        return sorted([*self._sums, *self._host])

    def read(self, reset: bool = True) -> Dict[str, float]:
        """Sums over all processes and steps since the last reset, as Python floats.

        Collective when distributed: every rank must call it at the same step.
        """
        names = self.names()
        if not names:
            return {}
        host = torch.tensor([self._host.get(n, 0.0) for n in names], dtype=self.dtype)
        if self._sums:
            zero = torch.zeros((), dtype=self.dtype, device=self.rt.device)
            # One vector: one collective and one device-to-host copy, however many metrics.
            vector = torch.stack([self._sums.get(n, zero) for n in names]) + host.to(self.rt.device)
        elif self.rt.distributed:
            vector = host.to(self.rt.device)  # nccl and XLA collectives need device tensors
        else:
            vector = host  # numbers only, one process: nothing to run on the device
        values = all_reduce_sum(vector, self.rt).cpu().tolist()
        if reset:
            self.reset()
        return dict(zip(names, values))

    def reset(self) -> None:
        """Forgets the sums."""
        self._sums = {}
        self._host = {}

    def state(self) -> Dict[str, Dict[str, float]]:
        """This process's running sums as numbers (not reduced), for ``load_state`` to go on
        from, bit for bit, in another process."""
        return {"device": {n: float(v) for n, v in self._sums.items()}, "host": dict(self._host)}

    def load_state(self, state: Dict[str, Dict[str, float]]) -> None:
        """Go on from the sums ``state`` returned (in place of the current ones)."""
        self._sums = {n: torch.tensor(v, dtype=self.dtype, device=self.rt.device)
                      for n, v in state["device"].items()}
        self._host = dict(state["host"])


def wait_for_all(rt: Runtime, tag: str = "advvit") -> None:
    """Blocks until every process reaches this point (e.g. rank 0 finished a checkpoint).

    Unlike ``barrier`` this synchronises processes, not an XLA graph: ``dist.barrier`` on CPU /
    CUDA, ``xm.rendezvous`` on XLA. A no-op in a single process.
    """
    if not rt.distributed:
        return
    if rt.kind == "xla":
        import torch_xla.core.xla_model as xm
        xm.rendezvous(tag)
    else:
        dist.barrier()


# --------------------------------------------------------------------------------------------
# launching on all local TPU cores
# --------------------------------------------------------------------------------------------

def launch_xla(fn: Callable[..., Any], args: tuple = (), *,
               debug_single_process: bool = False) -> None:
    """Runs ``fn(index, *args)`` once per local XLA device, in its own process each.

    torch-xla's launcher (``torch_xla.launch``, or ``xmp.spawn`` on older versions) starts one
    process per local TPU chip/core as PJRT requires and sets up their ranks; inside ``fn``,
    ``setup("xla")`` (or "auto") then gives each process its device, rank and world size. The
    number of processes comes from the hardware (``PJRT_DEVICE`` / ``TPU_PROCESS_BOUNDS``).
    With ``PJRT_DEVICE=CPU`` it is a single process, which runs ``fn`` in one thread per CPU
    device (``CPU_NUM_DEVICES``, default 1); ``setup`` refuses more than one device per
    process (see docs/architecture.md, accel, for what blocks several devices on the CPU).

    Args:
        fn: a picklable top-level function taking the process index first.
        args: the further positional arguments of ``fn``.
        debug_single_process: run one process only, for debugging on a TPU host.

    Raises:
        AccelError: torch_xla cannot be imported (the message says how to install it).
    """
    torch_xla = _import_xla()
    if hasattr(torch_xla, "launch"):
        torch_xla.launch(fn, args=args, debug_single_process=debug_single_process)
    else:
        import torch_xla.distributed.xla_multiprocessing as xmp
        xmp.spawn(fn, args=args, nprocs=1 if debug_single_process else None)


def resolve_device(text: str) -> torch.device:
    """A ``--device`` option: "auto" (CUDA when visible, else the CPU), "cpu" or "cuda[:N]".

    Raises:
        OptionError: an unknown device, or CUDA asked for without a GPU.
    """
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise OptionError(f"--device {text!r} is unknown: use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device {text} asked for, but no GPU is visible: use --device cpu")
    return device


def check_amp(amp: str | None, device: torch.device) -> None:
    """An ``--amp`` option (None, "bf16" or "fp16") against the device that runs it.

    Raises:
        OptionError: a device without that autocast precision, naming the fix.
    """
    if amp is None:
        return
    if amp == "fp16" and device.type != "cuda":
        raise OptionError("--amp fp16 needs a CUDA --device: on the CPU use --amp bf16")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise OptionError(f"--amp bf16: {torch.cuda.get_device_name(device)} has no bf16: use "
                          "--amp fp16")


def torchrun_rank() -> tuple[int, int]:
    """(rank, world size) as torchrun's variables give them, before any process group exists."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def all_gather_objects(obj: Any, world: int) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    gathered: list = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered
