"""Experiment specifications: one YAML file per claim under ``configs/findings/``.

An experiment names the claim it re-tests, the training settings it compares (overrides of one
training config), the seeds, the evaluations and analyses it measures, and the tests that turn
the measurements into a verdict. ``configs/findings/defaults.yaml`` holds what every experiment
shares (the training config, common overrides, seeds, the named evaluations); an experiment's
own keys win.

A metric reference reads ``SOURCE.METRIC@SETTING``: SOURCE is an evaluation or analysis name of
the experiment, METRIC what it measured (``clean``, ``robust`` for an evaluation; the analysis
extractor's names otherwise), SETTING the trained setting it was measured on. Its samples are
the values over the seeds.

Every problem is one :class:`FindingsError` naming the file, the key and the fix, raised before
any run starts.
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

__all__ = ["FindingsError", "EvalSpec", "AnalysisSpec", "SettingSpec", "TestSpec", "Experiment",
           "MetricRef", "load_experiment", "load_experiments", "parse_ref", "DEFAULTS_NAME",
           "add_suite_options", "run_env"]

DEFAULTS_NAME = "defaults.yaml"
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_REF = re.compile(r"^(?P<source>[A-Za-z0-9_-]+)\.(?P<metric>[A-Za-z0-9_-]+)@(?P<setting>[A-Za-z0-9_-]+)$")
TEST_KINDS = ("greater", "below", "close")


class FindingsError(ValueError):
    """A bad experiment file: names the file and key, what is wrong and how to fix it."""

    def __init__(self, where: str, key: str, problem: str, fix: str = "") -> None:
        message = f"{where}: key '{key}': {problem}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)


@dataclass(frozen=True)
class EvalSpec:
    """One ``advvit.eval`` measurement of every trained run.

    Attributes:
        name: how metric references call it (``apgd``).
        args: the evaluation's options after ``--checkpoint`` (attack, eps, examples, ...).
        minutes: the planning estimate for one run's evaluation.
        checkpoint: ``best`` (the run's best.pth, selected by held-out PGD) or ``last`` (its
            last.pth: where training ended). The selection is early stopping, and hides a
            collapse late in training: a claim about the end of training reads ``last``.
    """
    name: str
    args: Tuple[str, ...]
    minutes: float
    checkpoint: str = "best"


@dataclass(frozen=True)
class AnalysisSpec:
    """One ``advvit.analyze`` measurement.

    Attributes:
        name: how metric references call it.
        command: the analyze sub-command (``jacobian``, ``lesions``, ``transfer``, ...).
        args: its options after the checkpoints.
        per: ``run`` (one analysis per trained run), ``seed`` (one per seed over the listed
            settings' checkpoints together) or ``all`` (one over every seed's checkpoints: the
            transfer between seeds of one architecture is the control of the transfer between
            architectures).
        settings: the settings it runs on (empty: all).
        minutes: the planning estimate for one analysis.
        judges: settings whose checkpoints (of the same seed) are passed as ``--judge``
            (the semantic analysis's standardly trained judges).
    """
    name: str
    command: str
    args: Tuple[str, ...]
    per: str
    settings: Tuple[str, ...]
    minutes: float
    judges: Tuple[str, ...] = ()


@dataclass(frozen=True)
class SettingSpec:
    """One trained setting: overrides of the training config, and its planning estimate.

    ``evals``: the evaluations run on it (None: the experiment's ``use_evals``); a clean-trained
    model needs only its clean accuracy, a judge of the semantic analysis none.
    """
    name: str
    train: Mapping[str, Any]
    minutes: float
    finetune_from: Optional[str] = None
    evals: Optional[Tuple[str, ...]] = None


@dataclass(frozen=True)
class MetricRef:
    """``SOURCE.METRIC@SETTING``."""
    source: str
    metric: str
    setting: str

    def __str__(self) -> str:
        return f"{self.source}.{self.metric}@{self.setting}"


@dataclass(frozen=True)
class TestSpec:
    """One test of the claim.

    ``greater``: ``higher`` is above ``lower`` by more than the noise. ``below``: ``value`` is
    under ``threshold``. ``close``: ``higher`` and ``lower`` differ by less than ``threshold``.
    ``min_effect`` (``greater`` only; 0 for the others, whose threshold is the claim) is the
    smallest difference worth the claim: a measured difference whose upper bound is below it
    says the claim does not hold here.
    """
    name: str
    kind: str
    higher: Optional[MetricRef] = None
    lower: Optional[MetricRef] = None
    value: Optional[MetricRef] = None
    threshold: Optional[float] = None
    min_effect: float = 0.01
    note: str = ""

    def refs(self) -> List[MetricRef]:
        return [r for r in (self.higher, self.lower, self.value) if r is not None]


@dataclass(frozen=True)
class Experiment:
    """One claim's experiment, resolved against the defaults.

    The design is fixed before running: ``seeds``, ``tests`` (with their margins) and
    ``alpha``, the tests' two-sided level. ``added_seeds``: seeds run after the first ones'
    results were seen, which the record and docs/findings.md name as such.
    ``premise``: the tests that establish the situation the claim is about (a collapse the
    claim's remedy is to avoid); unless each holds, the claim is "cannot tell: premise not
    reached" whatever its other tests say. ``premise_not_reached``: the same said in words, for
    a record measured before its premise was a test.
    """
    id: str
    path: str
    claim: int
    title: str
    paper: str
    setting: str
    train_config: str
    common: Mapping[str, Any]
    seeds: Tuple[int, ...]
    settings: Tuple[SettingSpec, ...]
    evals: Tuple[EvalSpec, ...]
    use_evals: Tuple[str, ...]
    analyses: Tuple[AnalysisSpec, ...]
    tests: Tuple[TestSpec, ...]
    waits_for: str = ""
    notes: str = ""
    prepare: Tuple[str, ...] = ()
    prepare_creates: str = ""
    alpha: float = 0.05
    added_seeds: Tuple[int, ...] = ()
    premise_not_reached: str = ""
    premise: Tuple[str, ...] = ()

    def evals_of(self, setting: str) -> Tuple[str, ...]:
        """The names of the evaluations run on ``setting``."""
        chosen = self.setting_spec(setting).evals
        return tuple(e.name for e in self.evals
                     if (e.name in self.use_evals if chosen is None else e.name in chosen))

    def setting_spec(self, name: str) -> SettingSpec:
        return next(s for s in self.settings if s.name == name)

    def analysis(self, name: str) -> AnalysisSpec:
        return next(a for a in self.analyses if a.name == name)


def parse_ref(text: Any, where: str, key: str) -> MetricRef:
    """Parse ``SOURCE.METRIC@SETTING``."""
    m = _REF.match(str(text)) if isinstance(text, str) else None
    if m is None:
        raise FindingsError(where, key, f"{text!r} is not a metric reference",
                            "write SOURCE.METRIC@SETTING, e.g. apgd.robust@warmup")
    return MetricRef(m["source"], m["metric"], m["setting"])


def _read(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FindingsError(path, "file", "no such file", "see configs/findings/ for the experiments")
    with open(path) as fh:
        try:
            raw = yaml.safe_load(fh) or {}
        except yaml.YAMLError as err:
            raise FindingsError(path, "file", f"not valid yaml: {err}") from None
    if not isinstance(raw, dict):
        raise FindingsError(path, "file", "must hold a mapping")
    return raw


def _known(raw: Mapping[str, Any], known: Sequence[str], where: str, key: str) -> None:
    for k in raw:
        if k not in known:
            import difflib
            near = difflib.get_close_matches(str(k), known, n=1)
            raise FindingsError(where, f"{key}{k}", "unknown key",
                                f"did you mean '{near[0]}'?" if near else f"known: {', '.join(known)}")


def _mapping(value: Any, where: str, key: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FindingsError(where, key, f"must be a mapping, not {type(value).__name__}")
    return value


def _name(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise FindingsError(where, key, f"{value!r} is not a name", "use letters, digits, _ and -")
    return value


def _minutes(value: Any, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise FindingsError(where, key, f"{value!r} is not a positive number of minutes")
    return float(value)


def _args(value: Any, where: str, key: str) -> Tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise FindingsError(where, key, "must be a list of command-line words")
    return tuple(str(v) for v in value)


_EVAL_KEYS = ("args", "minutes", "checkpoint")
EVAL_CHECKPOINTS = ("best", "last")


def _evals(raw: Mapping[str, Any], where: str) -> Dict[str, EvalSpec]:
    out = {}
    for name, spec in _mapping(raw, where, "evals").items():
        key = f"evals.{name}"
        spec = _mapping(spec, where, key)
        _known(spec, _EVAL_KEYS, where, key + ".")
        checkpoint = spec.get("checkpoint", "best")
        if checkpoint not in EVAL_CHECKPOINTS:
            raise FindingsError(where, key + ".checkpoint", f"{checkpoint!r} is not a checkpoint",
                                "best (the run's best.pth) or last (its last.pth)")
        out[name] = EvalSpec(_name(name, where, key), _args(spec.get("args"), where, key + ".args"),
                             _minutes(spec.get("minutes", 2), where, key + ".minutes"),
                             checkpoint)
    return out


_ANALYSIS_KEYS = ("command", "args", "per", "settings", "minutes", "judges")


def _analyses(raw: Any, where: str, settings: Sequence[str]) -> Tuple[AnalysisSpec, ...]:
    out = []
    for name, spec in _mapping(raw, where, "analyses").items():
        key = f"analyses.{name}"
        spec = _mapping(spec, where, key)
        _known(spec, _ANALYSIS_KEYS, where, key + ".")
        from .extract import EXTRACTORS
        command = spec.get("command", name)
        if command not in EXTRACTORS:
            raise FindingsError(where, key + ".command", f"no metric extractor for {command!r}",
                                f"one of {', '.join(sorted(EXTRACTORS))}")
        per = spec.get("per", "run")
        if per not in ("run", "seed", "all"):
            raise FindingsError(where, key + ".per", f"{per!r}", "run, seed or all")
        if per == "all" and spec.get("judges"):
            raise FindingsError(where, key + ".judges", "judges are per seed", "use per: seed")
        used = tuple(spec.get("settings") or ())
        judges = tuple(spec.get("judges") or ())
        for k, names in (("settings", used), ("judges", judges)):
            for s in names:
                if s not in settings:
                    raise FindingsError(where, f"{key}.{k}", f"no setting {s!r}",
                                        f"settings are {', '.join(settings)}")
        out.append(AnalysisSpec(_name(name, where, key), command,
                                _args(spec.get("args"), where, key + ".args"), per, used,
                                _minutes(spec.get("minutes", 2), where, key + ".minutes"), judges))
    return tuple(out)


_SETTING_KEYS = ("train", "minutes", "finetune_from", "evals")


def _settings(raw: Any, where: str, default_minutes: float) -> Tuple[SettingSpec, ...]:
    raw = _mapping(raw, where, "settings")
    if not raw:
        raise FindingsError(where, "settings", "no settings", "name at least one setting to train")
    out = []
    for name, spec in raw.items():
        key = f"settings.{name}"
        spec = _mapping(spec, where, key)
        _known(spec, _SETTING_KEYS, where, key + ".")
        train = _mapping(spec.get("train"), where, key + ".train")
        for banned in ("output", "experiment", "seed", "resume", "finetune"):
            if banned in train:
                raise FindingsError(where, f"{key}.train.{banned}", "is set by the runner",
                                    "use finetune_from: SETTING for fine-tuning" if banned == "finetune"
                                    else "remove it")
        evals = spec.get("evals")
        if evals is not None and not isinstance(evals, list):
            raise FindingsError(where, key + ".evals", "must be a list of evaluation names")
        out.append(SettingSpec(_name(name, where, key), train,
                               _minutes(spec.get("minutes", default_minutes), where, key + ".minutes"),
                               spec.get("finetune_from"),
                               None if evals is None else tuple(str(e) for e in evals)))
    names = [s.name for s in out]
    for s in out:
        if s.finetune_from is not None and s.finetune_from not in names:
            raise FindingsError(where, f"settings.{s.name}.finetune_from",
                                f"no setting {s.finetune_from!r}", f"settings are {', '.join(names)}")
    by_name = {s.name: s for s in out}
    for s in out:
        # One level: a setting fine-tunes from one trained from scratch (the runner trains
        # the sources first), never from itself or from another fine-tuned setting.
        if s.finetune_from is not None and by_name[s.finetune_from].finetune_from is not None:
            raise FindingsError(where, f"settings.{s.name}.finetune_from",
                                f"{s.finetune_from!r} is itself fine-tuned",
                                "fine-tune from a setting trained from scratch")
    return tuple(out)


_TEST_KEYS = ("name", "kind", "higher", "lower", "value", "threshold", "min_effect", "note")


def _tests(raw: Any, where: str, default_min_effect: float) -> Tuple[TestSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise FindingsError(where, "tests", "must be a non-empty list", "say what would show the claim")
    out = []
    for i, spec in enumerate(raw):
        key = f"tests[{i}]"
        spec = _mapping(spec, where, key)
        _known(spec, _TEST_KEYS, where, key + ".")
        kind = spec.get("kind", "greater")
        if kind not in TEST_KINDS:
            raise FindingsError(where, key + ".kind", f"{kind!r}", f"one of {', '.join(TEST_KINDS)}")
        refs: Dict[str, Any] = {}
        needed = ("value",) if kind == "below" else ("higher", "lower")
        for k in needed:
            if k not in spec:
                raise FindingsError(where, f"{key}.{k}", f"a {kind} test needs it")
            refs[k] = parse_ref(spec[k], where, f"{key}.{k}")
        threshold = spec.get("threshold")
        if kind != "greater" and (isinstance(threshold, bool)
                                  or not isinstance(threshold, (int, float))):
            raise FindingsError(where, key + ".threshold", f"a {kind} test needs a number")
        if kind == "close" and not threshold > 0:
            raise FindingsError(where, key + ".threshold", f"{threshold!r}: a close test's "
                                "tolerance must be above 0 (else it can never hold)")
        # A below or close test's threshold is the claim itself: a margin on top of it would
        # judge a value clearly under the threshold as "does not hold".
        if kind != "greater" and "min_effect" in spec:
            raise FindingsError(where, key + ".min_effect", f"a {kind} test has no min_effect",
                                "its threshold says what the claim needs")
        min_effect = spec.get("min_effect", default_min_effect) if kind == "greater" else 0.0
        if isinstance(min_effect, bool) or not isinstance(min_effect, (int, float)) \
                or min_effect < 0:
            raise FindingsError(where, key + ".min_effect", f"{min_effect!r} is not a number >= 0")
        out.append(TestSpec(name=_name(spec.get("name", f"test{i}"), where, key + ".name"),
                            kind=kind, threshold=None if threshold is None else float(threshold),
                            min_effect=float(min_effect), note=str(spec.get("note", "")), **refs))
    return tuple(out)


def _check_refs(exp: Experiment) -> None:
    from .extract import METRICS, known_metric
    sources = {e.name: ("eval", None) for e in exp.evals}
    for a in exp.analyses:
        if a.name in sources:
            raise FindingsError(exp.path, f"analyses.{a.name}", "an evaluation has this name",
                                "name the analysis differently")
        sources[a.name] = ("analysis", a)
    names = [s.name for s in exp.settings]
    for i, test in enumerate(exp.tests):
        for ref in test.refs():
            if ref.source not in sources:
                raise FindingsError(exp.path, f"tests[{i}]", f"{ref}: no evaluation or analysis "
                                    f"{ref.source!r}", f"known: {', '.join(sources)}")
            if ref.setting not in names:
                raise FindingsError(exp.path, f"tests[{i}]", f"{ref}: no setting {ref.setting!r}",
                                    f"settings are {', '.join(names)}")
            kind, analysis = sources[ref.source]
            if kind == "eval" and ref.source not in exp.evals_of(ref.setting):
                raise FindingsError(exp.path, f"tests[{i}]", f"{ref}: evaluation {ref.source!r} "
                                    f"does not run on {ref.setting!r}",
                                    f"add it to settings.{ref.setting}.evals")
            if kind == "eval" and ref.metric not in ("clean", "robust"):
                raise FindingsError(exp.path, f"tests[{i}]", f"{ref}: an evaluation measures "
                                    "clean and robust", f"write {ref.source}.robust@{ref.setting}")
            if analysis is not None and not known_metric(analysis.command, ref.metric):
                raise FindingsError(exp.path, f"tests[{i}]", f"{ref}: {analysis.command} "
                                    f"measures no {ref.metric!r}",
                                    f"its metrics: {METRICS[analysis.command]}")
            if analysis is not None and analysis.settings and ref.setting not in analysis.settings:
                raise FindingsError(exp.path, f"tests[{i}]", f"{ref}: analysis {ref.source!r} "
                                    f"does not run on {ref.setting!r}", "add it to its settings")


def _prepare(raw: Any, where: str) -> Dict[str, Any]:
    """``prepare: {args: [script.py, ...], creates: PATH}``: a Python script the runner runs
    first when PATH is missing (e.g. writing an offline data set)."""
    if raw is None:
        return {}
    raw = _mapping(raw, where, "prepare")
    _known(raw, ("args", "creates"), where, "prepare.")
    args = _args(raw.get("args"), where, "prepare.args")
    if not args or not isinstance(raw.get("creates"), str):
        raise FindingsError(where, "prepare", "needs args (a script and its options) and creates "
                            "(the path that exists once it has run)")
    return {"prepare": args, "prepare_creates": raw["creates"]}


_TOP_KEYS = ("claim", "title", "paper", "setting", "train_config", "common", "seeds", "settings",
             "evals", "use_evals", "analyses", "tests", "minutes_per_run", "min_effect",
             "waits_for", "notes", "prepare", "alpha", "seeds_added_after_looking",
             "premise_not_reached", "premise")


def load_experiment(path: str, defaults: Optional[Mapping[str, Any]] = None) -> Experiment:
    """Read and check one experiment file, merged over the defaults.

    Args:
        path: the experiment's YAML file.
        defaults: the parsed ``defaults.yaml`` (None: read the one beside ``path``).

    Raises:
        FindingsError: for any missing, unknown or wrong key.
    """
    if defaults is None:
        defaults_path = os.path.join(os.path.dirname(path), DEFAULTS_NAME)
        defaults = _read(defaults_path) if os.path.isfile(defaults_path) else {}
    raw = _read(path)
    _known(raw, _TOP_KEYS, path, "")
    merged: Dict[str, Any] = {**defaults, **raw}
    merged["common"] = {**_mapping(defaults.get("common"), path, "common"),
                        **_mapping(raw.get("common"), path, "common")}
    for key in ("claim", "title", "paper", "setting", "train_config"):
        if key not in merged:
            raise FindingsError(path, key, "missing")
    if not isinstance(merged["claim"], int) or isinstance(merged["claim"], bool):
        raise FindingsError(path, "claim", "must be the claim's number")
    if not os.path.isfile(merged["train_config"]):
        raise FindingsError(path, "train_config", f"no such file: {merged['train_config']}",
                            "run from the repository root")
    seeds = merged.get("seeds", [0, 1])
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise FindingsError(path, "seeds", f"{seeds!r} is not a list of integers")
    if len(set(seeds)) != len(seeds):
        # One run counted twice is two identical samples: a spread of 0 that no seed measured.
        raise FindingsError(path, "seeds", f"{seeds!r} repeats a seed", "list each seed once")
    alpha = merged.get("alpha", 0.05)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 0.5:
        raise FindingsError(path, "alpha", f"{alpha!r} is not a level in (0, 0.5)")
    added = merged.get("seeds_added_after_looking", [])
    if not isinstance(added, list) or any(s not in seeds for s in added):
        raise FindingsError(path, "seeds_added_after_looking", f"{added!r} are not seeds of "
                            f"{seeds!r}", "list the seeds (also in seeds) run after looking")
    # An experiment's entry for a shared evaluation is laid over it key by key, so that
    # `apgd: {minutes: 2}` changes only the estimate.
    raw_evals = dict(_mapping(defaults.get("evals"), path, "evals"))
    for name, spec in _mapping(raw.get("evals"), path, "evals").items():
        base = raw_evals.get(name)
        raw_evals[name] = {**base, **spec} if isinstance(base, dict) and isinstance(spec, dict) else spec
    all_evals = _evals(raw_evals, path)
    use = merged.get("use_evals", list(all_evals))
    if not isinstance(use, list):
        raise FindingsError(path, "use_evals", f"{use!r} is not a list", "write [apgd]")
    for name in use:
        if name not in all_evals:
            raise FindingsError(path, "use_evals", f"no evaluation {name!r}",
                                f"known: {', '.join(all_evals)}")
    settings = _settings(merged["settings"], path,
                         _minutes(merged.get("minutes_per_run", 5), path, "minutes_per_run"))
    for s in settings:
        for name in s.evals or ():
            if name not in all_evals:
                raise FindingsError(path, f"settings.{s.name}.evals", f"no evaluation {name!r}",
                                    f"known: {', '.join(all_evals)}")
    wanted = set(use).union(*[s.evals or () for s in settings])
    tests = _tests(merged.get("tests"), path, float(merged.get("min_effect", 0.01)))
    exp = Experiment(
        id=os.path.splitext(os.path.basename(path))[0], path=path, claim=merged["claim"],
        title=str(merged["title"]), paper=str(merged["paper"]), setting=str(merged["setting"]),
        train_config=merged["train_config"], common=merged["common"], seeds=tuple(seeds),
        settings=settings, evals=tuple(e for n, e in all_evals.items() if n in wanted),
        use_evals=tuple(use),
        analyses=_analyses(raw.get("analyses"), path, [s.name for s in settings]),
        tests=tests,
        waits_for=str(merged.get("waits_for", "")), notes=str(merged.get("notes", "")),
        alpha=float(alpha), added_seeds=tuple(added),
        premise_not_reached=str(merged.get("premise_not_reached", "")),
        premise=_premise(merged.get("premise", []), path, [t.name for t in tests]),
        **_prepare(raw.get("prepare"), path))
    _check_refs(exp)
    return exp


def _premise(raw: Any, path: str, names: Sequence[str]) -> Tuple[str, ...]:
    if not isinstance(raw, list) or any(n not in names for n in raw):
        raise FindingsError(path, "premise", f"{raw!r} is not a list of this experiment's "
                            "test names", f"known: {', '.join(map(str, names))}")
    return tuple(raw)


def load_experiments(folder: str, only: Sequence[str] = ()) -> List[Experiment]:
    """Every experiment in ``folder`` (sorted by file name), or the ones named in ``only``
    (ids like ``02_eps_warmup``, or claim numbers), in that order."""
    if not os.path.isdir(folder):
        raise FindingsError(folder, "folder", "no such folder")
    defaults_path = os.path.join(folder, DEFAULTS_NAME)
    defaults = _read(defaults_path) if os.path.isfile(defaults_path) else {}
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                   if f.endswith(".yaml") and f != DEFAULTS_NAME)
    exps = [load_experiment(p, defaults) for p in paths]
    if not only:
        return exps
    chosen: List[Experiment] = []
    for name in only:
        found = [e for e in exps if name in (e.id, str(e.claim))]
        if not found:
            raise FindingsError(folder, "only", f"no experiment {name!r}",
                                f"known: {', '.join(e.id for e in exps)}")
        chosen += [e for e in found if e not in chosen]
    return chosen


def add_suite_options(p: argparse.ArgumentParser) -> None:
    """The experiments to run and where the suite's files are, for every command line that runs
    the suite (``python -m advvit.findings``, ``python -m advvit.launch findings``)."""
    p.add_argument("experiments", nargs="*", help="file stems or claim numbers (default: all)")
    p.add_argument("--configs", default="configs/findings", help="folder of experiment files")
    p.add_argument("--root", default="output/findings",
                   help="run folders, resolved configs and analyses go here")
    p.add_argument("--results", default="docs/findings", help="where <id>.json and <id>.png go")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS of the runs (default: torch's)")


def run_env(args: argparse.Namespace) -> Optional[Dict[str, str]]:
    """The environment the runs get from the suite's options (None: this process's own)."""
    return None if args.threads is None else {"OMP_NUM_THREADS": str(args.threads)}
