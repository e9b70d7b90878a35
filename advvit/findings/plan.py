"""What an experiment runs: its units (training runs, evaluations, analyses), where each one's
output lives, whether it is done, and how long the rest should take.

A training run is named by a hash of its resolved config (the training config, the common and
the setting's overrides, the seed), so experiments that train the same thing share one run:
claim 2's warm-up setting *is* claim 1's XCiT. A unit is done when its output file exists: the
training marker (written after the run exits 0), the evaluation's JSON, the analysis's JSON;
all are written whole, so a kill leaves either the old state or the new. A training run with a
checkpoint but no marker was killed and is resumed (``--resume auto``).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from ..attack_names import parse_attack
from ..io import OptionError, sha256_file
from .spec import AnalysisSpec, EvalSpec, Experiment, SettingSpec

__all__ = ["Unit", "units", "status", "plan_lines", "log_path", "journal_path", "read_journal",
           "TRAIN_MARKER", "EXPERIMENT_LIMIT_MINUTES", "train_values", "recorded_hashes",
           "file_sha256", "jobs_path", "read_jobs"]

TRAIN_MARKER = "findings_done.json"
EXPERIMENT_LIMIT_MINUTES = 45.0
_CHECKPOINT = "best.pth"
JOBS_NAME = "jobs.json"
# A running unit's journal is rewritten every 5 s (runner.HEARTBEAT_SECONDS); one older than this
# belongs to an attempt that has stopped.
RUNNING_WITHIN_SECONDS = 15.0


def _digest(payload: Any, n: int = 8) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


@dataclass
class Unit:
    """One command of an experiment.

    Attributes:
        kind: ``prepare``, ``train``, ``eval`` or ``analysis``.
        key: a readable id, unique within the experiment (``train warmup s0``).
        command: the argv (without the interpreter).
        output: the file whose existence means done.
        folder: where the unit writes (the run folder, or the analysis folder).
        minutes: the planning estimate.
        setting, seed: what it trains or measures (``setting`` None for a per-seed analysis).
        source: the evaluation or analysis name (None for training).
        config: for training, the resolved config written before the run.
        checkpoints: the checkpoints a measurement reads, in order.
        settings, seeds: the setting and seed of each checkpoint.
        needs: keys of the units that must finish first.
    """
    kind: str
    key: str
    command: List[str]
    output: str
    folder: str
    minutes: float
    setting: Optional[str]
    seed: int
    source: Optional[str] = None
    config: Optional[Dict[str, Any]] = None
    checkpoints: Tuple[str, ...] = ()
    settings: Tuple[str, ...] = ()
    seeds: Tuple[int, ...] = ()
    needs: Tuple[str, ...] = ()


def train_values(exp: Experiment, setting: SettingSpec, seed: int,
                 finetune: Optional[str] = None) -> Dict[str, Any]:
    """The resolved training config of one run (before ``output`` / ``experiment``)."""
    with open(exp.train_config) as fh:
        values = yaml.safe_load(fh) or {}
    values.update(exp.common)
    values.update(setting.train)
    values["seed"] = seed
    if finetune is not None:
        values["finetune"] = finetune
    values.pop("output", None)
    values.pop("experiment", None)
    return values


def _run_name(values: Dict[str, Any]) -> str:
    return f"{values.get('model', 'model')}-{values.get('loss', 'loss')}-s{values['seed']}-{_digest(values)}"


def _train_units(exp: Experiment, root: str) -> Dict[Tuple[str, int], Unit]:
    out: Dict[Tuple[str, int], Unit] = {}
    # Fine-tuned settings come after the settings they start from.
    order = sorted(exp.settings, key=lambda s: s.finetune_from is not None)
    for seed in exp.seeds:
        for s in order:
            needs: Tuple[str, ...] = ()
            finetune = None
            if s.finetune_from is not None:
                source = out[(s.finetune_from, seed)]
                finetune = os.path.join(source.folder, _CHECKPOINT)
                needs = (source.key,)
            values = train_values(exp, s, seed, finetune)
            name = _run_name(values)
            runs = os.path.join(root, "runs")
            config = {**values, "output": runs, "experiment": name}
            config_path = os.path.join(root, "configs", name + ".yaml")
            folder = os.path.join(runs, name)
            out[(s.name, seed)] = Unit(
                kind="train", key=f"train {s.name} s{seed}",
                command=["-m", "advvit.train", "--config", config_path, "--resume", "auto"],
                output=os.path.join(folder, TRAIN_MARKER), folder=folder, minutes=s.minutes,
                setting=s.name, seed=seed, config=config, needs=needs)
    return out


def _eval_unit(spec: EvalSpec, train: Unit) -> Unit:
    # Per-example outcomes let the verdict pair two settings image by image.
    args = list(spec.args) + ([] if "--per-example" in spec.args else ["--per-example"])
    tag = _digest(args) if spec.checkpoint == "best" else _digest([args, spec.checkpoint])
    out = os.path.join(train.folder, "findings", f"eval-{spec.name}-{tag}.json")
    checkpoint = os.path.join(train.folder, f"{spec.checkpoint}.pth")
    attack = args[args.index("--attack") + 1] if "--attack" in args else "autoattack"
    # advvit.eval resumes AutoAttack runs from a state file and refuses one for the rest.
    try:
        resumable = parse_attack(attack).kind == "autoattack"
    except OptionError:
        resumable = False  # check_configs names the bad option before anything runs
    state = ["--state-path", out + ".state"] if resumable else []
    return Unit(kind="eval", key=f"eval {spec.name} {train.setting} s{train.seed}",
                command=["-m", "advvit.eval", "--checkpoint", checkpoint, *args,
                         "--output", out, *state],
                output=out, folder=os.path.dirname(out), minutes=spec.minutes,
                setting=train.setting, seed=train.seed, source=spec.name,
                checkpoints=(checkpoint,), needs=(train.key,))


def _analysis_unit(exp: Experiment, spec: AnalysisSpec, trains: Sequence[Unit], root: str,
                   seed: int, judges: Sequence[Unit] = ()) -> Unit:
    checkpoints = tuple(os.path.join(t.folder, _CHECKPOINT) for t in trains)
    judge_args = [w for j in judges for w in ("--judge", os.path.join(j.folder, _CHECKPOINT))]
    tag = _digest([spec.command, spec.args, checkpoints, judge_args])
    if spec.per == "run":
        folder = os.path.join(trains[0].folder, "findings", f"{spec.name}-{tag}")
        key, setting = f"analysis {spec.name} {trains[0].setting} s{seed}", trains[0].setting
    else:
        which = "all" if spec.per == "all" else f"s{seed}"
        folder = os.path.join(root, "analyses", f"{exp.id}-{spec.name}-{which}-{tag}")
        key, setting = f"analysis {spec.name} {which}", None
    command = ["-m", "advvit.analyze", spec.command]
    for c in checkpoints:
        command += ["--checkpoint", c]
    command += [*judge_args, *spec.args, "--output", folder]
    return Unit(kind="analysis", key=key, command=command,
                output=os.path.join(folder, f"{spec.command}.json"), folder=folder,
                minutes=spec.minutes, setting=setting, seed=seed, source=spec.name,
                checkpoints=checkpoints, settings=tuple(t.setting for t in trains),
                seeds=tuple(t.seed for t in trains), needs=tuple(t.key for t in (*trains, *judges)))


def units(exp: Experiment, root: str) -> List[Unit]:
    """Every unit of ``exp`` in run order: its preparation, training, evaluations, analyses.

    Args:
        exp: the experiment.
        root: the folder for run folders, resolved configs and analyses (``output/findings``).
    """
    trains = _train_units(exp, root)
    out: List[Unit] = []
    if exp.prepare:
        out.append(Unit(kind="prepare", key=f"prepare {os.path.basename(exp.prepare[0])}",
                        command=list(exp.prepare), output=exp.prepare_creates,
                        folder=os.path.dirname(exp.prepare_creates) or ".", minutes=0.5,
                        setting=None, seed=-1))
    out += list(trains.values())
    for seed in exp.seeds:
        for s in exp.settings:
            run = exp.evals_of(s.name)
            out += [_eval_unit(e, trains[(s.name, seed)]) for e in exp.evals if e.name in run]
    for a in exp.analyses:
        used = a.settings or tuple(s.name for s in exp.settings)
        if a.per == "all":
            out.append(_analysis_unit(exp, a, [trains[(s, seed)] for s in used
                                               for seed in exp.seeds], root, -1))
            continue
        for seed in exp.seeds:
            judges = [trains[(j, seed)] for j in a.judges]
            if a.per == "run":
                out += [_analysis_unit(exp, a, [trains[(s, seed)]], root, seed, judges)
                        for s in used]
            else:
                out.append(_analysis_unit(exp, a, [trains[(s, seed)] for s in used], root, seed,
                                          judges))
    return out


_HASHES: Dict[Tuple[str, int, int], str] = {}


def file_sha256(path: str) -> Optional[str]:
    """The file's sha256 (cached while its size and mtime stay), None when it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def _measured_files(unit: Unit) -> List[str]:
    """The checkpoints a measurement reads: its models, then an analysis's judges."""
    c = unit.command
    return [*unit.checkpoints, *(c[i + 1] for i, w in enumerate(c[:-1]) if w == "--judge")]


def recorded_hashes(report: Mapping[str, Any], kind: str) -> List[Any]:
    """The sha256 of each model file a measurement's report says it read, in order."""
    models = [report.get("model")] if kind == "eval" else [*report.get("models", []),
                                                            *report.get("judges", [])]
    return [m.get("sha256") if isinstance(m, dict) else None for m in models]


def _stale(unit: Unit) -> bool:
    """Whether a finished measurement read other checkpoint files than those there now (a
    training run resumed and finished after it, or retrained)."""
    try:
        with open(unit.output) as fh:
            recorded = recorded_hashes(json.load(fh), unit.kind)
    except (OSError, ValueError):
        return True
    files = _measured_files(unit)
    if len(recorded) != len(files):
        return True
    # A checkpoint not there cannot be compared; its training unit runs first and the
    # measurement is checked again then.
    return any(now is not None and now != then
               for now, then in zip(map(file_sha256, files), recorded))


def status(unit: Unit) -> str:
    """``done``, ``partial`` (a killed training run or AutoAttack evaluation, resumed next),
    ``stale`` (a measurement of a checkpoint that has changed since: run again) or
    ``pending``."""
    if os.path.isfile(unit.output):
        if unit.kind in ("eval", "analysis") and _stale(unit):
            return "stale"
        return "done"
    if unit.kind == "train" and any(os.path.isfile(os.path.join(unit.folder, f))
                                    for f in ("last.pth", "recovery.pth")):
        return "partial"
    if unit.kind == "eval" and os.path.isfile(unit.output + ".state"):
        return "partial"
    return "pending"


def log_path(unit: Unit) -> str:
    """Where a unit's output goes: in the run folder for training, else beside its report."""
    if unit.kind == "train":
        return os.path.join(unit.folder, "findings_train.log")
    if unit.kind == "prepare":
        return os.path.join(unit.folder, "findings_prepare.log")
    return os.path.splitext(unit.output)[0] + ".log"


def journal_path(unit: Unit) -> str:
    """The file beside a unit's log that holds the seconds of all its attempts so far."""
    return log_path(unit) + ".seconds"


def read_journal(unit: Unit) -> Tuple[float, int]:
    """The seconds a unit's attempts have run so far, and how many attempts there were
    (``(0.0, 0)`` when it never ran or its journal is unreadable)."""
    try:
        with open(journal_path(unit)) as fh:
            data = json.load(fh)
        seconds, attempts = float(data["seconds"]), int(data["attempts"])
    except (OSError, ValueError, TypeError, KeyError):
        return 0.0, 0
    return seconds, attempts


def _seconds_done(unit: Unit) -> Optional[float]:
    # The journal counts every attempt, killed ones included; a report written by a resumed
    # evaluation counts only its last.
    journal = read_journal(unit)[0]
    if journal > 0:
        return journal
    try:
        with open(unit.output) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    for key in ("seconds", "seconds_total"):
        if isinstance(data.get(key), (int, float)):
            return float(data[key])
    return None


def jobs_path(root: str) -> str:
    """The file of the job ids the units under ``root`` were submitted as (by advvit.launch)."""
    return os.path.join(root, JOBS_NAME)


def read_jobs(root: str) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """Experiment id -> unit key -> ``{"job", "cluster", "submitted"}``; empty when no unit was
    ever submitted as a job (or the file is unreadable)."""
    try:
        with open(jobs_path(root)) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _running(unit: Unit) -> bool:
    try:
        return time.time() - os.path.getmtime(journal_path(unit)) < RUNNING_WITHIN_SECONDS
    except OSError:
        return False


def _where(unit: Unit, job: Optional[Mapping[str, Any]]) -> str:
    """``running``/``queued`` with the unit's job id, for a unit that is not done."""
    tag = f" (job {job['job']})" if job else ""
    if _running(unit):
        return f", running{tag}"
    return f", queued{tag}" if job else ""


def plan_lines(experiments: Sequence[Experiment], root: str) -> Tuple[List[str], float]:
    """The plan as printable lines, and the estimated minutes still to run.

    Units shared by several experiments are counted once, where they first appear. A unit not
    done is ``running`` while its journal is fresh, and ``queued`` when it was submitted as a job
    (``ROOT/jobs.json``), each with its job id.
    """
    jobs = read_jobs(root)
    lines: List[str] = []
    seen: set = set()
    total = 0.0
    for exp in experiments:
        todo = 0.0
        body: List[str] = []
        whole = 0.0
        for u in units(exp, root):
            state = status(u)
            shared = u.output in seen
            seen.add(u.output)
            took = _seconds_done(u) if state == "done" else None
            # The experiment's whole length, checked against the limit, is measured where done.
            whole += u.minutes if took is None else took / 60
            if state == "done":
                note = f"done{'' if took is None else f' in {took / 60:.1f} min'}"
            else:
                note = (f"{state}{_where(u, jobs.get(exp.id, {}).get(u.key))}, ~{u.minutes:g} min"
                        + (" (shared, counted above)" if shared else ""))
                if not shared:
                    todo += u.minutes
            body.append(f"    {u.key:<40} {note}")
        flag = f"  [over the {EXPERIMENT_LIMIT_MINUTES:g}-minute limit]" if whole > EXPERIMENT_LIMIT_MINUTES else ""
        head = f"claim {exp.claim} ({exp.id}): {exp.title}"
        wait = f"  [waits for: {exp.waits_for}]" if exp.waits_for else ""
        lines.append(f"{head}{wait}")
        lines.append(f"  alone ~{whole:.1f} min; still to run ~{todo:g} min{flag}")
        lines += body
        total += todo
    lines.append(f"total still to run: ~{total:g} min ({total / 60:.1f} h)")
    return lines, total
