"""The evaluation CLI: ``python -m advvit.eval`` (also ``advvit-eval``).

checkpoint (or timm name + weights) -> examples -> attack(s) -> report: a console table and a
JSON file with clean and robust accuracy, per-attack numbers and times, n, eps, norm, seed,
versions, the model file's sha256, and the sanity-check flags (numbers they concern are marked).
This module parses and validates the arguments, loads model and data, and hands the rest on:
the attacks run in :mod:`advvit.robustness`, the report is made and written by
:mod:`advvit.report`.

Examples::

    python -m advvit.eval --checkpoint run/best.pth --dataset cifar10 --data-dir /data \\
        --attack autoattack --eps 8/255 --n-examples 1000 --output aa.json
    python -m advvit.eval --checkpoint best.pth --dataset imagefolder --data-dir /imagenet \\
        --ids-file imagenet_test_image_ids.txt --attack apgd-ce --eps 4/255   # 5 x 100 APGD-CE
    torchrun --nproc-per-node 4 -m advvit.eval ... --attack autoattack    # one shard per rank
    python -m advvit.eval --checkpoint best.pth --eps 0.1 --corruptions fog,contrast \\
        --corruption-severities 1,3,5   # + ImageNet-C accuracy on the same examples

Everything is loaded and every argument validated before the first attack runs; a bad argument
is one error line naming it and the fix (exit status 2).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from . import checks, config
from .accel import add_threads_option, apply_threads
from .attacks import check_eps
from .autoattack_adapter import AA_ATTACKS, AutoAttackAdapter, available_backends
from .io import input_file_problem
from .report import (EVAL_FORMAT, build_report, envelope, print_corruption_table, print_table,
                     save_sweep_plot, save_tensors, sha256_file, write_report)
from .robustness import (EnsembleResult, StateMismatchError, merge_outcomes, run_attacks,
                         torch_attack_suite)

__all__ = [
    "EvalError",
    "AttackSpec",
    "parse_eps",
    "parse_attack",
    "select_indices",
    "read_ids_file",
    "LoadedModel",
    "load_checkpoint_model",
    "Examples",
    "load_examples",
    "resolve_device",
    "run_attack",
    "CORRUPTION_CACHE",
    "CorruptionSettings",
    "corruption_settings",
    "run_corruptions",
    "check_folder",
    "build_parser",
    "main",
]

TORCH_ATTACKS = ("pgd", "fgsm")
ENSEMBLES = {"autoattack": "standard", "autoattack-standard": "standard",
             "autoattack-plus": "plus", "autoattack-rand": "rand"}
ATTACK_CHOICES = (*ENSEMBLES, *AA_ATTACKS, *TORCH_ATTACKS)
CORRUPTION_CACHE = Path.home() / ".cache" / "advvit" / "corruptions"
"""The default corruption cache: beside ``advvit.data``'s ``~/.cache/advvit/data``, so every run
on the same examples (any output folder, either CLI, any model) reuses what was generated."""


class EvalError(ValueError):
    """A bad argument or input; the message names it and the fix."""


# --------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------

def parse_eps(text: str | float, *, norm: str = "linf", name: str = "--eps") -> float:
    """Read an eps given as a fraction of the pixel range ("0.0157") or in /255 ("4/255").

    Raises:
        EvalError: unparsable, negative, or (Linf) above 1, which no [0, 1] image allows.
    """
    try:
        value = config.parse_eps(text, name)
    except config.ConfigError:
        raise EvalError(f"{name} {text!r} is not a number: give e.g. 4/255 or 0.0157") from None
    try:
        return check_eps(value, norm, name=name)
    except ValueError as err:
        raise EvalError(str(err)) from None


@dataclass(frozen=True)
class AttackSpec:
    """One attack as the CLI runs it.

    Attributes:
        name: the ``--attack`` text.
        kind: "autoattack" (the AutoAttack code, via the adapter) or "pgd" / "fgsm" (advvit.attacks).
        version: AutoAttack version ("standard", "plus", "rand", "custom"); None for pgd/fgsm.
        attacks: the AutoAttack attacks run, in order (custom version), or (kind,).
        steps: iterations (APGD/FAB/PGD) or queries (Square); None for the default.
        restarts: restarts; None for the default.
        step_size: PGD/FGSM step size; None for advvit.attacks' default.
    """

    name: str
    kind: str
    version: str | None
    attacks: tuple[str, ...]
    steps: int | None = None
    restarts: int | None = None
    step_size: float | None = None


def parse_attack(text: str, *, steps: int | None = None, restarts: int | None = None,
                 step_size: float | None = None) -> AttackSpec:
    """Turn ``--attack`` and its knobs into an :class:`AttackSpec`.

    ``autoattack`` / ``autoattack-plus`` run AutoAttack as published, ``autoattack-rand`` its
    version for randomized models (APGD-CE and APGD-DLR with 20-sample EOT; knobs refused);
    a comma list of AutoAttack names (``apgd-ce,apgd-t``) runs a custom ensemble; one name alone
    runs that attack (``apgd-ce`` defaults to the thesis's 5 restarts x 100 iterations:
    ``--restarts 1`` is AutoAttack's standard setting); ``pgd`` / ``fgsm`` run advvit.attacks.

    Raises:
        EvalError: unknown names, or knobs that do not apply.
    """
    text = text.strip().lower()
    for knob, value in (("--steps", steps), ("--restarts", restarts)):
        if value is not None and value < 1:
            raise EvalError(f"{knob} must be >= 1, got {value}")
    if step_size is not None and not step_size > 0:
        raise EvalError(f"--step-size must be > 0, got {step_size}")
    if text in ENSEMBLES:
        if any(v is not None for v in (steps, restarts, step_size)):
            raise EvalError(f"--attack {text} runs AutoAttack as published: drop --steps/--restarts/"
                            "--step-size, or name the attacks (e.g. --attack apgd-ce,apgd-t)")
        return AttackSpec(text, "autoattack", ENSEMBLES[text], ())
    if text in TORCH_ATTACKS:
        if text == "fgsm" and (steps not in (None, 1) or restarts not in (None, 1)):
            raise EvalError("--attack fgsm is one step without restarts: use --attack pgd for "
                            "--steps/--restarts")
        return AttackSpec(text, text, None, (text,), steps, restarts, step_size)
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in AA_ATTACKS]
    if not names or unknown:
        raise EvalError(f"--attack {text!r} is unknown: use one of {', '.join(ATTACK_CHOICES)}, "
                        f"or a comma list of {', '.join(AA_ATTACKS)}")
    if len(set(names)) != len(names):
        raise EvalError(f"--attack {text!r} names an attack twice")
    if step_size is not None:
        raise EvalError("--step-size applies to pgd/fgsm only: the AutoAttack attacks choose "
                        "their own step sizes")
    return AttackSpec(text, "autoattack", "custom", names, steps, restarts)


def _input_file(path: str | os.PathLike, option: str, *, example: str) -> Path:
    """The file an option names, or EvalError: it does not exist, or it is a folder."""
    problem = input_file_problem(path, example)
    if problem:
        raise EvalError(f"{option} {problem}")
    return Path(path)


def read_ids_file(path: str | os.PathLike) -> list[str]:
    """Read a file of example ids: one integer index or one relative image path per line.

    Blank lines and lines starting with '#' are skipped (RobustBench's ImageNet subset files are
    plain relative paths, e.g. ``n01440764/ILSVRC2012_val_00000293.JPEG``).
    """
    p = _input_file(path, "--ids-file", example="imagenet_test_image_ids.txt")
    ids = [line.strip() for line in p.read_text().splitlines()]
    ids = [i for i in ids if i and not i.startswith("#")]
    if not ids:
        raise EvalError(f"--ids-file {p} lists no ids")
    return ids


def _dataset_paths(dataset: Any) -> list[str] | None:
    """Relative image paths of an image-folder data set in index order, or None if it has none."""
    filenames = getattr(dataset, "filenames", None)
    if filenames is None:
        return None
    try:
        return [str(Path(f).as_posix()) for f in filenames(basename=False, absolute=False)]
    except TypeError:
        return None


def select_indices(n_total: int, *, n_examples: int | None = None, sample: str = "first",
                   seed: int = 0, ids: Sequence[str] | None = None,
                   paths: Sequence[str] | None = None) -> list[int]:
    """Which examples to evaluate: the first N, a seeded random N, or those of an ids file.

    Args:
        n_total: size of the data split.
        n_examples: how many (None: all, or all ids); with ids, the first N ids.
        sample: "first" or "random" (a seeded choice, sorted, so order does not depend on it).
        seed: the seed of the random choice.
        ids: integer indices or relative image paths (from :func:`read_ids_file`).
        paths: the data set's relative image paths, for path ids.

    Raises:
        EvalError: an id that is out of range or not found, or more examples than there are.
    """
    if n_examples is not None and n_examples < 1:
        raise EvalError(f"--n-examples must be >= 1, got {n_examples}")
    if ids is not None:
        if all(i.lstrip("-").isdigit() for i in ids):
            chosen = [int(i) for i in ids]
            bad = [i for i in chosen if not 0 <= i < n_total]
            if bad:
                raise EvalError(f"--ids-file has indices outside the split's 0..{n_total - 1}: "
                                f"{bad[:5]}")
        else:
            if paths is None:
                raise EvalError("--ids-file lists image paths, but this data set has no image "
                                "files: give integer indices, or use --dataset imagefolder")
            where = {p: k for k, p in enumerate(paths)}
            chosen = []
            for i in ids:
                # The file's paths may carry a leading split folder ("val/n0144.../x.JPEG").
                parts = Path(i).as_posix().split("/")
                hit = next((where[s] for s in ("/".join(parts[j:]) for j in range(len(parts)))
                            if s in where), None)
                if hit is None:
                    raise EvalError(f"--ids-file path {i!r} is not in the data split (paths look "
                                    f"like {paths[0]!r}): check --data-dir and --split")
                chosen.append(hit)
        if n_examples is not None:
            chosen = chosen[:n_examples]
        return chosen
    n = n_total if n_examples is None else n_examples
    if n > n_total:
        raise EvalError(f"--n-examples {n} is more than the {n_total} examples of the split")
    if sample == "first":
        return list(range(n))
    if sample == "random":
        g = np.random.default_rng(seed)
        return sorted(int(i) for i in g.choice(n_total, size=n, replace=False))
    raise EvalError(f"--sample must be 'first' or 'random', got {sample!r}")


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------

def _autoattack_adapter(model: nn.Module, spec: AttackSpec, *, eps: float, norm: str,
                       seed: int, device: torch.device, num_classes: int | None,
                       backend: str) -> AutoAttackAdapter:
    kwargs: dict[str, Any] = {}
    if spec.version == "custom":
        # --steps is Square's query budget when Square runs alone, the iterations of the
        # gradient attacks otherwise (Square then keeps AutoAttack's 5000 queries).
        kwargs["n_queries" if spec.attacks == ("square",) else "n_iter"] = spec.steps
        # One APGD-CE alone without --restarts is the thesis's 5 x 100 setting (AutoAttack's own
        # default for the custom version); Square alone keeps AutoAttack's single restart.
        restarts = spec.restarts
        if restarts is None and spec.attacks == ("square",):
            restarts = 1
        kwargs["n_restarts"] = restarts
    return AutoAttackAdapter(model, eps=eps, norm=norm, version=spec.version,
                             attacks=list(spec.attacks) if spec.version == "custom" else None,
                             seed=seed, device=device, num_classes=num_classes,
                             backend=backend, **kwargs)


def run_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec, *,
               eps: float, norm: str = "linf", seed: int = 0, batch_size: int = 250,
               device: str | torch.device = "cpu", state_path: str | os.PathLike | None = None,
               keep_adv: bool = False, num_classes: int | None = None,
               backend: str = "auto") -> EnsembleResult:
    """Run one attack at one eps on (x, y), all on this process, through the one runner
    (:func:`advvit.robustness.run_attacks`).

    Args:
        model: classifier on ``device`` taking [0, 1] pixels, returning logits.
        x, y: the examples (CPU tensors).
        spec: from :func:`parse_attack`.
        eps, norm, seed, batch_size, device: as the CLI options.
        state_path: the runner's resumable state file.
        keep_adv: keep the adversarial examples.
        num_classes: the model's classes (lets AutoAttack's targeted attacks fit < 10 classes).
        backend: AutoAttack package: "auto", "pyautoattack" or "autoattack".
    """
    device = torch.device(device)
    if spec.kind == "autoattack":
        adapter = _autoattack_adapter(model, spec, eps=eps, norm=norm, seed=seed, device=device,
                                      num_classes=num_classes, backend=backend)
        return adapter.run(x, y, batch_size=batch_size, state_path=state_path,
                           keep_adv=keep_adv)
    suite = torch_attack_suite(model, spec.kind, eps=eps, norm=norm, steps=spec.steps,
                               restarts=spec.restarts, step_size=spec.step_size, seed=seed)
    return run_attacks(model, x, y, suite, batch_size=batch_size, device=device,
                       state_path=state_path, keep_adv=keep_adv)


# --------------------------------------------------------------------------------------------
# common corruptions (advvit.analysis.shifts), for this CLI and advvit.analyze
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CorruptionSettings:
    """What a corruption evaluation runs, validated.

    Attributes:
        corruptions, severities: the (corruption, severity) grid, in order.
        cache_dir: the :class:`advvit.analysis.shifts.CorruptionCache` folder.
        workers: generation processes (None: the cores available; 0: this process).
    """

    corruptions: tuple[str, ...]
    severities: tuple[int, ...]
    cache_dir: Path
    workers: int | None

    @property
    def tasks(self) -> int:
        """(corruption, severity) pairs."""
        return len(self.corruptions) * len(self.severities)


def _parse_corruption_names(text: str, option: str) -> tuple[str, ...]:
    from .analysis.shifts import CORRUPTIONS
    if text.strip().lower() == "all":
        return CORRUPTIONS
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in CORRUPTIONS]
    if not names or unknown:
        raise EvalError(f"{option} {','.join(unknown) or repr(text)} is unknown: use all or a comma "
                        f"list of {', '.join(CORRUPTIONS)}")
    if len(set(names)) != len(names):
        raise EvalError(f"{option} {text!r} names a corruption twice")
    return names


def _parse_severities(text: str, option: str) -> tuple[int, ...]:
    from .analysis.shifts import SEVERITIES
    if text.strip().lower() == "all":
        return SEVERITIES
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if not t.isdigit() or int(t) not in SEVERITIES]
    if not items or bad:
        raise EvalError(f"{option} {','.join(bad) or repr(text)}: severities are integers 1 to 5, "
                        "e.g. 1,3,5 or all")
    if len(set(int(t) for t in items)) != len(items):
        raise EvalError(f"{option} {text!r} names a severity twice")
    return tuple(int(t) for t in items)


def check_folder(target: str | os.PathLike, option: str) -> Path:
    """A folder that is there and writable, or can be created (its nearest existing parent is a
    writable folder).

    Raises:
        EvalError: the path is a file, or its nearest existing parent is not a writable folder.
    """
    out = Path(target)
    if out.exists() and not out.is_dir():
        raise EvalError(f"{option} {target} is a file: give a folder")
    existing = next(p for p in (out.resolve(), *out.resolve().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise EvalError(f"{option} {target}: {existing} is not a writable folder")
    return out


def corruption_settings(corruptions: str, severities: str | None, *, cache_dir: str | None,
                        workers: int | None, seed: int,
                        options: tuple[str, str, str, str]) -> CorruptionSettings:
    """Validate a CLI's corruption options (nothing is loaded or generated).

    Args:
        corruptions: ``all`` or a comma list of :data:`advvit.analysis.shifts.CORRUPTIONS`.
        severities: ``all`` or a comma list of 1..5 (None: all).
        cache_dir: the cache folder (None: :data:`CORRUPTION_CACHE`).
        workers: generation processes (None: the cores available; 0: this process).
        seed: the run's seed (the corruptions' seed: must be >= 0).
        options: the names of the corruption, severity, cache and worker options, for messages.

    Raises:
        EvalError: a bad value (named by its option), or the corruption library is missing.
    """
    from .analysis._corruption_compat import CorruptionLibraryMissing, library
    names_option, severity_option, cache_option, workers_option = options
    names = _parse_corruption_names(corruptions, names_option)
    levels = _parse_severities(severities or "all", severity_option)
    if workers is not None and workers < 0:
        raise EvalError(f"{workers_option} must be >= 0 (0: in this process), got {workers}")
    if seed < 0:
        raise EvalError(f"--seed must be >= 0 with {names_option} (it seeds the corruptions), "
                        f"got {seed}")
    folder = check_folder(cache_dir if cache_dir is not None else CORRUPTION_CACHE, cache_option)
    try:
        library()
    except CorruptionLibraryMissing as err:
        raise EvalError(f"{names_option}: {err}") from None
    return CorruptionSettings(names, levels, folder, workers)


def run_corruptions(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    settings: CorruptionSettings, *, seed: int, dataset: str,
                    batch_size: int) -> Any:
    """Accuracy per (corruption, severity) of ``model`` on (x, y), through the disk cache.

    The examples are corrupted as the model takes them (its channels and size), as ImageNet-C
    corrupts the 224x224 model inputs.

    Args:
        model: on its device, taking [0, 1] pixels.
        x, y: the examples (CPU, [0, 1]) and labels.
        settings: from :func:`corruption_settings`.
        seed: the corruptions' seed.
        dataset: the data set and split (``fashion_mnist/val``): part of the cache key.
        batch_size: examples per forward pass.

    Returns:
        An :class:`advvit.analysis.shifts.CorruptionAccuracy`.
    """
    from .analysis.shifts import CorruptionCache, evaluate_corruptions
    cache = CorruptionCache(settings.cache_dir, workers=settings.workers)
    return evaluate_corruptions(model, x, y, corruptions=settings.corruptions,
                                severities=settings.severities, seed=seed, cache=cache,
                                dataset=dataset, batch_size=batch_size)


# --------------------------------------------------------------------------------------------
# the CLI
# --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m advvit.eval``."""
    p = argparse.ArgumentParser(prog="advvit-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--checkpoint", help="advvit checkpoint (.pth): architecture, classes, input "
                   "size and normalization come from it")
    m.add_argument("--model", help="timm model name (with --weights) instead of a checkpoint")
    m.add_argument("--weights", help="weights file for --model (.safetensors or a torch state dict)")
    m.add_argument("--num-classes", type=int, help="--model only (default: the data set's)")
    m.add_argument("--img-size", type=int, help="--model only (default: the data set's)")
    m.add_argument("--in-chans", type=int, help="--model only (default: the data set's)")
    m.add_argument("--mean", help="--model only: normalization inside the model, e.g. 0.485,0.456,0.406")
    m.add_argument("--std", help="--model only: e.g. 0.229,0.224,0.225")
    m.add_argument("--no-ema", action="store_true", help="use the raw weights even if the "
                   "checkpoint holds EMA weights")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", help="advvit.data name: fashion_mnist, mnist, cifar10, "
                   "cifar100, imagefolder, or a timm hfds/ tfds/ wds/ name (default: the "
                   "checkpoint's training data set)")
    d.add_argument("--data-dir", help="data root (default: the checkpoint's, else the known "
                   "places)")
    d.add_argument("--split", default="val", choices=("val", "test", "train"))
    d.add_argument("--n-examples", type=int, help="how many examples (default: all)")
    d.add_argument("--sample", default="first", choices=("first", "random"))
    d.add_argument("--ids-file", help="one integer index or relative image path per line "
                   "(RobustBench's ImageNet subset format)")
    a = p.add_argument_group("attack")
    a.add_argument("--attack", default="autoattack",
                   help="autoattack | autoattack-plus | autoattack-rand (randomized models: "
                        "EOT) | apgd-ce | apgd-t | fab-t | square | "
                        "a comma list of AutoAttack attacks | pgd | fgsm")
    a.add_argument("--eps", default="4/255", help="radius: a fraction (0.0157) or x/255")
    a.add_argument("--eps-sweep", help="comma list of eps (e.g. 0,1/255,2/255,4/255): robust "
                   "accuracy over eps, with a plot (eps 0 is not attacked: its robust accuracy "
                   "is the clean accuracy)")
    a.add_argument("--norm", default="linf", choices=("linf", "l2"))
    a.add_argument("--steps", type=int, help="iterations (APGD/FAB/PGD) or queries (Square)")
    a.add_argument("--restarts", type=int, help="restarts (apgd-ce alone defaults to 5)")
    a.add_argument("--step-size", help="PGD/FGSM step size (fraction or x/255)")
    a.add_argument("--backend", default="auto", choices=("auto", "pyautoattack", "autoattack"),
                   help="AutoAttack package")
    c = p.add_argument_group("common corruptions (ImageNet-C, on the same examples)")
    c.add_argument("--corruptions", nargs="?", const="all", metavar="NAMES|all",
                   help="also the accuracy under common corruptions: all 15 (the flag alone, or "
                        "all) or a comma list (gaussian_noise,fog,...); per corruption and "
                        "severity, and their mean, in the table and the JSON")
    c.add_argument("--corruption-severities", metavar="LIST",
                   help="comma list of severities 1-5 (default: all five)")
    c.add_argument("--corruption-cache-dir", metavar="DIR",
                   help=f"where corrupted examples are kept (default: {CORRUPTION_CACHE})")
    c.add_argument("--corruption-workers", type=int, metavar="N",
                   help="processes generating corruptions (default: the cores available; 0: "
                        "this process)")
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--batch-size", type=int, default=250)
    r.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    r.add_argument("--state-path", help="AutoAttack state file: an interrupted run resumes from "
                   "it (the same model weights, examples and attack only; one run at a time)")
    r.add_argument("--output", help="JSON report path (missing folders are created)")
    r.add_argument("--save-adv", help="save adversarial examples (.pt) here")
    r.add_argument("--per-example", action="store_true",
                   help="record each example's outcome in the JSON")
    r.add_argument("--workers", type=int, default=0, help="data loader workers")
    add_threads_option(r)
    return p


def _floats(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise EvalError(f"{name} {text!r} must be comma-separated numbers") from None


def _read_weights(path: Path) -> Any:
    """What a ``--weights`` file holds (safetensors, or a torch file of plain data)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors
        try:
            return load_safetensors(str(path))
        except (SafetensorError, OSError) as err:
            raise EvalError(f"--weights {path} is not a readable safetensors file ({err})") from None
    from .checkpoint import CheckpointError, load_file
    try:
        return load_file(path, what="weights file", example="model.safetensors")
    except CheckpointError as err:
        raise EvalError(f"--weights: {err}") from None


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    from .checkpoint import CheckpointError, check_finite_weights
    state = _read_weights(path)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise EvalError(f"--weights {path} holds no state dict")
    try:
        check_finite_weights(state, where=str(path))
    except CheckpointError as err:
        raise EvalError(f"--weights: {err}") from None
    return state


def resolve_device(text: str) -> torch.device:
    """``--device``: "auto" (CUDA when visible, else the CPU), "cpu" or "cuda[:N]".

    Raises:
        EvalError: an unknown device, or CUDA asked for without a GPU.
    """
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise EvalError(f"--device {text!r} is unknown: use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {text} asked for, but no GPU is visible: use --device cpu")
    return device


@dataclass
class _Prepared:
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    indices: list[int]
    spec: AttackSpec
    eps_list: list[float]
    device: torch.device
    num_classes: int
    meta: dict[str, Any]
    corruptions: CorruptionSettings | None


def _check_writable(target: str | None, option: str) -> None:
    """The file can be written: its nearest existing folder is a writable folder (the missing
    ones are created when the file is written) and the path is not a folder itself."""
    if not target:
        return
    path = Path(target).resolve()
    if path.is_dir():
        raise EvalError(f"{option} {target} is a folder: give a file name in it")
    existing = next(p for p in path.parents if p.exists())
    if not existing.is_dir():
        raise EvalError(f"{option} {target}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise EvalError(f"{option} {target}: {existing} is not writable")


def _parse_eps_list(args: argparse.Namespace) -> list[float]:
    if not args.eps_sweep:
        return [parse_eps(args.eps, norm=args.norm)]
    eps_list = [parse_eps(e, norm=args.norm, name="--eps-sweep")
                for e in args.eps_sweep.split(",") if e.strip()]
    if len(eps_list) < 2 or len(set(eps_list)) != len(eps_list):
        raise EvalError("--eps-sweep needs two or more different eps, e.g. 0,2/255,4/255")
    return eps_list


def _check_eps_fits(eps_list: Sequence[float], args: argparse.Namespace,
                    input_shape: Sequence[int]) -> None:
    """The L2 bound depends on the input size, known once the data is loaded."""
    name = "--eps-sweep" if args.eps_sweep else "--eps"
    for eps in eps_list:
        try:
            check_eps(eps, args.norm, input_shape=tuple(input_shape), name=name)
        except ValueError as err:
            raise EvalError(str(err)) from None


def _corruption_args(args: argparse.Namespace) -> CorruptionSettings | None:
    """``--corruptions`` and its options, validated (None without ``--corruptions``)."""
    if args.corruptions is None:
        given = [o for o, v in (("--corruption-severities", args.corruption_severities),
                                ("--corruption-cache-dir", args.corruption_cache_dir),
                                ("--corruption-workers", args.corruption_workers))
                 if v is not None]
        if given:
            raise EvalError(f"{', '.join(given)} go with --corruptions: add --corruptions "
                            "(all, or a comma list) or drop them")
        return None
    return corruption_settings(args.corruptions, args.corruption_severities,
                               cache_dir=args.corruption_cache_dir,
                               workers=args.corruption_workers, seed=args.seed,
                               options=("--corruptions", "--corruption-severities",
                                        "--corruption-cache-dir", "--corruption-workers"))


def _check_args(args: argparse.Namespace) -> tuple[AttackSpec, list[float], torch.device,
                                                   list[str] | None, CorruptionSettings | None]:
    """The arguments that need nothing loaded -> (attack, eps list, device, ids, corruptions)."""
    if bool(args.checkpoint) == bool(args.model):
        raise EvalError("give either --checkpoint FILE or --model NAME --weights FILE")
    if args.model and not args.weights:
        raise EvalError(f"--model {args.model} needs --weights FILE (no weights are downloaded)")
    if args.checkpoint and any(getattr(args, k) is not None for k in
                               ("weights", "num_classes", "img_size", "in_chans", "mean", "std")):
        raise EvalError("--weights/--num-classes/--img-size/--in-chans/--mean/--std go with "
                        "--model: a checkpoint records them itself")
    if args.batch_size < 1:
        raise EvalError(f"--batch-size must be >= 1, got {args.batch_size}")
    step_size = parse_eps(args.step_size, norm=args.norm, name="--step-size") \
        if args.step_size is not None else None
    spec = parse_attack(args.attack, steps=args.steps, restarts=args.restarts,
                        step_size=step_size)
    eps_list = _parse_eps_list(args)
    if args.state_path and spec.kind != "autoattack":
        raise EvalError(f"--state-path resumes AutoAttack runs; --attack {spec.name} is short "
                        "enough to rerun: drop --state-path")
    if spec.kind == "autoattack" and not available_backends():
        raise EvalError("no AutoAttack package installed: pip install pyautoattack")
    device = resolve_device(args.device)
    ids = read_ids_file(args.ids_file) if args.ids_file else None
    if ids is not None and args.sample != "first":
        raise EvalError("--sample random picks examples itself: drop it or --ids-file")
    for option, target in (("--output", args.output), ("--save-adv", args.save_adv),
                           ("--state-path", args.state_path)):
        _check_writable(target, option)
    return spec, eps_list, device, ids, _corruption_args(args)


@dataclass(frozen=True)
class LoadedModel:
    """A model loaded for evaluation or analysis.

    Attributes:
        model: eval mode, on the CPU, taking [0, 1] pixels.
        num_classes, in_chans, img_size: what it takes and returns (img_size None: any).
        record: what the reports say about it (source, path, sha256, arch, ...).
        trained_on: the training config the checkpoint records ({} when none).
    """

    model: nn.Module
    num_classes: int
    in_chans: int
    img_size: int | None
    record: dict[str, Any]
    trained_on: dict[str, Any]


def load_checkpoint_model(path: str | os.PathLike, *, use_ema: bool = True,
                          option: str = "--checkpoint") -> LoadedModel:
    """Load an advvit checkpoint's model (both CLIs call this).

    Args:
        path: the checkpoint file.
        use_ema: take the EMA weights when the checkpoint has them.
        option: the CLI option that named the file, for messages.

    Raises:
        EvalError: the file is missing or does not load (the message says why).
    """
    from .checkpoint import CheckpointError, create_model_from_checkpoint, load_checkpoint
    path = _input_file(path, option, example="best.pth")
    try:
        ckpt = load_checkpoint(path)
        model, mspec = create_model_from_checkpoint(ckpt, use_ema=use_ema)
    except CheckpointError as err:
        raise EvalError(f"{option}: {err}") from None
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


def _load_model(args: argparse.Namespace) -> tuple[nn.Module, int, int, int | None,
                                                   dict[str, Any]]:
    """The model (eval mode, on the CPU) -> (model, classes, in_chans, img_size, its record).

    A checkpoint that records its training data sets ``args.dataset`` / ``args.data_dir``
    when they were not given.
    """
    from . import data as advdata
    if args.checkpoint:
        loaded = load_checkpoint_model(args.checkpoint, use_ema=not args.no_ema)
        if args.dataset is None:
            args.dataset = loaded.trained_on.get("dataset")
            args.data_dir = args.data_dir or loaded.trained_on.get("data_dir")
        if args.dataset is None:
            raise EvalError("--dataset: the checkpoint does not record its data set; name one")
        return (loaded.model, loaded.num_classes, loaded.in_chans, loaded.img_size,
                loaded.record)
    from .models import create_model, unwrap
    path = _input_file(args.weights, "--weights", example="model.safetensors")
    if args.dataset is None:
        raise EvalError("--dataset is needed with --model/--weights")
    info = advdata.dataset_info(args.dataset, args.data_dir)
    num_classes = args.num_classes or info.num_classes
    in_chans = args.in_chans or info.in_chans
    img_size = args.img_size or info.img_size
    mean, std = _floats(args.mean, "--mean"), _floats(args.std, "--std")
    if (mean is None) != (std is None):
        raise EvalError("--mean and --std go together")
    normalize = (mean, std) if mean is not None else None
    try:
        model = create_model(args.model, num_classes=num_classes, in_chans=in_chans,
                             img_size=img_size, normalize=normalize)
        missing, unexpected = unwrap(model).load_state_dict(_load_weights(path), strict=False)
    except (RuntimeError, ValueError) as err:
        raise EvalError(f"--weights {path} do not fit --model {args.model}: "
                        f"{str(err).splitlines()[0]}") from None
    if missing or unexpected:
        raise EvalError(f"--weights {path} do not fit --model {args.model}: missing "
                        f"{missing[:5]}, unexpected {unexpected[:5]}")
    record = {"source": "timm", "arch": args.model, "path": str(path),
              "sha256": sha256_file(path), "num_classes": num_classes,
              "in_chans": in_chans, "img_size": img_size, "normalize": normalize}
    return model.eval(), num_classes, in_chans, img_size, record


@dataclass(frozen=True)
class Examples:
    """Examples of a data split as [0, 1] tensors.

    Attributes:
        x: (n, C, H, W) float pixels; y: (n,) labels.
        indices: each example's index in the split.
        classes: the data set's class names in label order, or None where it has none.
    """

    x: torch.Tensor
    y: torch.Tensor
    indices: list[int]
    classes: tuple[str, ...] | None


def load_examples(dataset: str, data_dir: str | None, *, split: str, in_chans: int,
                  img_size: int | None, n_examples: int | None = None, sample: str = "first",
                  seed: int = 0, ids: Sequence[str] | None = None, batch_size: int = 250,
                  workers: int = 0, at_most: bool = False) -> Examples:
    """Load the chosen examples of a data split (both CLIs call this).

    Args:
        dataset, data_dir, split: the ``advvit.data`` name, root and split.
        in_chans, img_size: what the model takes (img_size None: the data set's own size).
        n_examples, sample, seed, ids: which examples (:func:`select_indices`).
        batch_size, workers: the loader's.
        at_most: take all examples of a split smaller than ``n_examples`` (for a default
            count the user did not ask for) instead of refusing.

    Raises:
        EvalError: the data set is not there, or the examples asked for are not in it.
    """
    from . import data as advdata
    try:
        ds = advdata.create_dataset(dataset, data_dir, split=split)
    except (advdata.DataNotFoundError, ValueError) as err:
        raise EvalError(f"--dataset {dataset}: {err}") from None
    if at_most and n_examples is not None:
        n_examples = min(n_examples, len(ds))
    indices = select_indices(len(ds), n_examples=n_examples, sample=sample, seed=seed, ids=ids,
                             paths=_dataset_paths(ds) if ids is not None else None)
    subset = ds.subset(np.asarray(indices)) if isinstance(ds, advdata.ArrayDataset) else \
        advdata.SubsetDataset(ds, indices)
    loader = advdata.create_loader(subset, img_size=img_size or _native(ds), in_chans=in_chans,
                                   batch_size=batch_size, is_training=False,
                                   num_workers=workers)
    xs, ys = zip(*[(xb.cpu(), yb.cpu()) for xb, yb in loader])
    x, y = torch.cat(xs), torch.cat(ys).long()
    if len(y) != len(indices):
        raise EvalError(f"the loader gave {len(y)} examples for {len(indices)} ids")
    classes = getattr(ds, "classes", None)
    return Examples(x, y, indices, tuple(str(c) for c in classes) if classes else None)


def _load_examples(args: argparse.Namespace, ids: list[str] | None, in_chans: int,
                   img_size: int | None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The chosen examples as [0, 1] tensors -> (x, y, their indices in the split)."""
    ex = load_examples(args.dataset, args.data_dir, split=args.split, in_chans=in_chans,
                       img_size=img_size, n_examples=args.n_examples, sample=args.sample,
                       seed=args.seed, ids=ids, batch_size=args.batch_size, workers=args.workers)
    return ex.x, ex.y, ex.indices


def _prepare(args: argparse.Namespace) -> _Prepared:
    """Validate every argument and load the model and examples, before any attack runs."""
    spec, eps_list, device, ids, corruptions = _check_args(args)
    model, num_classes, in_chans, img_size, model_record = _load_model(args)
    model = model.to(device)
    x, y, indices = _load_examples(args, ids, in_chans, img_size)
    _check_eps_fits(eps_list, args, x.shape[1:])
    if int(y.max()) >= num_classes:
        raise EvalError(f"--dataset {args.dataset} has labels up to {int(y.max())} but the model "
                        f"has {num_classes} classes: evaluate on the data set it was trained for")
    with torch.no_grad():
        out = model(x[:1].to(device))
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise EvalError(f"the model returns shape {tuple(out.shape)}, not (batch, {num_classes}) "
                        "logits")
    meta = {"model": model_record,
            "data": {"dataset": args.dataset, "data_dir": args.data_dir, "split": args.split,
                     "sample": "ids-file" if ids is not None else args.sample,
                     "ids_file": args.ids_file, "n_examples": len(indices),
                     "input_shape": list(x.shape[1:])}}
    return _Prepared(model, x, y, indices, spec, eps_list, device, num_classes, meta,
                     corruptions)


def _native(ds: Any) -> int:
    size = getattr(ds, "image_size", None)
    return int(size[0]) if size else 224


def _dist_info() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, world


def _state_path(args: argparse.Namespace, eps: float, n_eps: int, rank: int,
                world: int) -> str | None:
    if not args.state_path:
        return None
    state = args.state_path
    if n_eps > 1:
        state += f".eps{eps:.6g}"
    if world > 1:
        state += f".rank{rank}of{world}"
    return state


def _gather(outcomes: dict[float, EnsembleResult], model_flags: list[checks.Flag], world: int
            ) -> tuple[dict[float, EnsembleResult], list[checks.Flag]]:
    """Every rank's shard results and flags, merged (on every rank)."""
    import torch.distributed as dist
    merged: dict[float, EnsembleResult] = {}
    for eps, out in outcomes.items():
        out.x_adv = None  # adversarial examples stay in each rank's own file
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, out)
        merged[eps] = merge_outcomes(gathered)
    flags_gathered: list[Any] = [None] * world
    dist.all_gather_object(flags_gathered, model_flags)
    return merged, list(dict.fromkeys(f for fl in flags_gathered for f in fl))


def _corruption_entry(prep: _Prepared, args: argparse.Namespace) -> dict[str, Any]:
    """The corruption results of the report (rank 0 alone, on every example: the corrupted
    sets come from one cache)."""
    started = time.perf_counter()
    result = run_corruptions(prep.model, prep.x, prep.y, prep.corruptions, seed=args.seed,
                             dataset=f"{args.dataset}/{args.split}", batch_size=args.batch_size)
    return {**result.to_dict(), "cache_dir": str(prep.corruptions.cache_dir),
            "workers": prep.corruptions.workers,
            "seconds": round(time.perf_counter() - started, 3)}


def _write_outputs(report: dict[str, Any], args: argparse.Namespace, n_eps: int) -> None:
    out_path = Path(args.output)
    if n_eps > 1:
        png = save_sweep_plot(report, out_path.with_suffix(".png"))
        report["plot"] = str(png) if png else None
        if png is None:
            print("note: matplotlib is not installed, no eps-sweep plot", file=sys.stderr)
    write_report(report, out_path)
    print(f"report: {out_path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluation CLI; returns the exit status (2 for a bad argument)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    try:
        prep = _prepare(args)
    except EvalError as err:
        parser.error(str(err))  # exits 2 with the usage line and the message
    rank, world = _dist_info()
    rt = None
    if world > 1:
        from . import accel
        rt = accel.setup("cuda" if prep.device.type == "cuda" else "cpu")
        rank, world = rt.rank, rt.world_size
        if rt.device.type == "cuda":
            prep.model.to(rt.device)
            prep.device = rt.device
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # Each rank takes every world-th example: shards stay balanced whatever the order.
    positions = list(range(rank, len(prep.y), world))
    xs, ys = prep.x[positions], prep.y[positions]
    model_flags = checks.run_model_checks(prep.model, xs[:args.batch_size].to(prep.device),
                                          ys[:args.batch_size].to(prep.device))
    for f in model_flags:
        print(f"WARNING {f}", file=sys.stderr)
    started = time.perf_counter()
    outcomes: dict[float, EnsembleResult] = {}
    for eps in prep.eps_list:
        try:
            out = run_attack(prep.model, xs, ys, prep.spec, eps=eps, norm=args.norm,
                             seed=args.seed, batch_size=args.batch_size, device=prep.device,
                             state_path=_state_path(args, eps, len(prep.eps_list), rank, world),
                             keep_adv=bool(args.save_adv) and eps == prep.eps_list[0],
                             num_classes=prep.num_classes, backend=args.backend)
        except StateMismatchError as err:  # raised before this eps is attacked
            if not outcomes:
                parser.error(f"--state-path: {err}")
            done = ", ".join(f"{e:.6g}" for e in outcomes)
            print(f"error: --state-path: {err}. The evaluations at eps {done} are complete in "
                  "their state files: a rerun resumes them", file=sys.stderr)
            return 1
        out.positions = positions
        outcomes[eps] = out
    if args.save_adv:
        first = outcomes[prep.eps_list[0]]
        save_tensors({"x_adv": first.x_adv, "y": ys, "robust": first.robust,
                      "indices": [prep.indices[k] for k in positions],
                      "eps": prep.eps_list[0], "norm": args.norm},
                     args.save_adv if world == 1 else f"{args.save_adv}.rank{rank}of{world}")
    if world > 1:
        outcomes, model_flags = _gather(outcomes, model_flags, world)
        from . import accel
        accel.cleanup(rt)
    if rank != 0:
        return 0
    corruptions = _corruption_entry(prep, args) if prep.corruptions is not None else None
    first = next(iter(outcomes.values()))
    command = ["python", "-m", "advvit.eval", *(argv if argv is not None else sys.argv[1:])]
    meta = envelope(EVAL_FORMAT, seed=args.seed, model=prep.meta["model"], command=command,
                    autoattack=f"{first.backend} {first.backend_version}".strip())
    meta.update({"data": prep.meta["data"], "device": str(prep.device), "world_size": world,
                 "seconds_total": round(time.perf_counter() - started, 3)})
    report = build_report(outcomes, spec=prep.spec, norm=args.norm, seed=args.seed,
                          model_flags=model_flags, meta=meta, indices=prep.indices,
                          labels=prep.y, per_example=args.per_example)
    if corruptions is not None:
        report["corruptions"] = corruptions
    print_table(report)
    print_corruption_table(report)
    if args.output:
        _write_outputs(report, args, len(outcomes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
