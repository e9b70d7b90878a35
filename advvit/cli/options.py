"""The options ``advvit.eval`` and ``advvit.analyze`` share, defined once: one name each (a
former name of the other command stays accepted as an alias), the defaults each command had.

Each function adds its options to an argparse group, so every command keeps its own groups and
order; what differs between the commands (a default, what a default means) is an argument.
"""
from __future__ import annotations

import argparse
from typing import Any, Mapping

from .. import config
from ..accel import add_threads_option
from ..analysis.shifts import CORRUPTION_CACHE
from ..attacks import NORMS, check_eps
from ..io import OptionError

__all__ = ["OptionsView", "SPLITS", "add_model_file_options", "model_options", "add_data_options",
           "add_attack_options", "add_corruption_options", "add_run_options", "add_workers_option",
           "parse_eps", "parse_threats", "eval_threats", "EVAL_BATCH_SIZE", "eval_parser"]

SPLITS = ("val", "test", "train")


class OptionsView:
    """Reads a frozen request's ``options`` (the parsed command line, a read-only mapping) as
    attributes, beside its own fields."""

    options: Mapping[str, Any]

    def __getattr__(self, name: str) -> Any:
        if name != "options" and name in self.options:
            return self.options[name]
        raise AttributeError(name)


def add_model_file_options(g: argparse._ActionsContainer, *, model: bool = True) -> None:
    """``--no-ema``, ``--robustbench-dir`` and (``model``) ``--model``: how a model reference
    (advvit.references) is read."""
    g.add_argument("--no-ema", action="store_true", help="use the raw weights even where a "
                   "checkpoint holds EMA weights")
    if model:
        g.add_argument("--model", help="timm architecture of a plain state dict or "
                       ".safetensors file given as the model")
    g.add_argument("--robustbench-dir", metavar="DIR", help="robustbench's model folder, "
                   "holding DATASET/THREAT/NAME.pt (default: robustbench's, ./models)")


def model_options(args: Any, option: str, **given: Any) -> Any:
    """The ``ModelOptions`` of a model reference named by ``option``, from the parsed options."""
    from ..references import ModelOptions
    return ModelOptions(option=option, use_ema=not args.no_ema, model=args.model,
                        dataset=args.dataset, data_dir=args.data_dir,
                        norm=getattr(args, "norm", None),
                        robustbench_dir=args.robustbench_dir, **given)


def add_data_options(g: argparse._ActionsContainer, *, n_examples_help: str) -> None:
    """``--dataset``, ``--data-dir``, ``--split``, ``--n-examples``."""
    g.add_argument("--dataset", help="advvit.data name: fashion_mnist, mnist, cifar10, "
                   "cifar100, imagefolder, or a timm hfds/ tfds/ wds/ name (default: the "
                   "(first) checkpoint's training data set)")
    g.add_argument("--data-dir", help="data root (default: the checkpoint's, else the known "
                   "places)")
    g.add_argument("--split", default="val", choices=SPLITS,
                   help="data split the examples come from")
    g.add_argument("--n-examples", type=int, help=n_examples_help)


def add_attack_options(g: argparse._ActionsContainer, *, eps_default: str | None,
                       eps_help: str, norm_default: str | None, norm_help: str,
                       steps_help: str, norms: tuple[str, ...] = NORMS) -> None:
    """``--eps``, ``--norm``, ``--steps`` (the radius, the norm, the attack's iterations)."""
    g.add_argument("--eps", default=eps_default,
                   help=f"radius: a fraction (0.0157) or x/255{eps_help}")
    g.add_argument("--norm", default=norm_default, choices=norms, help=norm_help)
    g.add_argument("--steps", type=int, help=steps_help)


def add_corruption_options(g: argparse._ActionsContainer, *, severities_default: str | None,
                           ) -> None:
    """``--corruption-severities`` (alias ``--severities``), ``--corruption-cache-dir`` (alias
    ``--cache-dir``) and ``--corruption-workers``; each command adds its own ``--corruptions``
    (the flag of ``advvit.eval``, the list of ``advvit.analyze corruptions``)."""
    g.add_argument("--corruption-severities", "--severities", dest="corruption_severities",
                   default=severities_default, metavar="LIST",
                   help="comma list of severities 1-5, or all (default: all five)")
    g.add_argument("--corruption-cache-dir", "--cache-dir", dest="corruption_cache_dir",
                   metavar="DIR",
                   help=f"where corrupted examples are kept, shared by every run on the same "
                        f"examples (default: {CORRUPTION_CACHE})")
    g.add_argument("--corruption-workers", type=int, metavar="N",
                   help="processes generating corruptions (default: the cores available; 0: "
                        "this process; --workers is the data loader's)")


def add_run_options(g: argparse._ActionsContainer, *, batch_size: int) -> None:
    """``--seed``, ``--batch-size`` (each command's default), ``--device``."""
    g.add_argument("--seed", type=int, default=0, help="seeds every random start and control")
    g.add_argument("--batch-size", type=int, default=batch_size, help="images per batch")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")


def add_workers_option(g: argparse._ActionsContainer) -> None:
    """``--workers`` (the data loader's) and ``--threads`` (torch's, ``accel``'s one rule)."""
    g.add_argument("--workers", type=int, default=0, help="data loader workers")
    add_threads_option(g)


def parse_eps(text: str | float, *, norm: str = "linf", name: str = "--eps") -> float:
    """Read an eps option given as a fraction of the pixel range ("0.0157") or in /255
    ("4/255").

    Raises:
        OptionError: unparsable, negative, or (Linf) above 1, which no [0, 1] image allows.
    """
    try:
        value = config.parse_eps(text, name)
    except config.ConfigError:
        raise OptionError(f"{name} {text!r} is not a number: give e.g. 4/255 or 0.0157") from None
    try:
        return check_eps(value, norm, name=name)
    except ValueError as err:
        raise OptionError(str(err)) from None


def parse_threats(text: str) -> tuple[tuple[str, str, float], ...]:
    """Read ``--threats``, a comma list of NORM:EPS (``linf:4/255,l2:2,l1:75``) ->
    ``(label, norm, eps)`` per threat, in order.

    Raises:
        OptionError: an item that is not NORM:EPS, an unknown norm, an eps the norm does not
            allow, or a threat named twice.
    """
    example = "e.g. --threats linf:4/255,l2:2,l1:75"
    threats = []
    for item in (i.strip() for i in text.split(",")):
        norm, sep, eps = (p.strip() for p in item.partition(":"))
        if not sep or not norm or not eps:
            raise OptionError(f"--threats {text!r}: {item!r} is not NORM:EPS ({example})")
        if norm.lower() not in NORMS:
            raise OptionError(f"--threats: {norm!r} is not a norm: use {', '.join(NORMS)} "
                              f"({example})")
        norm = norm.lower()
        threats.append((f"{norm}:{eps}", norm, parse_eps(eps, norm=norm, name="--threats")))
    if len({t[1:] for t in threats}) != len(threats):
        raise OptionError(f"--threats {text!r} names a threat twice")
    return tuple(threats)


def eval_threats(args: argparse.Namespace) -> tuple[tuple[str, str, float], ...]:
    """eval's evaluations, ``(label, norm, eps)`` each: the --threats, the --eps-sweep, or
    --norm/--eps.

    Raises:
        OptionError: --threats with an option of one norm's, or a sweep of fewer than two eps.
    """
    if args.threats:
        if args.eps_sweep:
            raise OptionError("--threats and --eps-sweep do not go together: sweep one norm "
                              "(--norm, --eps-sweep) or list the threats")
        if args.step_size is not None:
            raise OptionError("--step-size is one norm's: drop it with --threats (PGD then "
                              "steps 1.5 * eps / steps in each threat)")
        if args.save_adv:
            raise OptionError("--save-adv keeps one threat's examples: run that threat alone "
                              "(--norm, --eps) to save them, or drop --save-adv")
        return parse_threats(args.threats)
    if not args.eps_sweep:
        eps = parse_eps(args.eps, norm=args.norm)
        return ((f"{args.norm}:{args.eps}", args.norm, eps),)
    eps_list = tuple(parse_eps(e, norm=args.norm, name="--eps-sweep")
                     for e in args.eps_sweep.split(",") if e.strip())
    if len(eps_list) < 2 or len(set(eps_list)) != len(eps_list):
        raise OptionError("--eps-sweep needs two or more different eps, e.g. 0,2/255,4/255")
    return tuple((f"{args.norm}:{e:.6g}", args.norm, e) for e in eps_list)


EVAL_BATCH_SIZE = 250
"""``advvit.eval --batch-size``'s default: AutoAttack's batch size, so results match its own
runs (``advvit.analyze``'s is 64)."""
EVAL_DESCRIPTION = "The evaluation CLI: ``python -m advvit.eval`` (also ``advvit-eval``)."


def eval_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m advvit.eval``."""
    p = argparse.ArgumentParser(prog="advvit-eval", description=EVAL_DESCRIPTION,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--checkpoint", help="the model: an advvit checkpoint (.pth), a timm "
                   "train.py checkpoint, a state dict with --model, timm:NAME, "
                   "hf-hub:ORG/NAME[@REV], local-dir:PATH or robustbench:[DATASET/THREAT/]NAME; "
                   "architecture, classes, input size and normalization come from it")
    m.add_argument("--weights", help="weights file for --model (.safetensors or a torch state "
                   "dict; the same as --checkpoint FILE --model NAME)")
    m.add_argument("--num-classes", type=int, help="--model only (default: the data set's)")
    m.add_argument("--img-size", type=int, help="--model only (default: the data set's)")
    m.add_argument("--in-chans", type=int, help="--model only (default: the data set's)")
    m.add_argument("--mean", help="--model only: normalization inside the model, e.g. 0.485,0.456,0.406")
    m.add_argument("--std", help="--model only: e.g. 0.229,0.224,0.225")
    add_model_file_options(m)
    d = p.add_argument_group("data")
    add_data_options(d, n_examples_help="how many examples (default: all)")
    d.add_argument("--sample", default="first", choices=("first", "random"))
    d.add_argument("--ids-file", help="one integer index or relative image path per line "
                   "(RobustBench's ImageNet subset format)")
    a = p.add_argument_group("attack")
    a.add_argument("--attack", default="autoattack",
                   help="autoattack | autoattack-plus | autoattack-rand (randomized models: "
                        "EOT) | apgd-ce | apgd-t | fab-t | square | "
                        "a comma list of AutoAttack attacks | pgd | fgsm")
    add_attack_options(a, eps_default="4/255", eps_help="", norm_default="linf", norm_help="",
                       steps_help="iterations (APGD/FAB/PGD) or queries (Square)")
    a.add_argument("--eps-sweep", help="comma list of eps (e.g. 0,1/255,2/255,4/255): robust "
                   "accuracy over eps, with a plot (eps 0 is not attacked: its robust accuracy "
                   "is the clean accuracy)")
    a.add_argument("--threats", metavar="NORM:EPS,...", help="several threat models in one "
                   "report, e.g. linf:4/255,l2:2,l1:75 (instead of --norm/--eps): a row per "
                   "threat and the union (robust only if robust under every threat)")
    a.add_argument("--restarts", type=int, help="restarts (apgd-ce alone defaults to 5)")
    a.add_argument("--step-size", help="PGD/FGSM step size (fraction or x/255)")
    a.add_argument("--backend", default="auto", choices=("auto", "pyautoattack", "autoattack"),
                   help="AutoAttack package")
    a.add_argument("--amp", choices=("bf16", "fp16"), help="attack under autocast at this "
                   "precision; every break is re-checked by the fp32 model (fp16: CUDA only)")
    a.add_argument("--compile", action="store_true", help="compile the model once with "
                   "torch.compile; the attacks and the fp32 check call it, and the report "
                   "records the compiles, graph breaks and recompiles")
    c = p.add_argument_group("common corruptions (ImageNet-C, on the same examples)")
    c.add_argument("--corruptions", nargs="?", const="all", metavar="NAMES|all",
                   help="also the accuracy under common corruptions: all 15 (the flag alone, or "
                        "all) or a comma list (gaussian_noise,fog,...); per corruption and "
                        "severity, and their mean, in the table and the JSON")
    add_corruption_options(c, severities_default=None)
    r = p.add_argument_group("run")
    add_run_options(r, batch_size=EVAL_BATCH_SIZE)
    r.add_argument("--state-path", help="AutoAttack state file: an interrupted run resumes from "
                   "it (the same model weights, examples and attack only; one run at a time)")
    r.add_argument("--output", help="JSON report path (missing folders are created)")
    r.add_argument("--save-adv", help="save adversarial examples (.pt) here")
    r.add_argument("--save-adv-format", default="advvit", choices=("advvit", "robustbench"),
                   help="advvit: a dict with labels, indices and outcomes; robustbench: x_adv "
                        "alone in the test set's order, as RobustBench's external evaluations "
                        "take it")
    r.add_argument("--robustbench-entry", metavar="FILE.json",
                   help="also write a RobustBench model_info entry (RobustBench's protocol "
                        "only: standard AutoAttack at its eps on its examples, no warning)")
    r.add_argument("--per-example", action="store_true",
                   help="record each example's outcome in the JSON")
    r.add_argument("--check-only", action="store_true",
                   help="check the options, the model and the examples on this machine's CPU, "
                        "then exit 0 without attacking (what python -m advvit.launch eval runs "
                        "before it submits)")
    add_workers_option(r)
    return p
