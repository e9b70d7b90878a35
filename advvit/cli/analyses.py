"""The analyses of ``advvit.analyze``, one registered sub-command each.

Each analysis gets a :class:`Context` (its models, examples, eps and options, all loaded and
validated), calls one library analysis of :mod:`advvit.analysis`, and returns an
:class:`Output`: the result types' numbers (their ``to_dict()``), figures drawn by
:mod:`advvit.plots`, tables and lines for report.md. A new analysis is one registration::

    @register("name", "one line for --help", options=_my_options)
    def _name(ctx: Context) -> Output:
        ...  # call the library, return numbers, figures and tables
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from .. import plots
from ..analysis._common import ANALYSIS_NORMS
from ..analysis.shifts import CorruptionSettings
from ..attack_names import ANALYZE_RESTARTS, TRANSFER_ATTACKS
from ..io import OptionError
from ..plots import CLASS_VIZ_ROWS, nearest_zero, pct, signed
from .options import (OptionsView, add_attack_options, add_corruption_options, add_data_options,
                      add_model_file_options, add_run_options, add_workers_option)

__all__ = ["NamedModel", "Progress", "AnalyzeRequest", "Context", "Output", "Analysis", "ANALYSES", "register",
           "FIGURE_DPI", "ANALYZE_BATCH_SIZE", "analyze_parser", "analyze_parsers"]

FIGURE_DPI = 120
ANALYZE_BATCH_SIZE = 64
"""``--batch-size``'s default (``advvit.eval``'s is AutoAttack's 250)."""


# --------------------------------------------------------------------------------------------
# what an analysis gets and gives
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NamedModel:
    """A loaded model and what the report says about it.

    Attributes:
        name: a short name for columns and tables (the checkpoint's file stem, or more of its
            path where stems repeat).
        model: on the run's device, eval mode, taking [0, 1] pixels.
        record: the report's record (path, sha256, arch, ...).
        num_classes: the model's classes.
    """

    name: str
    model: nn.Module
    record: dict[str, Any]
    num_classes: int


class Progress:
    """A stderr line with images/s, at most every ``interval`` seconds and at the end.

    Args:
        label: what runs (``perturbations best``).
        total: images the work will take.
    """

    def __init__(self, label: str, total: int, *, interval: float = 2.0,
                 file: Any = None) -> None:
        self.label, self.total, self.interval = label, total, interval
        self.file = file or sys.stderr
        self.done = 0
        self.started = self.last = time.perf_counter()

    def __call__(self, n: int) -> None:
        """Count ``n`` more images done."""
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.interval or self.done >= self.total:
            self.last = now
            self._line(now)

    def finish(self) -> None:
        """The closing line (for work that reports no batches)."""
        self.done = max(self.done, self.total)
        self._line(time.perf_counter())

    def _line(self, now: float) -> None:
        seconds = max(now - self.started, 1e-9)
        print(f"{self.label}: {min(self.done, self.total)}/{self.total} images, "
              f"{seconds:.1f} s, {self.done / seconds:.1f} images/s", file=self.file, flush=True)


@dataclass(frozen=True)
class AnalyzeRequest(OptionsView):
    """What ``advvit.analyze`` was asked to do: the parsed command line, built once and never
    changed. The options every analysis takes are fields; an analysis's own options (``--show``,
    ``--baseline``, ...) are in ``options`` and read as attributes too."""

    analysis: str
    checkpoint: tuple[str, ...]
    no_ema: bool
    dataset: Optional[str]
    data_dir: Optional[str]
    split: str
    n_examples: Optional[int]
    eps: Optional[str]
    norm: Optional[str]
    steps: Optional[int]
    seed: int
    batch_size: int
    device: str
    workers: int
    output: str
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "AnalyzeRequest":
        """The request of parsed arguments (the fields' names are the options' dests)."""
        given = dict(vars(args))
        common = {f: given.pop(f) for f in cls.__dataclass_fields__ if f != "options"}
        common["checkpoint"] = tuple(common["checkpoint"])
        return cls(**common, options=MappingProxyType(given))


@dataclass(frozen=True)
class Context:
    """Everything an analysis runs on (all loaded and validated).

    Attributes:
        args: the request (the parsed arguments, analysis options included).
        dataset, data_dir: the data set the examples come from (the request's, else the first
            checkpoint's).
        models: the ``--checkpoint`` models, in order.
        x, y: the examples (CPU, [0, 1] pixels) and labels; indices: their places in the split.
        class_names: the data set's class names (label order), or the labels as text.
        eps, norm: the radius and norm (None where the analysis takes none); eps_source says
            where eps came from.
        steps: ``--steps`` or None for the analysis's default.
        device: where the models are.
        out: the output folder; plt: matplotlib.pyplot, or None without matplotlib.
        judges: the ``--judge`` models (semantic), else empty.
        baseline: the ``--baseline`` model (corruptions' mCE), else None.
    """

    args: AnalyzeRequest
    dataset: str
    data_dir: Optional[str]
    models: list[NamedModel]
    x: torch.Tensor
    y: torch.Tensor
    indices: list[int]
    class_names: tuple[str, ...]
    eps: Optional[float]
    norm: Optional[str]
    eps_source: str
    steps: Optional[int]
    device: torch.device
    out: Path
    plt: Any
    judges: list[NamedModel] = field(default_factory=list)
    baseline: Optional[NamedModel] = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One example's (C, H, W)."""
        return tuple(self.x.shape[1:])

    def progress(self, label: str, total: int) -> Progress:
        """A progress line for ``total`` images of work."""
        return Progress(f"{self.args.analysis}: {label}", total)


@dataclass
class Output:
    """What an analysis returns for the CLI to write.

    Attributes:
        settings: the analysis's inputs besides the common ones (steps, attack, ...).
        results: its numbers (tensors are fine: they are made JSON-safe).
        figures: the figures it saved (:meth:`save`): file name in the output folder, caption,
            width and height in pixels.
        tables: (caption, header, rows) for report.md.
        lines: a few sentences for report.md.
    """

    settings: dict[str, Any]
    results: dict[str, Any]
    figures: list[dict[str, Any]] = field(default_factory=list)
    tables: list[tuple[str, Sequence[str], Sequence[Sequence[Any]]]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def save(self, fig: Any, folder: Path, name: str, caption: str) -> None:
        """Write a matplotlib figure as ``folder/name`` (PNG) and record it."""
        # Agg truncates the figure's size in pixels to whole pixels.
        width, height = (int(v * FIGURE_DPI) for v in fig.get_size_inches())
        plots.save_figure(fig, folder / name, dpi=FIGURE_DPI)
        self.figures.append({"file": name, "caption": caption, "width": width, "height": height})


OptionsFn = Callable[[argparse.ArgumentParser], None]
RunFn = Callable[[Context], Output]


@dataclass(frozen=True)
class Analysis:
    """One sub-command.

    Attributes:
        name: the sub-command (and the JSON's file name).
        help: one line for ``--help``.
        run: the analysis on a :class:`Context`.
        options: adds the analysis's own options to its parser.
        eps: how ``--eps`` / ``--norm`` apply: "attack" (an attack's radius, any norm;
            default the checkpoint's training eps, else 4/255), "class-viz" (an L2 radius,
            default the thesis's 15 scaled to the input), or None (they do not apply).
        min_examples: the fewest examples it works on (None: it takes no examples).
        default_examples: ``--n-examples`` when not given.
        needs_blocks: it looks inside the model (``advvit.analysis.blocks`` must know it).
        check: validates the analysis's own options once everything is loaded, before any
            work (raises :class:`OptionError`; what it returns is ignored, so a settings
            parser serves as its check).
    """

    name: str
    help: str
    run: RunFn
    options: Optional[OptionsFn] = None
    eps: Optional[str] = "attack"
    min_examples: Optional[int] = 1
    default_examples: int = 64
    needs_blocks: bool = False
    check: Optional[Callable[[Context], Any]] = None


ANALYSES: dict[str, Analysis] = {}
"""The sub-commands, in ``--help`` order."""


def register(name: str, help: str, *, options: Optional[OptionsFn] = None,
             eps: Optional[str] = "attack", min_examples: Optional[int] = 1,
             default_examples: int = 64, needs_blocks: bool = False,
             check: Optional[Callable[[Context], Any]] = None) -> Callable[[RunFn], RunFn]:
    """Register ``fn(ctx) -> Output`` as the sub-command ``name`` (see :class:`Analysis`)."""
    if eps not in ("attack", "class-viz", None):
        raise ValueError(f"eps must be 'attack', 'class-viz' or None, got {eps!r}")

    def decorate(fn: RunFn) -> RunFn:
        if name in ANALYSES:
            raise ValueError(f"analysis {name!r} is registered twice")
        ANALYSES[name] = Analysis(name, help, fn, options, eps, min_examples, default_examples,
                                  needs_blocks, check)
        return fn
    return decorate


# --------------------------------------------------------------------------------------------
# small shared pieces of the analyses
# --------------------------------------------------------------------------------------------

def _steps(ctx: Context, default: int) -> int:
    return ctx.steps if ctx.steps is not None else default


# --------------------------------------------------------------------------------------------
# perturbation images, class visualization, semantic score, transfer (advvit.analysis)
# --------------------------------------------------------------------------------------------

def _show_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--show", type=int, default=8, help="examples drawn in the figure")


def _perturbation_options(p: argparse.ArgumentParser) -> None:
    _show_option(p)
    p.add_argument("--random-init", action="store_true",
                   help="start PGD from a random point of the ball (default: the clean image, "
                        "so the picture is the gradient path alone)")


@register("perturbations", "PGD-k perturbations of test images seen as images (thesis figs. 1, 11, 13)",
          options=_perturbation_options, default_examples=8)
def _perturbations(ctx: Context) -> Output:
    from ..analysis.perturbations import perturbation_images
    steps = _steps(ctx, 100)
    results = {}
    for m in ctx.models:
        progress = ctx.progress(m.name, len(ctx.y))
        results[m.name] = perturbation_images(
            m.model, ctx.x, ctx.y, eps=ctx.eps, norm=ctx.norm, steps=steps,
            random_init=ctx.args.random_init, seed=ctx.args.seed,
            batch_size=ctx.args.batch_size, on_batch=progress)
    out = Output(settings={"steps": steps, "random_init": ctx.args.random_init,
                           "step_size": next(iter(results.values())).step_size},
                 results={name: p.to_dict() for name, p in results.items()})
    out.tables.append(("Accuracy on the images shown and attacked",
                       ["model", "clean (%)", f"PGD-{steps} (%)", "mean |delta| (x/255)"],
                       [[name, pct(p.clean_accuracy), pct(p.adversarial_accuracy),
                         round(float(p.delta.abs().mean()) * 255, 3)]
                        for name, p in results.items()]))
    if ctx.plt is not None:
        out.save(plots.perturbation_figure(ctx.x, ctx.y, ctx.class_names, results, ctx.args.show,
                                           ctx.eps, ctx.norm), ctx.out, "perturbations.png",
                 "clean | perturbation (colour, grey) | adversarial, one block of columns per model")
    return out


def _class_list(text: Optional[str], names: Sequence[str], num_classes: int) -> list[int]:
    if text is None:
        return list(range(num_classes))
    chosen = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item.isdigit() and int(item) < num_classes:
            chosen.append(int(item))
        elif item in names:
            chosen.append(list(names).index(item))
        else:
            raise OptionError(f"--classes {item!r} is neither a class index below {num_classes} "
                               f"nor a class name ({', '.join(names[:10])}...)")
    if not chosen:
        raise OptionError("--classes names no class")
    return chosen


def _class_viz_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classes", help="comma list of class indices or names (default: every class)")
    p.add_argument("--per-class", type=int, default=1, help="images per class")


def _check_class_viz(ctx: Context) -> None:
    if ctx.args.per_class < 1:
        raise OptionError(f"--per-class must be >= 1, got {ctx.args.per_class}")
    _class_list(ctx.args.classes, ctx.class_names, ctx.models[0].num_classes)


@register("class-viz", "draw each class from noise with a targeted L2 PGD (thesis figs. 12, 14)",
          options=_class_viz_options, eps="class-viz", min_examples=None, check=_check_class_viz)
def _class_viz(ctx: Context) -> Output:
    from ..analysis.perturbations import class_visualization
    classes = _class_list(ctx.args.classes, ctx.class_names, ctx.models[0].num_classes)
    steps = _steps(ctx, 100)
    results = {}
    for m in ctx.models:
        progress = ctx.progress(m.name, len(classes) * ctx.args.per_class)
        results[m.name] = class_visualization(
            m.model, ctx.input_shape, classes, per_class=ctx.args.per_class, eps=ctx.eps,
            steps=steps, seed=ctx.args.seed, batch_size=ctx.args.batch_size, on_batch=progress)
    out = Output(settings={"steps": steps, "classes": classes, "per_class": ctx.args.per_class},
                 results={name: cv.to_dict() for name, cv in results.items()})
    out.tables.append(("Target class reached from noise",
                       ["model", "reached (%)", "mean p(target) (%)"],
                       [[name, pct(cv.success.double().mean()),
                         pct(cv.confidence.double().mean())] for name, cv in results.items()]))
    if ctx.plt is not None:
        m = len(next(iter(results.values())).targets)
        shown = f" (the first {CLASS_VIZ_ROWS} of {m} images)" if m > CLASS_VIZ_ROWS else ""
        out.save(plots.class_viz_figure(ctx.class_names, results), ctx.out, "class_viz.png",
                 f"one row per target class{shown}, one block of columns per model")
    return out


def _semantic_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--judge", action="append", default=None, metavar="CKPT",
                   help="a judge checkpoint (repeat for several; default: the --checkpoint "
                        "models judge each other's perturbations)")
    p.add_argument("--top-k", type=int, default=5, help="top-k accuracy besides top-1")
    p.add_argument("--random-init", action="store_true",
                   help="start PGD from a random point of the ball")


def _check_semantic(ctx: Context) -> None:
    if ctx.args.top_k < 1:
        raise OptionError(f"--top-k must be >= 1, got {ctx.args.top_k}")


@register("semantic", "how often judge models see the true class in perturbation images (thesis table 9)",
          options=_semantic_options, default_examples=256, check=_check_semantic)
def _semantic(ctx: Context) -> Output:
    from ..analysis.perturbations import perturbation_images, semantic_score
    steps = _steps(ctx, 100)
    sources = {}
    for m in ctx.models:
        sources[m.name] = perturbation_images(
            m.model, ctx.x, ctx.y, eps=ctx.eps, norm=ctx.norm, steps=steps,
            random_init=ctx.args.random_init, seed=ctx.args.seed,
            batch_size=ctx.args.batch_size, on_batch=ctx.progress(f"PGD on {m.name}", len(ctx.y)))
    judges = ctx.judges or ctx.models
    progress = ctx.progress("judging", len(ctx.y) * len(sources) * len(judges) * 5)
    score = semantic_score(sources, {j.name: j.model for j in judges}, k=ctx.args.top_k,
                           seed=ctx.args.seed, batch_size=ctx.args.batch_size, on_batch=progress)
    out = Output(settings={"steps": steps, "judges": list(score.judges), "k": score.k,
                           "random_init": ctx.args.random_init},
                 results={**score.to_dict(),
                          "adversarial_accuracy": {n: p.adversarial_accuracy
                                                   for n, p in sources.items()}})
    k = score.k
    header = ["source", "judge"] + [f"{kind} top-1 / top-{k} (%)" for kind in score.kinds]
    rows = [[s, j] + [f"{pct(score.top1[si, ji, kk])} / {pct(score.topk[si, ji, kk])}"
                      for kk in range(len(score.kinds))]
            for si, s in enumerate(score.sources) for ji, j in enumerate(score.judges)]
    out.tables.append((f"Judges' accuracy on each image set (chance: {pct(score.chance_top1)} / "
                       f"{pct(score.chance_topk)})", header, rows))
    out.lines.append("A semantic perturbation scores well above its random-sign control; the "
                     "control is above chance only where saturated pixels let the [0, 1] box "
                     "outline the object.")
    if ctx.plt is not None:
        out.save(plots.semantic_figure(score), ctx.out, "semantic.png",
                 "top-1 accuracy of each judge on each source's perturbation images, negatives "
                 "and controls")
    return out


def _transfer_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attack", default="pgd", choices=TRANSFER_ATTACKS,
                   help="how the adversarial examples are crafted (the runner of advvit.eval)")
    p.add_argument("--restarts", type=int, default=ANALYZE_RESTARTS,
                   help="restarts per example (pgd, apgd-ce)")


def _check_transfer(ctx: Context) -> None:
    if ctx.args.restarts < 1:
        raise OptionError(f"--restarts must be >= 1, got {ctx.args.restarts}")
    if ctx.args.attack == "fgsm" and ctx.steps not in (None, 1):
        raise OptionError("--attack fgsm is one step: drop --steps or use --attack pgd")


@register("transfer", "adversarial examples of each model classified by every model (transfer matrix)",
          options=_transfer_options, default_examples=256, check=_check_transfer)
def _transfer(ctx: Context) -> Output:
    from ..analysis.perturbations import transfer_matrix
    models = {m.name: m.model for m in ctx.models}
    progress = ctx.progress("crafting", len(ctx.y) * len(models))
    tm = transfer_matrix(models, ctx.x, ctx.y, attack=ctx.args.attack, eps=ctx.eps, norm=ctx.norm,
                         steps=ctx.steps, restarts=ctx.args.restarts, seed=ctx.args.seed,
                         batch_size=ctx.args.batch_size, on_batch=progress)
    out = Output(settings={"attack": tm.attack, "steps": tm.steps, "restarts": tm.restarts},
                 results=tm.to_dict())
    rows = [[s, t, pct(tm.accuracy[i, j]), pct(tm.transfer_accuracy[i, j]),
             "yes" if tm.white_box[i, j] else ""]
            for i, s in enumerate(tm.sources) for j, t in enumerate(tm.targets)]
    out.tables.append(("Target accuracy on each source's adversarial examples",
                       ["source", "target", "accuracy (%)", "on examples that fooled the source (%)",
                        "white box"], rows))
    if ctx.plt is not None:
        out.save(plots.transfer_figure(tm), ctx.out, "transfer.png",
                 "transfer matrix: rows are attacked, columns classify")
    return out


# --------------------------------------------------------------------------------------------
# inside the model (advvit.analysis.internals)
# --------------------------------------------------------------------------------------------

def _timed(ctx: Context, label: str, work: Callable[[], Any], *,
           total: Optional[int] = None) -> Any:
    """``work()`` with a closing progress line for ``total`` images (default: the examples)."""
    progress = ctx.progress(label, total if total is not None else len(ctx.y))
    result = work()
    progress.finish()
    return result


def _jacobian_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bound", action="store_true",
                   help="also sqrt(||J||_1 ||J||_inf) (one vjp per output coordinate: slow)")


@register("jacobian", "spectral norm of each block's Jacobian by power iteration (Cauchy-problem paper)",
          options=_jacobian_options, eps=None, needs_blocks=True)
def _jacobian(ctx: Context) -> Output:
    from ..analysis import jacobian_norms
    steps = _steps(ctx, 200)
    results = {m.name: _timed(ctx, m.name, lambda m=m: jacobian_norms(
        m.model, ctx.x, max_steps=steps, bound=ctx.args.bound, seed=ctx.args.seed,
        batch_size=ctx.args.batch_size)) for m in ctx.models}
    out = Output(settings={"max_steps": steps, "bound": ctx.args.bound},
                 results={name: j.to_dict() for name, j in results.items()})
    out.tables.append(("Largest singular value of each block's Jacobian (mean over inputs; path: the "
                       "output rows differentiated, class-token for blocks that update it alone)",
                       ["model", "block", "path", "mean", "std", "converged (%)", "all tokens",
                        "all tokens converged (%)"],
                       [[name, b, j.paths[k], float(j.mean[k]), float(j.std[k]),
                         pct(j.converged[:, k].double().mean()), float(j.sigma_all_tokens[:, k].mean()),
                         pct(j.converged_all_tokens[:, k].double().mean())]
                        for name, j in results.items() for k, b in enumerate(j.blocks)]))
    if ctx.plt is not None:
        out.save(plots.jacobian_figure(results, len(ctx.y)), ctx.out, "jacobian.png", "per-block Jacobian spectral norm, one line per model")
    return out


@register("propagation", "how FGSM, PGD and random perturbations grow block by block",
          needs_blocks=True)
def _propagation(ctx: Context) -> Output:
    from ..analysis import propagation
    steps = _steps(ctx, 10)
    results = {m.name: _timed(ctx, m.name, lambda m=m: propagation(
        m.model, ctx.x, ctx.y, eps=ctx.eps, norm=ctx.norm, pgd_steps=steps, seed=ctx.args.seed,
        batch_size=ctx.args.batch_size)) for m in ctx.models}
    out = Output(settings={"pgd_steps": steps},
                 results={name: p.to_dict() for name, p in results.items()})
    out.tables.append(("Relative change of the first and last block's output (mean)",
                       ["model", "perturbation", "input", "first block", "last block"],
                       [[name, k, float(e.input_ratio.mean()), float(e.mean[0]), float(e.mean[-1])]
                        for name, p in results.items() for k, e in p.effects.items()]))
    if ctx.plt is not None:
        out.save(plots.propagation_figure(results, ctx.eps, ctx.norm), ctx.out, "propagation.png", "relative change per block, one column per model")
    return out


@register("similarity", "correlation and linear CKA between all block outputs (Bhojanapalli et al.)",
          eps=None, min_examples=2, needs_blocks=True)
def _similarity(ctx: Context) -> Output:
    from ..analysis import layer_similarity
    results = {m.name: _timed(ctx, m.name, lambda m=m: layer_similarity(
        m.model, ctx.x, batch_size=ctx.args.batch_size)) for m in ctx.models}
    out = Output(settings={},
                 results={name: s.to_dict() for name, s in results.items()})
    out.tables.append(("Linear CKA between neighbouring blocks and between the first and last",
                       ["model", "mean CKA of neighbours", "CKA first-last"],
                       [[name, s.neighbour_cka, float(s.tokens.cka[0, -1])]
                        for name, s in results.items()]))
    if ctx.plt is not None:
        out.save(plots.similarity_figure(results, "cka"), ctx.out, "similarity.png",
                 "linear CKA between block outputs (top: all tokens, bottom: class token), one "
                 "column per model")
        out.save(plots.similarity_figure(results, "correlation"), ctx.out,
                 "similarity_correlation.png",
                 "correlation between block outputs (top: all tokens, bottom: class token; blank: "
                 "outputs of different shapes), one column per model")
    return out


def _lesion_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kinds", help="comma list of lesion kinds (default: every part of each "
                   "block and the whole block: attn, mlp, lpi, conv, block)")


def _lesion_kinds(ctx: Context) -> Optional[list[str]]:
    if not ctx.args.kinds:
        return None
    return [k.strip() for k in ctx.args.kinds.split(",") if k.strip()]


def _check_lesions(ctx: Context) -> None:
    from ..analysis import blocks
    kinds = _lesion_kinds(ctx)
    for m in ctx.models:
        known = {k for b in blocks(m.model) for k in b.part_names + ("block",)}
        unknown = [k for k in kinds or () if k not in known]
        if unknown:
            raise OptionError(f"--kinds {','.join(unknown)}: {m.name} has no such part; its "
                               f"lesion kinds are {','.join(sorted(known))}")


@register("lesions", "clean and PGD accuracy after removing each block or its attention / MLP part",
          options=_lesion_options, needs_blocks=True, check=_check_lesions)
def _lesions(ctx: Context) -> Output:
    from ..analysis import lesion_study
    steps = _steps(ctx, 10)
    kinds = _lesion_kinds(ctx)
    results = {m.name: _timed(ctx, m.name, lambda m=m: lesion_study(
        m.model, ctx.x, ctx.y, eps=ctx.eps, norm=ctx.norm, steps=steps, kinds=kinds,
        seed=ctx.args.seed, batch_size=ctx.args.batch_size)) for m in ctx.models}
    out = Output(settings={"steps": steps, "kinds": kinds},
                 results={name: s.to_dict() for name, s in results.items()})
    out.tables.append((f"Accuracy after each lesion (PGD-{steps})",
                       ["model", "lesion", "block", "clean (%)", f"PGD-{steps} (%)",
                        "clean drop (pts)", "PGD drop (pts)"],
                       [[name, r["kind"], r["block"], pct(r["clean"]), pct(r["robust"]),
                         pct(r["clean_drop"]), pct(r["robust_drop"])]
                        for name, s in results.items() for r in s.rows()]))
    out.lines += [f"{name}: intact model {pct(s.baseline_clean)}% clean, "
                  f"{pct(s.baseline_robust)}% under PGD-{steps}." for name, s in results.items()]
    if ctx.plt is not None:
        out.save(plots.lesions_figure(results, steps), ctx.out, "lesions.png", "accuracy after each lesion (top: clean, bottom: PGD), "
                            "one column per model")
    return out


# --------------------------------------------------------------------------------------------
# beyond Lp balls: common corruptions and spatial grids (advvit.analysis.shifts)
# --------------------------------------------------------------------------------------------

def _corruption_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corruptions", default="all", metavar="NAMES",
                   help="all (the 15 of ImageNet-C) or a comma list (gaussian_noise,fog,...)")
    p.add_argument("--baseline", metavar="CKPT",
                   help="checkpoint the mCE is relative to (evaluated on the same corrupted "
                        "examples; default: no mCE)")
    add_corruption_options(p, severities_default="all")


def _corruption_settings(ctx: Context) -> CorruptionSettings:
    from ..analysis.shifts import corruption_settings
    a = ctx.args
    return corruption_settings(a.corruptions, a.corruption_severities,
                               cache_dir=a.corruption_cache_dir, workers=a.corruption_workers,
                               seed=a.seed, options=("--corruptions", "--severities",
                                                     "--cache-dir", "--corruption-workers"))


@register("corruptions", "accuracy under ImageNet-C corruptions x severities, mean, mCE (Hendrycks "
          "& Dietterich)", options=_corruption_options,
          eps=None, default_examples=1000, check=_corruption_settings)
def _corruptions(ctx: Context) -> Output:
    from ..analysis.shifts import corruption_study
    settings = _corruption_settings(ctx)
    total = len(ctx.y) * settings.tasks
    baseline = ctx.baseline
    study = corruption_study(
        {m.name: (str(m.record.get("sha256")), m.model) for m in ctx.models}, ctx.x, ctx.y,
        settings, seed=ctx.args.seed, dataset=f"{ctx.dataset}/{ctx.args.split}",
        batch_size=ctx.args.batch_size,
        baseline=(baseline.name, str(baseline.record.get("sha256")), baseline.model)
        if baseline is not None else None,
        evaluate=lambda name, work: _timed(ctx, name, work, total=total))
    with_mce = study.baseline is not None
    mce = {name: study.mce_percent(name) for name in study.mce}
    summary = study.summary()
    out = Output(settings={"corruptions": list(settings.corruptions),
                           "severities": list(settings.severities),
                           "cache_dir": settings.cache_dir, "corruption_workers": settings.workers,
                           "baseline": ({"name": baseline.name, **baseline.record}
                                        if baseline is not None else None)},
                 results=study.to_dict())

    def mce_cell(name: str) -> Any:
        if name not in mce:  # the baseline's own row
            return 100.0
        return "n/a" if mce[name] is None else round(mce[name], 2)

    out.tables.append(("Mean over corruptions and severities",
                       ["model", "clean (%)", "mean corruption accuracy (%)"]
                       + (["mCE (%)"] if with_mce else []),
                       [[name, pct(r.clean_accuracy), pct(r.mean_corruption_accuracy)]
                        + ([mce_cell(name)] if with_mce else [])
                        for name, r in summary.items()]))
    out.tables.append(("Accuracy per corruption",
                       ["model", "corruption", *[f"severity {s} (%)" for s in settings.severities],
                        "mean (%)"] + (["CE (%)"] if with_mce else []),
                       [[name, c, *[pct(a) for a in r.accuracy[c]],
                         pct(sum(r.accuracy[c]) / len(r.accuracy[c]))]
                        + ([study.mce[name][0].ce_percent[c] if mce[name] is not None else "n/a"]
                           if with_mce else [])
                        for name, r in study.results.items() for c in r.corruptions]))
    out.lines.append(f"Corruptions of the examples as the models take them "
                     f"({'x'.join(map(str, ctx.input_shape))}), seed {ctx.args.seed}, "
                     f"{next(iter(study.results.values())).library}. The library's constants are "
                     "in pixels, tuned for 224x224 ImageNet: on smaller images blurs, glass, "
                     "motion, snow and elastic are stronger relative to the image, so the numbers "
                     "are not comparable to published CIFAR-10-C results.")
    if with_mce:
        out.lines.append("mCE (Hendrycks & Dietterich): per corruption, the model's error summed "
                         "over severities divided by the baseline's (CE), averaged over "
                         "corruptions; 100% is the baseline, lower is better.")
        out.lines += [f"{name}: no mCE: {why}" for name, (m, why) in study.mce.items() if m is None]
    if ctx.plt is not None:
        out.save(plots.corruption_heatmaps(study.results), ctx.out, "corruptions.png",
                 "accuracy (%) per corruption and severity, one column per model")
        out.save(plots.corruption_bars(summary, mce, baseline.name if with_mce else None),
                 ctx.out, "corruptions_summary.png",
                 "clean and mean corruption accuracy per model"
                 + (", and mCE against the baseline" if with_mce else ""))
    return out


def _spatial_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-rotation", type=float, default=30.0, metavar="DEG",
                   help="rotations span -DEG..DEG degrees")
    p.add_argument("--rotation-steps", type=int, default=31, metavar="N",
                   help="rotations, evenly spaced (1: none; the default: 2-degree steps)")
    p.add_argument("--max-translation", type=float, default=0.1, metavar="F",
                   help="translations span -F..F of the image side, along each axis")
    p.add_argument("--translation-steps", type=int, default=5, metavar="N",
                   help="translations per axis, evenly spaced (1: none)")


def _spatial_grid(ctx: Context) -> Any:
    """The grid of the options (default: Engstrom et al.'s 31 x 5 x 5)."""
    from ..analysis.shifts import SpatialGrid
    a = ctx.args
    for option, limit, top, steps, steps_option in (
            ("--max-rotation", a.max_rotation, 180.0, a.rotation_steps, "--rotation-steps"),
            ("--max-translation", a.max_translation, 1.0, a.translation_steps,
             "--translation-steps")):
        if steps < 1:
            raise OptionError(f"{steps_option} must be >= 1 (1: none), got {steps}")
        if not (math.isfinite(limit) and 0 <= limit <= top):
            raise OptionError(f"{option} must be in [0, {top:g}], got {limit:g}")
        if limit == 0 and steps > 1:
            raise OptionError(f"{option} 0 has one value: use {steps_option} 1 or a larger "
                               f"{option}")
    return SpatialGrid.uniform(a.max_rotation, a.rotation_steps, a.max_translation,
                               a.translation_steps)


@register("spatial", "accuracy over a rotation x translation grid, and its worst case (Engstrom "
          "et al.)", options=_spatial_options, eps=None, default_examples=256,
          check=_spatial_grid)
def _spatial(ctx: Context) -> Output:
    from ..analysis.shifts import evaluate_spatial
    grid = _spatial_grid(ctx)
    points = len(grid.points())
    results = {m.name: _timed(ctx, m.name, lambda m=m: evaluate_spatial(
        m.model, ctx.x, ctx.y, grid=grid, batch_size=ctx.args.batch_size),
        total=len(ctx.y) * points) for m in ctx.models}

    out = Output(settings={"max_rotation": ctx.args.max_rotation,
                           "rotation_steps": ctx.args.rotation_steps,
                           "max_translation": ctx.args.max_translation,
                           "translation_steps": ctx.args.translation_steps, "points": points,
                           "accuracy_axes": ["rotation", "translation_y", "translation_x"]},
                 results={name: {**s.to_dict(), "lowest_point": s.lowest_point()}
                          for name, s in results.items()})
    out.tables.append(("Accuracy under rotations and translations",
                       ["model", "clean (%)", "lowest grid point (%)", "at (rotation, tx, ty)",
                        "worst of grid (%)"],
                       [[name, pct(s.clean_accuracy), pct(low["accuracy"]),
                         "({}, {}, {})".format(*map(signed, (low["rotation"], low["tx"],
                                                             low["ty"]))),
                         pct(s.worst_of_grid_accuracy)]
                        for name, s in results.items() for low in (s.lowest_point(),)]))
    out.lines.append(f"{points} grid points: rotations {grid.rotations[0]:g}..{grid.rotations[-1]:g} "
                     f"degrees ({len(grid.rotations)}), translations "
                     f"{grid.translations_x[0]:+.3g}..{grid.translations_x[-1]:+.3g} of the side "
                     f"({len(grid.translations_x)} per axis); bilinear, black padding. Worst of "
                     "grid: an example counts only when it is classified correctly at every "
                     "point (Engstrom et al. 2019).")
    if ctx.plt is not None:
        ty = grid.translations_y[nearest_zero(grid.translations_y)]
        out.save(plots.spatial_heatmaps(results), ctx.out, "spatial.png",
                 f"accuracy (%) over rotation x horizontal shift at vertical shift {signed(ty)}, one "
                 "column per model (the JSON has every point)")
        out.save(plots.spatial_bars(results), ctx.out, "spatial_summary.png",
                 "clean, lowest single grid point and worst-of-grid accuracy per model")
    return out


# --------------------------------------------------------------------------------------------
# the command line: one sub-parser per analysis
# --------------------------------------------------------------------------------------------

class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one and the help text does not already say it."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=100)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS or "default" in text:
            return text
        return super()._get_help_string(action)


class _ListHelp(argparse.RawDescriptionHelpFormatter):
    """The top-level help: one line per analysis (argparse measures sub-commands two columns
    short of where it prints them, which would wrap the longest name's line)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=24, width=110)

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction):
            self._action_max_length += 2


def _common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    m = p.add_argument_group("models and data")
    m.add_argument("--checkpoint", action="append", required=True, metavar="CKPT",
                   help="a model: an advvit checkpoint (.pth), a timm train.py checkpoint, a "
                        "state dict with --model, timm:NAME, hf-hub:ORG/NAME[@REV], "
                        "local-dir:PATH or robustbench:[DATASET/THREAT/]NAME; repeat for "
                        "several models (one figure column each)")
    add_model_file_options(m)
    add_data_options(m, n_examples_help="how many examples (the first N of the split; default "
                                        "depends on the analysis)")
    a = p.add_argument_group("attack")
    add_attack_options(a, eps_default=None, eps_help=" (default: the first checkpoint's "
                       "training eps, else 4/255; class-viz: L2 15 * sqrt(d / (224*224*3)))",
                       norm_default=None, norm_help="the attack's norm (default linf; class-viz "
                       "is L2)", steps_help="attack steps (default: the analysis's: 100 for "
                       "perturbations / class-viz / semantic, 10 for PGD elsewhere; jacobian: "
                       "power-iteration steps, 200)",
                       norms=ANALYSIS_NORMS)
    r = p.add_argument_group("run")
    add_run_options(r, batch_size=ANALYZE_BATCH_SIZE)
    add_workers_option(r)
    r.add_argument("--output", required=True, help="output folder (created when missing)")
    return p


def analyze_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m advvit.analyze`` (one sub-parser per analysis)."""
    return analyze_parsers()[0]


def analyze_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser and each analysis's sub-parser (whose usage line an error prints)."""
    p = argparse.ArgumentParser(prog="advvit-analyze",
                                description="Analyses of trained models, one sub-command each: "
                                            "an output folder with <analysis>.json, PNG figures "
                                            "and report.md.",
                                formatter_class=_ListHelp,
                                epilog="Run `advvit-analyze ANALYSIS --help` for an analysis's "
                                       "options.")
    sub = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True,
                           title="analyses")
    common = _common_parser()
    subs = {}
    for a in ANALYSES.values():
        sp = sub.add_parser(a.name, help=a.help, description=a.help, parents=[common],
                            formatter_class=_Help)
        if a.options is not None:
            a.options(sp.add_argument_group(a.name))
        subs[a.name] = sp
    return p, subs


def _model_names(paths: Sequence[str]) -> list[str]:
    """Short distinct names: file stems, or more of the path where stems repeat."""
