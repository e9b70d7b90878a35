"""A training run as a library: its parts built from a validated config, and the trainer.

``build(cfg)`` claims the run folder and builds the parts with timm's factories (model, loaders,
optimizer, scheduler, EMA, MixUp, AMP scaler); :class:`Trainer` runs the epochs through
``advvit.engine`` and keeps ``last.pth`` and ``best.pth`` (by robust accuracy) in the run folder
with ``args.yaml``, ``summary.csv``, TensorBoard logs and recovery points; ``train(cfg)`` does
both, stopping at a safe point on SIGTERM. The command line is ``advvit.train``.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from . import accel, checkpoint, data, engine, models, rundir
from .attacks import default_step_size
from .config import ConfigError, TrainConfig, config_to_dict, effective_lr, save_args_yaml
from .io import naming_write_errors
from .losses import create_loss, default_steps
from .monitor import Monitor
from .preflight import Checked, check, finetune_summary
from .schedules import EpsSchedule, create_eps_schedule

__all__ = ["train", "build", "Parts", "Trainer", "StopRequest", "TrainingStopped",
           "CatastrophicOverfittingGuard", "KILL_ENV"]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Parts:
    """Everything a run needs, built and validated before the first step."""

    cfg: TrainConfig
    rt: accel.Runtime
    run_dir: str
    info: data.DataInfo
    spec: checkpoint.ModelSpec
    train_loader: Any
    val_loader: Any
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    num_epochs: int
    eps_schedule: EpsSchedule
    scaler: Any
    ema: Any
    mixup_fn: Any
    resume_state: Optional[Dict[str, Any]]
    lock: rundir.RunLock
    resume_path: Optional[str] = None
    resume_changes: Optional[Dict[str, Tuple[Any, Any]]] = None
    updates_per_epoch: int = 0
    finetune: Optional[str] = None  # the fine-tuning source, in one line (finetune_summary)


def _build_loaders(cfg: TrainConfig, rt: accel.Runtime, spec: checkpoint.ModelSpec):
    d = cfg.data
    common = dict(class_list=d.class_list, val_fraction=d.val_fraction, split_seed=d.split_seed)
    try:
        train_set = data.create_dataset(d.dataset, d.data_dir, split="train", **common)
        val_set = data.create_dataset(d.dataset, d.data_dir, split="val", **common)
    except data.SplitError as err:
        raise ConfigError("val_fraction", str(err), "raise val_fraction, or 0 for the data "
                          "set's own evaluation split") from None
    device = rt.device if rt.kind == "cuda" else None
    augment = dict(scale=tuple(d.scale), ratio=tuple(d.ratio), hflip=d.hflip,
                   color_jitter=d.color_jitter or 0.0, auto_augment=d.auto_augment,
                   re_prob=d.reprob, no_aug=d.no_aug, interpolation=d.interpolation,
                   crop_padding=d.crop_padding, rotation=d.rotation)
    train_loader = data.create_loader(
        train_set, img_size=spec.img_size, in_chans=spec.in_chans, batch_size=d.batch_size,
        is_training=True, num_workers=d.workers, distributed=rt.distributed,
        device=device, **augment)
    val_loader = data.create_loader(
        val_set, img_size=spec.img_size, in_chans=spec.in_chans,
        batch_size=d.val_batch_size or d.batch_size, is_training=False, num_workers=d.workers,
        distributed=rt.distributed, device=device, interpolation=d.interpolation)
    if rt.kind == "xla":
        import torch_xla.distributed.parallel_loader as pl
        train_loader = pl.MpDeviceLoader(train_loader, rt.device)
        val_loader = pl.MpDeviceLoader(val_loader, rt.device)
    return train_loader, val_loader


def _criterion(cfg: TrainConfig):
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if cfg.data.mixup > 0 or cfg.data.cutmix > 0:
        return SoftTargetCrossEntropy()
    if cfg.data.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.data.smoothing)
    return torch.nn.CrossEntropyLoss()


def _build_loss(cfg: TrainConfig, rt: accel.Runtime) -> torch.nn.Module:
    a = cfg.attack
    common: Dict[str, Any] = dict(criterion=_criterion(cfg))
    if a.loss == "clean":
        return create_loss("clean", **common)
    steps = default_steps(a.loss, a.attack_steps)
    step_size = a.attack_step_size
    if step_size is None and a.attack_step_size_rule == "final":
        # The thesis's rule: a step fixed at the target eps's, through the eps warm-up too.
        step_size = default_step_size(a.eps, steps)
    policy = accel.attack_policy(rt)
    attack = dict(eps=a.eps, steps=steps, step_size=step_size,
                  norm=a.attack_norm, on_step=policy.on_step, check_range=False,
                  attack_mode=policy.mode, **common)
    if a.loss == "trades":
        return create_loss("trades", beta=a.trades_beta, **attack)
    return create_loss(a.loss, random_init=a.random_init, clean_logits=a.train_clean_logits,
                       **attack)


def _eval_attack(cfg: TrainConfig) -> Optional[Dict[str, Any]]:
    a = cfg.attack
    eps = a.eval_eps if a.eval_eps is not None else a.eps
    if a.eval_attack == "none":
        return None
    if a.eval_attack == "pgd":
        return dict(eps=eps, steps=a.eval_steps, norm=a.attack_norm)
    return dict(eps=eps, steps=default_steps(a.loss, a.attack_steps),
                step_size=a.attack_step_size, norm=a.attack_norm,
                random_init=a.random_init)


def build(cfg: TrainConfig) -> Parts:
    """Validate everything that can be checked, then build every part of the run.

    Raises:
        ConfigError, data.DataNotFoundError, data.DataError, checkpoint.CheckpointError: before
            any training.
    """
    accel.apply_threads(cfg.run.threads)
    rt = accel.setup(cfg.run.device)
    _seed_everything(cfg.run.seed + rt.rank)
    run_dir = rundir.run_dir_for(cfg)
    # Everything the config alone decides is checked before the run folder is touched.
    checked = check(cfg, rt.world_size)
    lock = _claim_run_dir(cfg, rt, run_dir)
    try:
        return _build_parts(cfg, rt, run_dir, lock, checked)
    except BaseException:
        lock.release()
        raise


def _check_run_keys(cfg: TrainConfig) -> None:
    """The resume and recovery keys, checked before the run folder is touched."""
    r = cfg.run
    if r.resume_override and r.resume is None:
        raise ConfigError("resume_override", "applies only when resuming",
                          "add --resume auto (or a checkpoint), or drop --resume-override")
    rundir.parse_overrides(r.resume_override)
    if r.recovery_interval_steps is not None and r.recovery_interval_steps % r.log_interval:
        # Recovery checkpoints are written at log points, where the epoch's metric sums are read.
        near = r.log_interval * max(1, round(r.recovery_interval_steps / r.log_interval))
        raise ConfigError("recovery_interval_steps", f"{r.recovery_interval_steps} is not a "
                          f"multiple of log_interval ({r.log_interval})",
                          f"use a multiple of {r.log_interval}, e.g. {near}")


def _claim_run_dir(cfg: TrainConfig, rt: accel.Runtime, run_dir: str) -> rundir.RunLock:
    """Rank 0 locks the run folder and checks what it holds; every rank learns the outcome.

    Raises:
        ConfigError: a bad resume / recovery key, a folder that cannot be written, one in use,
            or one with another run's files and no checkpoint.
    """
    _check_run_keys(cfg)
    error: Optional[ConfigError] = None
    lock = rundir.RunLock.none()
    if rt.is_main:
        try:
            rundir.check_run_dir(run_dir)
            lock = rundir.lock_run_dir(run_dir, is_main=True,
                                       say=functools.partial(print, file=sys.stderr))
            rundir.refuse_leftovers(run_dir)
        except ConfigError as err:
            lock.release()
            error = err
    if rt.world_size > 1:
        # Every rank stops alike, rather than the others waiting at the first collective.
        refused = accel.all_reduce_sum(
            torch.tensor([float(error is not None)], device=rt.device), rt)
        if error is None and float(refused.item()) > 0:
            error = ConfigError("experiment", f"the main process refused the run folder {run_dir}",
                                "see its message")
    if error is not None:
        raise error
    return lock


def _build_parts(cfg: TrainConfig, rt: accel.Runtime, run_dir: str, lock: rundir.RunLock,
                 checked: Checked) -> Parts:
    """What ``build`` does once the run folder is held."""
    info, spec = checked.info, checked.spec
    resume_path = rundir.choose_resume(run_dir, cfg.run.resume)

    resume_state, resume_changes = None, None
    if resume_path is not None:
        resume_state = checkpoint.load_checkpoint(resume_path)
        resume_changes = rundir.check_resume_config(
            resume_state["config"], config_to_dict(cfg), resume_path,
            rundir.parse_overrides(cfg.run.resume_override))
        saved = checkpoint.ModelSpec.from_dict(resume_state["spec"])
        if saved != spec:
            raise ConfigError("resume", f"{resume_path} holds {saved}, but the config builds {spec}",
                              "resume with the config the run was started with (its args.yaml)")

    train_loader, val_loader = _build_loaders(cfg, rt, spec)

    model = models.create_model(spec.arch, num_classes=spec.num_classes, in_chans=spec.in_chans,
                                img_size=spec.img_size, drop_path_rate=cfg.model.drop_path,
                                normalize=spec.normalize)
    if resume_state is not None:  # the spec fits; the weights must too, checked before any work
        for key in ("model", "ema"):
            if resume_state.get(key):
                checkpoint.check_state_dict_fits(model, resume_state[key], where=f"{resume_path} ({key})")
    finetune = None
    if checked.finetune is not None and resume_state is None:
        # The source's normalization is already the spec's (preflight.model_spec): only the
        # weights inside its wrapper move.
        dropped = models.load_finetune_weights(
            model, models.unwrap(checked.finetune.model).state_dict())
        finetune = f"{finetune_summary(checked.finetune)}; re-initialised: {dropped}"
        if rt.is_main:
            print(finetune, file=sys.stderr)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(rt.device)

    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    o = cfg.optim
    lr = effective_lr(o, cfg.data.batch_size * rt.world_size)
    optimizer = create_optimizer_v2(models.unwrap(model), opt=o.opt, lr=lr,
                                    weight_decay=o.weight_decay, momentum=o.momentum)
    updates_per_epoch = len(train_loader)
    if cfg.run.max_steps_per_epoch:
        updates_per_epoch = min(updates_per_epoch, cfg.run.max_steps_per_epoch)
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=o.sched, num_epochs=o.epochs, warmup_epochs=o.warmup_epochs,
        warmup_lr=o.warmup_lr, min_lr=o.min_lr, cooldown_epochs=o.cooldown_epochs,
        step_on_epochs=False, updates_per_epoch=updates_per_epoch)

    a = cfg.attack
    eps_schedule = create_eps_schedule(
        a.eps_schedule if a.eps_warmup_epochs > 0 else "constant", eps=a.eps,
        warmup_steps=int(round(a.eps_warmup_epochs * updates_per_epoch)),
        zero_steps=int(round(a.zero_eps_epochs * updates_per_epoch)))

    ema = None
    if cfg.model.model_ema:
        from timm.utils import ModelEmaV3
        # The whole model (normalization wrapper included), so the EMA can be evaluated as is.
        ema = ModelEmaV3(model, decay=cfg.model.model_ema_decay)
    scaler = None
    if cfg.run.amp == "fp16":
        if rt.kind != "cuda":
            raise ConfigError("amp", "fp16 loss scaling needs a CUDA device", "use amp: bf16")
        from timm.utils import NativeScaler
        scaler = NativeScaler()
    mixup_fn = None
    if cfg.data.mixup > 0 or cfg.data.cutmix > 0:
        from timm.data import Mixup
        mixup_fn = Mixup(mixup_alpha=cfg.data.mixup, cutmix_alpha=cfg.data.cutmix,
                         label_smoothing=cfg.data.smoothing, num_classes=spec.num_classes)

    if cfg.run.compile:
        model = torch.compile(model)
    model = accel.wrap_model(model, rt)
    return Parts(cfg=cfg, rt=rt, run_dir=run_dir, info=info, spec=spec,
                 train_loader=train_loader, val_loader=val_loader, model=model,
                 loss_fn=_build_loss(cfg, rt), optimizer=optimizer, lr_scheduler=lr_scheduler,
                 num_epochs=num_epochs, eps_schedule=eps_schedule, scaler=scaler, ema=ema,
                 mixup_fn=mixup_fn, resume_state=resume_state, lock=lock,
                 resume_path=resume_path, resume_changes=resume_changes,
                 updates_per_epoch=updates_per_epoch, finetune=finetune)


class CatastrophicOverfittingGuard:
    """Wong et al.'s check: PGD accuracy on a fixed training batch collapsing under FGSM training.

    Args:
        batch: a fixed (x, y) training batch on the device.
        eps, steps, norm: the PGD check's attack.
        drop: flag when accuracy falls below ``drop`` times the best seen.
    """

    def __init__(self, batch, *, eps: float, steps: int, norm: str, drop: float) -> None:
        self.x, self.y = batch
        self.eps, self.steps, self.norm, self.drop = eps, steps, norm, drop
        self.best = 0.0

    def check(self, model: torch.nn.Module, rt: accel.Runtime) -> tuple:
        """Returns (PGD accuracy on the batch, whether it collapsed)."""
        correct = engine.robust_accuracy(accel.attack_model(model), self.x, self.y, eps=self.eps,
                                         steps=self.steps, norm=self.norm, rt=rt)
        acc = float(accel.all_reduce_sum(correct.float(), rt).item()) / (
            self.y.shape[0] * rt.world_size)
        collapsed = self.best > 0 and acc < self.drop * self.best
        self.best = max(self.best, acc)
        return acc, collapsed


# Tests only: ADVVIT_KILL_AT=NAME[:N] kills the process (SIGKILL, as a preemption would) the N-th
# time (default: the first) it passes the named point: "log" (a log point inside an epoch, after
# any recovery checkpoint), "recovery_saved", "csv_appended" (the epoch's summary row written, its
# checkpoint not yet), "last_saved" (last.pth written, best.pth not yet linked).
KILL_ENV = "ADVVIT_KILL_AT"
_kill_counts: Dict[str, int] = {}


def _kill_point(name: str) -> None:
    target, _, count = os.environ.get(KILL_ENV, "").partition(":")
    if target != name:
        return
    _kill_counts[name] = _kill_counts.get(name, 0) + 1
    if _kill_counts[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _skip_batches(loader: Any, n: int, rng: Dict[str, Any]):
    """The batches of ``loader`` after its first ``n``, as an uninterrupted epoch draws them.

    The caller has restored the RNG state of the epoch's start; the first ``n`` batches are
    loaded (the sampler and the augmentations draw what they drew) but not trained on, then the
    interrupted run's RNG state at that point is restored.
    """
    batches = iter(loader)
    for i in range(n):
        if next(batches, None) is None:
            raise checkpoint.CheckpointError(
                f"the recovery checkpoint is {n} batches into its epoch, but the training loader "
                f"has {i}: the data changed; resume from last.pth (delete recovery.pth)")
    checkpoint.restore_rng_state(rng)
    yield from batches


class TrainingStopped(Exception):
    """Training stopped on SIGTERM at a safe point, its recovery point written.

    Attributes:
        path: the recovery point, the file ``--resume auto`` continues from.
        is_main: whether this process is the one that reports.
        distributed: whether the run had several processes.
    """

    def __init__(self, epoch: int, step: int, path: str, *, is_main: bool,
                 distributed: bool) -> None:
        super().__init__(f"stopped on SIGTERM at epoch {epoch}, step {step}; recovery point: "
                         f"{path}")
        self.path, self.is_main, self.distributed = path, is_main, distributed


class StopRequest:
    """Whether training was asked to stop: set by SIGTERM's handler at any moment, read by the
    trainer at its safe points."""

    def __init__(self) -> None:
        self.asked = False


class Trainer:
    """Runs the epochs of a built run, saving and logging as it goes.

    Once ``stop.asked`` is set, training ends at the next safe point: after the current step in
    a single process, at the next log point when distributed, or at the end of the epoch when
    it was set during the evaluation; the recovery point is written there and
    :class:`TrainingStopped` raised.
    """

    def __init__(self, parts: Parts, stop: Optional[StopRequest] = None) -> None:
        self.p = parts
        self.stop = stop or StopRequest()
        state = parts.resume_state
        # On resume TensorBoard hides what was logged after the checkpoint (before a kill).
        self.monitor = Monitor(parts.run_dir, is_main=parts.rt.is_main,
                               tensorboard=parts.cfg.run.tensorboard,
                               log_wandb=parts.cfg.run.log_wandb, config=config_to_dict(parts.cfg),
                               purge_step=None if state is None else int(state["step"]) + 1)
        self.start_epoch, self.step, self.best = 0, 0, -math.inf
        self.best_epoch: Optional[int] = None
        # Set when resuming inside an epoch: where it stopped, and the RNG states to continue.
        self.progress: Optional[engine.EpochProgress] = None
        self._resume_rng: Optional[Dict[str, Any]] = None
        # The RNG state at the current epoch's start, stored in recovery checkpoints.
        self._epoch_rng: Optional[Dict[str, Any]] = None
        self._last_save = time.monotonic()
        # Drawn before the RNG state is restored, so a resumed run's data order stays the same.
        self.guard = self._make_guard()
        if state is not None:
            self._restore(state)

    def _make_guard(self) -> Optional["CatastrophicOverfittingGuard"]:
        p, a = self.p, self.p.cfg.attack
        if a.co_check == "off" or a.loss == "clean":
            return None
        x, y = next(iter(p.train_loader))
        return CatastrophicOverfittingGuard(
            (x.to(p.rt.device), y.to(p.rt.device)), eps=a.eps, steps=a.co_pgd_steps,
            norm=a.attack_norm, drop=a.co_drop)

    def _restore(self, state: Dict[str, Any]) -> None:
        p = self.p
        models.unwrap(p.model).load_state_dict(state["model"])
        p.optimizer.load_state_dict(state["optimizer"])
        if set(p.resume_changes or {}) & {"epochs", "cooldown_epochs"}:
            # A new run length: the schedule built for it goes on from this step (timm's resume).
            p.lr_scheduler.step_update(num_updates=int(state["step"]))
        elif state.get("scheduler") is not None:
            p.lr_scheduler.load_state_dict(state["scheduler"])
        if p.scaler is not None and state.get("scaler") is not None:
            p.scaler.load_state_dict(state["scaler"])
        if p.ema is not None and state.get("ema") is not None:
            models.unwrap(p.ema.module).load_state_dict(state["ema"])
        extra = state.get("extra") or {}
        self.step = int(state["step"])
        best = state.get("best_metric")
        self.best = -math.inf if best is None else float(best)
        self.best_epoch = extra.get("best_epoch")
        if self.guard is not None:
            self.guard.best = float(extra.get("co_best", 0.0))
        recovery = extra.get("recovery")
        if recovery is None:
            self.start_epoch = int(state["epoch"]) + 1
            if state.get("rng") is not None:
                checkpoint.restore_rng_state(state["rng"])
            self._repair_best(state)
            where = f"the end of epoch {state['epoch']}"
        else:
            self.start_epoch = int(state["epoch"])
            self.progress = engine.EpochProgress(
                step=self.step, steps_done=int(recovery["steps_done"]),
                sums={k: float(v) for k, v in recovery["sums"].items()},
                images=int(recovery["images"]), seconds=float(recovery["seconds"]),
                interval=recovery.get("interval") or {})
            self._epoch_rng, self._resume_rng = recovery["epoch_rng"], state["rng"]
            where = f"epoch {state['epoch']} after {self.progress.steps_done} of its steps"
        dropped = self.monitor.drop_rows_after(self.start_epoch - 1)
        if dropped:
            self.monitor.info(f"dropped {dropped} summary.csv row(s) logged after the checkpoint")
        self.monitor.info(f"resumed from {p.resume_path} at {where} (step {self.step}, best "
                          f"{self.best:.4f})")

    def _repair_best(self, state: Dict[str, Any]) -> None:
        """Link best.pth to last.pth when a kill came between writing one and linking the other."""
        p = self.p
        last = os.path.join(p.run_dir, rundir.LAST)
        if (p.rt.is_main and self.best_epoch == state["epoch"] and p.resume_path is not None
                and os.path.abspath(p.resume_path) == os.path.abspath(last)
                and rundir.checkpoint_step(os.path.join(p.run_dir, rundir.BEST)) != self.step):
            with naming_write_errors(os.path.join(p.run_dir, rundir.BEST)):
                rundir.link_best(p.run_dir)
            self.monitor.info(f"best.pth now holds epoch {self.best_epoch} (the run stopped "
                              "before linking it)")

    def _check_finite(self, epoch: int, step: int, losses: Dict[str, float]) -> None:
        """Stop before a checkpoint of NaN / infinite weights or validation losses is written.

        Every rank checks (the weights are the same on all), so every rank stops alike.
        """
        p = self.p
        engine.check_finite(accel.attack_model(p.model), "weights", epoch=epoch, step=step)
        if p.ema is not None:
            engine.check_finite(p.ema.module, "EMA weights", epoch=epoch, step=step)
        bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
        if bad:
            raise engine.NonFiniteLossError(
                f"the validation loss became NaN or infinite at epoch {epoch} ({bad}); no "
                "checkpoint of it is written and the last good one is kept: lower the learning "
                "rate, enable clip_grad, or use amp bf16")

    def _state(self, epoch: int, step: int,
               recovery: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """The checkpoint of the run now (built and moved to the CPU once)."""
        p = self.p
        extra: Dict[str, Any] = {"best_epoch": self.best_epoch}
        if self.guard is not None:
            extra["co_best"] = self.guard.best
        if recovery is not None:
            extra["recovery"] = recovery
        state = checkpoint.make_checkpoint(
            accel.attack_model(p.model), p.spec, config=config_to_dict(p.cfg), epoch=epoch,
            step=step, best_metric=None if self.best == -math.inf else self.best,
            optimizer=p.optimizer, scheduler=p.lr_scheduler, scaler=p.scaler,
            ema=p.ema,
            train_norm=p.cfg.attack.attack_norm, train_eps=p.cfg.attack.eps, rng=True,
            extra=extra)
        if p.rt.kind == "xla":
            import torch_xla.core.xla_model as xm
            state = xm._maybe_convert_to_cpu(state)
        return state

    def _save_epoch(self, epoch: int, improved: bool) -> None:
        """last.pth, written once; best.pth linked to it; the epoch's recovery.pth superseded."""
        p = self.p
        self._last_save = time.monotonic()
        if not p.rt.is_main:
            return
        last = os.path.join(p.run_dir, rundir.LAST)
        with naming_write_errors(last):
            checkpoint.save_checkpoint(last, self._state(epoch, self.step))
        _kill_point("last_saved")
        if improved:
            with naming_write_errors(os.path.join(p.run_dir, rundir.BEST)):
                rundir.link_best(p.run_dir)
        recovery = os.path.join(p.run_dir, rundir.RECOVERY)
        if os.path.exists(recovery):
            os.unlink(recovery)

    def _recovery_due(self, progress: engine.EpochProgress) -> bool:
        """Whether to write recovery.pth at this log point (the same answer on every rank)."""
        r, p = self.p.cfg.run, self.p
        if progress.steps_done >= p.updates_per_epoch:
            return False  # the epoch's own checkpoint comes next
        if r.recovery_interval_steps and progress.step % r.recovery_interval_steps == 0:
            return True
        if not r.recovery_interval_minutes:
            return False
        late = time.monotonic() - self._last_save >= 60 * r.recovery_interval_minutes
        if p.rt.world_size > 1:
            # Clocks differ between processes: one late rank decides for all.
            flag = torch.tensor([float(late)], device=p.rt.device)
            late = float(accel.all_reduce_sum(flag, p.rt).item()) > 0
        return late

    def save_recovery(self, epoch: int, progress: engine.EpochProgress) -> None:
        """Write ``recovery.pth``: the run inside ``epoch``, as ``progress`` says (every rank
        calls it; the main process writes)."""
        self._check_finite(epoch, progress.step, {})
        self._last_save = time.monotonic()
        if not self.p.rt.is_main:
            return
        self.monitor.flush()  # TensorBoard holds everything up to the checkpoint
        recovery = {"epoch_rng": self._epoch_rng, "steps_done": progress.steps_done,
                    "sums": progress.sums, "images": progress.images, "seconds": progress.seconds,
                    "interval": progress.interval}
        path = os.path.join(self.p.run_dir, rundir.RECOVERY)
        with naming_write_errors(path):
            checkpoint.save_checkpoint(path, self._state(epoch, progress.step, recovery))

    def _stop_agreed(self) -> bool:
        """Whether to stop here: asked in any process (collective when distributed)."""
        rt = self.p.rt
        if not rt.distributed:
            return self.stop.asked
        flag = torch.tensor([float(self.stop.asked)], device=rt.device)
        return float(accel.all_reduce_sum(flag, rt).item()) > 0

    def _stopped(self, epoch: int, step: int, name: str) -> None:
        self.monitor.close()
        raise TrainingStopped(epoch, step, os.path.join(self.p.run_dir, name),
                              is_main=self.p.rt.is_main, distributed=self.p.rt.distributed)

    def _on_progress(self, epoch: int, progress: engine.EpochProgress) -> None:
        if self._recovery_due(progress):
            self.save_recovery(epoch, progress)
            _kill_point("recovery_saved")
        _kill_point("log")

    def _epoch_loader(self) -> Tuple[Any, Optional[engine.EpochProgress]]:
        """The epoch's batches, and where the epoch starts (a recovery checkpoint's progress)."""
        if self.progress is None:
            self._epoch_rng = checkpoint.rng_state()
            return self.p.train_loader, None
        checkpoint.restore_rng_state(self._epoch_rng)
        resume, self.progress = self.progress, None
        return _skip_batches(self.p.train_loader, resume.steps_done, self._resume_rng), resume

    def fit(self) -> Dict[str, float]:
        """Train from ``start_epoch`` to the end; returns the last epoch's metrics."""
        p, cfg = self.p, self.p.cfg
        settings = engine.StepSettings(
            amp=None if cfg.run.amp == "none" else cfg.run.amp, clip_grad=cfg.optim.clip_grad,
            clip_mode=cfg.optim.clip_mode, channels_last=cfg.run.channels_last,
            log_interval=cfg.run.log_interval, max_steps=cfg.run.max_steps_per_epoch)
        eval_attack = _eval_attack(cfg)
        guard = self.guard
        self.monitor.info(f"run folder {p.run_dir}: {p.spec.arch} on {cfg.data.dataset}, "
                          f"{p.rt.kind} x{p.rt.world_size}, loss {cfg.attack.loss}, "
                          f"eps {cfg.attack.eps * 255:.2f}/255, {p.num_epochs} epochs")
        facts = accel.thread_facts()
        self.monitor.info(f"torch threads {facts['torch_threads']} (threads: {cfg.run.threads}, "
                          f"{facts['usable_cores']} usable cores, OMP_NUM_THREADS "
                          f"{facts['omp_num_threads'] or 'unset'}), CPU kernels "
                          f"{facts['cpu_capability']}")
        result: Dict[str, float] = {}
        for epoch in range(self.start_epoch, p.num_epochs):
            sampler = getattr(p.train_loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            loader, resume = self._epoch_loader()
            try:
                train_metrics, self.step = engine.train_one_epoch(
                    model=p.model, loss_fn=p.loss_fn, loader=loader, optimizer=p.optimizer,
                    rt=p.rt, eps_schedule=p.eps_schedule, epoch=epoch, step=self.step,
                    settings=settings, lr_scheduler=p.lr_scheduler, scaler=p.scaler, ema=p.ema,
                    mixup_fn=p.mixup_fn, on_log=lambda s, m, e=epoch: self.monitor.step(e, s, m),
                    resume=resume, on_progress=functools.partial(self._on_progress, epoch),
                    stop=lambda step: self._stop_agreed())
            except engine.EpochStopped as stopped:
                self.save_recovery(epoch, stopped.progress)
                self._stopped(epoch, stopped.progress.step, rundir.RECOVERY)
            p.lr_scheduler.step(epoch + 1)
            evaluate = functools.partial(
                engine.evaluate, loader=p.val_loader, rt=p.rt, attack=eval_attack,
                amp=settings.amp, max_batches=cfg.attack.eval_batches,
                channels_last=cfg.run.channels_last)
            val = evaluate(p.model)
            extra: Dict[str, float] = {}
            if p.ema is not None:
                # advvit.eval reads the EMA weights of a checkpoint that has them, so the best
                # checkpoint is chosen by the EMA's accuracy; the raw weights' is logged beside.
                extra.update({f"raw_{k}": v for k, v in val.items() if k != "n"})
                val = evaluate(p.ema.module)
            if val.get("n", 0) > 0:
                self._check_finite(epoch, self.step, {k: v for k, v in {**val, **extra}.items()
                                                      if k.endswith("loss")})
            stop = False
            if guard is not None:
                extra["co_pgd_acc"], collapsed = guard.check(p.model, p.rt)
                if collapsed:
                    self.monitor.warning(
                        f"catastrophic overfitting: PGD-{cfg.attack.co_pgd_steps} accuracy on a "
                        f"training batch fell to {extra['co_pgd_acc']:.1%} (best "
                        f"{guard.best:.1%}); FGSM no longer finds the worst case"
                        + (": stopping, best.pth holds the best model" if cfg.attack.co_check == "stop"
                           else ""))
                    stop = cfg.attack.co_check == "stop"
            metric = val.get("robust_acc", val["clean_acc"])
            improved = metric > self.best and not stop
            if improved:
                self.best, self.best_epoch = metric, epoch
            self.monitor.epoch(epoch, self.step, train_metrics, val, extra)
            _kill_point("csv_appended")
            self._save_epoch(epoch, improved)
            accel.wait_for_all(p.rt)
            result = {**{f"train_{k}" if not k.startswith("train_") else k: v
                         for k, v in train_metrics.items()},
                      **{f"val_{k}": v for k, v in val.items()}, **extra, "best": self.best}
            if stop:
                break
            if epoch + 1 < p.num_epochs and self._stop_agreed():  # asked during the evaluation
                self._stopped(epoch, self.step, rundir.LAST)
        self.monitor.close()
        return result


@contextlib.contextmanager
def _stop_on_sigterm(stop: StopRequest) -> Iterator[None]:
    """SIGTERM, a scheduler's notice before it kills a job, asks training to stop at a safe
    point."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may take signals: SIGTERM keeps its default there
        return

    def ask(signum: int, frame: Any) -> None:
        stop.asked = True

    previous = signal.signal(signal.SIGTERM, ask)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(cfg: TrainConfig) -> Dict[str, float]:
    """Build and run a training job from a validated config (for use from Python).

    Raises:
        TrainingStopped: SIGTERM stopped it, its recovery point written.
        WriteError: a file of the run could not be written (the checkpoints before are whole).
    """
    stop = StopRequest()
    # From the start: a signal while the parts are built stops after the first step, rather
    # than killing one rank of a distributed run while the others go on.
    with _stop_on_sigterm(stop):
        parts = build(cfg)
        try:
            trainer = Trainer(parts, stop)
            if parts.rt.is_main:
                _record_start(parts)
            accel.wait_for_all(parts.rt)
            return trainer.fit()
        finally:
            parts.lock.release()
            accel.cleanup(parts.rt)


def _record_start(parts: Parts) -> None:
    """``args.yaml`` for a new run; for a resumed one, its record in ``resume_history.yaml``.

    A resumed run keeps the ``args.yaml`` it started with, so the file never claims settings
    the run did not use; what changed on each resume is in the history.
    """
    state = parts.resume_state
    args = os.path.join(parts.run_dir, "args.yaml")
    if state is None:
        with naming_write_errors(args):
            save_args_yaml(parts.cfg, args, [parts.finetune] if parts.finetune else [])
        return
    with naming_write_errors(args):
        rundir.write_args_if_missing(parts.run_dir, state["config"])
    with naming_write_errors(os.path.join(parts.run_dir, rundir.HISTORY)):
        rundir.record_resume(parts.run_dir, path=parts.resume_path, epoch=state["epoch"],
                             step=state["step"], changes=parts.resume_changes or {})
