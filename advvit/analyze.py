"""The analysis CLI: ``python -m advvit.analyze ANALYSIS`` (also ``advvit-analyze``).

checkpoint(s) -> examples -> one analysis of :mod:`advvit.analysis` -> an output folder with
``<analysis>.json`` (the envelope of :mod:`advvit.report`: inputs, numbers, seed, versions,
every checkpoint's sha256), PNG figures (one column per model when several are given) and
``report.md`` linking them with a short table. This module only loads and writes: every number
comes from a library function on a plain ``nn.Module``.

Examples::

    python -m advvit.analyze perturbations --checkpoint robust/best.pth \\
        --checkpoint clean/best.pth --dataset fashion_mnist --n-examples 8 --output out/pert
    python -m advvit.analyze transfer --checkpoint a.pth --checkpoint b.pth \\
        --dataset cifar10 --attack apgd-ce --eps 8/255 --output out/transfer
    python -m advvit.analyze corruptions --checkpoint robust/best.pth \\
        --baseline clean/best.pth --severities 1,3,5 --output out/corruptions

Every argument is validated and every model and example loaded before the first analysis step;
a bad argument is one error line naming it and the fix (exit status 2).

A new analysis is one registration::

    @register("name", "one line for --help", options=_my_options)
    def _name(ctx: Context) -> Output:
        ...  # call the library, return numbers, figures and tables
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import textwrap
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from . import eval as _eval
from .accel import add_threads_option, apply_threads
from .attacks import check_eps
from .report import (envelope, heatmap, pyplot, save_figure, show_image, to_jsonable,
                     write_markdown_report, write_report)

__all__ = [
    "ANALYZE_FORMAT",
    "AnalyzeError",
    "Analysis",
    "ANALYSES",
    "register",
    "Context",
    "Output",
    "Progress",
    "build_parser",
    "main",
]

ANALYZE_FORMAT = "advvit-analyze/1"
DEFAULT_EPS = 4 / 255
"""Linf eps when neither --eps nor the checkpoint gives one (the thesis's ImageNet eps)."""
DEFAULT_L2_EPS = 0.5
FIGURE_DPI = 120
CLASS_VIZ_ROWS = 20
"""Rows of the class-visualization figure at most (the JSON holds every image's numbers)."""


class AnalyzeError(ValueError):
    """A bad argument or input; the message names it and the fix."""


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


@dataclass
class Context:
    """Everything an analysis runs on (all loaded and validated).

    Attributes:
        args: the parsed arguments (analysis options included).
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

    args: argparse.Namespace
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
        save_figure(fig, folder / name, dpi=FIGURE_DPI)
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
            work (raises :class:`AnalyzeError`; what it returns is ignored, so a settings
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

def _pct(value: float) -> float:
    return round(100 * float(value), 2)


def _short(text: str, width: int = 14) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _suptitle(fig: Any, text: str, fontsize: float = 9) -> None:
    """A figure title wrapped to the figure's width (about 11 characters an inch at 9 pt)."""
    width = max(20, int(fig.get_size_inches()[0] * 11 * 9 / fontsize))
    fig.suptitle(textwrap.fill(text, width), fontsize=fontsize)


def _images_figure(ctx: Context, rows: int, cols: int, *, scale: float = 1.35) -> tuple[Any, Any]:
    # Constrained layout keeps every row's title lines clear of the images above them.
    fig, axes = ctx.plt.subplots(rows, cols, figsize=(scale * cols + 0.4, 1.12 * scale * rows + 0.9),
                                 squeeze=False, layout="constrained")
    return fig, axes


def _block_axis(ax: Any, names: Sequence[str]) -> None:
    ax.set_xticks(range(len(names)), labels=list(names), rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("block (forward order)")
    ax.grid(alpha=0.3)


def _model_axes(ctx: Context, rows: int = 1, *, width: float = 4.2,
                height: float = 3.4) -> tuple[Any, Any]:
    cols = len(ctx.models)
    fig, axes = ctx.plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    return fig, axes


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


def _perturbation_figure(ctx: Context, results: dict[str, Any], show: int) -> Any:
    """Rows: examples; columns: clean, then per model: perturbation (colour, grey), adversarial."""
    names = ctx.class_names
    n = min(show, len(ctx.y))
    cols = 1 + 3 * len(results)
    fig, axes = _images_figure(ctx, n, cols)
    colour_map = "RdBu_r" if ctx.input_shape[0] == 1 else None
    for i in range(n):
        show_image(axes[i, 0], ctx.x[i], f"true: {_short(names[int(ctx.y[i])])}")
        for m, (model_name, p) in enumerate(results.items()):
            c = 1 + 3 * m
            pred = int(p.adv_pred[i])
            show_image(axes[i, c], p.delta_viz[i], cmap=colour_map)
            show_image(axes[i, c + 1], p.delta_grey[i])
            show_image(axes[i, c + 2], p.x_adv[i], f"pred: {_short(names[pred])}")
            axes[i, c + 2].title.set_color("black" if pred == int(ctx.y[i]) else "crimson")
            if i == 0:
                for k, what in enumerate(("perturbation", "perturbation (grey)", "adversarial")):
                    axes[0, c + k].set_title(f"{_short(model_name, 18)}\n{what}"
                                             + (f"\npred: {_short(names[pred])}" if k == 2 else ""),
                                             fontsize=8, color=axes[0, c + 2].title.get_color()
                                             if k == 2 else "black")
    axes[0, 0].set_title(f"clean\ntrue: {_short(names[int(ctx.y[0])])}", fontsize=8)
    norm = "Linf" if ctx.norm == "linf" else "L2"
    scale = "(delta + eps) / (2 eps)" if ctx.norm == "linf" else "(delta + m) / (2 m), m = max|delta|"
    colours = " (colour: blue -, white 0, red +)" if colour_map else ""
    _suptitle(fig, f"PGD-{results[next(iter(results))].steps} perturbations, {norm} eps "
                   f"{_eps_text(ctx.eps, ctx.norm)}, shown as {scale}: 0.5 = unchanged{colours}. "
                   "Red label: a wrong prediction.")
    return fig


@register("perturbations", "PGD-k perturbations of test images seen as images (thesis figs. 1, 11, 13)",
          options=_perturbation_options, default_examples=8)
def _perturbations(ctx: Context) -> Output:
    from .analysis.perturbations import perturbation_images
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
                 results={name: {"clean_accuracy": p.clean_accuracy,
                                 "adversarial_accuracy": p.adversarial_accuracy,
                                 "mean_abs_delta": float(p.delta.abs().mean()),
                                 "labels": p.y, "clean_pred": p.clean_pred,
                                 "adv_pred": p.adv_pred}
                          for name, p in results.items()})
    out.tables.append(("Accuracy on the images shown and attacked",
                       ["model", "clean (%)", f"PGD-{steps} (%)", "mean |delta| (x/255)"],
                       [[name, _pct(p.clean_accuracy), _pct(p.adversarial_accuracy),
                         round(float(p.delta.abs().mean()) * 255, 3)]
                        for name, p in results.items()]))
    if ctx.plt is not None:
        out.save(_perturbation_figure(ctx, results, ctx.args.show), ctx.out, "perturbations.png",
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
            raise AnalyzeError(f"--classes {item!r} is neither a class index below {num_classes} "
                               f"nor a class name ({', '.join(names[:10])}...)")
    if not chosen:
        raise AnalyzeError("--classes names no class")
    return chosen


def _class_viz_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classes", help="comma list of class indices or names (default: every class)")
    p.add_argument("--per-class", type=int, default=1, help="images per class")


def _class_viz_figure(ctx: Context, results: dict[str, Any]) -> Any:
    """Rows: target classes; columns: the start, then per model: the result and its change."""
    from .analysis.perturbations import perturbation_viz
    names = ctx.class_names
    first = next(iter(results.values()))
    rows = min(len(first.targets), CLASS_VIZ_ROWS)
    fig, axes = _images_figure(ctx, rows, 1 + 2 * len(results), scale=1.45)
    for i in range(rows):
        target = int(first.targets[i])
        show_image(axes[i, 0], first.start[i], "start: uniform noise" if i == 0 else None)
        axes[i, 0].set_ylabel(_short(names[target], 16), fontsize=8)
        for m, (model_name, cv) in enumerate(results.items()):
            change = cv.images[i:i + 1] - cv.start[i:i + 1]
            title = f"p {cv.start_confidence[i]:.2f} -> {cv.confidence[i]:.2f}"
            show_image(axes[i, 1 + 2 * m], cv.images[i],
                       f"{_short(model_name, 18)}\n{title}" if i == 0 else title)
            show_image(axes[i, 2 + 2 * m], perturbation_viz(change, change.abs().max())[0],
                       cmap="RdBu_r", title="change (scaled)" if i == 0 else None)
    _suptitle(fig, f"targeted L2 PGD-{first.steps} from uniform noise towards each class (rows), "
                   f"eps {first.eps:.3g}; p: the model's probability of the class before -> "
                   "after; change: image - start scaled to its largest pixel (blue -, red +)")
    return fig


def _check_class_viz(ctx: Context) -> None:
    if ctx.args.per_class < 1:
        raise AnalyzeError(f"--per-class must be >= 1, got {ctx.args.per_class}")
    _class_list(ctx.args.classes, ctx.class_names, ctx.models[0].num_classes)


@register("class-viz", "draw each class from noise with a targeted L2 PGD (thesis figs. 12, 14)",
          options=_class_viz_options, eps="class-viz", min_examples=None, check=_check_class_viz)
def _class_viz(ctx: Context) -> Output:
    from .analysis.perturbations import class_visualization
    classes = _class_list(ctx.args.classes, ctx.class_names, ctx.models[0].num_classes)
    steps = _steps(ctx, 100)
    results = {}
    for m in ctx.models:
        progress = ctx.progress(m.name, len(classes) * ctx.args.per_class)
        results[m.name] = class_visualization(
            m.model, ctx.input_shape, classes, per_class=ctx.args.per_class, eps=ctx.eps,
            steps=steps, seed=ctx.args.seed, batch_size=ctx.args.batch_size, on_batch=progress)
    out = Output(settings={"steps": steps, "classes": classes, "per_class": ctx.args.per_class},
                 results={name: {"targets": cv.targets, "pred": cv.pred,
                                 "confidence": cv.confidence,
                                 "start_confidence": cv.start_confidence,
                                 "success_rate": float(cv.success.double().mean())}
                          for name, cv in results.items()})
    out.tables.append(("Target class reached from noise",
                       ["model", "reached (%)", "mean p(target) (%)"],
                       [[name, _pct(cv.success.double().mean()),
                         _pct(cv.confidence.double().mean())] for name, cv in results.items()]))
    if ctx.plt is not None:
        m = len(next(iter(results.values())).targets)
        shown = f" (the first {CLASS_VIZ_ROWS} of {m} images)" if m > CLASS_VIZ_ROWS else ""
        out.save(_class_viz_figure(ctx, results), ctx.out, "class_viz.png",
                 f"one row per target class{shown}, one block of columns per model")
    return out


def _semantic_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--judge", action="append", default=None, metavar="CKPT",
                   help="a judge checkpoint (repeat for several; default: the --checkpoint "
                        "models judge each other's perturbations)")
    p.add_argument("--top-k", type=int, default=5, help="top-k accuracy besides top-1")
    p.add_argument("--random-init", action="store_true",
                   help="start PGD from a random point of the ball")


def _semantic_figure(ctx: Context, score: Any) -> Any:
    J = len(score.judges)
    fig, axes = ctx.plt.subplots(1, J, figsize=(1.2 + 1.6 * len(score.sources) * 1.5, 3.8),
                                 squeeze=False)
    kinds = score.kinds
    width = 0.8 / len(kinds)
    colours = {"clean": "lightgrey"}
    for j, judge in enumerate(score.judges):
        ax = axes[0, j]
        for kk, kind in enumerate(kinds):
            values = [100 * float(score.top1[s, j, kk]) for s in range(len(score.sources))]
            ax.bar([s + (kk - (len(kinds) - 1) / 2) * width for s in range(len(score.sources))],
                   values, width, label="clean images (reference)" if kind == "clean" else kind,
                   color=colours.get(kind, f"C{kk - 1}"))
        ax.axhline(100 * score.chance_top1, color="black", ls="--", lw=1, label="chance")
        ax.set_xticks(range(len(score.sources)), labels=list(score.sources), fontsize=8)
        ax.set_xlabel("perturbations of (source model)")
        ax.set_ylabel("top-1 accuracy of the judge (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"judge: {judge}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0, -1].legend(fontsize=7, loc="upper right")
    _suptitle(fig, "semantic score: judges classify the perturbation images against the true "
                   "label (random: random-sign control, same eps and box)")
    fig.tight_layout()
    return fig


def _check_semantic(ctx: Context) -> None:
    if ctx.args.top_k < 1:
        raise AnalyzeError(f"--top-k must be >= 1, got {ctx.args.top_k}")


@register("semantic", "how often judge models see the true class in perturbation images (thesis table 9)",
          options=_semantic_options, default_examples=256, check=_check_semantic)
def _semantic(ctx: Context) -> Output:
    from .analysis.perturbations import perturbation_images, semantic_score
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
                 results={"sources": list(score.sources), "judges": list(score.judges),
                          "kinds": list(score.kinds), "top1": score.top1,
                          f"top{score.k}": score.topk, "chance_top1": score.chance_top1,
                          f"chance_top{score.k}": score.chance_topk, "rows": score.rows(),
                          "adversarial_accuracy": {n: p.adversarial_accuracy
                                                   for n, p in sources.items()}})
    k = score.k
    header = ["source", "judge"] + [f"{kind} top-1 / top-{k} (%)" for kind in score.kinds]
    rows = [[s, j] + [f"{_pct(score.top1[si, ji, kk])} / {_pct(score.topk[si, ji, kk])}"
                      for kk in range(len(score.kinds))]
            for si, s in enumerate(score.sources) for ji, j in enumerate(score.judges)]
    out.tables.append((f"Judges' accuracy on each image set (chance: {_pct(score.chance_top1)} / "
                       f"{_pct(score.chance_topk)})", header, rows))
    out.lines.append("A semantic perturbation scores well above its random-sign control; the "
                     "control is above chance only where saturated pixels let the [0, 1] box "
                     "outline the object.")
    if ctx.plt is not None:
        out.save(_semantic_figure(ctx, score), ctx.out, "semantic.png",
                 "top-1 accuracy of each judge on each source's perturbation images, negatives "
                 "and controls")
    return out


def _transfer_options(p: argparse.ArgumentParser) -> None:
    from .analysis.perturbations import TRANSFER_ATTACKS
    p.add_argument("--attack", default="pgd", choices=TRANSFER_ATTACKS,
                   help="how the adversarial examples are crafted (the runner of advvit.eval)")
    p.add_argument("--restarts", type=int, default=1, help="restarts per example (pgd, apgd-ce)")


def _transfer_figure(ctx: Context, tm: Any) -> Any:
    fig, axes = ctx.plt.subplots(1, 2, figsize=(4.5 + 1.6 * len(tm.targets) * 2, 1.6 + 0.9 * len(tm.sources)),
                                 squeeze=False)
    cols = [f"{t}\n(clean {_pct(c):.0f}%)" for t, c in zip(tm.targets, tm.clean_accuracy)]
    for ax, values, what in ((axes[0, 0], tm.accuracy, "all examples (diagonal: white box)"),
                             (axes[0, 1], tm.transfer_accuracy, "examples that fooled the source")):
        heatmap(ax, values, row_labels=list(tm.sources), col_labels=cols, xlabel="target model",
                ylabel="source model (attacked)", colorbar="target accuracy (%)", scale=100,
                vmin=0, vmax=100)
        ax.set_title(what, fontsize=9)
    _suptitle(fig, f"transfer of {tm.attack} ({tm.norm}, eps {_eps_text(tm.eps, tm.norm)}, "
                   f"{tm.steps} steps), n={tm.n}")
    fig.tight_layout()
    return fig


def _check_transfer(ctx: Context) -> None:
    if ctx.args.restarts < 1:
        raise AnalyzeError(f"--restarts must be >= 1, got {ctx.args.restarts}")
    if ctx.args.attack == "fgsm" and ctx.steps not in (None, 1):
        raise AnalyzeError("--attack fgsm is one step: drop --steps or use --attack pgd")


@register("transfer", "adversarial examples of each model classified by every model (transfer matrix)",
          options=_transfer_options, default_examples=256, check=_check_transfer)
def _transfer(ctx: Context) -> Output:
    from .analysis.perturbations import transfer_matrix
    models = {m.name: m.model for m in ctx.models}
    progress = ctx.progress("crafting", len(ctx.y) * len(models))
    tm = transfer_matrix(models, ctx.x, ctx.y, attack=ctx.args.attack, eps=ctx.eps, norm=ctx.norm,
                         steps=ctx.steps, restarts=ctx.args.restarts, seed=ctx.args.seed,
                         batch_size=ctx.args.batch_size, on_batch=progress)
    out = Output(settings={"attack": tm.attack, "steps": tm.steps, "restarts": tm.restarts},
                 results={"sources": list(tm.sources), "targets": list(tm.targets),
                          "accuracy": tm.accuracy, "transfer_accuracy": tm.transfer_accuracy,
                          "clean_accuracy": tm.clean_accuracy, "white_box": tm.white_box,
                          "n_fooled": tm.fooled.sum(1), "seconds": tm.seconds})
    rows = [[s, t, _pct(tm.accuracy[i, j]), _pct(tm.transfer_accuracy[i, j]),
             "yes" if tm.white_box[i, j] else ""]
            for i, s in enumerate(tm.sources) for j, t in enumerate(tm.targets)]
    out.tables.append(("Target accuracy on each source's adversarial examples",
                       ["source", "target", "accuracy (%)", "on examples that fooled the source (%)",
                        "white box"], rows))
    if ctx.plt is not None:
        out.save(_transfer_figure(ctx, tm), ctx.out, "transfer.png",
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
    from .analysis import jacobian_norms
    steps = _steps(ctx, 200)
    results = {m.name: _timed(ctx, m.name, lambda m=m: jacobian_norms(
        m.model, ctx.x, max_steps=steps, bound=ctx.args.bound, seed=ctx.args.seed,
        batch_size=ctx.args.batch_size)) for m in ctx.models}
    out = Output(settings={"max_steps": steps, "bound": ctx.args.bound},
                 results={name: {"blocks": list(j.blocks), "paths": list(j.paths),
                                 "sigma_mean": j.mean, "sigma_std": j.std,
                                 "sigma_all_tokens_mean": j.sigma_all_tokens.mean(0),
                                 "converged": float(j.converged.double().mean()),
                                 "converged_all_tokens": float(j.converged_all_tokens.double().mean()),
                                 "bound_mean": j.bound.mean(0) if j.bound is not None else None,
                                 "jvp_passes": j.jvp_passes, "vjp_passes": j.vjp_passes,
                                 "seconds": j.seconds}
                          for name, j in results.items()})
    out.tables.append(("Largest singular value of each block's Jacobian (mean over inputs; path: the "
                       "output rows differentiated, class-token for blocks that update it alone)",
                       ["model", "block", "path", "mean", "std", "converged (%)", "all tokens",
                        "all tokens converged (%)"],
                       [[name, b, j.paths[k], float(j.mean[k]), float(j.std[k]),
                         _pct(j.converged[:, k].double().mean()), float(j.sigma_all_tokens[:, k].mean()),
                         _pct(j.converged_all_tokens[:, k].double().mean())]
                        for name, j in results.items() for k, b in enumerate(j.blocks)]))
    if ctx.plt is not None:
        fig, ax = ctx.plt.subplots(figsize=(7, 4))
        class_token_paths = False
        for name, j in results.items():
            xs = range(len(j.blocks))
            line = ax.plot(xs, j.mean.numpy(), marker="o", label=name)[0]
            ax.fill_between(xs, (j.mean - j.std).numpy(), (j.mean + j.std).numpy(),
                            color=line.get_color(), alpha=0.2)
            cls = [k for k, path in enumerate(j.paths) if path == "class-token"]
            if cls:
                class_token_paths = True
                ax.plot(cls, j.sigma_all_tokens[:, cls].mean(0).numpy(), ls="none", marker="o", mfc="none",
                        color=line.get_color(), label=f"{name}: class-attention over all tokens (patch path in)")
            if j.bound is not None:
                ax.plot(xs, j.bound.mean(0).numpy(), ls="--", color=line.get_color(),
                        label=f"{name}: sqrt(||J||_1 ||J||_inf)")
        _block_axis(ax, next(iter(results.values())).blocks)
        ax.set_ylabel(r"$\|J\|_2$ of the block (mean ± std)")
        path = "; class-attention blocks: class-token path" if class_token_paths else ""
        ax.set_title(f"block Jacobian spectral norm{path}, n={len(ctx.y)} inputs", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out.save(fig, ctx.out, "jacobian.png", "per-block Jacobian spectral norm, one line per model")
    return out


@register("propagation", "how FGSM, PGD and random perturbations grow block by block",
          needs_blocks=True)
def _propagation(ctx: Context) -> Output:
    from .analysis import propagation
    steps = _steps(ctx, 10)
    results = {m.name: _timed(ctx, m.name, lambda m=m: propagation(
        m.model, ctx.x, ctx.y, eps=ctx.eps, norm=ctx.norm, pgd_steps=steps, seed=ctx.args.seed,
        batch_size=ctx.args.batch_size)) for m in ctx.models}
    out = Output(settings={"pgd_steps": steps},
                 results={name: {"blocks": list(p.blocks),
                                 "effects": {k: {"mean": e.mean, "std": e.std,
                                                 "input_ratio": float(e.input_ratio.mean()),
                                                 "l2": float(e.l2.mean()),
                                                 "linf": float(e.linf.mean())}
                                             for k, e in p.effects.items()}}
                          for name, p in results.items()})
    out.tables.append(("Relative change of the first and last block's output (mean)",
                       ["model", "perturbation", "input", "first block", "last block"],
                       [[name, k, float(e.input_ratio.mean()), float(e.mean[0]), float(e.mean[-1])]
                        for name, p in results.items() for k, e in p.effects.items()]))
    if ctx.plt is not None:
        fig, axes = _model_axes(ctx)
        for ax, (name, p) in zip(axes[0], results.items()):
            for k, e in p.effects.items():
                ax.plot(range(len(p.blocks)), e.mean.numpy(), marker=".",
                        ls="--" if e.matched_to else "-", label=k)
            _block_axis(ax, p.blocks)
            ax.set_yscale("log")
            ax.set_ylabel(r"$\|h(x + \delta) - h(x)\| \,/\, \|h(x)\|$")
            ax.set_title(name, fontsize=9)
            ax.legend(fontsize=7)
        _suptitle(fig, f"layer-wise propagation, {ctx.norm} eps {_eps_text(ctx.eps, ctx.norm)} "
                       "(dashed: random control of the same norm)")
        fig.tight_layout()
        out.save(fig, ctx.out, "propagation.png", "relative change per block, one column per model")
    return out


@register("similarity", "correlation and linear CKA between all block outputs (Bhojanapalli et al.)",
          eps=None, min_examples=2, needs_blocks=True)
def _similarity(ctx: Context) -> Output:
    from .analysis import layer_similarity
    results = {m.name: _timed(ctx, m.name, lambda m=m: layer_similarity(
        m.model, ctx.x, batch_size=ctx.args.batch_size)) for m in ctx.models}
    out = Output(settings={},
                 results={name: {"blocks": list(s.blocks),
                                 "tokens": {"correlation": s.tokens.correlation, "cka": s.tokens.cka},
                                 "class_token": {"correlation": s.class_token.correlation,
                                                 "cka": s.class_token.cka}}
                          for name, s in results.items()})
    out.tables.append(("Linear CKA between neighbouring blocks and between the first and last",
                       ["model", "mean CKA of neighbours", "CKA first-last"],
                       [[name, float(torch.diagonal(s.tokens.cka, 1).mean()) if len(s.blocks) > 1
                         else math.nan, float(s.tokens.cka[0, -1])]
                        for name, s in results.items()]))
    if ctx.plt is not None:
        out.save(_similarity_figure(ctx, results, "cka"), ctx.out, "similarity.png",
                 "linear CKA between block outputs (top: all tokens, bottom: class token), one "
                 "column per model")
        out.save(_similarity_figure(ctx, results, "correlation"), ctx.out,
                 "similarity_correlation.png",
                 "correlation between block outputs (top: all tokens, bottom: class token; blank: "
                 "outputs of different shapes), one column per model")
    return out


SIMILARITY_MEASURES = {"cka": "linear CKA", "correlation": "correlation"}
"""The similarity heatmaps: the measure (a ``SimilarityMatrices`` field) and its colour bar."""


def _similarity_scale(results: dict[str, Any], measure: str) -> float:
    """The low end of the colour scale: 0 (CKA's range), or -1 where a correlation is negative;
    one scale for every panel, so that models compare by colour."""
    values = torch.cat([getattr(m, measure).flatten() for s in results.values()
                        for m in (s.tokens, s.class_token)])
    values = values[~values.isnan()]
    return -1.0 if values.numel() and float(values.min()) < 0 else 0.0


def _similarity_figure(ctx: Context, results: dict[str, Any], measure: str) -> Any:
    """One ``measure`` of :data:`SIMILARITY_MEASURES`: rows all tokens and class token, a column
    per model."""
    label, vmin = SIMILARITY_MEASURES[measure], _similarity_scale(results, measure)
    fig, axes = _model_axes(ctx, 2, width=4.6, height=4.0)
    for m, (name, s) in enumerate(results.items()):
        for row, (matrices, what) in enumerate(((s.tokens, "all tokens"),
                                                (s.class_token, "class token"))):
            heatmap(axes[row, m], getattr(matrices, measure), row_labels=s.blocks,
                    col_labels=s.blocks, xlabel="block", ylabel="block", colorbar=label,
                    vmin=vmin, vmax=1, fmt="{:.2f}", annotate=len(s.blocks) <= 12)
            axes[row, m].set_title(f"{name}: {what}", fontsize=9)
    fig.tight_layout()
    return fig


def _lesion_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kinds", help="comma list of lesion kinds (default: every part of each "
                   "block and the whole block: attn, mlp, lpi, conv, block)")


def _lesion_kinds(ctx: Context) -> Optional[list[str]]:
    if not ctx.args.kinds:
        return None
    return [k.strip() for k in ctx.args.kinds.split(",") if k.strip()]


def _check_lesions(ctx: Context) -> None:
    from .analysis import blocks
    kinds = _lesion_kinds(ctx)
    for m in ctx.models:
        known = {k for b in blocks(m.model) for k in b.part_names + ("block",)}
        unknown = [k for k in kinds or () if k not in known]
        if unknown:
            raise AnalyzeError(f"--kinds {','.join(unknown)}: {m.name} has no such part; its "
                               f"lesion kinds are {','.join(sorted(known))}")


@register("lesions", "clean and PGD accuracy after removing each block or its attention / MLP part",
          options=_lesion_options, needs_blocks=True, check=_check_lesions)
def _lesions(ctx: Context) -> Output:
    from .analysis import lesion_study
    steps = _steps(ctx, 10)
    kinds = _lesion_kinds(ctx)
    results = {m.name: _timed(ctx, m.name, lambda m=m: lesion_study(
        m.model, ctx.x, ctx.y, eps=ctx.eps, norm=ctx.norm, steps=steps, kinds=kinds,
        seed=ctx.args.seed, batch_size=ctx.args.batch_size)) for m in ctx.models}
    out = Output(settings={"steps": steps, "kinds": kinds},
                 results={name: {"blocks": list(s.blocks), "kinds": list(s.kinds),
                                 "clean_accuracy": s.clean_accuracy,
                                 "robust_accuracy": s.robust_accuracy,
                                 "baseline_clean": s.baseline_clean,
                                 "baseline_robust": s.baseline_robust, "rows": s.rows()}
                          for name, s in results.items()})
    out.tables.append((f"Accuracy after each lesion (PGD-{steps})",
                       ["model", "lesion", "block", "clean (%)", f"PGD-{steps} (%)",
                        "clean drop (pts)", "PGD drop (pts)"],
                       [[name, r["kind"], r["block"], _pct(r["clean"]), _pct(r["robust"]),
                         _pct(r["clean_drop"]), _pct(r["robust_drop"])]
                        for name, s in results.items() for r in s.rows()]))
    out.lines += [f"{name}: intact model {_pct(s.baseline_clean)}% clean, "
                  f"{_pct(s.baseline_robust)}% under PGD-{steps}." for name, s in results.items()]
    if ctx.plt is not None:
        fig, axes = _model_axes(ctx, 2, width=5.0, height=2.6)
        for m, (name, s) in enumerate(results.items()):
            for row, (values, base, what) in enumerate((
                    (s.clean_accuracy, s.baseline_clean, "clean"),
                    (s.robust_accuracy, s.baseline_robust, f"PGD-{steps}"))):
                heatmap(axes[row, m], values, row_labels=s.kinds, col_labels=s.blocks,
                        xlabel="block", ylabel="lesion", colorbar=f"{what} accuracy (%)",
                        scale=100, vmin=0, vmax=100, fmt="{:.0f}")
                axes[row, m].set_title(f"{name}: {what} (intact {_pct(base):.1f}%)", fontsize=9)
        fig.tight_layout()
        out.save(fig, ctx.out, "lesions.png", "accuracy after each lesion (top: clean, bottom: PGD), "
                            "one column per model")
    return out


# --------------------------------------------------------------------------------------------
# beyond Lp balls: common corruptions and spatial grids (advvit.analysis.shifts)
# --------------------------------------------------------------------------------------------

def _corruption_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corruptions", default="all", metavar="NAMES",
                   help="all (the 15 of ImageNet-C) or a comma list (gaussian_noise,fog,...)")
    p.add_argument("--severities", default="all", metavar="LIST",
                   help="comma list of severities 1-5, or all")
    p.add_argument("--baseline", metavar="CKPT",
                   help="checkpoint the mCE is relative to (evaluated on the same corrupted "
                        "examples; default: no mCE)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help=f"where corrupted examples are kept, shared by every run on the same "
                        f"examples (default: {_eval.CORRUPTION_CACHE})")
    p.add_argument("--corruption-workers", type=int, metavar="N",
                   help="processes generating corruptions (default: the cores available; 0: "
                        "this process; --workers is the data loader's)")


def _corruption_settings(ctx: Context) -> _eval.CorruptionSettings:
    a = ctx.args
    return _eval.corruption_settings(a.corruptions, a.severities, cache_dir=a.cache_dir,
                                     workers=a.corruption_workers, seed=a.seed,
                                     options=("--corruptions", "--severities", "--cache-dir",
                                              "--corruption-workers"))


def _mce(result: Any, baseline: Any) -> tuple[Optional[Any], str]:
    """-> (MeanCorruptionError or None, why there is none)."""
    from .analysis.shifts import mean_corruption_error
    try:
        return mean_corruption_error(result, baseline), ""
    except ValueError as err:  # a baseline without error on a corruption: its CE is undefined
        return None, str(err)


def _corruption_heatmaps(ctx: Context, results: dict[str, Any]) -> Any:
    first = next(iter(results.values()))
    fig, axes = _model_axes(ctx, width=1.9 + 0.55 * len(first.severities),
                            height=1.4 + 0.3 * len(first.corruptions))
    for ax, (name, r) in zip(axes[0], results.items()):
        matrix = torch.tensor([r.accuracy[c] for c in r.corruptions])
        heatmap(ax, matrix, row_labels=list(r.corruptions),
                col_labels=[str(s) for s in r.severities], xlabel="severity",
                ylabel="corruption", colorbar="accuracy (%)", scale=100, vmin=0, vmax=100,
                fmt="{:.0f}")
        ax.set_title(f"{_short(name, 24)}\nclean {_pct(r.clean_accuracy):.1f}%, mean "
                     f"{_pct(r.mean_corruption_accuracy):.1f}%", fontsize=9)
    fig.tight_layout()
    return fig


def _corruption_bars(ctx: Context, summary: dict[str, Any], mce: dict[str, Optional[float]],
                     baseline_name: Optional[str]) -> Any:
    """Left: clean and mean corruption accuracy per model (and the baseline); right (with a
    baseline): each model's mCE, the baseline at 100%."""
    panels = 2 if baseline_name else 1
    fig, axes = ctx.plt.subplots(1, panels, figsize=(2.4 + 1.3 * len(summary) * panels, 3.8),
                                 squeeze=False)
    xs = np.arange(len(summary))
    ax = axes[0, 0]
    _labelled_bars(ax, xs - 0.2, [_pct(r.clean_accuracy) for r in summary.values()], 0.4,
                   color="lightgrey", label="clean")
    _labelled_bars(ax, xs + 0.2, [_pct(r.mean_corruption_accuracy) for r in summary.values()],
                   0.4, color="C0", label="mean over corruptions x severities")
    ax.set_xticks(xs, labels=[_short(n, 18) for n in summary], rotation=20, ha="right",
                  fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    if baseline_name:
        ax = axes[0, 1]
        xm = np.arange(len(mce))
        _labelled_bars(ax, xm, [v if v is not None else np.nan for v in mce.values()], 0.6,
                       color="C1")
        ax.axhline(100, color="black", ls="--", lw=1, label=f"baseline: {_short(baseline_name, 18)}")
        ax.set_xticks(xm, labels=[_short(n, 18) for n in mce], rotation=20, ha="right",
                      fontsize=8)
        ax.set_ylabel("mCE (%, lower is better)")
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    first = next(iter(summary.values()))
    _suptitle(fig, f"common corruptions: {len(first.corruptions)} corruptions x severities "
                   f"{','.join(map(str, first.severities))}, n={first.n}")
    fig.tight_layout()
    return fig


@register("corruptions", "accuracy under ImageNet-C corruptions x severities, mean, mCE (Hendrycks "
          "& Dietterich)", options=_corruption_options,
          eps=None, default_examples=1000, check=_corruption_settings)
def _corruptions(ctx: Context) -> Output:
    settings = _corruption_settings(ctx)
    dataset = f"{ctx.args.dataset}/{ctx.args.split}"
    done: dict[str, Any] = {}  # by sha256: a baseline that is one of the models runs once

    def evaluate(m: NamedModel) -> Any:
        key = str(m.record.get("sha256"))
        if key not in done:
            done[key] = _timed(ctx, m.name, lambda: _eval.run_corruptions(
                m.model, ctx.x, ctx.y, settings, seed=ctx.args.seed, dataset=dataset,
                batch_size=ctx.args.batch_size), total=len(ctx.y) * settings.tasks)
        return done[key]

    results = {m.name: evaluate(m) for m in ctx.models}
    base = evaluate(ctx.baseline) if ctx.baseline is not None else None
    mces = {name: _mce(r, base) for name, r in results.items()} if base is not None else {}
    mce = {name: m.mce_percent if m is not None else None for name, (m, _) in mces.items()}
    summary = dict(results)
    if base is not None and ctx.baseline.name not in results:  # listed once when it is a model
        summary[f"{ctx.baseline.name} (baseline)"] = base
    out = Output(settings={"corruptions": list(settings.corruptions),
                           "severities": list(settings.severities),
                           "cache_dir": settings.cache_dir, "corruption_workers": settings.workers,
                           "baseline": ({"name": ctx.baseline.name, **ctx.baseline.record}
                                        if ctx.baseline is not None else None)},
                 results={"models": {name: {**r.to_dict(), **(mces[name][0].to_dict()
                                                              if mce.get(name) is not None else {})}
                                     for name, r in results.items()},
                          "baseline": base.to_dict() if base is not None else None})
    with_mce = base is not None

    def mce_cell(name: str) -> Any:
        if name not in mce:  # the baseline's own row
            return 100.0
        return "n/a" if mce[name] is None else round(mce[name], 2)

    out.tables.append(("Mean over corruptions and severities",
                       ["model", "clean (%)", "mean corruption accuracy (%)"]
                       + (["mCE (%)"] if with_mce else []),
                       [[name, _pct(r.clean_accuracy), _pct(r.mean_corruption_accuracy)]
                        + ([mce_cell(name)] if with_mce else [])
                        for name, r in summary.items()]))
    out.tables.append(("Accuracy per corruption",
                       ["model", "corruption", *[f"severity {s} (%)" for s in settings.severities],
                        "mean (%)"] + (["CE (%)"] if with_mce else []),
                       [[name, c, *[_pct(a) for a in r.accuracy[c]],
                         _pct(sum(r.accuracy[c]) / len(r.accuracy[c]))]
                        + ([mces[name][0].ce_percent[c] if mce[name] is not None else "n/a"]
                           if with_mce else [])
                        for name, r in results.items() for c in r.corruptions]))
    out.lines.append(f"Corruptions of the examples as the models take them "
                     f"({'x'.join(map(str, ctx.input_shape))}), seed {ctx.args.seed}, "
                     f"{next(iter(results.values())).library}. The library's constants are in "
                     "pixels, tuned for 224x224 ImageNet: on smaller images blurs, glass, motion, "
                     "snow and elastic are stronger relative to the image, so the numbers are not "
                     "comparable to published CIFAR-10-C results.")
    if with_mce:
        out.lines.append("mCE (Hendrycks & Dietterich): per corruption, the model's error summed "
                         "over severities divided by the baseline's (CE), averaged over "
                         "corruptions; 100% is the baseline, lower is better.")
        out.lines += [f"{name}: no mCE: {why}" for name, (m, why) in mces.items() if m is None]
    if ctx.plt is not None:
        out.save(_corruption_heatmaps(ctx, results), ctx.out, "corruptions.png",
                 "accuracy (%) per corruption and severity, one column per model")
        out.save(_corruption_bars(ctx, summary, mce, ctx.baseline.name if with_mce else None),
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
    from .analysis.shifts import SpatialGrid
    a = ctx.args
    for option, limit, top, steps, steps_option in (
            ("--max-rotation", a.max_rotation, 180.0, a.rotation_steps, "--rotation-steps"),
            ("--max-translation", a.max_translation, 1.0, a.translation_steps,
             "--translation-steps")):
        if steps < 1:
            raise AnalyzeError(f"{steps_option} must be >= 1 (1: none), got {steps}")
        if not (math.isfinite(limit) and 0 <= limit <= top):
            raise AnalyzeError(f"{option} must be in [0, {top:g}], got {limit:g}")
        if limit == 0 and steps > 1:
            raise AnalyzeError(f"{option} 0 has one value: use {steps_option} 1 or a larger "
                               f"{option}")
    return SpatialGrid.uniform(a.max_rotation, a.rotation_steps, a.max_translation,
                               a.translation_steps)


def _nearest_zero(values: Sequence[float]) -> int:
    return min(range(len(values)), key=lambda i: abs(values[i]))


def _signed(value: float) -> str:
    return "0" if value == 0 else f"{value:+.3g}"


def _labelled_bars(ax: Any, *args: Any, **kwargs: Any) -> None:
    """Bars with their value on top (a bar at 0 is still read)."""
    ax.bar_label(ax.bar(*args, **kwargs), fmt="%.0f", fontsize=7, padding=1)


def _spatial_heatmaps(ctx: Context, results: dict[str, Any]) -> Any:
    """Per model: accuracy over rotation x horizontal shift, at the vertical shift nearest 0."""
    grid = next(iter(results.values())).grid
    ty = _nearest_zero(grid.translations_y)
    rows, cols = len(grid.rotations), len(grid.translations_x)
    fig, axes = _model_axes(ctx, width=3.2 + 0.5 * cols, height=2.2 + 0.24 * rows)
    for ax, (name, s) in zip(axes[0], results.items()):
        heatmap(ax, s.accuracy[:, ty, :], row_labels=[_signed(r) for r in grid.rotations],
                col_labels=[_signed(t) for t in grid.translations_x],
                xlabel="horizontal shift (x width)", ylabel="rotation (degrees)",
                colorbar="accuracy (%)", scale=100, vmin=0, vmax=100, fmt="{:.0f}",
                annotate=rows * cols <= 400)
        ax.set_title(f"{_short(name, 24)}\nclean {_pct(s.clean_accuracy):.1f}%, worst of grid "
                     f"{_pct(s.worst_of_grid_accuracy):.1f}%", fontsize=9)
    _suptitle(fig, f"accuracy at vertical shift {_signed(grid.translations_y[ty])}; rotation + "
                   "counter-clockwise, shift + right, as fractions of the side")
    fig.tight_layout()
    return fig


def _spatial_bars(ctx: Context, results: dict[str, Any]) -> Any:
    fig, ax = ctx.plt.subplots(figsize=(2.6 + 1.4 * len(results), 3.8))
    xs = np.arange(len(results))
    kinds = (("clean", "lightgrey", lambda s: s.clean_accuracy),
             ("lowest single grid point", "C0", lambda s: float(s.accuracy.min())),
             ("worst of grid (per example)", "C3", lambda s: s.worst_of_grid_accuracy))
    for k, (label, colour, value) in enumerate(kinds):
        _labelled_bars(ax, xs + (k - 1) * 0.27, [_pct(value(s)) for s in results.values()],
                       0.27, color=colour, label=label)
    ax.set_xticks(xs, labels=[_short(n, 16) for n in results], rotation=20, ha="right",
                  fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    grid = next(iter(results.values())).grid
    _suptitle(fig, f"spatial grid: {len(grid.rotations)} rotations x {len(grid.translations_x)} x "
                   f"{len(grid.translations_y)} translations; worst of grid: correct at every point")
    fig.tight_layout()
    return fig


@register("spatial", "accuracy over a rotation x translation grid, and its worst case (Engstrom "
          "et al.)", options=_spatial_options, eps=None, default_examples=256,
          check=_spatial_grid)
def _spatial(ctx: Context) -> Output:
    from .analysis.shifts import evaluate_spatial
    grid = _spatial_grid(ctx)
    points = len(grid.points())
    results = {m.name: _timed(ctx, m.name, lambda m=m: evaluate_spatial(
        m.model, ctx.x, ctx.y, grid=grid, batch_size=ctx.args.batch_size),
        total=len(ctx.y) * points) for m in ctx.models}

    def lowest(s: Any) -> dict[str, Any]:
        r, ty, tx = np.unravel_index(int(s.accuracy.argmin()), grid.shape)
        return {"accuracy": float(s.accuracy.min()), "rotation": grid.rotations[r],
                "tx": grid.translations_x[tx], "ty": grid.translations_y[ty]}

    out = Output(settings={"max_rotation": ctx.args.max_rotation,
                           "rotation_steps": ctx.args.rotation_steps,
                           "max_translation": ctx.args.max_translation,
                           "translation_steps": ctx.args.translation_steps, "points": points,
                           "accuracy_axes": ["rotation", "translation_y", "translation_x"]},
                 results={name: {**s.to_dict(), "lowest_point": lowest(s)}
                          for name, s in results.items()})
    out.tables.append(("Accuracy under rotations and translations",
                       ["model", "clean (%)", "lowest grid point (%)", "at (rotation, tx, ty)",
                        "worst of grid (%)"],
                       [[name, _pct(s.clean_accuracy), _pct(lowest(s)["accuracy"]),
                         "({}, {}, {})".format(*map(_signed, (lowest(s)["rotation"],
                                                               lowest(s)["tx"], lowest(s)["ty"]))),
                         _pct(s.worst_of_grid_accuracy)] for name, s in results.items()]))
    out.lines.append(f"{points} grid points: rotations {grid.rotations[0]:g}..{grid.rotations[-1]:g} "
                     f"degrees ({len(grid.rotations)}), translations "
                     f"{grid.translations_x[0]:+.3g}..{grid.translations_x[-1]:+.3g} of the side "
                     f"({len(grid.translations_x)} per axis); bilinear, black padding. Worst of "
                     "grid: an example counts only when it is classified correctly at every "
                     "point (Engstrom et al. 2019).")
    if ctx.plt is not None:
        ty = grid.translations_y[_nearest_zero(grid.translations_y)]
        out.save(_spatial_heatmaps(ctx, results), ctx.out, "spatial.png",
                 f"accuracy (%) over rotation x horizontal shift at vertical shift {_signed(ty)}, one "
                 "column per model (the JSON has every point)")
        out.save(_spatial_bars(ctx, results), ctx.out, "spatial_summary.png",
                 "clean, lowest single grid point and worst-of-grid accuracy per model")
    return out


# --------------------------------------------------------------------------------------------
# the CLI
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
                   help="advvit checkpoint (.pth); repeat for several models (one figure "
                        "column each)")
    m.add_argument("--no-ema", action="store_true", help="use the raw weights even where a "
                   "checkpoint holds EMA weights")
    m.add_argument("--dataset", help="advvit.data name (default: the first checkpoint's "
                   "training data set)")
    m.add_argument("--data-dir", help="data root (default: the checkpoint's, else the known places)")
    m.add_argument("--split", default="val", choices=("val", "test", "train"),
                   help="data split the examples come from")
    m.add_argument("--n-examples", type=int, help="how many examples (the first N of the "
                   "split; default depends on the analysis)")
    a = p.add_argument_group("attack")
    a.add_argument("--eps", help="radius: a fraction (0.0157) or x/255 (default: the first "
                   "checkpoint's training eps, else 4/255; class-viz: L2 15 * sqrt(d / (224*224*3)))")
    a.add_argument("--norm", choices=("linf", "l2"), help="the attack's norm (default linf; "
                   "class-viz is L2)")
    a.add_argument("--steps", type=int, help="attack steps (default: the analysis's: 100 for "
                   "perturbations / class-viz / semantic, 10 for PGD elsewhere; jacobian: "
                   "power-iteration steps, 200)")
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0, help="seeds every random start and control")
    r.add_argument("--batch-size", type=int, default=64, help="images per batch")
    r.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    r.add_argument("--workers", type=int, default=0, help="data loader workers")
    add_threads_option(r)
    r.add_argument("--output", required=True, help="output folder (created when missing)")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m advvit.analyze`` (one sub-parser per analysis)."""
    return _parsers()[0]


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
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
    parts = [Path(p).resolve().with_suffix("").parts for p in paths]
    for depth in range(1, max(len(p) for p in parts)):  # never up to the root's "/"
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    # The same file more than once: its stem, numbered.
    return [f"{p[-1]}#{i}" for i, p in enumerate(parts)]


def _check_output(target: str) -> Path:
    return _eval.check_folder(target, "--output")


def _check_args(analysis: Analysis, args: argparse.Namespace) -> None:
    """The arguments that need nothing loaded."""
    if analysis.eps is None and (args.eps is not None or args.norm is not None):
        raise AnalyzeError(f"--eps/--norm do not apply to {analysis.name}: drop them")
    if analysis.eps == "class-viz" and args.norm not in (None, "l2"):
        raise AnalyzeError("--norm linf: class-viz is a targeted L2 attack; drop --norm")
    if analysis.min_examples is None and args.n_examples is not None:
        raise AnalyzeError(f"--n-examples does not apply to {analysis.name} (it starts from "
                           "noise): use --classes / --per-class")
    if analysis.min_examples is not None and args.n_examples is not None \
            and args.n_examples < analysis.min_examples:
        raise AnalyzeError(f"--n-examples {args.n_examples} is too few for {analysis.name}: it "
                           f"needs at least {analysis.min_examples}")
    for option in ("batch_size", "steps"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise AnalyzeError(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    if getattr(args, "show", 1) < 1:
        raise AnalyzeError(f"--show must be >= 1, got {args.show}")


def _norm(analysis: Analysis, args: argparse.Namespace) -> Optional[str]:
    if analysis.eps is None:
        return None
    return "l2" if analysis.eps == "class-viz" else (args.norm or "linf")


def _eps(analysis: Analysis, args: argparse.Namespace, norm: Optional[str],
         first: NamedModel, input_shape: Sequence[int]) -> tuple[Optional[float], str]:
    """-> (eps, where it came from), checked against the input's shape."""
    if analysis.eps is None:
        return None, ""
    if args.eps is not None:
        eps, source = _eval.parse_eps(args.eps, norm=norm), "--eps"
    elif analysis.eps == "class-viz":
        from .analysis.perturbations import default_class_viz_eps
        eps = default_class_viz_eps(input_shape)
        source = "the thesis's L2 15 at 224x224x3, scaled by sqrt(d / (224*224*3))"
    else:
        train_eps, train_norm = first.record.get("train_eps"), first.record.get("train_norm")
        if train_eps and train_norm == norm:
            eps, source = float(train_eps), f"{first.name}'s training eps"
        else:
            eps = DEFAULT_EPS if norm == "linf" else DEFAULT_L2_EPS
            source = "the default (the checkpoint records no training eps for this norm)"
    try:
        check_eps(eps, norm, input_shape=tuple(input_shape), name="--eps")
    except ValueError as err:
        raise AnalyzeError(str(err)) from None
    return eps, source


def _load_models(paths: Sequence[str], args: argparse.Namespace, device: torch.device,
                 option: str) -> tuple[list[NamedModel], list[_eval.LoadedModel]]:
    loaded = [_eval.load_checkpoint_model(p, use_ema=not args.no_ema, option=option)
              for p in paths]
    named = [NamedModel(name, lm.model.to(device), lm.record, lm.num_classes)
             for name, lm in zip(_model_names(paths), loaded)]
    return named, loaded


def _check_inputs_agree(loaded: Sequence[_eval.LoadedModel], paths: Sequence[str]) -> None:
    first = loaded[0]
    for lm, path in zip(loaded[1:], paths[1:]):
        if (lm.in_chans, lm.img_size) != (first.in_chans, first.img_size):
            raise AnalyzeError(
                f"{path} takes {lm.in_chans}x{lm.img_size} inputs but {paths[0]} takes "
                f"{first.in_chans}x{first.img_size}: compare models of the same input")


def _check_blocks(models: Sequence[NamedModel], analysis: Analysis) -> None:
    from .analysis import blocks
    from .analysis.blocks import UnsupportedArchitectureError
    for m in models:
        try:
            blocks(m.model)
        except UnsupportedArchitectureError as err:
            raise AnalyzeError(f"--checkpoint {m.record.get('path')}: {analysis.name} looks "
                               f"inside the model, but {err}") from None


def _check_model_outputs(models: Sequence[NamedModel], x: torch.Tensor, y: torch.Tensor,
                         dataset: str, device: torch.device) -> None:
    for m in models:
        if int(y.max()) >= m.num_classes:
            raise AnalyzeError(f"--dataset {dataset} has labels up to {int(y.max())} but "
                               f"{m.name} has {m.num_classes} classes: analyse it on the data "
                               "set it was trained for")
        with torch.no_grad():
            out = m.model(x[:1].to(device))
        if out.ndim != 2 or out.shape[1] != m.num_classes:
            raise AnalyzeError(f"{m.name} returns shape {tuple(out.shape)}, not (batch, "
                               f"{m.num_classes}) logits")


def _load_baseline(args: argparse.Namespace, device: torch.device,
                   first: _eval.LoadedModel) -> Optional[NamedModel]:
    """The ``--baseline`` model (where the analysis has the option): same input and classes as
    the first checkpoint."""
    path = getattr(args, "baseline", None)
    if path is None:
        return None
    (named,), (lm,) = _load_models([path], args, device, "--baseline")
    _check_inputs_agree([first, lm], [args.checkpoint[0], path])
    if lm.num_classes != first.num_classes:
        raise AnalyzeError(f"--baseline {path} has {lm.num_classes} classes but "
                           f"{args.checkpoint[0]} has {first.num_classes}: give a baseline "
                           "trained for the same classes")
    # Named as the checkpoint it is when it is one of them; otherwise by as much of its path as
    # tells it apart from them (the file stem alone, "best", would read as one of the models).
    checkpoints = [Path(p).resolve() for p in args.checkpoint]
    if Path(path).resolve() in checkpoints:
        name = _model_names(args.checkpoint)[checkpoints.index(Path(path).resolve())]
    else:
        name = _model_names([*args.checkpoint, path])[-1]
    return replace(named, name=name)


def _class_names(classes: Optional[Sequence[str]], num_classes: int) -> tuple[str, ...]:
    if classes is not None and len(classes) == num_classes:
        return tuple(classes)
    return tuple(str(i) for i in range(num_classes))


def _prepare(analysis: Analysis, args: argparse.Namespace) -> Context:
    """Validate every argument and load models and examples, before any analysis work."""
    _check_args(analysis, args)
    out = _check_output(args.output)
    device = _eval.resolve_device(args.device)
    models, loaded = _load_models(args.checkpoint, args, device, "--checkpoint")
    _check_inputs_agree(loaded, args.checkpoint)
    judge_paths = getattr(args, "judge", None) or []
    judges, judges_loaded = _load_models(judge_paths, args, device, "--judge") if judge_paths \
        else ([], [])
    if judges_loaded:
        _check_inputs_agree([loaded[0], *judges_loaded], [args.checkpoint[0], *judge_paths])
    baseline = _load_baseline(args, device, loaded[0])
    if analysis.needs_blocks:
        _check_blocks(models, analysis)
    trained_on = loaded[0].trained_on
    dataset = args.dataset or trained_on.get("dataset")
    data_dir = args.data_dir or (trained_on.get("data_dir") if args.dataset is None else None)
    if dataset is None:
        raise AnalyzeError("--dataset: the checkpoint does not record its data set; name one")
    n = 1 if analysis.min_examples is None else (args.n_examples or analysis.default_examples)
    ex = _eval.load_examples(dataset, data_dir, split=args.split, in_chans=loaded[0].in_chans,
                             img_size=loaded[0].img_size, n_examples=n,
                             batch_size=args.batch_size, workers=args.workers,
                             at_most=args.n_examples is None)
    args.dataset, args.data_dir = dataset, data_dir
    _check_model_outputs(models + judges + ([baseline] if baseline else []), ex.x, ex.y,
                         dataset, device)
    norm = _norm(analysis, args)
    eps, eps_source = _eps(analysis, args, norm, models[0], ex.x.shape[1:])
    ctx = Context(args=args, models=models, x=ex.x, y=ex.y, indices=ex.indices,
                  class_names=_class_names(ex.classes, models[0].num_classes), eps=eps,
                  norm=norm, eps_source=eps_source, steps=args.steps, device=device, out=out,
                  plt=pyplot(), judges=judges, baseline=baseline)
    if analysis.check is not None:
        analysis.check(ctx)
    return ctx


def _eps_text(eps: float, norm: str) -> str:
    return f"{eps * 255:.4g}/255" if norm == "linf" else f"{eps:.4g}"


def _write(analysis: Analysis, ctx: Context, result: Output, seconds: float,
           argv: Sequence[str]) -> Path:
    args = ctx.args
    command = ["python", "-m", "advvit.analyze", *argv]
    report = envelope(ANALYZE_FORMAT, seed=args.seed, command=command,
                      models=[m.record for m in ctx.models])
    data = {"dataset": args.dataset, "data_dir": args.data_dir, "split": args.split,
            "n_examples": len(ctx.indices) if analysis.min_examples is not None else 0,
            "indices": ctx.indices if analysis.min_examples is not None else [],
            "input_shape": list(ctx.input_shape), "classes": list(ctx.class_names)}
    settings = {"eps": ctx.eps, "norm": ctx.norm, "eps_source": ctx.eps_source,
                "batch_size": args.batch_size, **result.settings}
    report.update({"analysis": analysis.name, "model_names": [m.name for m in ctx.models],
                   "judges": [m.record for m in ctx.judges], "data": data,
                   "settings": settings, "results": result.results,
                   "figures": result.figures, "device": str(ctx.device),
                   "seconds": round(seconds, 3)})
    json_path = write_report(to_jsonable(report), ctx.out / f"{analysis.name}.json")
    lines = [f"`{' '.join(command)}`", "",
             "Models: " + ", ".join(f"**{m.name}** (`{m.record.get('path')}`, sha256 "
                                    f"{str(m.record.get('sha256'))[:12]}…)" for m in ctx.models)
             + ".",
             f"Data: {args.dataset} {args.split}, "
             + (f"{len(ctx.indices)} examples. " if analysis.min_examples is not None else "")
             + (f"Attack: {ctx.norm} eps {_eps_text(ctx.eps, ctx.norm)} ({ctx.eps_source}). "
                if ctx.eps is not None else "")
             + f"Seed {args.seed}. Numbers: [{json_path.name}]({json_path.name}).", "",
             *result.lines]
    if ctx.plt is None:
        lines.append("No figures: matplotlib is not installed (pip install advvit[plot]).")
    write_markdown_report(ctx.out / "report.md", title=f"advvit analyze {analysis.name}",
                          lines=lines, tables=result.tables,
                          figures=[(f["caption"], f["file"]) for f in result.figures])
    return json_path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the analysis CLI; returns the exit status (2 for a bad argument)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subs = _parsers()
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    analysis = ANALYSES[args.analysis]
    sub = subs[analysis.name]
    try:
        ctx = _prepare(analysis, args)
    except (AnalyzeError, _eval.EvalError) as err:
        sub.error(str(err))  # exits 2 with the usage line and the message
    if ctx.eps is not None:
        print(f"{analysis.name}: {ctx.norm} eps {_eps_text(ctx.eps, ctx.norm)} ({ctx.eps_source})",
              file=sys.stderr)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    ctx.out.mkdir(parents=True, exist_ok=True)
    result = analysis.run(ctx)
    path = _write(analysis, ctx, result, time.perf_counter() - started, argv)
    print(f"report: {path} and {ctx.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
