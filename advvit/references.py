"""Model references: what ``--checkpoint`` (and ``--baseline``, ``--judge``, training's
``--finetune``) may name, resolved in one place into a :class:`~advvit.checkpoint.LoadedModel`
that takes [0, 1] pixels.

A reference is one of::

    PATH                          an advvit checkpoint; a checkpoint of timm's train.py (the
                                  thesis's public code: state_dict / state_dict_ema, arch, args);
                                  a safetensors file or plain state dict (with --model NAME)
    timm:NAME                     timm's pretrained weights
    hf-hub:ORG/NAME[@REV]         a timm model folder on the Hugging Face Hub (or its cache)
    local-dir:PATH                a timm model folder (what ``advvit.export`` writes)
    robustbench:[DATASET/THREAT/]NAME   a RobustBench zoo entry, built by robustbench's load_model

The normalization each source was trained behind is taken from the source itself (the
checkpoint's spec, timm's pretrained cfg, train.py's resolved data config, robustbench's own
model) and ends up inside the model exactly once: timm models are wrapped in
``NormalizedModel``; robustbench's models normalize themselves and are left as they are.
Every resolved model carries its input contract in ``LoadedModel.record``, which the reports
write: input range, normalization and where it came from, input size, classes, the weights
file, its sha256 and its origin.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

import timm

from .checkpoint import (FORMAT, CheckpointError, LoadedModel, check_finite_weights,
                         load_checkpoint_model, load_file, load_timm_model)
from .io import OptionError, input_file_problem, sha256_file
from .leaderboard import LEADERBOARD_EPS, THREATS, robustbench_dataset
from .wrappers import NormalizedModel, unwrap

__all__ = ["SCHEMES", "ModelOptions", "resolve_model", "check_classes", "check_input_size",
           "robustbench_zoo", "ROBUSTBENCH_EXTRA"]

SCHEMES = ("timm", "hf-hub", "local-dir", "robustbench")
_FORMS = ("a checkpoint path, timm:NAME, hf-hub:ORG/NAME[@REV], local-dir:PATH or "
          "robustbench:[DATASET/THREAT/]NAME")
ROBUSTBENCH_EXTRA = ("pip install --no-deps robustbench==1.1.1 geotorch torchdiffeq, then pip "
                     "install requests gdown pandas 'setuptools<81' (as scripts/setup.sh does: "
                     "robustbench's own pins would replace advvit's timm)")


@dataclass(frozen=True)
class ModelOptions:
    """What besides the reference decides how a model is read.

    Attributes:
        option: the option that named it, for messages.
        use_ema: take EMA weights where a checkpoint holds them.
        model: ``--model NAME`` for a plain state dict or safetensors file.
        dataset, data_dir, norm: the run's data set, its root and threat norm (a state dict's
            classes and input size; robustbench:NAME's entry).
        robustbench_dir: robustbench's model folder (its default: ./models).
        num_classes, in_chans, img_size, normalize: a plain state dict's model (``--model``).
        model_option: the option that names a plain state dict's architecture, for the message
            that asks for it; None where no option can (training's ``--finetune``: the weights
            must record their model and the normalization they were trained behind).
    """

    option: str = "--checkpoint"
    use_ema: bool = True
    model: Optional[str] = None
    dataset: Optional[str] = None
    data_dir: Optional[str] = None
    norm: Optional[str] = None
    robustbench_dir: Optional[str] = None
    num_classes: Optional[int] = None
    in_chans: Optional[int] = None
    img_size: Optional[int] = None
    normalize: Optional[Tuple[Sequence[float], Sequence[float]]] = None
    model_option: Optional[str] = "--model"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _close(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
    return f" (close names: {', '.join(close)})" if close else ""


def resolve_model(ref: str, opts: ModelOptions = ModelOptions()) -> LoadedModel:
    """The model a reference names, eval mode, on the CPU, taking [0, 1] pixels.

    Raises:
        OptionError: one message naming ``opts.option`` and the fix: an unknown scheme or name
            (close names suggested), weights absent offline (the file and the folder for it),
            an optional package missing (what to install), weights that do not fit.
    """
    scheme, sep, rest = str(ref).partition(":")
    if sep and scheme in SCHEMES:
        if not rest:
            raise OptionError(f"{opts.option} {ref}: give a name after {scheme}: ({_FORMS})")
        loaded = {"timm": _timm_name, "hf-hub": _hub, "local-dir": _local_dir,
                  "robustbench": _robustbench}[scheme](rest, opts)
    elif sep and len(scheme) > 1 and "/" not in scheme and not Path(ref).exists():
        raise OptionError(f"{opts.option} {ref}: unknown scheme {scheme + ':'!r}"
                          f"{_close(scheme, SCHEMES)}: give {_FORMS}")
    else:
        loaded = _path(ref, opts)
    record = {"reference": str(ref), "input_range": [0.0, 1.0], **loaded.record}
    return dataclasses.replace(loaded, model=loaded.model.eval(), record=record)


def check_classes(num_classes: int, dataset: str, where: str) -> None:
    """Refuse a model whose class count is not the data set's (for the data sets whose classes
    are known without reading them: an image folder may hold a subset of its model's classes).

    Raises:
        OptionError: naming the model, both counts and the fix.
    """
    from .data import DATASET_NAMES, dataset_info
    if dataset not in DATASET_NAMES or dataset == "imagefolder":
        return
    expected = dataset_info(dataset).num_classes
    if num_classes != expected:
        raise OptionError(f"{where} has {num_classes} classes but --dataset {dataset} has "
                          f"{expected}: use it on the data set it was trained for")


def check_input_size(model: nn.Module, size: Tuple[int, int], where: str) -> None:
    """Refuse a model that cannot take examples of ``size`` (height, width) as it was trained.

    Evaluation and the analyses give a model its examples at the size the model records (the
    size it was trained at: advvit's spec, train.py's input size, timm's pretrained cfg,
    robustbench's preprocessing), the data set's images resized to it as training resized them;
    a model that records none gets the data set's own size. Whether another size fits depends
    on the model, read from timm's patch embedding:

    - absolute position embeddings for one token grid (ViT, DeiT, CaiT), or a patch embedding
      that asserts its size (``strict_img_size``: Swin's windows): another size fails at the
      first forward, or, built with ``dynamic_img_size``, runs on position embeddings timm
      resamples on the fly, a grid the model was never trained on: refused either way;
    - positions computed from the grid (XCiT, FAN): any multiple of the patch size; another
      size runs on the floor of the grid, silently cropping the border: refused;
    - no patch embedding (ResNets and other CNNs, robustbench's own classes): any size.

    Raises:
        OptionError: naming the model, both sizes and the fix.
    """
    inner = unwrap(model)
    embed = getattr(inner, "patch_embed", None)
    built = _pair(getattr(embed, "img_size", None))
    patch = _pair(getattr(embed, "patch_size", None))
    fixed = isinstance(getattr(inner, "pos_embed", None), nn.Parameter) or \
        bool(getattr(embed, "strict_img_size", False))
    fix = ("give a model that records the size it takes (its checkpoint's spec.img_size, its "
           "pretrained cfg's input_size), or --model NAME with --img-size N for plain weights")
    if fixed and built is not None and tuple(size) != built:
        raise OptionError(f"{where} takes {built[0]}x{built[1]} inputs (the token grid it was "
                          f"built for) but the examples come at {size[0]}x{size[1]}: {fix}")
    if patch is not None and (size[0] % patch[0] or size[1] % patch[1]):
        raise OptionError(f"{where} cuts its input into {patch[0]}x{patch[1]} patches but the "
                          f"examples come at {size[0]}x{size[1]}, not a multiple: {fix}")


def _pair(value: Any) -> Optional[Tuple[int, int]]:
    if value is None:
        return None
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------

def _read(path: Path, option: str) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors
        try:
            return load_safetensors(str(path))
        except Exception as err:  # noqa: BLE001  (safetensors raises several kinds)
            raise OptionError(f"{option} {path} is not a readable safetensors file ({err})") from None
    # timm's train.py stores its argparse Namespace: plain data, allowed by name.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return load_file(path, what="checkpoint")
        except CheckpointError as err:
            raise OptionError(f"{option}: {err}") from None


def _path(ref: str, opts: ModelOptions) -> LoadedModel:
    problem = input_file_problem(ref, "best.pth")
    if problem:
        raise OptionError(f"{opts.option} {problem}: give {_FORMS}")
    path = Path(ref)
    state = _read(path, opts.option) if opts.option != "--weights" else None
    if isinstance(state, dict) and state.get("format") == FORMAT:
        if opts.model:
            raise OptionError(f"--model {opts.model}: {ref} is an advvit checkpoint, which "
                              "records its model: drop --model")
        loaded = load_checkpoint_model(path, use_ema=opts.use_ema, option=opts.option)
        return _with(loaded, origin=str(path.resolve()),
                     normalization="the checkpoint's spec.normalize" if loaded.record["normalize"]
                     else "none: the checkpoint's spec.normalize is None (pixels as they are)")
    if isinstance(state, dict) and "arch" in state and isinstance(state.get("state_dict"), dict):
        return _train_py_checkpoint(path, state, opts)
    if opts.model_option is None:
        raise OptionError(f"{opts.option} {ref} holds weights without their model or "
                          "normalization: give a reference that records them (an advvit or timm "
                          "train.py checkpoint, timm:NAME, hf-hub:ORG/NAME or local-dir:PATH)")
    if not opts.model:
        raise OptionError(f"{opts.option} {ref} holds weights without their model: add "
                          f"{opts.model_option} NAME (the timm architecture), or give an advvit "
                          "checkpoint")
    if opts.dataset is None:
        raise OptionError(f"--dataset is needed with --model {opts.model} (the classes and "
                          "input size come from it)")
    from .data import DataNotFoundError, dataset_info
    try:
        info = dataset_info(opts.dataset, opts.data_dir)
    except (DataNotFoundError, ValueError) as err:
        raise OptionError(f"--dataset {opts.dataset}: {err}") from None
    loaded = load_timm_model(opts.model, path,
                             num_classes=opts.num_classes or info.num_classes,
                             in_chans=opts.in_chans or info.in_chans,
                             img_size=opts.img_size or info.img_size, normalize=opts.normalize,
                             option=opts.option)
    return _with(loaded, origin=str(path.resolve()),
                 normalization="--mean/--std" if opts.normalize else
                 "none: --mean/--std not given, the model takes [0, 1] pixels as they are")


def _with(loaded: LoadedModel, **record: Any) -> LoadedModel:
    return dataclasses.replace(loaded, record={**loaded.record, **record})


def _strip_module(state: Mapping[str, Any]) -> Dict[str, Any]:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _train_py_checkpoint(path: Path, ckpt: Mapping[str, Any], opts: ModelOptions) -> LoadedModel:
    """A checkpoint of timm's train.py (the thesis's public code is built on it): the
    normalization is the data config train.py resolved (its --mean/--std, else the
    architecture's pretrained cfg), recomputed the same way."""
    from timm.data import resolve_data_config
    args = ckpt.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    arch = str(ckpt["arch"])
    if opts.model and opts.model != arch:
        raise OptionError(f"--model {opts.model}: {path} records its architecture ({arch}): "
                          "drop --model")
    ema = opts.use_ema and isinstance(ckpt.get("state_dict_ema"), dict)
    weights = _strip_module(ckpt["state_dict_ema"] if ema else ckpt["state_dict"])
    try:
        check_finite_weights(weights, where=str(path))
    except CheckpointError as err:
        raise OptionError(f"{opts.option}: {err}") from None
    kwargs: Dict[str, Any] = {}
    for key in ("num_classes", "in_chans"):
        if args.get(key):
            kwargs[key] = int(args[key])
    size = args.get("input_size") or ([None, args["img_size"], args["img_size"]]
                                      if args.get("img_size") else None)
    if size:
        kwargs["img_size"] = int(size[-1]) if size[-1] == size[-2] else tuple(size[-2:])
    try:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError) as err:
        raise OptionError(f"{opts.option} {path}: cannot build its arch {arch!r}: {err}") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise OptionError(f"{opts.option} {path}: its weights do not fit {arch}: missing "
                          f"{list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
    cfg = resolve_data_config(args, model=model)
    wrapped, normalize = _normalized(model, cfg["mean"], cfg["std"])
    given = args.get("mean") is not None
    return LoadedModel(wrapped.eval(), model.num_classes, int(cfg["input_size"][0]),
                       int(cfg["input_size"][-1]), {
                           "source": "timm-train-checkpoint", "path": str(path),
                           "origin": str(path.resolve()), "sha256": sha256_file(path),
                           "arch": arch, "num_classes": model.num_classes,
                           "in_chans": int(cfg["input_size"][0]),
                           "img_size": int(cfg["input_size"][-1]), "normalize": normalize,
                           "normalization": "the checkpoint's args.mean/args.std" if given else
                           f"{arch}'s pretrained cfg, as train.py resolved it (args.mean unset)",
                           "ema": ema, "epoch": ckpt.get("epoch")},
                       {k: args[k] for k in ("dataset", "data_dir") if args.get(k)})


def _normalized(model: nn.Module, mean: Sequence[float], std: Sequence[float]
                ) -> Tuple[nn.Module, Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]]:
    """The model behind its normalization; mean 0 / std 1 is none (advvit's exports of models
    that take [0, 1] pixels as they are write it so)."""
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if all(m == 0 for m in mean) and all(s == 1 for s in std):
        return model, None
    return NormalizedModel(model, mean, std), (mean, std)


# --------------------------------------------------------------------------------------------
# timm's loaders: timm:NAME, hf-hub:ORG/NAME[@REV], local-dir:PATH
# --------------------------------------------------------------------------------------------

def _hub_folder(repo: str) -> Path:
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"


def _hub_file(repo: str, revision: Optional[str], filenames: Sequence[str]) -> Optional[Path]:
    from huggingface_hub import try_to_load_from_cache
    for name in filenames:
        found = try_to_load_from_cache(repo, name, revision=revision)
        if isinstance(found, str):
            return Path(found)
    return None


_HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _weights_location(cfg: Mapping[str, Any]) -> Tuple[str, Optional[Path], str]:
    """Where timm reads a pretrained cfg's weights: (origin, the file when present, the folder
    to put it in)."""
    from timm.models._builder import _resolve_pretrained_source
    load_from, loc = _resolve_pretrained_source(dict(cfg))
    if load_from == "hf-hub":
        repo, names = (loc if isinstance(loc, tuple) else (loc, None))
        repo_id, _, revision = repo.partition("@")
        files = (names,) if names else _HUB_WEIGHTS
        return (f"hf-hub:{repo}", _hub_file(repo_id, revision or None, files),
                f"{_hub_folder(repo_id)} (the Hub cache, as huggingface_hub lays it out; "
                f"file {' or '.join(files)})")
    if load_from == "url":
        folder = Path(torch.hub.get_dir()) / "checkpoints"
        file = folder / os.path.basename(str(loc).split("?")[0])
        return str(loc), file if file.is_file() else None, f"{folder} (file {file.name})"
    if load_from in ("file", "local-dir"):
        file = Path(loc)
        if file.is_dir():
            file = next((file / n for n in _HUB_WEIGHTS if (file / n).is_file()), file / _HUB_WEIGHTS[0])
        return str(file), file if file.is_file() else None, str(file.parent)
    return load_from or "none", None, "nowhere: the pretrained cfg names no weights"


def _timm_name(name: str, opts: ModelOptions) -> LoadedModel:
    from timm.models import get_pretrained_cfg
    arch = name.partition(".")[0]
    if not timm.is_model(arch):
        raise OptionError(f"{opts.option} timm:{name}: timm has no model {arch!r}"
                          f"{_close(arch, timm.list_models())}: see timm.list_pretrained()")
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # an unknown tag
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        tags = timm.list_pretrained(arch + ".*")
        raise OptionError(f"{opts.option} timm:{name}: timm has no pretrained weights "
                          f"{name!r}{_close(name, tags)}: name one of timm.list_pretrained("
                          f"'{arch}.*')")
    return _timm_pretrained(f"timm:{name}", name, cfg.to_dict(), opts, source="timm")


def _hub(repo: str, opts: ModelOptions) -> LoadedModel:
    repo_id, _, revision = repo.partition("@")
    if repo_id.count("/") != 1:
        raise OptionError(f"{opts.option} hf-hub:{repo}: give the Hub repository as ORG/NAME"
                          "[@REVISION]")
    config = _hub_file(repo_id, revision or None, ("config.json",))
    if config is None and _offline():
        raise OptionError(f"{opts.option} hf-hub:{repo}: not in the Hub cache and HF_HUB_OFFLINE "
                          f"is set: put config.json and model.safetensors under "
                          f"{_hub_folder(repo_id)} (huggingface-cli download {repo_id}), or unset "
                          "HF_HUB_OFFLINE")
    from timm.models._hub import load_model_config_from_hf
    try:
        cfg, arch, _ = load_model_config_from_hf(repo)
    except Exception as err:  # noqa: BLE001  (huggingface_hub raises many kinds)
        raise OptionError(f"{opts.option} hf-hub:{repo}: cannot read its config.json "
                          f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
    return _timm_pretrained(f"hf-hub:{repo}", f"hf-hub:{repo}", cfg, opts, source="hf-hub",
                            arch=arch, config=config)


def _local_dir(folder: str, opts: ModelOptions) -> LoadedModel:
    path = Path(folder)
    config = path / "config.json"
    if not config.is_file():
        raise OptionError(f"{opts.option} local-dir:{folder}: no {config}: give a timm model "
                          "folder (config.json + model.safetensors, as advvit.export writes)")
    from timm.models._hub import load_model_config_from_path
    cfg, arch, _ = load_model_config_from_path(path)
    return _timm_pretrained(f"local-dir:{folder}", f"local-dir:{folder}", cfg, opts,
                            source="local-dir", arch=arch, config=config)


def _advvit_note(config: Optional[Path]) -> Dict[str, Any]:
    """What an advvit export's config.json records beyond timm's fields."""
    if config is None:
        return {}
    import json
    return dict(json.loads(config.read_text()).get("advvit") or {})


def _timm_pretrained(reference: str, create_name: str, cfg: Mapping[str, Any],
                     opts: ModelOptions, *, source: str, arch: Optional[str] = None,
                     config: Optional[Path] = None) -> LoadedModel:
    origin, file, folder = _weights_location(cfg)
    if file is None and (_offline() or source == "local-dir"):
        raise OptionError(f"{opts.option} {reference}: its weights are absent (offline): put "
                          f"them in {folder}")
    # advvit's own architectures register on import; an export of one names them.
    import advvit.models  # noqa: F401
    try:
        model = timm.create_model(create_name, pretrained=True)
    except Exception as err:  # noqa: BLE001  (downloads and loaders raise many kinds)
        raise OptionError(f"{opts.option} {reference}: timm could not load its weights "
                          f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                          f"they belong in {folder}") from None
    if file is None:
        file = _weights_location(cfg)[1]
    pcfg = model.pretrained_cfg
    wrapped, normalize = _normalized(model, pcfg["mean"], pcfg["std"])
    chans, size = int(pcfg["input_size"][0]), int(pcfg["input_size"][-1])
    note = _advvit_note(config)
    record = {"source": source, "arch": arch or model.default_cfg.get("architecture") or
              type(model).__name__, "path": str(file) if file else None, "origin": origin,
              "sha256": sha256_file(file) if file else None, "num_classes": model.num_classes,
              "in_chans": chans, "img_size": size, "normalize": normalize,
              "normalization": f"{reference}'s pretrained cfg (mean/std)",
              "train_eps": note.get("train_eps"), "train_norm": note.get("train_norm")}
    return LoadedModel(wrapped.eval(), model.num_classes, chans, size, record, {})


# --------------------------------------------------------------------------------------------
# robustbench:[DATASET/THREAT/]NAME
# --------------------------------------------------------------------------------------------

def _import_robustbench(option: str) -> Any:
    """robustbench, imported; its package imports the reference ``autoattack`` package, of which
    PyPI holds the same code as ``pyautoattack``: where the former is absent the latter stands
    in for that import alone (the names are taken back after it, so advvit's own choice of
    AutoAttack package is unchanged)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its imports of timm's deprecated paths
            import robustbench  # noqa: F401
        return sys.modules["robustbench"]
    except ModuleNotFoundError as err:
        if err.name != "autoattack" and not str(err.name).startswith("autoattack."):
            what = ("robustbench is" if err.name in (None, "robustbench") else
                    f"robustbench's import {err.name} is")
            raise OptionError(f"{option} robustbench:...: {what} not installed: "
                              f"{ROBUSTBENCH_EXTRA}") from None
    import pyautoattack
    import pyautoattack.state
    for key in [k for k in sys.modules if k == "robustbench" or k.startswith("robustbench.")]:
        del sys.modules[key]
    sys.modules["autoattack"], sys.modules["autoattack.state"] = pyautoattack, pyautoattack.state
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import robustbench  # noqa: F401,F811
    except ModuleNotFoundError as err:
        raise OptionError(f"{option} robustbench:...: robustbench's import {err.name} is not "
                          f"installed: {ROBUSTBENCH_EXTRA}") from None
    finally:
        del sys.modules["autoattack"], sys.modules["autoattack.state"]
    return sys.modules["robustbench"]


def robustbench_zoo(option: str = "--checkpoint") -> Dict[Tuple[str, str], Sequence[str]]:
    """{(dataset, threat model): the zoo's names}, as robustbench lists them."""
    _import_robustbench(option)
    from robustbench.model_zoo import model_dicts
    return {(d.value, t.value): list(models) for d, tms in model_dicts.items()
            for t, models in tms.items()}


def _robustbench_entry(rest: str, opts: ModelOptions) -> Tuple[str, str, str]:
    parts = rest.split("/")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) != 1:
        raise OptionError(f"{opts.option} robustbench:{rest}: give robustbench:NAME or "
                          "robustbench:DATASET/THREAT/NAME (e.g. cifar10/Linf/Standard)")
    if opts.dataset is None:
        raise OptionError(f"{opts.option} robustbench:{rest}: say the zoo's data set: --dataset "
                          "cifar10|cifar100|imagefolder, or robustbench:DATASET/THREAT/NAME")
    dataset = robustbench_dataset(opts.dataset)
    if dataset is None:
        raise OptionError(f"--dataset {opts.dataset}: the RobustBench zoo holds cifar10, "
                          "cifar100 and ImageNet (imagefolder) models")
    return dataset, THREATS[opts.norm or "linf"], parts[0]


def _robustbench_file(name: str, dataset: str, threat: str, model_dir: Path
                      ) -> Tuple[str, Path, bool]:
    """(origin, the weights file load_model reads, whether timm reads it)."""
    timm_name = f"{name.lower().replace('-', '_')}_{dataset}_{threat.lower()}"
    if timm.is_model(timm_name):
        from timm.models import get_pretrained_cfg
        url = get_pretrained_cfg(timm_name).url
        return url, Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url), True
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    gdrive = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat)][name]["gdrive_id"]
    ids = gdrive if isinstance(gdrive, list) else [gdrive]
    origin = ", ".join(f"https://drive.google.com/uc?id={i}" for i in ids)
    return origin, model_dir / dataset / threat / f"{name}.pt", False


def _inner_normalization(model: nn.Module) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
    """The (mean, std) robustbench's model applies itself, where a module holds it."""
    for module in model.modules():
        mean, std = getattr(module, "mean", None), getattr(module, "std", None)
        if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor):
            return (tuple(float(v) for v in mean.flatten()), tuple(float(v) for v in std.flatten()))
    return None


def _robustbench(rest: str, opts: ModelOptions) -> LoadedModel:
    dataset, threat, name = _robustbench_entry(rest, opts)
    zoo = robustbench_zoo(opts.option)
    if not any(d == dataset for d, _ in zoo):
        raise OptionError(f"{opts.option} robustbench:{rest}: no zoo data set {dataset!r}"
                          f"{_close(dataset, sorted({d for d, _ in zoo}))}")
    if (dataset, threat) not in zoo:
        threats = sorted(t for d, t in zoo if d == dataset)
        raise OptionError(f"{opts.option} robustbench:{rest}: the zoo has no {threat} models for "
                          f"{dataset} (it has {', '.join(threats)}): --norm or DATASET/THREAT/NAME")
    names = zoo[(dataset, threat)]
    if name not in names:
        raise OptionError(f"{opts.option} robustbench:{rest}: no {dataset}/{threat} zoo entry "
                          f"{name!r}{_close(name, names)}")
    model_dir = Path(opts.robustbench_dir or "./models")
    origin, file, by_timm = _robustbench_file(name, dataset, threat, model_dir)
    if not file.is_file() and _offline():
        raise OptionError(f"{opts.option} robustbench:{dataset}/{threat}/{name}: its weights are "
                          f"absent (offline): put {file.name} in {file.parent}"
                          + ("" if by_timm else " (or point --robustbench-dir at the folder "
                             "holding DATASET/THREAT/NAME.pt)"))
    from robustbench.data import get_preprocessing
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    from robustbench.utils import load_model
    try:
        model = load_model(name, model_dir=str(model_dir), dataset=dataset, threat_model=threat)
    except Exception as err:  # noqa: BLE001  (downloads, unpickling, state dict fits)
        raise OptionError(f"{opts.option} robustbench:{dataset}/{threat}/{name}: robustbench's "
                          f"load_model failed ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); its weights belong "
                          f"at {file}") from None
    entry = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat)][name]
    preprocessing = entry.get("preprocessing")
    transform = None
    if dataset == "imagenet":
        # The resize and crop robustbench's own benchmark() applies (preprocessing None: the
        # timm model's cfg where the entry is one, e.g. bicubic for the XCiTs, else the
        # entry's): the leaderboard's numbers were measured through it.
        transform = get_preprocessing(BenchmarkDataset(dataset), ThreatModel(threat), name, None)
        crops = [t for t in getattr(transform, "transforms", []) if hasattr(t, "size")]
        size = crops[-1].size if crops else 224
        img_size = int(size if isinstance(size, int) else size[0])
    else:
        img_size = 32
    num_classes = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}[dataset]
    normalize = _inner_normalization(model)
    train_norm = {v: k for k, v in THREATS.items()}.get(threat)
    return LoadedModel(model.eval(), num_classes, 3, img_size, {
        "source": "robustbench", "arch": name, "zoo_entry": f"{dataset}/{threat}/{name}",
        "path": str(file), "origin": origin, "sha256": sha256_file(file) if file.is_file() else None,
        "num_classes": num_classes, "in_chans": 3, "img_size": img_size,
        "normalize": normalize,
        "normalization": "inside robustbench's model, as its load_model builds it" +
        ("" if normalize else " (none: the entry takes [0, 1] pixels as they are)"),
        "preprocessing": ("robustbench's get_preprocessing, applied to the examples: " +
                          ", ".join(map(repr, getattr(transform, "transforms", [transform])))
                          if transform is not None else "ToTensor"),
        "train_norm": train_norm, "train_eps": LEADERBOARD_EPS.get((dataset, threat), (None,))[0]},
        {"dataset": "imagefolder" if dataset == "imagenet" else dataset}, transform)
