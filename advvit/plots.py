"""Every figure advvit draws: evaluation sweeps, each analysis's figures, the findings' records.

Figures are optional: :func:`pyplot` is matplotlib's Agg backend, or None when matplotlib is
not installed (``pip install advvit[plot]``, :data:`INSTALL_HINT`); callers check it once and
say so where a figure would have been. This is the only module that imports matplotlib.
Each figure function takes results (the analyses' result types, a report's dict) and returns
a matplotlib figure; :func:`save_figure` writes it as PNG, atomically, and closes it.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from .analysis.perturbations import perturbation_viz
from .io import atomic_write

__all__ = [
    "INSTALL_HINT", "pyplot", "save_figure", "show_image", "heatmap", "save_sweep_plot",
    "pct", "short", "signed", "eps_text", "nearest_zero", "CLASS_VIZ_ROWS",
    "perturbation_figure", "class_viz_figure", "semantic_figure", "transfer_figure",
    "jacobian_figure", "propagation_figure", "SIMILARITY_MEASURES", "similarity_figure",
    "lesions_figure", "corruption_heatmaps", "corruption_bars", "spatial_heatmaps",
    "spatial_bars", "findings_figure",
]

INSTALL_HINT = "pip install advvit[plot]"
CLASS_VIZ_ROWS = 20
"""Rows of the class-visualization figure at most (the JSON holds every image's numbers)."""


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or None when matplotlib is not
    installed (figures are optional: :data:`INSTALL_HINT`)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig: Any, path: str | Path, *, dpi: int = 120) -> Path:
    """Write a matplotlib figure as PNG, atomically, and close it."""
    path = Path(path)
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        pyplot().close(fig)
    return path


def show_image(ax: Any, image: torch.Tensor, title: str | None = None, *,
               cmap: str | None = None, vmin: float = 0.0, vmax: float = 1.0,
               fontsize: float = 8) -> Any:
    """Draw one (C, H, W) image in [0, 1] (C 1 or 3) on ``ax``, without ticks.

    One channel is drawn with ``cmap`` (default grey) between vmin and vmax; three as RGB.
    Returns what ``imshow`` returned (for a colour bar).
    """
    image = image.detach().float().cpu()
    if image.shape[0] == 1:
        shown = ax.imshow(image[0].numpy(), cmap=cmap or "gray", vmin=vmin, vmax=vmax,
                          interpolation="nearest")
    else:
        shown = ax.imshow(image.clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title, fontsize=fontsize)
    return shown


def heatmap(ax: Any, matrix: torch.Tensor, *, row_labels: Sequence[str],
            col_labels: Sequence[str], xlabel: str, ylabel: str, colorbar: str,
            fmt: str = "{:.1f}", scale: float = 1.0, vmin: float | None = None,
            vmax: float | None = None, cmap: str = "viridis", annotate: bool = True) -> Any:
    """A labelled matrix: rows x columns, a colour bar named ``colorbar`` (with its unit), the
    value in each cell (``fmt`` of value * ``scale``) when ``annotate``; NaN cells are blank."""
    values = matrix.detach().double().cpu() * scale
    shown = ax.imshow(values.numpy(), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    # Few columns read best level; many need slanting to fit.
    slanted = len(col_labels) > 6
    ax.set_xticks(range(len(col_labels)), labels=list(col_labels), rotation=45 if slanted else 0,
                  ha="right" if slanted else "center", fontsize=8)
    ax.set_yticks(range(len(row_labels)), labels=list(row_labels), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    bar = ax.figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label(colorbar)
    if annotate:
        lo, hi = shown.get_clim()
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                v = float(values[i, j])
                if math.isnan(v):
                    continue
                dark = (v - lo) / (hi - lo) < 0.5 if hi > lo else True
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    return shown


def save_sweep_plot(report: Mapping[str, Any], path: str | Path) -> Path | None:
    """Plot robust accuracy against eps (PNG); returns None when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return None
    eps = [r["eps_255"] for r in report["results"]]
    acc = [r["robust_accuracy"]["value"] * 100 for r in report["results"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(eps, acc, marker="o")
    ax.set_xlabel("eps (x/255)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(0, 100)
    title = f"{report['attack']['name']} ({report['attack']['norm']}), n={report['n']}"
    ax.set_title(title + ("\nuntrustworthy: gradient masking" if report.get("headline") else ""))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def pct(value: float) -> float:
    return round(100 * float(value), 2)


def short(text: str, width: int = 14) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _suptitle(fig: Any, text: str, fontsize: float = 9) -> None:
    """A figure title wrapped to the figure's width (about 11 characters an inch at 9 pt)."""
    width = max(20, int(fig.get_size_inches()[0] * 11 * 9 / fontsize))
    fig.suptitle(textwrap.fill(text, width), fontsize=fontsize)


def _images_figure(rows: int, cols: int, *, scale: float = 1.35) -> tuple[Any, Any]:
    # Constrained layout keeps every row's title lines clear of the images above them.
    fig, axes = pyplot().subplots(rows, cols, figsize=(scale * cols + 0.4, 1.12 * scale * rows + 0.9),
                                 squeeze=False, layout="constrained")
    return fig, axes


def _block_axis(ax: Any, names: Sequence[str]) -> None:
    ax.set_xticks(range(len(names)), labels=list(names), rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("block (forward order)")
    ax.grid(alpha=0.3)


def _model_axes(models: int, rows: int = 1, *, width: float = 4.2,
                height: float = 3.4) -> tuple[Any, Any]:
    fig, axes = pyplot().subplots(rows, models, figsize=(width * models, height * rows),
                                  squeeze=False)
    return fig, axes


def perturbation_figure(x: torch.Tensor, y: torch.Tensor, class_names: Sequence[str],
                        results: Mapping[str, Any], show: int, eps: float, norm: str) -> Any:
    """Rows: examples; columns: clean, then per model: perturbation (colour, grey), adversarial."""
    names = class_names
    n = min(show, len(y))
    cols = 1 + 3 * len(results)
    fig, axes = _images_figure(n, cols)
    colour_map = "RdBu_r" if x.shape[1] == 1 else None
    for i in range(n):
        show_image(axes[i, 0], x[i], f"true: {short(names[int(y[i])])}")
        for m, (model_name, p) in enumerate(results.items()):
            c = 1 + 3 * m
            pred = int(p.adv_pred[i])
            show_image(axes[i, c], p.delta_viz[i], cmap=colour_map)
            show_image(axes[i, c + 1], p.delta_grey[i])
            show_image(axes[i, c + 2], p.x_adv[i], f"pred: {short(names[pred])}")
            axes[i, c + 2].title.set_color("black" if pred == int(y[i]) else "crimson")
            if i == 0:
                for k, what in enumerate(("perturbation", "perturbation (grey)", "adversarial")):
                    axes[0, c + k].set_title(f"{short(model_name, 18)}\n{what}"
                                             + (f"\npred: {short(names[pred])}" if k == 2 else ""),
                                             fontsize=8, color=axes[0, c + 2].title.get_color()
                                             if k == 2 else "black")
    axes[0, 0].set_title(f"clean\ntrue: {short(names[int(y[0])])}", fontsize=8)
    norm_name = "Linf" if norm == "linf" else "L2"
    scale = "(delta + eps) / (2 eps)" if norm == "linf" else "(delta + m) / (2 m), m = max|delta|"
    colours = " (colour: blue -, white 0, red +)" if colour_map else ""
    _suptitle(fig, f"PGD-{results[next(iter(results))].steps} perturbations, {norm_name} eps "
                   f"{eps_text(eps, norm)}, shown as {scale}: 0.5 = unchanged{colours}. "
                   "Red label: a wrong prediction.")
    return fig


def class_viz_figure(class_names: Sequence[str], results: Mapping[str, Any]) -> Any:
    """Rows: target classes; columns: the start, then per model: the result and its change."""
    names = class_names
    first = next(iter(results.values()))
    rows = min(len(first.targets), CLASS_VIZ_ROWS)
    fig, axes = _images_figure(rows, 1 + 2 * len(results), scale=1.45)
    for i in range(rows):
        target = int(first.targets[i])
        show_image(axes[i, 0], first.start[i], "start: uniform noise" if i == 0 else None)
        axes[i, 0].set_ylabel(short(names[target], 16), fontsize=8)
        for m, (model_name, cv) in enumerate(results.items()):
            change = cv.images[i:i + 1] - cv.start[i:i + 1]
            title = f"p {cv.start_confidence[i]:.2f} -> {cv.confidence[i]:.2f}"
            show_image(axes[i, 1 + 2 * m], cv.images[i],
                       f"{short(model_name, 18)}\n{title}" if i == 0 else title)
            show_image(axes[i, 2 + 2 * m], perturbation_viz(change, change.abs().max())[0],
                       cmap="RdBu_r", title="change (scaled)" if i == 0 else None)
    _suptitle(fig, f"targeted L2 PGD-{first.steps} from uniform noise towards each class (rows), "
                   f"eps {first.eps:.3g}; p: the model's probability of the class before -> "
                   "after; change: image - start scaled to its largest pixel (blue -, red +)")
    return fig


def semantic_figure(score: Any) -> Any:
    J = len(score.judges)
    fig, axes = pyplot().subplots(1, J, figsize=(1.2 + 1.6 * len(score.sources) * 1.5, 3.8),
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


def transfer_figure(tm: Any) -> Any:
    fig, axes = pyplot().subplots(1, 2, figsize=(4.5 + 1.6 * len(tm.targets) * 2,
                                                 1.6 + 0.9 * len(tm.sources)), squeeze=False)
    cols = [f"{t}\n(clean {pct(c):.0f}%)" for t, c in zip(tm.targets, tm.clean_accuracy)]
    for ax, values, what in ((axes[0, 0], tm.accuracy, "all examples (diagonal: white box)"),
                             (axes[0, 1], tm.transfer_accuracy, "examples that fooled the source")):
        heatmap(ax, values, row_labels=list(tm.sources), col_labels=cols, xlabel="target model",
                ylabel="source model (attacked)", colorbar="target accuracy (%)", scale=100,
                vmin=0, vmax=100)
        ax.set_title(what, fontsize=9)
    _suptitle(fig, f"transfer of {tm.attack} ({tm.norm}, eps {eps_text(tm.eps, tm.norm)}, "
                   f"{tm.steps} steps), n={tm.n}")
    fig.tight_layout()
    return fig


SIMILARITY_MEASURES = {"cka": "linear CKA", "correlation": "correlation"}


def _similarity_scale(results: Mapping[str, Any], measure: str) -> float:
    """The low end of the colour scale: 0 (CKA's range), or -1 where a correlation is negative;
    one scale for every panel, so that models compare by colour."""
    values = torch.cat([getattr(m, measure).flatten() for s in results.values()
                        for m in (s.tokens, s.class_token)])
    values = values[~values.isnan()]
    return -1.0 if values.numel() and float(values.min()) < 0 else 0.0


def similarity_figure(results: Mapping[str, Any], measure: str) -> Any:
    """One ``measure`` of :data:`SIMILARITY_MEASURES`: rows all tokens and class token, a column
    per model."""
    label, vmin = SIMILARITY_MEASURES[measure], _similarity_scale(results, measure)
    fig, axes = _model_axes(len(results), 2, width=4.6, height=4.0)
    for m, (name, s) in enumerate(results.items()):
        for row, (matrices, what) in enumerate(((s.tokens, "all tokens"),
                                                (s.class_token, "class token"))):
            heatmap(axes[row, m], getattr(matrices, measure), row_labels=s.blocks,
                    col_labels=s.blocks, xlabel="block", ylabel="block", colorbar=label,
                    vmin=vmin, vmax=1, fmt="{:.2f}", annotate=len(s.blocks) <= 12)
            axes[row, m].set_title(f"{name}: {what}", fontsize=9)
    fig.tight_layout()
    return fig


def corruption_heatmaps(results: Mapping[str, Any]) -> Any:
    first = next(iter(results.values()))
    fig, axes = _model_axes(len(results), width=1.9 + 0.55 * len(first.severities),
                            height=1.4 + 0.3 * len(first.corruptions))
    for ax, (name, r) in zip(axes[0], results.items()):
        matrix = torch.tensor([r.accuracy[c] for c in r.corruptions])
        heatmap(ax, matrix, row_labels=list(r.corruptions),
                col_labels=[str(s) for s in r.severities], xlabel="severity",
                ylabel="corruption", colorbar="accuracy (%)", scale=100, vmin=0, vmax=100,
                fmt="{:.0f}")
        ax.set_title(f"{short(name, 24)}\nclean {pct(r.clean_accuracy):.1f}%, mean "
                     f"{pct(r.mean_corruption_accuracy):.1f}%", fontsize=9)
    fig.tight_layout()
    return fig


def corruption_bars(summary: Mapping[str, Any], mce: Mapping[str, Optional[float]],
                     baseline_name: Optional[str]) -> Any:
    """Left: clean and mean corruption accuracy per model (and the baseline); right (with a
    baseline): each model's mCE, the baseline at 100%."""
    panels = 2 if baseline_name else 1
    fig, axes = pyplot().subplots(1, panels, figsize=(2.4 + 1.3 * len(summary) * panels, 3.8),
                                 squeeze=False)
    xs = np.arange(len(summary))
    ax = axes[0, 0]
    _labelled_bars(ax, xs - 0.2, [pct(r.clean_accuracy) for r in summary.values()], 0.4,
                   color="lightgrey", label="clean")
    _labelled_bars(ax, xs + 0.2, [pct(r.mean_corruption_accuracy) for r in summary.values()],
                   0.4, color="C0", label="mean over corruptions x severities")
    ax.set_xticks(xs, labels=[short(n, 18) for n in summary], rotation=20, ha="right",
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
        ax.axhline(100, color="black", ls="--", lw=1, label=f"baseline: {short(baseline_name, 18)}")
        ax.set_xticks(xm, labels=[short(n, 18) for n in mce], rotation=20, ha="right",
                      fontsize=8)
        ax.set_ylabel("mCE (%, lower is better)")
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    first = next(iter(summary.values()))
    _suptitle(fig, f"common corruptions: {len(first.corruptions)} corruptions x severities "
                   f"{','.join(map(str, first.severities))}, n={first.n}")
    fig.tight_layout()
    return fig


def nearest_zero(values: Sequence[float]) -> int:
    return min(range(len(values)), key=lambda i: abs(values[i]))


def signed(value: float) -> str:
    return "0" if value == 0 else f"{value:+.3g}"


def _labelled_bars(ax: Any, *args: Any, **kwargs: Any) -> None:
    """Bars with their value on top (a bar at 0 is still read)."""
    ax.bar_label(ax.bar(*args, **kwargs), fmt="%.0f", fontsize=7, padding=1)


def spatial_heatmaps(results: Mapping[str, Any]) -> Any:
    """Per model: accuracy over rotation x horizontal shift, at the vertical shift nearest 0."""
    grid = next(iter(results.values())).grid
    ty = nearest_zero(grid.translations_y)
    rows, cols = len(grid.rotations), len(grid.translations_x)
    fig, axes = _model_axes(len(results), width=3.2 + 0.5 * cols, height=2.2 + 0.24 * rows)
    for ax, (name, s) in zip(axes[0], results.items()):
        heatmap(ax, s.accuracy[:, ty, :], row_labels=[signed(r) for r in grid.rotations],
                col_labels=[signed(t) for t in grid.translations_x],
                xlabel="horizontal shift (x width)", ylabel="rotation (degrees)",
                colorbar="accuracy (%)", scale=100, vmin=0, vmax=100, fmt="{:.0f}",
                annotate=rows * cols <= 400)
        ax.set_title(f"{short(name, 24)}\nclean {pct(s.clean_accuracy):.1f}%, worst of grid "
                     f"{pct(s.worst_of_grid_accuracy):.1f}%", fontsize=9)
    _suptitle(fig, f"accuracy at vertical shift {signed(grid.translations_y[ty])}; rotation + "
                   "counter-clockwise, shift + right, as fractions of the side")
    fig.tight_layout()
    return fig


def spatial_bars(results: Mapping[str, Any]) -> Any:
    fig, ax = pyplot().subplots(figsize=(2.6 + 1.4 * len(results), 3.8))
    xs = np.arange(len(results))
    kinds = (("clean", "lightgrey", lambda s: s.clean_accuracy),
             ("lowest single grid point", "C0", lambda s: float(s.accuracy.min())),
             ("worst of grid (per example)", "C3", lambda s: s.worst_of_grid_accuracy))
    for k, (label, colour, value) in enumerate(kinds):
        _labelled_bars(ax, xs + (k - 1) * 0.27, [pct(value(s)) for s in results.values()],
                       0.27, color=colour, label=label)
    ax.set_xticks(xs, labels=[short(n, 16) for n in results], rotation=20, ha="right",
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


def eps_text(eps: float, norm: str) -> str:
    return f"{eps * 255:.4g}/255" if norm == "linf" else f"{eps:.4g}"


def jacobian_figure(results: Mapping[str, Any], n: int) -> Any:
    """One line per model: each block's Jacobian spectral norm (mean +- std over ``n`` inputs)."""
    fig, ax = pyplot().subplots(figsize=(7, 4))
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
    ax.set_title(f"block Jacobian spectral norm{path}, n={n} inputs", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def propagation_figure(results: Mapping[str, Any], eps: float, norm: str) -> Any:
    """A column per model: each perturbation's relative change per block."""
    fig, axes = _model_axes(len(results))
    for ax, (name, p) in zip(axes[0], results.items()):
        for k, e in p.effects.items():
            ax.plot(range(len(p.blocks)), e.mean.numpy(), marker=".",
                    ls="--" if e.matched_to else "-", label=k)
        _block_axis(ax, p.blocks)
        ax.set_yscale("log")
        ax.set_ylabel(r"$\|h(x + \delta) - h(x)\| \,/\, \|h(x)\|$")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    _suptitle(fig, f"layer-wise propagation, {norm} eps {eps_text(eps, norm)} "
                   "(dashed: random control of the same norm)")
    fig.tight_layout()
    return fig


def lesions_figure(results: Mapping[str, Any], steps: int) -> Any:
    """A column per model: clean (top) and PGD (bottom) accuracy after each lesion."""
    fig, axes = _model_axes(len(results), 2, width=5.0, height=2.6)
    for m, (name, s) in enumerate(results.items()):
        for row, (values, base, what) in enumerate((
                (s.clean_accuracy, s.baseline_clean, "clean"),
                (s.robust_accuracy, s.baseline_robust, f"PGD-{steps}"))):
            heatmap(axes[row, m], values, row_labels=s.kinds, col_labels=s.blocks,
                    xlabel="block", ylabel="lesion", colorbar=f"{what} accuracy (%)",
                    scale=100, vmin=0, vmax=100, fmt="{:.0f}")
            axes[row, m].set_title(f"{name}: {what} (intact {pct(base):.1f}%)", fontsize=9)
    fig.tight_layout()
    return fig


def findings_figure(panels: Sequence[Mapping[str, Any]], title: str, path: str) -> bool:
    """A findings record's figure: one panel per test, each side's seeds as dots and its mean
    with a band, on an axis zoomed to the numbers; False (nothing written) without matplotlib.

    Args:
        panels: per test ``{title, threshold (a "below" line or None), sides: [{label, mean,
            band (half-width), values}]}``.
        title: the figure's title (wrapped to its width).
        path: the PNG to write.
    """
    plt = pyplot()
    if plt is None:
        return False
    width = 2.9 * len(panels) + 0.8
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        sides = panel["sides"]
        for x, side in enumerate(sides):
            color = "#3182bd" if x == 0 else "#e6550d"
            ax.errorbar(x, side["mean"], yerr=side["band"], fmt="_", color=color, markersize=22,
                        capsize=6, lw=1.5)
            ax.scatter([x] * len(side["values"]), side["values"], color="black", s=14, zorder=3)
        if panel["threshold"] is not None:
            ax.axhline(panel["threshold"], color="red", lw=1, ls="--")
        ax.set_xlim(-0.6, len(sides) - 0.4)
        ax.set_xticks(range(len(sides)))
        ax.set_xticklabels([s["label"] for s in sides], fontsize=7)
        ax.set_title(panel["title"], fontsize=9)
    # A long title wrapped to the figure's width (~13 characters an inch at 9 points) instead of
    # cut off at both edges.
    fig.suptitle(textwrap.fill(title, int(13 * width)), fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return True
