"""Pre-flight checks of a training config: what needs timm's registries, the data set's facts or
the model itself, done before any run folder, data loader or weight exists.

:func:`check` is called by ``advvit.train``'s ``build``; it raises one
:class:`~advvit.config.ConfigError` naming the key and the fix, and returns the data set's
facts, the run's :class:`~advvit.checkpoint.ModelSpec` and the resolved ``finetune`` source.
:func:`validate` is the same checks for the callers that start no run here (``main`` before an
XLA launch, the cluster launcher, the findings runner).
"""
from __future__ import annotations

import difflib
import importlib.util
import re
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import checkpoint, data, models
from .attacks import check_eps
from .config import ConfigError, OptimConfig, TrainConfig, check_lr, shown
from .io import OptionError

__all__ = ["validate", "check", "Checked", "model_spec", "finetune_summary",
           "finetune_normalization"]

Normalize = Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]


@dataclass(frozen=True)
class Checked:
    """What the checks found: the data set's facts, the run's model spec and the model
    ``finetune`` names (None without it), resolved by ``references.resolve_model``."""

    info: data.DataInfo
    spec: checkpoint.ModelSpec
    finetune: Optional[checkpoint.LoadedModel]


def _for_channels(normalize: Normalize, in_chans: int) -> Normalize:
    """Grayscale statistics for a 3-channel input (or the reverse): repeated or averaged."""
    if normalize is None or len(normalize[0]) == in_chans:
        return normalize
    mean, std = normalize
    if in_chans == 3 and len(mean) == 1:
        return (tuple(mean) * 3, tuple(std) * 3)
    return ((float(np.mean(mean)),), (float(np.mean(std)),))


def _same(a: Normalize, b: Normalize) -> bool:
    if a is None or b is None:
        return a is b
    return all(np.allclose(x, y, rtol=0, atol=1e-6) for x, y in zip(a, b))


def model_spec(cfg: TrainConfig, info: data.DataInfo,
               finetune: Optional[checkpoint.LoadedModel] = None) -> checkpoint.ModelSpec:
    """The model the run builds.

    Its normalization is the config's ``normalize``; fine-tuning, it is the source's (as timm
    fine-tunes behind the pretrained cfg's mean/std), so the model sees the pixels as its source
    was trained to see them: ``normalize: none`` takes it, and ``imagenet`` / ``dataset`` must
    be it.

    Raises:
        ConfigError: ``normalize`` asks for statistics other than the fine-tuning source's.
    """
    in_chans = cfg.data.in_chans or info.in_chans
    normalize = None
    if cfg.model.normalize == "imagenet":
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        normalize = (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))
    elif cfg.model.normalize == "dataset":
        normalize = (tuple(info.mean), tuple(info.std))
    normalize = _for_channels(normalize, in_chans)
    if finetune is not None:
        normalize = finetune_normalization(cfg.model.normalize, normalize,
                                           finetune.record.get("normalize"), in_chans,
                                           cfg.model.finetune)
    return checkpoint.ModelSpec(arch=cfg.model.model,
                                num_classes=cfg.model.num_classes or info.num_classes,
                                in_chans=in_chans, img_size=cfg.data.img_size or info.img_size,
                                normalize=normalize)


def finetune_normalization(key: str, own: Normalize, source: Normalize, in_chans: int,
                           name: str) -> Normalize:
    """The normalization a fine-tuned model runs behind: its source's.

    Args:
        key: the config's ``normalize`` (``none`` takes the source's).
        own: the statistics ``key`` resolves to for this run's data and channels.
        source: the statistics the source was trained behind.
        in_chans: the run's input channels (a grayscale source's statistics are repeated).
        name: the source, for the message.

    Raises:
        ConfigError: ``key`` asks for statistics other than the source's.
    """
    resolved = _for_channels(source, in_chans)
    if key != "none" and not _same(own, resolved):
        raise ConfigError("normalize", f"{key} is mean {list(own[0])} std {list(own[1])}, but "
                          f"the finetune source {name} was trained behind "
                          + _normalization_text(source),
                          "set normalize: none, which takes the source's normalization")
    return resolved


def _normalization_text(normalize: Normalize) -> str:
    if normalize is None:
        return "none (pixels as they are)"
    return f"mean {list(normalize[0])} std {list(normalize[1])}"


def finetune_summary(source: checkpoint.LoadedModel) -> str:
    """One line on the fine-tuning source, for the training log and ``args.yaml``: the
    reference, what it is, its weights' sha256 and the normalization the run takes from it."""
    r = source.record
    return (f"finetune {r.get('reference')}: {r.get('source')} {r.get('arch')}, sha256 "
            f"{r.get('sha256')}, normalization {_normalization_text(r.get('normalize'))} "
            f"({r.get('normalization')})")


def _resolve_finetune(cfg: TrainConfig) -> Optional[checkpoint.LoadedModel]:
    """The model ``finetune`` names, through the one resolver of model references."""
    if not cfg.model.finetune:
        return None
    from .references import ModelOptions, resolve_model
    # The weights trained, not their EMA: what timm's own fine-tuning starts from.
    options = ModelOptions(option="--finetune", use_ema=False, dataset=cfg.data.dataset,
                           data_dir=cfg.data.data_dir, norm=cfg.attack.attack_norm,
                           model_option=None)
    try:
        return resolve_model(cfg.model.finetune, options)
    except OptionError as err:
        raise ConfigError("finetune", str(err)) from None


def _check_finetune_fits(spec: checkpoint.ModelSpec, source: checkpoint.LoadedModel,
                         reference: str) -> None:
    """Adapt the source's weights to the run's model built on the meta device, as the trainer
    will, so a misfit is one message before any work."""
    target = _meta_model(spec, spec.img_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # copying into meta tensors is a no-op
        try:
            models.load_finetune_weights(target, models.unwrap(source.model).state_dict())
        except checkpoint.CheckpointError as err:
            raise ConfigError("finetune", f"{reference}: {err}") from None


def _near(name: str, names: Sequence[str]) -> str:
    near = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f"did you mean {', '.join(near)}?" if near else ""


def _check_model_name(name: str) -> None:
    import timm
    if not timm.is_model(name):  # models is imported: advvit's variants are registered
        raise ConfigError("model", f"unknown architecture {shown(name)}",
                          _near(name, timm.list_models()) or "see timm.list_models()")


def _check_opt_name(name: str) -> None:
    from timm.optim import list_optimizers
    # create_optimizer_v2 reads "lookahead_<name>" as <name> wrapped in Lookahead (and would
    # read any other "<word>_<name>" as <name>: refused here).
    base = name.lower()
    if base.startswith("lookahead_"):
        base = base[len("lookahead_"):]
    if base not in list_optimizers():
        raise ConfigError("opt", f"unknown optimizer {shown(name)}",
                          _near(base, list_optimizers()) or "see timm.optim.list_optimizers()")


def _check_sched(o: OptimConfig) -> None:
    from timm.scheduler import create_scheduler_v2
    # timm lists no scheduler names: ask its factory, with this run's settings, on a throw-away
    # optimizer (one update per epoch: the schedule's shape does not depend on the count).
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    try:
        scheduler, _ = create_scheduler_v2(
            probe, sched=o.sched, num_epochs=o.epochs, warmup_epochs=o.warmup_epochs,
            warmup_lr=o.warmup_lr, min_lr=o.min_lr, cooldown_epochs=o.cooldown_epochs,
            step_on_epochs=False, updates_per_epoch=1)
    except (ValueError, AssertionError) as err:
        raise ConfigError("sched", f"timm cannot build scheduler {shown(o.sched)} here: {err}",
                          "advvit steps the schedule per optimizer update; use e.g. cosine, "
                          "step, multistep, poly, tanh or constant") from None
    if scheduler is None:
        raise ConfigError("sched", f"{shown(o.sched)} builds no scheduler",
                          "use constant for a fixed learning rate")


_AUTO_AUGMENT_FORMS = ("rand-m9-mstd0.5-inc1 (RandAugment: m magnitude, n ops, p probability, "
                       "mstd, mmax, inc, tweights / t3a / t3aw), augmix-m5-w4-d2 (AugMix: m, w, "
                       "d, a, b, mstd), or original, originalr, v0, v0r, 3a (AutoAugment, "
                       "e.g. original-mstd0.5)")


def _ignored_parts(policy: str) -> List[str]:
    """The dash-separated parts of ``policy`` that timm's parsers skip without a word.

    timm reads a part as letters then a number and skips one with no digit (``rand-zz`` is
    plain RandAugment); RandAugment's transform set (``t`` part) is read from the first such
    part only, and a set timm does not know falls back to its default, as no set does.
    """
    from timm.data.auto_augment import rand_augment_choices
    name, *parts = policy.split("-")
    ignored, transform_set = [], False
    for part in parts:
        if name == "rand" and part.startswith("t"):
            if transform_set or rand_augment_choices(part[1:]) is rand_augment_choices(""):
                ignored.append(part)
            transform_set = True
        elif re.search(r"\d", part) is None:
            ignored.append(part)
    return ignored


def _check_auto_augment(policy: str, img_size: int, interpolation: str) -> None:
    """Build the policy's transform with timm's own factory (as the training loader will), and
    refuse the parts it would skip."""
    from timm.data import create_transform
    try:
        create_transform(img_size, is_training=True, auto_augment=policy,
                         interpolation=interpolation)
    except (AssertionError, ValueError, KeyError) as err:
        reason = f": {err}" if str(err) else ""
        raise ConfigError("auto_augment", f"timm cannot read {shown(policy)}{reason}",
                          f"use {_AUTO_AUGMENT_FORMS}") from None
    ignored = _ignored_parts(policy)
    if ignored:
        raise ConfigError("auto_augment", f"timm would skip {', '.join(map(shown, ignored))} "
                          f"of {shown(policy)} without a word", f"use {_AUTO_AUGMENT_FORMS}")


def _dataset_info(cfg: TrainConfig) -> data.DataInfo:
    d = cfg.data
    try:
        return data.dataset_info(d.dataset, d.data_dir, class_list=d.class_list)
    except ValueError as err:
        raise ConfigError("dataset", str(err), _near(d.dataset.lower(), data.DATASET_NAMES)) \
            from None


def _patch_size(model: torch.nn.Module) -> Optional[Tuple[int, int]]:
    """The (h, w) patch a model cuts its input into, or None for models that take any size."""
    size = getattr(getattr(models.unwrap(model), "patch_embed", None), "patch_size", None)
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


_BUILD_ERRORS = (AssertionError, ValueError, TypeError, RuntimeError)


def _meta_model(spec: checkpoint.ModelSpec, img_size: Optional[int]) -> torch.nn.Module:
    # Shapes only: no memory, no initialisation compute. Normalization is left out: it does
    # not change a shape.
    with torch.device("meta"):
        return models.create_model(spec.arch, num_classes=spec.num_classes,
                                   in_chans=spec.in_chans, img_size=img_size)


def _divides(patch: Tuple[int, int], img: int) -> bool:
    return img % patch[0] == 0 and img % patch[1] == 0


def _check_model_fits(spec: checkpoint.ModelSpec) -> None:
    """Build the model on the meta device and check that its patch size divides ``img_size``.

    ViT-style models report ``patch_embed.patch_size``; timm's XCiT also asserts it when built;
    CNNs have none and take any size.
    """
    img = spec.img_size
    try:
        patch = _patch_size(_meta_model(spec, img))
    except _BUILD_ERRORS as err:
        # Tell a patch size that does not divide the input from any other misfit: read the
        # patch size at the model's own input size.
        try:
            patch = _patch_size(_meta_model(spec, None))
        except _BUILD_ERRORS:
            patch = None
        if patch is None or _divides(patch, img):
            raise ConfigError("model", f"{spec.arch} cannot be built for {spec.in_chans}x{img}x"
                              f"{img} inputs and {spec.num_classes} classes: {err}") from None
    if patch is not None and not _divides(patch, img):
        raise ConfigError("img_size", f"{img} is not a multiple of {spec.arch}'s patch size "
                          f"{patch[0]}x{patch[1]}",
                          f"use e.g. {max(patch[0], img // patch[0] * patch[0])}")


def validate(cfg: TrainConfig, world_size: Optional[int]) -> Tuple[data.DataInfo,
                                                                  checkpoint.ModelSpec]:
    """:func:`check`, for callers that need the data set's facts and the model spec only.

    Raises:
        ConfigError: naming the key. data.DataNotFoundError: an image folder that is not there.
    """
    checked = check(cfg, world_size)
    return checked.info, checked.spec


def check(cfg: TrainConfig, world_size: Optional[int]) -> Checked:
    """Check what the config alone cannot: names in timm's registries, the data set's facts, the
    model's input, the fine-tuning source, the learning rate of this world size. Runs before
    any data is read.

    Checks: ``model`` (timm's registry, advvit's variants included; close names suggested),
    ``log_wandb`` (wandb installed), ``opt`` (timm's optimizer registry), ``sched`` (timm's
    scheduler factory), ``dataset`` (advvit.data's names and timm prefixes); ``num_classes``
    not below the data set's classes; ``img_size`` a multiple of the model's patch size (the
    model is built on the meta device);
    ``finetune`` a reference ``references.resolve_model`` resolves (a checkpoint path,
    ``timm:``, ``hf-hub:``, ``local-dir:``, ``robustbench:``) whose weights
    ``load_finetune_weights`` adapts to the model, and ``normalize`` none or the source's;
    ``auto_augment`` a policy timm's transform factory builds, with no part it would skip;
    ``eps`` / ``eval_eps`` within the eps policy for the input shape (an L2 or L1 radius up to
    the input box's diagonal in that norm); ``min_lr`` not above the effective learning rate (also when it comes
    from ``lr_base`` scaling).

    Args:
        world_size: processes sharing the global batch; None skips the learning-rate check
            (before an XLA launch, when the device count is not known yet).

    Returns:
        The data set's facts, the model spec the run builds and the fine-tuning source.

    Raises:
        ConfigError: naming the key. data.DataNotFoundError: an image folder that is not there.
    """
    _check_model_name(cfg.model.model)
    if cfg.run.log_wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("log_wandb", "wandb is not installed", "pip install 'advvit[wandb]', "
                          "or set log_wandb: false")
    _check_opt_name(cfg.optim.opt)
    _check_sched(cfg.optim)
    info = _dataset_info(cfg)
    n = cfg.model.num_classes
    if n is not None and n < info.num_classes:
        raise ConfigError("num_classes", f"{n} is fewer than the {info.num_classes} classes of "
                          f"{cfg.data.dataset}", "leave num_classes unset (the data set's)")
    finetune = _resolve_finetune(cfg)
    spec = model_spec(cfg, info, finetune)
    _check_model_fits(spec)
    if finetune is not None:
        _check_finetune_fits(spec, finetune, cfg.model.finetune)
    if cfg.data.auto_augment:
        _check_auto_augment(cfg.data.auto_augment, spec.img_size, cfg.data.interpolation)
    a = cfg.attack
    for key in ("eps", "eval_eps"):
        value = getattr(a, key)
        if value is not None:
            try:
                check_eps(value, a.attack_norm, name=key,
                          input_shape=(spec.in_chans, spec.img_size, spec.img_size))
            except ValueError as err:
                raise ConfigError(key, str(err)) from None
    if world_size is not None:
        check_lr(cfg.optim, cfg.data.batch_size * world_size)
    return Checked(info, spec, finetune)
