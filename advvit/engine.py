"""The training and evaluation loops, given parts that are already built.

Nothing here reads a config file or parses arguments: ``advvit.train`` builds the model, loss,
optimizer, schedules and loaders, and hands each loop what it needs.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from . import accel
from .attacks import model_mode, pgd
from .schedules import EpsSchedule

__all__ = ["StepSettings", "EpochProgress", "EpochStopped", "NonFiniteLossError",
           "train_one_epoch", "evaluate", "robust_accuracy", "autocast", "check_finite"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stops before saving a checkpoint."""


@dataclass
class StepSettings:
    """How each optimizer step is taken.

    Attributes:
        amp: None, "bf16" or "fp16" autocast.
        clip_grad: gradient clipping threshold, or None.
        clip_mode: "norm", "value" or "agc" (timm's ``dispatch_clip_grad``).
        channels_last: move inputs to channels-last memory format.
        log_interval: steps between progress reports (and metric reductions).
        max_steps: stop the epoch after this many steps (None: the whole loader).
    """

    amp: Optional[str] = None
    clip_grad: Optional[float] = None
    clip_mode: str = "norm"
    channels_last: bool = False
    log_interval: int = 50
    max_steps: Optional[int] = None


@dataclass
class EpochProgress:
    """How far an epoch has got at a log point: what it takes to continue it exactly.

    Attributes:
        step: the global optimizer step.
        steps_done: optimizer steps (batches) taken in this epoch.
        sums: the epoch's metric sums so far, reduced over processes.
        images: training images this process has seen in the epoch.
        seconds: time spent in the epoch's steps so far.
        interval: the running sums of the steps after the last log point (one process's, as
            ``DeviceMetrics.state`` gives them), where the epoch stopped between log points.
    """

    step: int = 0
    steps_done: int = 0
    sums: Dict[str, float] = field(default_factory=dict)
    images: int = 0
    seconds: float = 0.0
    interval: Dict[str, Dict[str, float]] = field(default_factory=dict)


class EpochStopped(Exception):
    """The epoch was stopped after a step, as asked; ``progress`` is where (a recovery point).

    Attributes:
        progress: the epoch's progress after that step.
    """

    def __init__(self, progress: EpochProgress) -> None:
        super().__init__(f"stopped at step {progress.step}")
        self.progress = progress


def check_finite(module: nn.Module, what: str, *, epoch: int, step: int) -> None:
    """Raise ``NonFiniteLossError`` when a weight or buffer of ``module`` is NaN or infinite.

    One device reduction and one host read for the whole model, so it is cheap at save time.
    """
    tensors = [(name, t) for name, t in module.state_dict().items() if t.is_floating_point()]
    if not tensors:
        return
    flags = torch.stack([torch.isfinite(t).all() for _, t in tensors])
    if bool(flags.all()):
        return
    bad = [name for (name, _), ok in zip(tensors, flags.tolist()) if not ok]
    raise NonFiniteLossError(
        f"the {what} became NaN or infinite at epoch {epoch}, step {step} (first: {bad[0]}; "
        f"{len(bad)} tensors); no checkpoint of it is written and the last good one is kept: "
        "lower the learning rate, enable clip_grad, or use amp bf16")


def autocast(rt: accel.Runtime, amp: Optional[str]) -> contextlib.AbstractContextManager:
    """The autocast context for the runtime's device type, or a null context."""
    if amp in (None, "none"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    device_type = "cuda" if rt.kind == "cuda" else ("xla" if rt.kind == "xla" else "cpu")
    return torch.autocast(device_type=device_type, dtype=dtype)


def _hard_labels(y: torch.Tensor) -> torch.Tensor:
    return y.argmax(dim=1) if y.dim() > 1 else y


def _to_device(x: torch.Tensor, y: torch.Tensor, rt: accel.Runtime,
               channels_last: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    x = x.to(rt.device, non_blocking=True)
    y = y.to(rt.device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def train_one_epoch(
    *,
    model: nn.Module,
    loss_fn: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    rt: accel.Runtime,
    eps_schedule: EpsSchedule,
    epoch: int,
    step: int,
    settings: StepSettings,
    lr_scheduler: Any = None,
    scaler: Any = None,
    ema: Any = None,
    mixup_fn: Optional[Callable] = None,
    on_log: Optional[Callable[[int, Dict[str, float]], None]] = None,
    resume: Optional[EpochProgress] = None,
    on_progress: Optional[Callable[[EpochProgress], None]] = None,
    stop: Optional[Callable[[int], bool]] = None,
) -> Tuple[Dict[str, float], int]:
    """One pass over ``loader`` with the (adversarial) loss.

    Metrics are summed on the device and reduced over processes only every ``log_interval``
    steps, so the step never waits for the host (nor cuts an XLA graph) to log.

    Args:
        model: the model as trained (DDP-wrapped where distributed).
        loss_fn: an ``advvit.losses`` module; its ``eps`` is set from ``eps_schedule`` each step.
        loader: yields (x in [0, 1], y).
        optimizer: the optimizer.
        rt: the runtime from ``accel.setup``.
        eps_schedule: eps as a function of the global optimizer step.
        epoch: the epoch index (for logs).
        step: the global optimizer step at the start of the epoch.
        settings: amp, clipping, logging.
        lr_scheduler: a timm scheduler stepped per update (``step_update``), or None.
        scaler: timm's ``NativeScaler`` for fp16, or None.
        ema: a timm ``ModelEmaV3`` (or similar with ``update(model, step=)``), or None.
        mixup_fn: timm's ``Mixup`` (returns soft targets), or None.
        on_log: called with (step, metrics) at each log interval on every rank.
        resume: where an interrupted epoch stopped (its ``step`` is the ``step`` given);
            ``loader`` then yields the batches after its ``steps_done`` (the caller skips those).
        on_progress: called with the epoch's progress after each log interval's ``on_log``, on
            every rank (recovery checkpoints are written there).
        stop: asked with the global step whether to stop there: after every step in a single
            process, at log points only when distributed (where the ranks synchronize anyway;
            every rank must answer alike).

    Returns:
        (the epoch's metrics, the global step after the epoch).

    Raises:
        NonFiniteLossError: the loss became NaN or infinite.
        EpochStopped: ``stop`` said so; it carries the progress to continue from.
    """
    model.train()
    meter = accel.DeviceMetrics(rt)
    target_model = accel.attack_model(model)
    done = resume or EpochProgress(step=step)
    if done.step != step:
        raise ValueError(f"resume is at step {done.step}, the epoch was given step {step}")
    if done.interval:
        meter.load_state(done.interval)
    # Reduced sums of the intervals read so far: the same on every rank, summed on the host.
    epoch_sums = dict(done.sums)
    start = interval_start = time.perf_counter() - done.seconds
    interval_images = 0
    epoch_images = done.images
    last_eps = 0.0

    def report(final: bool) -> Dict[str, float]:
        nonlocal interval_start, interval_images
        sums = meter.read()
        for name, value in sums.items():
            epoch_sums[name] = epoch_sums.get(name, 0.0) + value
        if sums.get("nonfinite", 0) > 0:
            raise NonFiniteLossError(
                f"the training loss became NaN or infinite at epoch {epoch}, near step {step} "
                f"(eps {last_eps:.5f}, lr {optimizer.param_groups[0]['lr']:.3g}); the last good "
                "checkpoint is kept: lower the learning rate, enable clip_grad, or use amp bf16")
        elapsed = max(time.perf_counter() - interval_start, 1e-9)
        metrics = _summarise(sums)
        metrics.update(eps=last_eps, lr=optimizer.param_groups[0]["lr"],
                       images_per_s=interval_images * rt.world_size / elapsed)
        interval_start, interval_images = time.perf_counter(), 0
        if on_log is not None and not final:
            on_log(step, metrics)
        return metrics

    steps_done = done.steps_done
    for x, y in loader:
        if settings.max_steps is not None and steps_done >= settings.max_steps:
            break
        x, y = _to_device(x, y, rt, settings.channels_last)
        labels = y
        if mixup_fn is not None:
            x, y = mixup_fn(x, y)
        last_eps = eps_schedule(step)
        loss_fn.eps = last_eps
        with autocast(rt, settings.amp):
            out = loss_fn(model, x, y, attack_model=target_model)
        loss = out.loss
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler(loss, optimizer, clip_grad=settings.clip_grad, clip_mode=settings.clip_mode,
                   parameters=model.parameters())
        else:
            loss.backward()
            accel.optimizer_step(optimizer, rt, clip_grad=settings.clip_grad,
                                 clip_mode=settings.clip_mode)
        step += 1
        steps_done += 1
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=step)
        if ema is not None:
            ema.update(accel.attack_model(model), step=step)
        accel.barrier(rt)

        n = labels.shape[0]
        loss_d = loss.detach().float()
        values: Dict[str, Any] = {"count": n, "loss_sum": loss_d * n,
                                  "nonfinite": (~torch.isfinite(loss_d)).float()}
        labels = _hard_labels(labels)
        if out.adv_logits is not None:
            values["adv_correct"] = (out.adv_logits.argmax(1) == labels).sum()
        if out.clean_logits is not None:
            # Counted apart: clean logits may exist on some steps only (free at eps 0).
            values["clean_correct"] = (out.clean_logits.argmax(1) == labels).sum()
            values["clean_count"] = n
        meter.add(**values)
        interval_images += n
        epoch_images += n
        at_log = step % settings.log_interval == 0
        if at_log:
            report(final=False)
            if on_progress is not None:
                on_progress(EpochProgress(step=step, steps_done=steps_done,
                                          sums=dict(epoch_sums), images=epoch_images,
                                          seconds=time.perf_counter() - start))
        if stop is not None and (at_log or not rt.distributed) and stop(step):
            raise EpochStopped(EpochProgress(step=step, steps_done=steps_done,
                                             sums=dict(epoch_sums), images=epoch_images,
                                             seconds=time.perf_counter() - start,
                                             interval=meter.state()))

    if meter.names():
        report(final=True)
    totals = _summarise(epoch_sums)
    seconds = max(time.perf_counter() - start, 1e-9)
    totals.update(eps=last_eps, lr=optimizer.param_groups[0]["lr"],
                  images_per_s=epoch_images * rt.world_size / seconds, steps=steps_done,
                  seconds=seconds)
    return totals, step


def _summarise(sums: Dict[str, float]) -> Dict[str, float]:
    count = max(sums.get("count", 0.0), 1.0)
    out = {"loss": sums.get("loss_sum", math.nan) / count}
    if "adv_correct" in sums:
        out["train_adv_acc"] = sums["adv_correct"] / count
    # Only where every step had clean logits: a figure from the eps-0 steps alone would mislead.
    if sums.get("clean_count", 0) == count:
        out["train_clean_acc"] = sums["clean_correct"] / count
    return out


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                    steps: int, norm: str = "linf", step_size: Optional[float] = None,
                    random_init: bool = True, amp: Optional[str] = None,
                    rt: Optional[accel.Runtime] = None) -> torch.Tensor:
    """Number of examples still classified correctly under a PGD attack (a device tensor).

    The attack runs as ``accel.attack_policy(rt)`` says (on XLA in train mode, BatchNorm
    statistics kept); the adversarial examples are classified in eval mode, and the model's
    modes are as they were afterwards.
    """
    ctx = autocast(rt, amp) if rt is not None else contextlib.nullcontext()
    policy = accel.attack_policy(rt)
    with ctx:
        x_adv = pgd(model, x, y, eps=eps, steps=steps, norm=norm, step_size=step_size,
                    random_init=random_init, check_range=False, model_mode=policy.mode,
                    on_step=policy.on_step)
        with torch.no_grad(), model_mode(model, "eval"):
            return (model(x_adv).argmax(1) == y).sum()


def evaluate(model: nn.Module, loader: Iterable, *, rt: accel.Runtime,
             attack: Optional[Dict[str, Any]] = None, amp: Optional[str] = None,
             max_batches: Optional[int] = None, channels_last: bool = False) -> Dict[str, float]:
    """Clean and (optionally) robust accuracy on a held-out loader, summed over processes.

    Args:
        model: the model (un-wrapped from DDP here: each rank evaluates its own shard).
        loader: yields (x in [0, 1], y).
        rt: the runtime.
        attack: keyword arguments of ``advvit.attacks.pgd`` (eps, steps, norm, step_size,
            random_init), or None for clean accuracy only.
        amp: autocast mode.
        max_batches: evaluate at most this many batches per process.
        channels_last: channels-last inputs.

    Returns:
        {"clean_acc", "clean_loss", "robust_acc" (with an attack), "n"}.
    """
    net = accel.attack_model(model)
    meter = accel.DeviceMetrics(rt)
    with model_mode(net, "eval"):
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = _to_device(x, y, rt, channels_last)
            with torch.no_grad(), autocast(rt, amp):
                logits = net(x)
                loss = torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum")
            values: Dict[str, Any] = {"n": y.shape[0], "clean_correct": (logits.argmax(1) == y).sum(),
                                      "clean_loss": loss}
            if attack is not None and attack.get("eps", 0) > 0:
                values["robust_correct"] = robust_accuracy(net, x, y, amp=amp, rt=rt, **attack)
            elif attack is not None:
                values["robust_correct"] = values["clean_correct"]
            meter.add(**values)
            accel.barrier(rt)
    sums = meter.read()
    n = max(sums.get("n", 0.0), 1.0)
    out = {"n": sums.get("n", 0.0), "clean_acc": sums.get("clean_correct", 0.0) / n,
           "clean_loss": sums.get("clean_loss", math.nan) / n}
    if "robust_correct" in sums:
        out["robust_acc"] = sums["robust_correct"] / n
    return out
