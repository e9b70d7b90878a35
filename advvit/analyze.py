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

import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .accel import apply_threads, resolve_device
from .attacks import check_eps
from .checkpoint import LoadedModel
from .cli.analyses import (ANALYSES, Analysis, AnalyzeRequest, Context, NamedModel, Output,
                           Progress, analyze_parser, analyze_parsers, register)
from .data import load_examples
from .cli.options import model_options, parse_eps
from .io import OptionError, check_folder
from .plots import INSTALL_HINT, eps_text, pyplot
from .references import check_classes, check_input_size, resolve_model
from .report import envelope, to_jsonable, write_markdown_report, write_report

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
AnalyzeError = OptionError
"""A bad argument or input; the message names it and the fix."""
build_parser = analyze_parser


def _model_names(paths: Sequence[str]) -> list[str]:
    """Short distinct names: file stems, or more of the path where stems repeat."""
    parts = [Path(p).resolve().with_suffix("").parts for p in paths]
    for depth in range(1, max(len(p) for p in parts)):  # never up to the root's "/"
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    # The same file more than once: its stem, numbered.
    return [f"{p[-1]}#{i}" for i, p in enumerate(parts)]


def _check_args(analysis: Analysis, args: AnalyzeRequest) -> None:
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


def _norm(analysis: Analysis, args: AnalyzeRequest) -> Optional[str]:
    if analysis.eps is None:
        return None
    return "l2" if analysis.eps == "class-viz" else (args.norm or "linf")


def _eps(analysis: Analysis, args: AnalyzeRequest, norm: Optional[str],
         first: NamedModel, input_shape: Sequence[int]) -> tuple[Optional[float], str]:
    """-> (eps, where it came from), checked against the input's shape."""
    if analysis.eps is None:
        return None, ""
    if args.eps is not None:
        eps, source = parse_eps(args.eps, norm=norm), "--eps"
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


def _load_models(paths: Sequence[str], args: AnalyzeRequest, device: torch.device,
                 option: str) -> tuple[list[NamedModel], list[LoadedModel]]:
    loaded = [resolve_model(p, model_options(args, option)) for p in paths]
    named = [NamedModel(name, lm.model.to(device), lm.record, lm.num_classes)
             for name, lm in zip(_model_names(paths), loaded)]
    return named, loaded


def _check_inputs_agree(loaded: Sequence[LoadedModel], paths: Sequence[str]) -> None:
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
        where = f"{m.name} ({m.record.get('reference')})"
        check_classes(m.num_classes, dataset, where)
        check_input_size(m.model, tuple(x.shape[-2:]), where)
        if int(y.max()) >= m.num_classes:
            raise AnalyzeError(f"--dataset {dataset} has labels up to {int(y.max())} but "
                               f"{m.name} has {m.num_classes} classes: analyse it on the data "
                               "set it was trained for")
        with torch.no_grad():
            out = m.model(x[:1].to(device))
        if out.ndim != 2 or out.shape[1] != m.num_classes:
            raise AnalyzeError(f"{m.name} returns shape {tuple(out.shape)}, not (batch, "
                               f"{m.num_classes}) logits")


def _load_baseline(args: AnalyzeRequest, device: torch.device,
                   first: LoadedModel) -> Optional[NamedModel]:
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


def _prepare(analysis: Analysis, args: AnalyzeRequest) -> Context:
    """Validate every argument and load models and examples, before any analysis work."""
    _check_args(analysis, args)
    out = check_folder(args.output, "--output")
    device = resolve_device(args.device)
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
    ex = load_examples(dataset, data_dir, split=args.split, in_chans=loaded[0].in_chans,
                       img_size=loaded[0].img_size, n_examples=n,
                       batch_size=args.batch_size, workers=args.workers,
                       at_most=args.n_examples is None, eval_transform=loaded[0].eval_transform)
    _check_model_outputs(models + judges + ([baseline] if baseline else []), ex.x, ex.y,
                         dataset, device)
    norm = _norm(analysis, args)
    eps, eps_source = _eps(analysis, args, norm, models[0], ex.x.shape[1:])
    ctx = Context(args=args, dataset=dataset, data_dir=data_dir, models=models, x=ex.x, y=ex.y, indices=ex.indices,
                  class_names=_class_names(ex.classes, models[0].num_classes), eps=eps,
                  norm=norm, eps_source=eps_source, steps=args.steps, device=device, out=out,
                  plt=pyplot(), judges=judges, baseline=baseline)
    if analysis.check is not None:
        analysis.check(ctx)
    return ctx


def _write(analysis: Analysis, ctx: Context, result: Output, seconds: float,
           argv: Sequence[str]) -> Path:
    args = ctx.args
    command = ["python", "-m", "advvit.analyze", *argv]
    report = envelope(ANALYZE_FORMAT, seed=args.seed, command=command,
                      models=[m.record for m in ctx.models])
    data = {"dataset": ctx.dataset, "data_dir": ctx.data_dir, "split": args.split,
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
             f"Data: {ctx.dataset} {args.split}, "
             + (f"{len(ctx.indices)} examples. " if analysis.min_examples is not None else "")
             + (f"Attack: {ctx.norm} eps {eps_text(ctx.eps, ctx.norm)} ({ctx.eps_source}). "
                if ctx.eps is not None else "")
             + f"Seed {args.seed}. Numbers: [{json_path.name}]({json_path.name}).", "",
             *result.lines]
    if ctx.plt is None:
        lines.append(f"No figures: matplotlib is not installed ({INSTALL_HINT}).")
    write_markdown_report(ctx.out / "report.md", title=f"advvit analyze {analysis.name}",
                          lines=lines, tables=result.tables,
                          figures=[(f["caption"], f["file"]) for f in result.figures])
    return json_path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the analysis CLI; returns the exit status (2 for a bad argument)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subs = analyze_parsers()
    request = AnalyzeRequest.from_args(parser.parse_args(argv))
    apply_threads(request.threads)
    analysis = ANALYSES[request.analysis]
    sub = subs[analysis.name]
    try:
        ctx = _prepare(analysis, request)
    except OptionError as err:
        sub.error(str(err))  # exits 2 with the usage line and the message
    if ctx.eps is not None:
        print(f"{analysis.name}: {ctx.norm} eps {eps_text(ctx.eps, ctx.norm)} ({ctx.eps_source})",
              file=sys.stderr)
    random.seed(request.seed)
    np.random.seed(request.seed)
    torch.manual_seed(request.seed)
    started = time.perf_counter()
    ctx.out.mkdir(parents=True, exist_ok=True)
    result = analysis.run(ctx)
    path = _write(analysis, ctx, result, time.perf_counter() - started, argv)
    print(f"report: {path} and {ctx.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
