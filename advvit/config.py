"""Typed training configuration: yaml file + command-line overrides, validated before any work.

Keys are flat and the same in yaml and on the command line (timm's convention: ``eps: 4/255`` in
yaml is ``--eps 4/255``). Each key lives in one section dataclass (data, model, attack, optim,
run); :func:`load_config` builds them once, checks every key, type and value, and raises one
:class:`ConfigError` naming the key and the fix. The resolved config is written as ``args.yaml``.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import reprlib
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from .accel import THREADS_HELP, ThreadsError, parse_threads
from .attacks import check_eps
from .io import atomic_write_text, input_file_problem
from .losses import DEFAULT_STEPS

__all__ = [
    "ConfigError", "DataConfig", "ModelConfig", "AttackConfig", "OptimConfig", "RunConfig",
    "TrainConfig", "load_config", "build_parser", "parse_eps", "config_to_dict", "save_args_yaml",
    "effective_lr", "check_lr", "shown", "MAX_CONFIG_BYTES", "MAX_CONFIG_NODES",
]

# A config file is a flat mapping of some hundred short values; a file past these bounds is
# something else (a checkpoint given as --config, an alias bomb) and is refused before it is built.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 10_000
# The longest folder name (in bytes) the usual file systems take.
NAME_MAX = 255

_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 8
_SHORT.maxlevel = 3


def shown(value: Any) -> str:
    """``repr(value)`` cut to a readable length: a bad value can be a whole file's worth, and a
    message that printed it all would take longer than the run it refuses."""
    return _SHORT.repr(value)


class ConfigError(ValueError):
    """A bad configuration value: names the key, what is wrong and how to fix it."""

    def __init__(self, key: str, problem: str, fix: str = "") -> None:
        self.key = key
        named = key if len(key) <= _SHORT.maxstring else shown(key)[1:-1]
        message = f"config key '{named}': {problem}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)


def _finite(key: str, value: float) -> float:
    # nan passes every bound check (all comparisons are false) and inf trains to non-finite
    # weights: neither is a setting.
    if not math.isfinite(value):
        raise ConfigError(key, f"{shown(value)} is not a finite number", "give a finite value")
    return value


def parse_eps(value: Any, key: str = "eps") -> float:
    """Read an eps written as a number (0.0157) or a fraction ("4/255"); it must be finite."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a number or a fraction like 4/255, got {shown(value)}")
    if isinstance(value, (int, float)):
        return _finite(key, float(value))
    if isinstance(value, str):
        try:
            return _finite(key, float(Fraction(value.replace(" ", ""))))
        except (ValueError, ZeroDivisionError, OverflowError):
            pass
    raise ConfigError(key, f"expected a finite number or a fraction like 4/255, got {shown(value)}")


def _opt(help: str, default: Any = None, choices: Optional[Sequence[Any]] = None, **checks: Any) -> Any:
    meta = {"help": help, "choices": choices, **checks}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def _crop_range(meaning: str, upper: float, example: str):
    """The check of a ``[min, max]`` range of timm's random resized crop (``scale``, ``ratio``):
    timm draws from it at the first training image, so a range it cannot draw from would end
    the run there, after its folder is written."""
    bound = "" if upper == math.inf else f" <= {upper:g}"

    def check(key: str, pair: List[float]) -> None:
        if len(pair) != 2 or not 0 < pair[0] <= pair[1] <= upper:
            raise ConfigError(key, f"expected [min, max] of {meaning}, with 0 < min <= max{bound}; "
                              f"got {shown(pair)}", f"e.g. --{key} {example}")
    return check


def _check_experiment(key: str, name: str) -> None:
    """The run folder is ``<output>/<experiment>``: the name must be one folder inside output."""
    if name in (".", ".."):
        problem = f"{name!r} is output itself or its parent, not a folder inside it"
    elif "/" in name or os.sep in name or (os.altsep and os.altsep in name):
        problem = f"{shown(name)} is a path, not a folder name"
    elif "\0" in name:
        problem = f"{shown(name)} holds a NUL character"
    elif len(os.fsencode(name)) > NAME_MAX:
        problem = (f"{shown(name)} is {len(os.fsencode(name))} bytes long, more than the "
                   f"{NAME_MAX} a folder name may have")
    else:
        return
    raise ConfigError(key, problem, "give a plain folder name; parent folders go in output")


@dataclass
class DataConfig:
    """Where the images come from and how they are augmented (timm's transform factory)."""

    dataset: str = _opt("data set: fashion_mnist, mnist, cifar10, cifar100, imagefolder, or a "
                        "timm name with hfds/, tfds/, wds/ prefix", "fashion_mnist")
    data_dir: Optional[str] = _opt("data root (None: the known places for the data set)")
    class_list: Optional[str] = _opt("file of class folder names selecting a subset "
                                     "(ImageNet-100)", path=True)
    val_fraction: float = _opt("hold out this fraction of the training split for validation "
                               "(0: the data set's own validation split)", 0.0, lo=0.0, hi=0.9)
    split_seed: int = _opt("seed of the held-out split", 0)
    interpolation: str = _opt("resize interpolation of the training crops and evaluation "
                              "resizes (timm's names)", "bilinear",
                              choices=("bilinear", "bicubic", "nearest"))
    img_size: Optional[int] = _opt("input size (None: the data set's native size)", lo=8)
    in_chans: Optional[int] = _opt("input channels (None: the data set's; 3 repeats grayscale)",
                                   choices=(None, 1, 3))
    batch_size: int = _opt("per-process training batch size", 128, lo=1)
    val_batch_size: Optional[int] = _opt("per-process evaluation batch size (None: batch_size)", lo=1)
    workers: int = _opt("data loader worker processes", 2, lo=0)
    scale: List[float] = _opt("random resized crop scale range: the crop's area as a fraction "
                              "of the image's", [0.08, 1.0],
                              check=_crop_range("the crop's area as a fraction of the image's",
                                                1.0, "0.08 1.0"))
    ratio: List[float] = _opt("random resized crop aspect ratio range (width / height)",
                              [0.75, 1.3333333],
                              check=_crop_range("the crop's aspect ratio (width / height)",
                                                math.inf, "0.75 1.3333"))
    crop_padding: int = _opt("pad by this many pixels and take a random img_size crop "
                             "(torchvision RandomCrop, the CIFAR crop) in place of the random "
                             "resized crop; 0: off", 0, lo=0)
    rotation: float = _opt("random rotation up to this many degrees (0: off)", 0.0,
                           lo=0.0, hi=180.0)
    hflip: float = _opt("horizontal flip probability", 0.5, lo=0.0, hi=1.0)
    color_jitter: Optional[float] = _opt("color jitter strength (None: off)", 0.4, lo=0.0)
    auto_augment: Optional[str] = _opt("timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1")
    reprob: float = _opt("random erasing probability", 0.0, lo=0.0, hi=1.0)
    no_aug: bool = _opt("disable all training augmentation", False)
    mixup: float = _opt("MixUp alpha (0: off)", 0.0, lo=0.0)
    cutmix: float = _opt("CutMix alpha (0: off)", 0.0, lo=0.0)
    smoothing: float = _opt("label smoothing", 0.1, lo=0.0, hi=0.99)


@dataclass
class ModelConfig:
    """Which network, how its inputs are normalized, where its weights start."""

    model: str = _opt("timm (or advvit-registered) architecture name", "xcit_nano_12_p8_32")
    num_classes: Optional[int] = _opt("classes (None: the data set's)", lo=2)
    drop_path: float = _opt("stochastic depth rate", 0.0, lo=0.0, hi=0.9)
    normalize: str = _opt("normalization inside the model: none (inputs stay in [0, 1]; with "
                          "finetune: the source's), imagenet, or dataset (the data set's "
                          "mean/std)", "none", choices=("none", "imagenet", "dataset"))
    # Not a path option: a reference may name no file (timm:NAME); preflight resolves it.
    finetune: Optional[str] = _opt("model to fine-tune from (classifier reset, its "
                                   "normalization kept): a checkpoint path, timm:NAME, "
                                   "hf-hub:ORG/NAME[@REV], local-dir:PATH or "
                                   "robustbench:[DATASET/THREAT/]NAME, as advvit.eval's "
                                   "--checkpoint")
    model_ema: bool = _opt("keep an EMA of the weights (timm ModelEmaV3)", False)
    model_ema_decay: float = _opt("EMA decay", 0.9998, lo=0.0, hi=1.0)


@dataclass
class AttackConfig:
    """The training loss and its attack, and the per-epoch robust evaluation."""

    loss: str = _opt("training loss: clean, fgsm, pgd or trades", "fgsm",
                     choices=("clean", "fgsm", "pgd", "trades"))
    eps: float = _opt("attack radius (a number or a fraction like 4/255; Linf <= 1, L2 and L1 "
                      "<= the input box's diagonal in that norm)", 4 / 255, lo=0.0)
    attack_norm: str = _opt("attack norm", "linf", choices=("linf", "l2", "l1"))
    attack_steps: Optional[int] = _opt(
        "attack iterations (None: the loss's default: "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items() if k != "adversarial") + ")",
        lo=1)
    attack_step_size: Optional[float] = _opt("attack step size (None: 1.5 * eps / steps, eps "
                                             "as attack_step_size_rule says)", gt=0.0)
    # "current" by default: the step keeps its ratio to the radius (Wong et al.'s FGSM-RS at
    # every eps of the warm-up); "final" is the thesis's code, whose step stays at 1.5 x the
    # target eps, so early in the warm-up FGSM-RS is nearly plain FGSM.
    attack_step_size_rule: str = _opt("eps behind the default step size during the eps warm-up: "
                                      "current (the scheduled eps) or final (the target eps, "
                                      "as the thesis's code)", "current",
                                      choices=("current", "final"))
    random_init: bool = _opt("random start in the eps-ball", True)
    trades_beta: float = _opt("TRADES robust-term weight", 6.0, lo=0.0)
    eps_schedule: str = _opt("eps warm-up shape", "linear",
                             choices=("constant", "linear", "cosine", "sine"))
    eps_warmup_epochs: float = _opt("epochs of eps warm-up from 0 (per step, smooth)", 0.0, lo=0.0)
    zero_eps_epochs: float = _opt("epochs at eps 0 before the warm-up", 0.0, lo=0.0)
    train_clean_logits: bool = _opt("also compute clean training accuracy (one extra forward "
                                    "per step)", False)
    eval_attack: str = _opt("per-epoch robust evaluation: train (the training attack), pgd, "
                            "or none", "train", choices=("train", "pgd", "none"))
    eval_eps: Optional[float] = _opt("eps of the per-epoch evaluation (None: eps)", lo=0.0)
    eval_steps: int = _opt("PGD steps when eval_attack is pgd", 10, lo=1)
    eval_batches: Optional[int] = _opt("evaluate on at most this many held-out batches", lo=1)
    co_check: str = _opt("catastrophic-overfitting guard: off, warn or stop", "off",
                         choices=("off", "warn", "stop"))
    co_pgd_steps: int = _opt("PGD steps of the catastrophic-overfitting check", 10, lo=1)
    co_drop: float = _opt("flag catastrophic overfitting when PGD accuracy on a training batch "
                          "falls below this fraction of its best", 0.5, lo=0.0, hi=1.0)


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (timm's factories)."""

    opt: str = _opt("timm optimizer name", "adamw")
    lr: Optional[float] = _opt("learning rate (None: lr_base * global batch / lr_base_size)", gt=0.0)
    lr_base: float = _opt("learning rate at lr_base_size", 5e-4, gt=0.0)
    lr_base_size: int = _opt("batch size that lr_base is given for", 512, lo=1)
    lr_scale: str = _opt("how lr_base scales with the global batch: linear (DeiT, the thesis's "
                         "ImageNet rule), sqrt (timm's rule for Adam-type optimizers, the "
                         "thesis's fine-tuning) or none", "linear",
                         choices=("linear", "sqrt", "none"))
    weight_decay: float = _opt("weight decay", 0.5, lo=0.0)
    momentum: float = _opt("SGD momentum", 0.9, lo=0.0, hi=1.0)
    clip_grad: Optional[float] = _opt("gradient clipping value (None: off)", lo=0.0)
    clip_mode: str = _opt("gradient clipping mode", "norm", choices=("norm", "value", "agc"))
    sched: str = _opt("timm scheduler name", "cosine")
    epochs: int = _opt("training epochs (after them come cooldown_epochs)", 100, lo=1)
    warmup_epochs: int = _opt("learning-rate warm-up epochs", 5, lo=0)
    warmup_lr: float = _opt("learning rate at the start of the warm-up", 5e-6, lo=0.0)
    min_lr: float = _opt("learning rate at the end of the cosine", 5e-5, lo=0.0)
    cooldown_epochs: int = _opt("epochs at min_lr after the schedule", 10, lo=0)


@dataclass
class RunConfig:
    """Where and how the run executes, logs and saves."""

    output: str = _opt("parent folder of run folders", "output")
    experiment: Optional[str] = _opt("run folder name, one folder inside output (None: "
                                     "model-dataset-loss)", check=_check_experiment)
    seed: int = _opt("random seed", 0)
    device: str = _opt("auto, cpu, cuda or xla", "auto", choices=("auto", "cpu", "cuda", "xla"))
    amp: str = _opt("mixed precision", "none", choices=("none", "bf16", "fp16"))
    compile: bool = _opt("torch.compile the model", False)
    threads: Union[int, str] = _opt(THREADS_HELP, "auto")
    channels_last: bool = _opt("channels-last memory format", False)
    resume: Optional[str] = _opt("checkpoint to resume (or 'auto': the run folder's newest of "
                                 "recovery.pth and last.pth)")
    resume_override: Optional[str] = _opt("comma list of keys allowed to differ from the resumed "
                                          "checkpoint's config (epochs, log_interval, ...: see "
                                          "advvit.rundir.OVERRIDABLE)")
    recovery_interval_steps: Optional[int] = _opt("write recovery.pth every this many optimizer "
                                                  "steps (a multiple of log_interval; None: off)",
                                                  lo=1)
    recovery_interval_minutes: Optional[float] = _opt("write recovery.pth at the first log point "
                                                      "this many minutes after the last "
                                                      "checkpoint (None: off)", gt=0.0)
    log_interval: int = _opt("steps between progress lines", 50, lo=1)
    max_steps_per_epoch: Optional[int] = _opt("cut each epoch after this many steps", lo=1)
    tensorboard: bool = _opt("write TensorBoard scalars", True)
    log_wandb: bool = _opt("also log the TensorBoard scalars to Weights & Biases (pip install "
                           "'advvit[wandb]'; project: $WANDB_PROJECT, else advvit; "
                           "WANDB_MODE=offline keeps the run in the run folder)", False)
    xla_spawn: bool = _opt("with device xla: one process per local XLA device "
                           "(torch_xla.launch); off runs this process on one device", True)


@dataclass
class TrainConfig:
    """The whole training configuration, one section per concern."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "attack": AttackConfig,
            "optim": OptimConfig, "run": RunConfig}


def _fields() -> Dict[str, Tuple[str, dataclasses.Field, Any]]:
    """Every flat key -> (section, field, resolved type)."""
    out: Dict[str, Tuple[str, dataclasses.Field, Any]] = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out[f.name] = (section, f, hints[f.name])
    return out


FIELDS = _fields()


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return f"{_type_name(inner[0])} or null"
    if typing.get_origin(tp) in (list, List):
        return f"a list of {_type_name(args[0])}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check (and gently convert) one value against its annotated type."""
    if key == "threads":
        try:
            return parse_threads(value)
        except ThreadsError as err:
            raise ConfigError(key, err.problem,
                              "e.g. threads: auto, or threads: 1") from None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(key, value, [a for a in args if a is not type(None)][0])
    if origin in (list, List):
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {shown(value)}")
        return [_coerce(key, v, args[0]) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(key, f"expected true or false, got {shown(value)}")
    if tp is float:
        if key in ("eps", "eval_eps"):
            return parse_eps(value, key)
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(key, f"expected a number, got {shown(value)}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(key, f"expected a number, got {shown(value)}") from None
        return _finite(key, number)
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected an integer, got {shown(value)}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(key, f"expected an integer, got {shown(value)}")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {shown(value)}")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _check_value(key: str, value: Any, meta: Dict[str, Any]) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        listed = ", ".join(str(c) for c in choices if c is not None)
        raise ConfigError(key, f"{shown(value)} is not one of: {listed}")
    lo, hi, gt = meta.get("lo"), meta.get("hi"), meta.get("gt")
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, (int, float)) and lo is not None and v < lo:
            raise ConfigError(key, f"{shown(v)} is below the minimum {lo}", f"use a value >= {lo}")
        if isinstance(v, (int, float)) and gt is not None and v <= gt:
            raise ConfigError(key, f"{shown(v)} must be above {gt}", f"use a value > {gt}")
        if isinstance(v, (int, float)) and hi is not None and v > hi:
            raise ConfigError(key, f"{shown(v)} is above the maximum {hi}", f"use a value <= {hi}")
    if meta.get("path") and not os.path.exists(value):
        raise ConfigError(key, f"no such file or folder: {value}", "check the path")
    check = meta.get("check")
    if check is not None:
        check(key, value)


def _check_combinations(cfg: TrainConfig) -> None:
    """Checks that need more than one key."""
    a, d, o = cfg.attack, cfg.data, cfg.optim
    if a.loss == "fgsm" and a.attack_steps not in (None, 1):
        raise ConfigError("attack_steps", f"loss fgsm takes 1 attack step, got {a.attack_steps}",
                          "set loss: pgd for a multi-step attack")
    if a.loss == "clean" and a.eval_attack == "train":
        a.eval_attack = "none" if a.eps == 0 else "pgd"
    if o.lr is not None:
        check_lr(o, global_batch=1)  # the batch only matters when lr comes from lr_base
    if o.warmup_epochs > o.epochs:
        raise ConfigError("warmup_epochs", f"{o.warmup_epochs} learning-rate warm-up epochs are "
                          f"more than the run's {o.epochs} epochs", "shorten the warm-up")
    _check_eps_warmup(a, o.epochs)
    for key in ("eps", "eval_eps"):
        value = getattr(a, key)
        if value is not None:
            try:
                check_eps(value, a.attack_norm, name=key)
            except ValueError as err:
                raise ConfigError(key, str(err), "write Linf radii as fractions, e.g. 4/255") \
                    from None
    if (d.mixup > 0 or d.cutmix > 0) and a.loss == "trades":
        raise ConfigError("mixup", "TRADES needs hard labels for its natural loss",
                          "set mixup: 0 and cutmix: 0 with loss: trades")


def _check_eps_warmup(a: AttackConfig, epochs: int) -> None:
    """eps must reach its value within the run, or the run never trains at the eps it names."""
    if a.zero_eps_epochs + a.eps_warmup_epochs <= epochs:
        return
    key = "eps_warmup_epochs" if a.eps_warmup_epochs > 0 else "zero_eps_epochs"
    raise ConfigError(key, f"zero_eps_epochs {a.zero_eps_epochs:g} + eps_warmup_epochs "
                      f"{a.eps_warmup_epochs:g} is longer than the run's {epochs} epochs: eps "
                      "would never reach its value", "shorten the eps warm-up or raise epochs")


def effective_lr(o: OptimConfig, global_batch: int) -> float:
    """The learning rate a run uses: ``lr``, or ``lr_base`` scaled to the global batch.

    ``lr_scale`` linear: ``lr_base * global_batch / lr_base_size``; sqrt: the square root of that
    ratio (timm's rule for Adam-type optimizers); none: ``lr_base`` as it is.
    """
    if o.lr is not None:
        return o.lr
    ratio = global_batch / o.lr_base_size
    return o.lr_base * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[o.lr_scale]


def check_lr(o: OptimConfig, global_batch: int) -> float:
    """:func:`effective_lr`, refused when ``min_lr`` is above it (the cosine would rise).

    Raises:
        ConfigError: naming ``min_lr``.
    """
    lr = effective_lr(o, global_batch)
    if o.min_lr > lr:
        source = "" if o.lr is not None else (
            f" (lr_base {o.lr_base:g} scaled {o.lr_scale} from batch {o.lr_base_size} to the "
            f"global batch {global_batch})")
        raise ConfigError("min_lr", f"{o.min_lr:g} is above the learning rate {lr:g}{source}",
                          "lower min_lr or raise the learning rate")
    return lr


def build_parser() -> argparse.ArgumentParser:
    """The training CLI: one option per config key, documented from the dataclasses."""
    parser = argparse.ArgumentParser(
        prog="python -m advvit.train",
        description="Adversarial training of timm models. Every option is also a yaml key.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-c", "--config", default=None, help="yaml file of config keys")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section, cls.__doc__)
        for f in dataclasses.fields(cls):
            tp = FIELDS[f.name][2]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kwargs: Dict[str, Any] = {"default": argparse.SUPPRESS, "dest": f.name,
                                      "help": f"{f.metadata['help']} (default: {default})"}
            if tp is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif typing.get_origin(tp) in (list, List):
                kwargs["nargs"] = "+"
            group.add_argument("--" + f.name.replace("_", "-"), **kwargs)
    return parser


def _build(values: Dict[str, Any]) -> TrainConfig:
    sections: Dict[str, Dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in values.items():
        section, f, tp = FIELDS[key]
        value = _coerce(key, value, tp)
        _check_value(key, value, f.metadata)
        sections[section][key] = value
    cfg = TrainConfig(**{name: cls(**sections[name]) for name, cls in SECTIONS.items()})
    _check_combinations(cfg)
    return cfg


_CONFIG_FILE_FIX = "give the yaml file of config keys, e.g. configs/xcit_s12_adv.yaml"


def _read_config_text(path: str) -> str:
    """The text of a config file: a regular file of at most 1 MiB of UTF-8."""
    problem = input_file_problem(path, "config.yaml")
    if problem:
        raise ConfigError("config", problem)
    with open(path, "rb") as fh:
        data = fh.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError("config", f"{path} is larger than the {MAX_CONFIG_BYTES // 2**20} MiB a "
                          "config file may be", _CONFIG_FILE_FIX)
    if b"\0" in data:
        raise ConfigError("config", f"{path} is a binary file (a NUL byte at offset "
                          f"{data.index(0)}), not yaml text", _CONFIG_FILE_FIX)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError("config", f"{path} is not UTF-8 text (byte 0x{data[err.start]:02x} at "
                          f"offset {err.start})", _CONFIG_FILE_FIX) from None


def _expanded_sizes(root: yaml.Node) -> Dict[int, int]:
    """Each node's count of nodes (itself included) with every alias expanded, by ``id``.

    An alias is the node it names, so ten aliases of a ten-element list count 100 nodes: what
    the constructed value holds. A node that holds itself counts as too many.
    """
    sizes: Dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = MAX_CONFIG_NODES + 1  # still being counted: an alias to itself
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        sizes[id(node)] = 1 + sum(size(child) for child in children)
        return sizes[id(node)]

    size(root)
    return sizes


def _check_nodes(root: yaml.Node, path: str) -> None:
    """Refuse a document that expands past :data:`MAX_CONFIG_NODES`, naming the largest key,
    and a key given twice, naming both lines (yaml keeps the last without a word)."""
    sizes = _expanded_sizes(root)
    pairs = root.value if isinstance(root, yaml.MappingNode) else []
    if sizes[id(root)] > MAX_CONFIG_NODES:
        key = "config"
        if pairs:
            key_node, _ = max(pairs, key=lambda pair: sizes[id(pair[1])])
            key = str(key_node.value)
        raise ConfigError(key, f"{path} expands to more than {MAX_CONFIG_NODES:,} yaml values "
                          "(each alias counted as all it repeats)",
                          "write the values out: a config value is a number, a string or a "
                          "short list")
    lines: Dict[str, int] = {}
    for key_node, _ in pairs:
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        line = key_node.start_mark.line + 1
        if key_node.value in lines:
            raise ConfigError(key_node.value, f"given twice in {path} (lines "
                              f"{lines[key_node.value]} and {line})", "keep one of them")
        lines[key_node.value] = line


def load_yaml(path: str) -> Dict[str, Any]:
    """Read a config file; unknown keys are errors, with the nearest known key suggested.

    The file is refused before its values are built when it is not at most 1 MiB of UTF-8
    text, when it expands past :data:`MAX_CONFIG_NODES` values, or when it gives a key twice.
    """
    loader = yaml.SafeLoader(_read_config_text(path))
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_nodes(node, path)
        raw = (loader.construct_document(node) if node is not None else None) or {}
    except yaml.YAMLError as err:
        raise ConfigError("config", f"{path} is not valid yaml: {err}") from None
    except RecursionError:
        raise ConfigError("config", f"{path} nests its values too deeply to be a config",
                          _CONFIG_FILE_FIX) from None
    finally:
        loader.dispose()
    if not isinstance(raw, dict):
        raise ConfigError("config", f"{path} must hold a mapping of keys to values")
    for key in raw:
        if key not in FIELDS:
            import difflib
            near = difflib.get_close_matches(str(key), FIELDS, n=1)
            raise ConfigError(str(key), f"unknown key in {path}",
                              f"did you mean '{near[0]}'?" if near else
                              "see python -m advvit.train --help")
    return raw


def load_config(argv: Optional[Sequence[str]] = None,
                overrides: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """Build the validated config from ``--config FILE`` plus command-line options.

    Args:
        argv: command-line arguments (None: ``sys.argv[1:]``).
        overrides: extra key/values applied last (for programmatic use).

    Raises:
        ConfigError: for an unknown key, a wrong type or an impossible value.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    values: Dict[str, Any] = {}
    if args.config:
        values.update(load_yaml(args.config))
    values.update({k: v for k, v in vars(args).items() if k != "config"})
    values.update(overrides or {})
    for key in values:
        if key not in FIELDS:
            raise ConfigError(key, "unknown key", "see python -m advvit.train --help")
    return _build(values)


def config_to_dict(cfg: TrainConfig) -> Dict[str, Any]:
    """The flat key -> value mapping (the form of yaml files and ``args.yaml``)."""
    flat: Dict[str, Any] = {}
    for section in SECTIONS:
        flat.update(dataclasses.asdict(getattr(cfg, section)))
    return flat


def config_from_dict(values: Dict[str, Any]) -> TrainConfig:
    """Rebuild (and re-validate) a config from its flat form, e.g. from a checkpoint."""
    unknown = [k for k in values if k not in FIELDS]
    if unknown:
        raise ConfigError(unknown[0], "unknown key")
    return _build(dict(values))


def save_args_yaml(cfg: TrainConfig, path: str, notes: Sequence[str] = ()) -> None:
    """Write the resolved config beside the run (timm's ``args.yaml``), atomically.

    Args:
        notes: lines written first as yaml comments (what the run resolved beyond its keys,
            e.g. the fine-tuning source's sha256): the file stays a config ``--config`` reads.
    """
    header = "".join(f"# {line}\n" for line in notes)
    atomic_write_text(path, header + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
