"""The evaluation CLI: ``python -m advvit.eval`` (also ``advvit-eval``).

checkpoint (or timm name + weights) -> examples -> attack(s) -> report: a console table and a
JSON file with clean and robust accuracy, per-attack numbers and times, n, eps, norm, seed,
versions, the model file's sha256, and the sanity-check flags (numbers they concern are marked).
This module parses the arguments into one :class:`EvalRequest`, loads model and data through
the library (:mod:`advvit.checkpoint`, :mod:`advvit.data`), runs the attacks through
:mod:`advvit.suites` and writes the report through :mod:`advvit.report`.

Examples::

    python -m advvit.eval --checkpoint run/best.pth --dataset cifar10 --data-dir /data \\
        --attack autoattack --eps 8/255 --n-examples 1000 --output aa.json
    python -m advvit.eval --checkpoint best.pth --dataset imagefolder --data-dir /imagenet \\
        --ids-file imagenet_test_image_ids.txt --attack apgd-ce --eps 4/255   # 5 x 100 APGD-CE
    torchrun --nproc-per-node 4 -m advvit.eval ... --attack autoattack    # one shard per rank
    python -m advvit.eval --checkpoint best.pth --eps 0.1 --corruptions fog,contrast \\
        --corruption-severities 1,3,5   # + ImageNet-C accuracy on the same examples
    python -m advvit.eval --checkpoint best.pth --attack autoattack \\
        --threats linf:4/255,l2:2,l1:75 --amp bf16   # a row per threat, their union; fp32-checked
    python -m advvit.eval --checkpoint best.pth --attack apgd-ce --compile   # torch.compile'd

Everything is loaded and every argument validated before the first attack runs; a bad argument
is one error line naming it and the fix (exit status 2).
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from . import accel, checks
from .accel import check_amp, resolve_device
from .attack_names import AttackSpec, parse_attack
from .attacks import check_eps
from .autoattack_adapter import available_backends
from .checkpoint import LoadedModel
from .cli.options import OptionsView, eval_parser, eval_threats, model_options, parse_eps
from .compiled import DynamoCounters, check_compile, compile_model
from .data import load_examples, read_ids_file
from .io import OptionError, atomic_write_json, check_file_target
from .leaderboard import model_info_entry, protocol_problems, save_adversarial
from .plots import save_sweep_plot
from .references import check_classes, check_input_size, resolve_model
from .report import (EVAL_FORMAT, build_report, envelope, print_corruption_table, print_table,
                     save_tensors, write_report)
from .robustness import EnsembleResult, StateMismatchError, merge_outcomes
from .suites import run_attack

__all__ = ["EvalError", "EvalRequest", "build_parser", "check", "main"]

EvalError = OptionError
"""A bad argument or input; the message names it and the fix."""
build_parser = eval_parser


def _floats(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise OptionError(f"{name} {text!r} must be comma-separated numbers") from None


def _corruption_args(args: Any) -> Any:
    """``--corruptions`` and its options, validated (None without ``--corruptions``)."""
    from .analysis.shifts import corruption_settings
    if args.corruptions is None:
        given = [o for o, v in (("--corruption-severities", args.corruption_severities),
                                ("--corruption-cache-dir", args.corruption_cache_dir),
                                ("--corruption-workers", args.corruption_workers))
                 if v is not None]
        if given:
            raise OptionError(f"{', '.join(given)} go with --corruptions: add --corruptions "
                              "(all, or a comma list) or drop them")
        return None
    return corruption_settings(args.corruptions, args.corruption_severities,
                               cache_dir=args.corruption_cache_dir,
                               workers=args.corruption_workers, seed=args.seed,
                               options=("--corruptions", "--corruption-severities",
                                        "--corruption-cache-dir", "--corruption-workers"))


@dataclass(frozen=True)
class EvalRequest(OptionsView):
    """What ``advvit.eval`` was asked to do, validated, built once and never changed: the
    parsed options (read as attributes) and what they mean.

    Attributes:
        options: the parsed command line.
        spec: the attack; threats: (label, norm, eps) per evaluation, in order (one, an eps
            sweep's, or ``--threats``'); device: where to run.
        ids: the ids file's ids, or None; corruptions: the corruption settings, or None.
    """

    options: Mapping[str, Any]
    spec: AttackSpec
    threats: tuple[tuple[str, str, float], ...]
    device: torch.device
    ids: tuple[str, ...] | None
    corruptions: Any

    @property
    def threats_given(self) -> bool:
        """``--threats`` was given: each evaluation is a row of its own norm, and the report
        has their union."""
        return bool(self.options["threats"])

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "EvalRequest":
        """Check every argument that needs nothing loaded.

        Raises:
            OptionError: naming the option and the fix.
        """
        if bool(args.checkpoint) == bool(args.weights):
            raise OptionError("give either --checkpoint REFERENCE (a path, timm:NAME, "
                              "hf-hub:ORG/NAME, local-dir:PATH, robustbench:NAME) or --model "
                              "NAME --weights FILE")
        if args.weights and not args.model:
            raise OptionError("--weights FILE needs --model NAME (the timm architecture)")
        if not args.model and any(getattr(args, k) is not None for k in
                                  ("num_classes", "img_size", "in_chans", "mean", "std")):
            raise OptionError("--num-classes/--img-size/--in-chans/--mean/--std go with "
                              "--model: a checkpoint records them itself")
        if args.batch_size < 1:
            raise OptionError(f"--batch-size must be >= 1, got {args.batch_size}")
        threats = eval_threats(args)
        step_size = parse_eps(args.step_size, norm=args.norm, name="--step-size") \
            if args.step_size is not None else None
        spec = parse_attack(args.attack, steps=args.steps, restarts=args.restarts,
                            step_size=step_size)
        if args.state_path and spec.kind != "autoattack":
            raise OptionError(f"--state-path resumes AutoAttack runs; --attack {spec.name} is "
                              "short enough to rerun: drop --state-path")
        if spec.kind == "autoattack" and not available_backends():
            raise OptionError("no AutoAttack package installed: pip install pyautoattack")
        device = resolve_device(args.device)
        check_amp(args.amp, device)
        if args.compile:
            check_compile(device)
        ids = tuple(read_ids_file(args.ids_file)) if args.ids_file else None
        if ids is not None and args.sample != "first":
            raise OptionError("--sample random picks examples itself: drop it or --ids-file")
        if args.save_adv_format == "robustbench" and accel.torchrun_rank()[1] > 1:
            raise OptionError("--save-adv-format robustbench writes one tensor of every example: "
                              "run one process (no torchrun)")
        for option, target in (("--output", args.output), ("--save-adv", args.save_adv),
                               ("--state-path", args.state_path),
                               ("--robustbench-entry", args.robustbench_entry)):
            check_file_target(target, option)
        return cls(MappingProxyType(dict(vars(args))), spec, threats, device, ids,
                   _corruption_args(args))


@dataclass(frozen=True)
class _Prepared:
    """The loaded model and examples, and the data set they came from."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    indices: list[int]
    num_classes: int
    dataset: str
    data_dir: str | None
    meta: dict[str, Any]


def _load_model(req: EvalRequest) -> tuple[LoadedModel, str, str | None]:
    """The model (eval mode, on the CPU) -> (it, the data set, its root): a model that records
    its training data gives them where they were not given."""
    mean, std = _floats(req.mean, "--mean"), _floats(req.std, "--std")
    if (mean is None) != (std is None):
        raise OptionError("--mean and --std go together")
    loaded = resolve_model(req.checkpoint or req.weights, model_options(
        req, "--checkpoint" if req.checkpoint else "--weights", num_classes=req.num_classes,
        in_chans=req.in_chans, img_size=req.img_size,
        normalize=(mean, std) if mean is not None else None))
    dataset, data_dir = req.dataset, req.data_dir
    if dataset is None:
        dataset = loaded.trained_on.get("dataset")
        data_dir = data_dir or loaded.trained_on.get("data_dir")
    if dataset is None:
        raise OptionError("--dataset: the model does not record its data set; name one")
    return loaded, dataset, data_dir


def _prepare(req: EvalRequest) -> _Prepared:
    """Load the model and examples and check they fit, before any attack runs."""
    loaded, dataset, data_dir = _load_model(req)
    model = loaded.model.to(req.device)
    ex = load_examples(dataset, data_dir, split=req.split, in_chans=loaded.in_chans,
                       img_size=loaded.img_size, n_examples=req.n_examples, sample=req.sample,
                       seed=req.seed, ids=req.ids, batch_size=req.batch_size,
                       workers=req.workers, eval_transform=loaded.eval_transform)
    x, y = ex.x, ex.y
    name = "--threats" if req.threats_given else "--eps-sweep" if req.eps_sweep else "--eps"
    for _, norm, eps in req.threats:  # the L2 and L1 bounds depend on the input size
        try:
            check_eps(eps, norm, input_shape=tuple(x.shape[1:]), name=name)
        except ValueError as err:
            raise OptionError(str(err)) from None
    num_classes = loaded.num_classes
    where = f"the model ({loaded.record.get('reference')})"
    check_classes(num_classes, dataset, where)
    check_input_size(model, tuple(x.shape[-2:]), where)
    if int(y.max()) >= num_classes:
        raise OptionError(f"--dataset {dataset} has labels up to {int(y.max())} but the model "
                          f"has {num_classes} classes: evaluate on the data set it was trained for")
    with torch.no_grad():
        out = model(x[:1].to(req.device))
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise OptionError(f"the model returns shape {tuple(out.shape)}, not (batch, "
                          f"{num_classes}) logits")
    meta = {"model": loaded.record,
            "data": {"dataset": dataset, "data_dir": data_dir, "split": req.split,
                     "sample": "ids-file" if req.ids is not None else req.sample,
                     "ids_file": req.ids_file, "n_examples": len(ex.indices),
                     "input_shape": list(x.shape[1:])}}
    if req.robustbench_entry:
        planned = {"data": meta["data"],
                   "attack": {"name": req.spec.name, "norm": req.threats[0][1]},
                   "eps": req.threats[0][2], "results": [eps for _, _, eps in req.threats]}
        problems = protocol_problems(planned)
        if problems:
            raise OptionError("--robustbench-entry: refused, the run is not RobustBench's "
                              f"protocol: {'; '.join(problems)}")
    return _Prepared(model, x, y, ex.indices, num_classes, dataset, data_dir, meta)


def check(args: argparse.Namespace) -> None:
    """eval's own checks of a command line that will run on other machines (a cluster's
    nodes): every option, the model reference, the data set and its examples, as :func:`main`
    checks them before any attack, here on the CPU. What only those machines can tell (CUDA
    for ``--device cuda`` or ``--amp fp16``, a compiler for ``--compile``) is theirs to check.

    Args:
        args: the parsed command line (:func:`build_parser`).

    Raises:
        OptionError: naming the option and the fix.
    """
    here = argparse.Namespace(**{**vars(args), "device": "cpu", "compile": False,
                                 "amp": None if args.amp == "fp16" else args.amp})
    _prepare(EvalRequest.from_args(here))


def _state_path(req: EvalRequest, norm: str, eps: float, rank: int, world: int) -> str | None:
    if not req.state_path:
        return None
    state = req.state_path
    if req.threats_given:
        state += f".{norm}"
    if len(req.threats) > 1:
        state += f".eps{eps:.6g}"
    if world > 1:
        state += f".rank{rank}of{world}"
    return state


def _gather(outcomes: dict[Any, EnsembleResult], model_flags: list[checks.Flag], world: int
            ) -> tuple[dict[Any, EnsembleResult], list[checks.Flag]]:
    """Every rank's shard results and flags, merged (on every rank)."""
    merged: dict[Any, EnsembleResult] = {}
    for eps, out in outcomes.items():
        out.x_adv = None  # adversarial examples stay in each rank's own file
        merged[eps] = merge_outcomes(accel.all_gather_objects(out, world))
    gathered = accel.all_gather_objects(model_flags, world)
    return merged, list(dict.fromkeys(f for fl in gathered for f in fl))


def _corruption_entry(prep: _Prepared, req: EvalRequest) -> dict[str, Any]:
    """The corruption results of the report (rank 0 alone, on every example: the corrupted
    sets come from one cache)."""
    from .analysis.shifts import run_corruptions
    started = time.perf_counter()
    result = run_corruptions(prep.model, prep.x, prep.y, req.corruptions, seed=req.seed,
                             dataset=f"{prep.dataset}/{req.split}", batch_size=req.batch_size)
    return {**result.to_dict(), "cache_dir": str(req.corruptions.cache_dir),
            "workers": req.corruptions.workers,
            "seconds": round(time.perf_counter() - started, 3)}


def _write_outputs(report: dict[str, Any], req: EvalRequest, n_eps: int) -> None:
    out_path = Path(req.output)
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
    accel.apply_threads(args.threads)
    if args.check_only:
        try:
            check(args)
        except OptionError as err:
            parser.error(str(err))
        print("the options, the model and the examples are valid (nothing was attacked)")
        return 0
    try:
        req = EvalRequest.from_args(args)
        prep = _prepare(req)
    except OptionError as err:
        parser.error(str(err))  # exits 2 with the usage line and the message
    rank, world = accel.torchrun_rank()
    device, rt = req.device, None
    if world > 1:
        rt = accel.setup("cuda" if device.type == "cuda" else "cpu")
        rank, world = rt.rank, rt.world_size
        if rt.device.type == "cuda":
            prep.model.to(rt.device)
            device = rt.device
    random.seed(req.seed)
    np.random.seed(req.seed)
    torch.manual_seed(req.seed)

    # Each rank takes every world-th example: shards stay balanced whatever the order.
    positions = list(range(rank, len(prep.y), world))
    xs, ys = prep.x[positions], prep.y[positions]
    model_flags = checks.run_model_checks(prep.model, xs[:req.batch_size].to(device),
                                          ys[:req.batch_size].to(device))
    for f in model_flags:
        print(f"WARNING {f}", file=sys.stderr)
    # Compiled after the model checks (they switch train/eval modes, each a graph of its own);
    # this one module serves every batch, attack and threat.
    attacked = compile_model(prep.model) if req.compile else prep.model
    counters = DynamoCounters.now()
    started = time.perf_counter()
    # Keyed by eps for one norm (the report's eps sweep), by threat for --threats.
    outcomes: dict[Any, EnsembleResult] = {}
    for label, norm, eps in req.threats:
        try:
            out = run_attack(attacked, xs, ys, req.spec, eps=eps, norm=norm,
                             seed=req.seed, batch_size=req.batch_size, device=device,
                             state_path=_state_path(req, norm, eps, rank, world),
                             keep_adv=bool(req.save_adv) and not outcomes,
                             num_classes=prep.num_classes, backend=req.backend, amp=req.amp)
        except StateMismatchError as err:  # raised before this eps is attacked
            if not outcomes:
                parser.error(f"--state-path: {err}")
            done = ", ".join(outcomes) if req.threats_given else \
                "eps " + ", ".join(f"{e:.6g}" for e in outcomes)
            print(f"error: --state-path: {err}. The evaluations at {done} are complete in "
                  "their state files: a rerun resumes them", file=sys.stderr)
            return 1
        out.positions = positions
        outcomes[label if req.threats_given else eps] = out
    if req.save_adv and req.save_adv_format == "robustbench":
        save_adversarial(next(iter(outcomes.values())).x_adv, prep.indices, req.save_adv)
    elif req.save_adv:
        first = next(iter(outcomes.values()))
        save_tensors({"x_adv": first.x_adv, "y": ys, "robust": first.robust,
                      "indices": [prep.indices[k] for k in positions],
                      "eps": first.eps, "norm": req.norm},
                     req.save_adv if world == 1 else f"{req.save_adv}.rank{rank}of{world}")
    if world > 1:
        outcomes, model_flags = _gather(outcomes, model_flags, world)
        accel.cleanup(rt)
    if rank != 0:
        return 0
    corruptions = _corruption_entry(prep, req) if req.corruptions is not None else None
    first = next(iter(outcomes.values()))
    command = ["python", "-m", "advvit.eval", *(argv if argv is not None else sys.argv[1:])]
    meta = envelope(EVAL_FORMAT, seed=req.seed, model=prep.meta["model"], command=command,
                    autoattack=f"{first.backend} {first.backend_version}".strip())
    meta.update({"data": prep.meta["data"], "device": str(device), "world_size": world,
                 "seconds_total": round(time.perf_counter() - started, 3)})
    if req.compile:  # this rank's compiles: their time is in seconds_total
        meta["compile"] = DynamoCounters.now().since(counters)
    norm = ",".join(dict.fromkeys(n for _, n, _ in req.threats))
    report = build_report(outcomes, spec=req.spec, norm=norm, seed=req.seed,
                          model_flags=model_flags, meta=meta, indices=prep.indices,
                          labels=prep.y, per_example=req.per_example,
                          threats=req.threats_given)
    if corruptions is not None:
        report["corruptions"] = corruptions
    print_table(report)
    print_corruption_table(report)
    if req.output:
        _write_outputs(report, req, len(outcomes))
    return _write_entry(report, req.robustbench_entry) if req.robustbench_entry else 0


def _write_entry(report: dict[str, Any], path: str) -> int:
    """The RobustBench entry, unless the finished run showed what the plan could not (a
    sanity-check warning): then 1, with the reason."""
    problems = protocol_problems(report)
    if problems:
        print(f"error: --robustbench-entry: not written: {'; '.join(problems)}", file=sys.stderr)
        return 1
    entry, empty = model_info_entry(report)
    atomic_write_json(Path(path), entry, indent=2)
    print(f"RobustBench entry: {path}; fill in {', '.join(empty)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
