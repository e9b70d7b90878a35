"""One checkpoint format for training output, read by evaluation, fine-tuning and users' code.

A checkpoint is a ``torch.save``d dict of plain data (loadable with ``weights_only=True``)::

    format: "advvit-checkpoint", format_version: 1
    model:  the timm model's state dict (wrappers stripped: see ``advvit.wrappers.unwrap``)
    spec:   ModelSpec as a dict: arch, num_classes, in_chans, img_size, normalize
    meta:   input_range [0, 1], normalize, train_norm, train_eps, versions (advvit, timm, torch),
            created (UTC, ISO 8601)
    config: the resolved run config, as plain data
    epoch, step, best_metric
    checksums: {"algorithm": "crc32", "model": {key: crc}, "ema": {key: crc}}, written by
            ``save_checkpoint``: a CRC-32 of each weight tensor (dtype, shape and bytes)
    optional: optimizer, scheduler, scaler, ema (state dicts), rng (python, numpy, torch, cuda)

Loading verifies the checksums (a mismatch is a damaged file, named with its tensors) and
refuses weights holding NaN or infinite values, for files written before the checksums too:
such a file is never evaluated, analysed, resumed or fine-tuned from.

The normalization is part of the model, not of the data: inputs are always [0, 1] pixels, and
``spec.normalize`` says whether the model maps them with ``(x - mean) / std`` inside. A loader
that guessed instead could apply a normalization the model never saw.

Saving is atomic (temporary file in the same folder, flush + fsync, ``os.replace``, folder
fsync): a kill mid-save leaves the previous checkpoint whole.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import json
import os
import pickle
import pickletools
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

import timm

from . import __version__
from .io import OptionError, atomic_write, input_file, input_file_problem, sha256_file
from .models import create_model, iter_registered
# Below the models, which raise the same error from the same fit check when fine-tuning; part of
# this module's interface all the same.
from .weights import (CheckpointError, _listed, check_state_dict_fits, state_dict_misfit, weights_checksums,
                      weights_digest)
from .wrappers import NormalizedModel, unwrap

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "ModelSpec",
    "save_checkpoint",
    "make_checkpoint",
    "load_checkpoint",
    "load_file",
    "create_model_from_checkpoint",
    "state_dict_misfit",
    "check_state_dict_fits",
    "weights_checksums",
    "weights_digest",
    "check_finite_weights",
    "restore_rng_state",
    "rng_state",
    "export_timm",
    "LoadedModel",
    "load_checkpoint_model",
    "load_weights_file",
    "load_timm_model",
]

FORMAT = "advvit-checkpoint"
FORMAT_VERSION = 1
_REQUIRED = ("format", "format_version", "model", "spec", "meta")
_SPEC_FIELDS = ("arch", "num_classes", "in_chans", "img_size", "normalize")
_WEIGHTS = ("model", "ema")  # the state dicts that hold weights: checksummed, checked finite
_CHECKSUM = "crc32"
# What to do with a checkpoint whose weights cannot be used.
_OTHER_CHECKPOINT = "use another checkpoint (e.g. the run's best.pth or last.pth)"

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class ModelSpec:
    """What it takes to rebuild a checkpoint's model.

    Attributes:
        arch: timm model name (after ``import advvit.models`` for the thesis variants).
        num_classes: classifier outputs.
        in_chans: input channels.
        img_size: input size (int or (H, W)), or None for the architecture's default.
        normalize: None (the model takes [0, 1] pixels as they are) or ``(mean, std)`` applied
            inside the model.
        model_args: further architecture arguments given to ``timm.create_model`` (e.g.
            ``patch_size``, ``depth``), plain data; not drop rates, which do not change weights.
    """

    arch: str
    num_classes: int
    in_chans: int = 3
    img_size: Optional[Union[int, Tuple[int, int]]] = None
    normalize: Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]] = None
    model_args: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or not self.arch:
            raise CheckpointError(f"ModelSpec.arch must be a timm model name, got {self.arch!r}")
        if self.normalize is not None:
            try:
                mean, std = self.normalize
                mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
            except (TypeError, ValueError):
                raise CheckpointError(f"ModelSpec.normalize must be None or (mean, std), got {self.normalize!r}") from None
            object.__setattr__(self, "normalize", (mean, std))
        if not isinstance(self.model_args, Mapping):
            raise CheckpointError(f"ModelSpec.model_args must be a dict, got {self.model_args!r}")
        if isinstance(self.img_size, (list, tuple)):
            object.__setattr__(self, "img_size", tuple(int(s) for s in self.img_size))

    def to_dict(self) -> Dict[str, Any]:
        return {
            "arch": self.arch, "num_classes": int(self.num_classes), "in_chans": int(self.in_chans),
            "img_size": list(self.img_size) if isinstance(self.img_size, tuple) else self.img_size,
            "normalize": None if self.normalize is None else [list(self.normalize[0]), list(self.normalize[1])],
            "model_args": _plain(dict(self.model_args), "spec.model_args"),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelSpec":
        missing = [k for k in _SPEC_FIELDS if k not in d]
        if missing:
            raise CheckpointError(f"checkpoint spec lacks {missing}; it was not written by make_checkpoint")
        return cls(**{k: d[k] for k in _SPEC_FIELDS}, model_args=dict(d.get("model_args") or {}))


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------

def save_checkpoint(path: PathLike, state: Dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (see ``atomic_write``), with its weights' checksums.

    The ``model`` and ``ema`` weights are written from the CPU (copied there once, where they are
    on a device) and their ``checksums`` are added; ``state`` itself is not changed.

    Args:
        path: destination file; its folder is created if missing.
        state: the dict to save (see ``make_checkpoint``).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is a folder: give a file name, e.g. {path}/last.pth")
    state = dict(state)
    checksums: Dict[str, Any] = {}
    for part in _weight_parts(state):
        state[part] = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state[part].items()}
        checksums[part] = weights_checksums(state[part])
    if checksums:
        state["checksums"] = {"algorithm": _CHECKSUM, **checksums}
    atomic_write(path, lambda f: torch.save(state, f))


def _plain(obj: Any, where: str = "config") -> Any:
    """Plain data (dict/list/tuple/str/number/bool/None/tensor) for ``weights_only`` loading."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name), f"{where}.{f.name}") for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, enum.Enum):
        return _plain(obj.value, where)
    if isinstance(obj, (str, int, float, bool)) or obj is None or isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, (os.PathLike, torch.device, torch.dtype)):
        return str(obj)
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return _plain(obj.to_dict(), where)
    if hasattr(obj, "__dict__"):
        return _plain(vars(obj), where)
    return repr(obj)


def rng_state() -> Dict[str, Any]:
    """The python, numpy, torch (and CUDA) RNG states now, as a checkpoint's ``rng`` holds them."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: Dict[str, Any] = {
        "python": random.getstate(),
        # numpy's state holds an ndarray; stored as a tensor so the file loads with weights_only.
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore python, numpy, torch (and CUDA, where saved and present) RNG states for exact resume."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        n = state["numpy"]
        keys = n["keys"].numpy().astype(np.uint32) if isinstance(n["keys"], torch.Tensor) else np.asarray(n["keys"], np.uint32)
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _versions() -> Dict[str, str]:
    return {"advvit": str(__version__), "timm": str(timm.__version__), "torch": str(torch.__version__)}


def _model_normalization(model: nn.Module) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
    """The (mean, std) of the ``NormalizedModel`` inside DDP / compile wrappers, or None."""
    inner = unwrap(model, "runtime")
    return inner.normalization if isinstance(inner, NormalizedModel) else None


def make_checkpoint(model: nn.Module, spec: ModelSpec, *, config: Any, epoch: int, step: int,
                    best_metric: Optional[float] = None, optimizer: Optional[torch.optim.Optimizer] = None,
                    scheduler: Any = None, scaler: Any = None, ema: Any = None,
                    train_norm: Optional[str] = None, train_eps: Optional[float] = None,
                    rng: bool = True, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Assemble a checkpoint dict for ``save_checkpoint``.

    Args:
        model: the trained model; DDP / compile / ``NormalizedModel`` wrappers are stripped, so the
            weights are a plain timm state dict.
        spec: how to rebuild it; ``spec.normalize`` must agree with a ``NormalizedModel`` wrapper.
        config: the resolved run config (a dataclass, a mapping, or an object with ``to_dict``),
            stored as plain data.
        epoch: epochs completed.
        step: optimizer steps taken.
        best_metric: the model-selection metric so far (e.g. robust accuracy on the held-out set).
        optimizer, scheduler, scaler: anything with ``state_dict()`` (timm schedulers and
            ``NativeScaler`` included), saved for resume.
        ema: an EMA model (timm ``ModelEmaV3`` or a plain module): its weights, wrappers stripped.
        train_norm: the attack norm trained against ("linf", "l2").
        train_eps: the attack radius trained against, in [0, 1] pixel units.
        rng: store python / numpy / torch (/ CUDA) RNG states for exact resume.
        extra: more plain data, stored under ``extra``.

    Returns:
        The checkpoint dict.
    """
    if not isinstance(spec, ModelSpec):
        raise CheckpointError(f"spec must be a ModelSpec, got {type(spec).__name__}")
    norm = _model_normalization(model)
    if norm is not None:
        mean, std = norm
        if spec.normalize is None or not (np.allclose(mean, spec.normalize[0]) and np.allclose(std, spec.normalize[1])):
            raise CheckpointError(f"spec.normalize={spec.normalize} does not match the model's NormalizedModel "
                                  f"(mean={mean}, std={std}): record the normalization the model applies")
    elif spec.normalize is not None:
        raise CheckpointError(f"spec.normalize={spec.normalize} but the model is not wrapped in NormalizedModel: "
                              "set spec.normalize=None or wrap the model")
    state_dict = {k: v.detach() for k, v in unwrap(model).state_dict().items()}
    ckpt: Dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": state_dict,
        "spec": spec.to_dict(),
        "meta": {
            "input_range": [0.0, 1.0],
            "normalize": spec.to_dict()["normalize"],
            "train_norm": train_norm,
            "train_eps": None if train_eps is None else float(train_eps),
            "versions": _versions(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        },
        "config": _plain(config),
        "epoch": int(epoch),
        "step": int(step),
        "best_metric": None if best_metric is None else float(best_metric),
    }
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        ckpt["scheduler"] = _plain(scheduler.state_dict(), "scheduler")
    if scaler is not None:
        ckpt["scaler"] = scaler.state_dict()
    if ema is not None:
        ema_module = getattr(ema, "module", ema)
        ckpt["ema"] = {k: v.detach() for k, v in unwrap(ema_module).state_dict().items()}
    if rng:
        ckpt["rng"] = rng_state()
    if extra:
        ckpt["extra"] = _plain(extra, "extra")
    return ckpt


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def _validate(ckpt: Any, path: str) -> Dict[str, Any]:
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not an advvit checkpoint: it holds a {type(ckpt).__name__}, not a dict")
    if ckpt.get("format") != FORMAT:
        looks_like_sd = bool(ckpt) and all(isinstance(v, torch.Tensor) for v in ckpt.values())
        hint = (" It looks like a bare state dict: load it with timm.create_model(arch, pretrained=True, "
                "pretrained_cfg_overlay=dict(file=...)) or advvit.models.load_finetune_weights."
                if looks_like_sd else "")
        raise CheckpointError(f"{path} is not an advvit checkpoint (no format marker; top-level keys: "
                              f"{sorted(map(str, ckpt))[:12]}).{hint}")
    version = ckpt.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format_version {version!r}; this advvit reads up to "
                              f"{FORMAT_VERSION}: upgrade advvit")
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks the checkpoint field(s) {missing}")
    if not isinstance(ckpt["model"], dict) or not ckpt["model"]:
        raise CheckpointError(f"{path}: 'model' must be a non-empty state dict")
    ModelSpec.from_dict(ckpt["spec"])  # raises on a malformed spec
    return ckpt


_TORCH_REASON = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|\Z)", re.S)


def _load_failure(err: BaseException) -> str:
    """torch's reason for a failed load, in one line, without its advice.

    torch's message for the safe unpickler tells users to retry with ``weights_only=False``, which
    runs whatever code the file holds: for a file that fails to load as plain data that advice is
    never right, so only the reason itself is kept (its first sentence).
    """
    text = str(err)
    found = _TORCH_REASON.search(text)
    reason = found.group(1) if found else (text.strip().splitlines() or [""])[0]
    reason = reason.split(". ")[0].strip().rstrip(".")
    if "weights_only" in reason:
        reason = ""
    return f"{type(err).__name__}: {reason}" if reason else type(err).__name__


_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _pickle_globals(path: Path) -> list[str]:
    """The globals (classes, functions) a plain pickle file refers to, read without running it.

    torch's safe unpickler reads no pickle protocol above 2, so a ``pickle.dump``ed file fails
    there before its globals are seen; ``pickletools`` lists them. [] for anything that is not
    one whole pickle (a torch zip file, random bytes).
    """
    names: list[str] = []
    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    names.append(".".join(strings[-2:]) if len(strings) >= 2 else "a global")
                elif isinstance(arg, str):
                    strings.append(arg)
            if f.read(1):
                return []
    except Exception:  # noqa: BLE001  (anything but a pickle makes pickletools raise anything)
        return []
    return names


def _refused_objects(err: BaseException, path: Path) -> Optional[str]:
    """What a file the safe unpickler refused holds beyond plain data, or None when it was
    refused for being damaged."""
    found = _REFUSED_GLOBAL.search(str(err))
    if found:
        return found.group(1)
    names = list(dict.fromkeys(_pickle_globals(path)))
    return ", ".join(names[:3]) + (" ..." if len(names) > 3 else "") if names else None


def load_file(path: PathLike, *, weights_only: bool = True, what: str = "file",
              example: str = "best.pth") -> Any:
    """``torch.load`` a file on the CPU with one clear error for every way it can fail.

    Args:
        path: the file.
        weights_only: torch's safe unpickler (plain data and tensors only).
        what: what the file is meant to be, for the messages ("checkpoint", "weights file").
        example: a file name for the message when ``path`` is a folder.

    Raises:
        CheckpointError: missing, a folder, truncated or corrupt, or holding objects other than
            plain data; never with torch's advice to retry with ``weights_only=False``.
    """
    p = Path(path)
    problem = input_file_problem(p, example)
    if problem:
        raise CheckpointError(f"{what} {problem}")
    try:
        with warnings.catch_warnings():
            # Random bytes can read as a newer pickle protocol; the error below says it all.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(p, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as e:
        # torch wraps every failure of its safe unpickler alike: a refused global, or a plain
        # pickle naming globals, means the file is whole but holds objects beyond plain data.
        objects = _refused_objects(e, p) if weights_only else None
        if objects:
            convert = ("save the weights with advvit.checkpoint.make_checkpoint + save_checkpoint"
                       if what == "checkpoint" else "save its tensors with torch.save or safetensors")
            raise CheckpointError(f"{p} holds objects other than plain data and tensors ({objects}), which "
                                  "advvit will not load: loading them could run code, and the files "
                                  "save_checkpoint writes never hold any. If you trust its source, convert "
                                  f"it: load it with torch.load's full unpickler in Python, then {convert}") from None
        raise CheckpointError(f"{p} is truncated or corrupt ({_load_failure(e)})") from None
    except Exception as e:  # noqa: BLE001  (random bytes make the unpickler raise anything)
        raise CheckpointError(f"{p} is truncated or corrupt ({_load_failure(e)})") from None


def check_finite_weights(state_dict: Mapping[str, Any], *, where: str = "checkpoint") -> None:
    """Raise unless every floating-point tensor of ``state_dict`` is finite.

    Weights holding NaN or infinity give no meaningful evaluation (a constant prediction reads
    as chance accuracy) and train on at absurd losses: they are refused wherever they are loaded.

    Raises:
        CheckpointError: naming the first tensor with non-finite values and how many it holds.
    """
    bad: Dict[str, int] = {}
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
            count = int(value.numel() - torch.isfinite(value).sum())
            if count:
                bad[key] = count
    if bad:
        first, count = next(iter(bad.items()))
        more = (f"; {len(bad)} tensors, {sum(bad.values())} values in all" if len(bad) > 1 else "")
        values = "value" if count == 1 else "values"
        raise CheckpointError(f"{where}: {count} non-finite {values} (NaN or infinite) in tensor {first}{more}: "
                              f"such weights give no meaningful result (a run that diverged, or an altered file); "
                              f"{_OTHER_CHECKPOINT}")


def _weight_parts(ckpt: Mapping[str, Any]) -> list[str]:
    """The weight state dicts a checkpoint holds ("model", and "ema" where saved)."""
    return [part for part in _WEIGHTS if isinstance(ckpt.get(part), Mapping) and ckpt[part]]


def _check_checksums(ckpt: Mapping[str, Any], where: str) -> None:
    """Compare the weights with the checksums ``save_checkpoint`` stored (none in older files)."""
    sums = ckpt.get("checksums")
    if sums is None:
        return  # written before checksums were stored: nothing to verify
    if not isinstance(sums, Mapping) or sums.get("algorithm") != _CHECKSUM:
        raise CheckpointError(f"{where}: its weights' checksums are unreadable: the file is damaged; {_OTHER_CHECKPOINT}")
    for part in _weight_parts(ckpt):
        stored = sums.get(part)
        if not isinstance(stored, Mapping):
            continue
        # Keys added or removed are left to check_state_dict_fits, which names them.
        damaged = [k for k, crc in weights_checksums(ckpt[part]).items() if k in stored and stored[k] != crc]
        if damaged:
            raise CheckpointError(f"{where} ({part}): {_listed('tensors fail their checksum:', damaged, 3)}: the "
                                  f"file is damaged (changed after it was written); {_OTHER_CHECKPOINT}, or copy "
                                  "it again from its source")


def load_checkpoint(path: PathLike, *, expected_arch: Optional[str] = None,
                    weights_only: bool = True) -> Dict[str, Any]:
    """Read and validate a checkpoint (on the CPU).

    Args:
        path: the file written by ``save_checkpoint``.
        expected_arch: raise if the checkpoint holds another architecture.
        weights_only: load with torch's safe unpickler (plain data and tensors only). Pass False
            only for a file you trust that stores arbitrary objects.

    Returns:
        The checkpoint dict.

    Raises:
        CheckpointError: not a file, truncated or corrupt, not an advvit checkpoint, a newer
            format, missing fields, weights that fail their checksums or hold NaN / infinite
            values, or another architecture than ``expected_arch``.
    """
    p = Path(path)
    ckpt = load_file(p, weights_only=weights_only, what="checkpoint")
    ckpt = _validate(ckpt, str(p))
    _check_checksums(ckpt, str(p))
    for part in _weight_parts(ckpt):
        check_finite_weights(ckpt[part], where=f"{p} ({part})")
    if expected_arch is not None and ckpt["spec"]["arch"] != expected_arch:
        raise CheckpointError(f"{p} holds a {ckpt['spec']['arch']!r} model, expected {expected_arch!r}")
    return ckpt


def create_model_from_checkpoint(path_or_ckpt: Union[PathLike, Dict[str, Any]], *, use_ema: bool = True,
                                 expected_arch: Optional[str] = None) -> Tuple[nn.Module, ModelSpec]:
    """Rebuild a checkpoint's model with its weights and its normalization, in eval mode.

    Args:
        path_or_ckpt: a checkpoint file or a dict from ``load_checkpoint``.
        use_ema: take the EMA weights when the checkpoint has them.
        expected_arch: raise if the checkpoint holds another architecture.

    Returns:
        ``(model, spec)``: the model takes [0, 1] pixels (wrapped in ``NormalizedModel`` when
        ``spec.normalize`` is set).

    Raises:
        CheckpointError: as ``load_checkpoint``, plus weights that do not fit the architecture
            (missing / unexpected keys, shape mismatches, listed).
    """
    if isinstance(path_or_ckpt, dict):
        ckpt, where = _validate(path_or_ckpt, "checkpoint"), "checkpoint"
        if expected_arch is not None and ckpt["spec"]["arch"] != expected_arch:
            raise CheckpointError(f"checkpoint holds a {ckpt['spec']['arch']!r} model, expected {expected_arch!r}")
    else:
        ckpt, where = load_checkpoint(path_or_ckpt, expected_arch=expected_arch), str(path_or_ckpt)
    spec = ModelSpec.from_dict(ckpt["spec"])
    try:
        model = create_model(spec.arch, num_classes=spec.num_classes, in_chans=spec.in_chans,
                             img_size=spec.img_size, normalize=spec.normalize, **spec.model_args)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{where}: cannot build {spec.arch!r}: {e}") from None
    weights = ckpt["ema"] if use_ema and ckpt.get("ema") else ckpt["model"]
    check_state_dict_fits(model, weights, where=where)
    unwrap(model).load_state_dict(weights, strict=True)
    model.eval()
    return model, spec


# --------------------------------------------------------------------------------------------
# Export to plain timm
# --------------------------------------------------------------------------------------------

def export_timm(path: PathLike, out_dir: PathLike, *, use_ema: bool = True) -> Path:
    """Export a checkpoint as a plain timm model folder: ``model.safetensors`` + ``config.json``.

    The folder loads without advvit (for architectures timm ships)::

        timm.create_model("local-dir:" + out_dir, pretrained=True)
        timm.create_model(arch, pretrained=True, num_classes=N, in_chans=C, img_size=S,
                          pretrained_cfg_overlay=dict(file=out_dir + "/model.safetensors",
                                                      num_classes=N))

    ``config.json`` is timm's own format (written by timm's ``save_config_for_hf``); its
    ``pretrained_cfg`` mean/std are the normalization the model was trained behind (0 and 1 when
    it took [0, 1] pixels as they are), so timm's ``resolve_data_config`` + ``create_transform``
    reproduce the training inputs: pixels in [0, 1], then ``(x - mean) / std``. An ``advvit``
    section records the same in words, with the training norm / eps and versions.

    Args:
        path: an advvit checkpoint.
        out_dir: the folder to write (created).
        use_ema: export the EMA weights when the checkpoint has them.

    Returns:
        The folder.
    """
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    model, spec = create_model_from_checkpoint(path, use_ema=use_ema)
    timm_model = unwrap(model)
    ckpt = load_checkpoint(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage: give every tensor its own copy.
    tensors = {k: v.detach().contiguous().clone() for k, v in timm_model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    chans = spec.in_chans
    if spec.normalize is None:
        mean, std = (0.0,) * chans, (1.0,) * chans
    else:
        mean, std = tuple(spec.normalize[0]), tuple(spec.normalize[1])
        if len(mean) == 1 and chans > 1:
            mean, std = mean * chans, std * chans
    size = spec.img_size
    model_args: Dict[str, Any] = {"num_classes": spec.num_classes, "in_chans": chans}
    if size is not None and "img_size" in getattr(timm_model, "_model_args", {}):
        model_args["img_size"] = list(size) if isinstance(size, tuple) else size
    hw = None
    if size is not None:
        hw = (size, size) if isinstance(size, int) else tuple(size)
    data_config: Dict[str, Any] = {"mean": mean, "std": std, "crop_pct": 1.0}
    if hw is not None:
        data_config["input_size"] = (chans, *hw)
    advvit_note = {
        "input_range": [0.0, 1.0],
        "normalization": ("none: the model takes pixels in [0, 1] as they are" if spec.normalize is None else
                          "pixels in [0, 1], then (x - mean) / std with the mean/std of pretrained_cfg"),
        "normalize": ckpt["meta"].get("normalize"),
        "train_norm": ckpt["meta"].get("train_norm"),
        "train_eps": ckpt["meta"].get("train_eps"),
        "versions": ckpt["meta"].get("versions"),
        "epoch": ckpt.get("epoch"),
        "best_metric": ckpt.get("best_metric"),
        "weights": "ema" if use_ema and ckpt.get("ema") else "model",
    }
    registered_here = spec.arch in iter_registered()
    if registered_here:
        advvit_note["requires"] = "import advvit.models (registers this architecture in timm)"
    save_config_for_hf(timm_model, str(out / "config.json"),
                       model_config={
                           "advvit": advvit_note,
                           # the source cfg's tag / paper / hub id describe timm's weights, not these
                           "pretrained_cfg": {"tag": "advvit", "hf_hub_id": None, "origin_url": None,
                                              "paper_ids": None, "url": None}},
                       model_args=model_args, data_config=data_config)
    return out


def describe(ckpt: Mapping[str, Any]) -> str:
    """One line about a checkpoint, for logs."""
    spec, meta = ckpt["spec"], ckpt["meta"]
    return (f"{spec['arch']} ({spec['num_classes']} classes, {spec['in_chans']}x{spec['img_size']}, "
            f"normalize={json.dumps(spec['normalize'])}), epoch {ckpt.get('epoch')}, step {ckpt.get('step')}, "
            f"best {ckpt.get('best_metric')}, trained {meta.get('train_norm')} eps={meta.get('train_eps')}")


# --------------------------------------------------------------------------------------------
# models for evaluation and analysis, loaded from a file an option names
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadedModel:
    """A model loaded for evaluation or analysis.

    Attributes:
        model: eval mode, on the CPU, taking [0, 1] pixels.
        num_classes, in_chans, img_size: what it takes and returns (img_size None: any).
        record: what the reports say about it (source, path, sha256, arch, ...).
        trained_on: the training config the checkpoint records ({} when none).
        eval_transform: the source's own evaluation preprocessing (a PIL image to a [0, 1]
            tensor: resize, crop), applied to the examples in place of advvit's; None:
            advvit's (the data set's native size, or timm's eval transform).
    """

    model: nn.Module
    num_classes: int
    in_chans: int
    img_size: Optional[int]
    record: Dict[str, Any]
    trained_on: Dict[str, Any]
    eval_transform: Optional[Callable[[Any], torch.Tensor]] = None


def load_checkpoint_model(path: PathLike, *, use_ema: bool = True,
                          option: str = "--checkpoint") -> LoadedModel:
    """Load an advvit checkpoint's model (evaluation and every analysis model option).

    Args:
        path: the checkpoint file.
        use_ema: take the EMA weights when the checkpoint has them.
        option: the command-line option that named the file, for messages.

    Raises:
        OptionError: the file is missing or does not load (the message says why).
    """
    path = input_file(path, option, example="best.pth")
    try:
        ckpt = load_checkpoint(path)
        model, mspec = create_model_from_checkpoint(ckpt, use_ema=use_ema)
    except CheckpointError as err:
        raise OptionError(f"{option}: {err}") from None
    record = {"source": "checkpoint", "path": str(path), "sha256": sha256_file(path),
              "arch": mspec.arch, "num_classes": mspec.num_classes,
              "in_chans": mspec.in_chans, "img_size": mspec.img_size,
              "normalize": mspec.normalize,
              "ema": bool(ckpt.get("ema")) and use_ema,
              "epoch": ckpt.get("epoch"),
              "train_eps": ckpt["meta"].get("train_eps"),
              "train_norm": ckpt["meta"].get("train_norm")}
    return LoadedModel(model.eval(), mspec.num_classes, mspec.in_chans, mspec.img_size, record,
                       dict(ckpt.get("config") or {}))


def _read_weights(path: Path, option: str = "--weights") -> Any:
    """What a weights file holds (safetensors, or a torch file of plain data)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors
        try:
            return load_safetensors(str(path))
        except (SafetensorError, OSError) as err:
            raise OptionError(f"{option} {path} is not a readable safetensors file "
                              f"({err})") from None
    try:
        return load_file(path, what="weights file", example="model.safetensors")
    except CheckpointError as err:
        raise OptionError(f"{option}: {err}") from None


def load_weights_file(path: Path, option: str = "--weights") -> Dict[str, torch.Tensor]:
    """The state dict of a ``--weights`` file (timm's containers unwrapped), checked finite.

    Raises:
        OptionError: naming ``--weights``: unreadable, no state dict, NaN / inf weights.
    """
    state = _read_weights(path, option)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise OptionError(f"{option} {path} holds no state dict")
    try:
        check_finite_weights(state, where=str(path))
    except CheckpointError as err:
        raise OptionError(f"{option}: {err}") from None
    return state


def load_timm_model(arch: str, weights: PathLike, *, num_classes: int, in_chans: int,
                    img_size: Optional[int],
                    normalize: Optional[Tuple[Sequence[float], Sequence[float]]],
                    option: str = "--weights") -> LoadedModel:
    """A timm model (``--model``) with the weights of a file (``option``), strictly loaded.

    Raises:
        OptionError: the file is missing or unreadable, or its weights do not fit the model.
    """
    path = input_file(weights, option, example="model.safetensors")
    try:
        model = create_model(arch, num_classes=num_classes, in_chans=in_chans,
                             img_size=img_size, normalize=normalize)
        missing, unexpected = unwrap(model).load_state_dict(load_weights_file(path, option),
                                                            strict=False)
    except (RuntimeError, ValueError) as err:  # an unreadable file's OptionError included
        raise OptionError(f"{option} {path} do not fit --model {arch}: "
                          f"{str(err).splitlines()[0]}") from None
    if missing or unexpected:
        raise OptionError(f"{option} {path} do not fit --model {arch}: missing "
                          f"{missing[:5]}, unexpected {unexpected[:5]}")
    record = {"source": "timm", "arch": arch, "path": str(path),
              "sha256": sha256_file(path), "num_classes": num_classes,
              "in_chans": in_chans, "img_size": img_size, "normalize": normalize}
    return LoadedModel(model.eval(), num_classes, in_chans, img_size, record, {})
