"""A finding's result: its measurements gathered from the finished units, the tests' verdicts,
and the file ``docs/findings/<experiment>.json`` (format ``advvit-findings/1``) with one figure.

The JSON records every per-seed number and where it came from (run folder, evaluation or
analysis file), so a reader can check a verdict against the runs behind it.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .. import __version__
from ..io import atomic_write_json
from ..plots import findings_figure
from . import verdict as V
from .extract import ExtractError, eval_metrics, extract
from .plan import status, units
from .spec import Experiment, MetricRef

__all__ = ["collect", "build_result", "rebuild_result", "validate_result", "write_result", "FORMAT",
           "SchemaError"]

FORMAT = "advvit-findings/1"
# (setting, seed, source) -> metric -> value
Measurements = Dict[Tuple[str, int, str], Dict[str, float]]


class SchemaError(ValueError):
    """A findings file does not have the advvit-findings/1 shape."""


def _load(path: str) -> Dict[str, Any]:
    with open(path) as fh:
        return json.load(fh)


def collect(exp: Experiment, root: str) -> Tuple[Measurements, List[Dict[str, Any]]]:
    """The measurements of every finished unit, and one record per run and measurement.

    An evaluation's measurements also carry ``n``, its number of test examples (under a key
    no metric reference can name: references take letters, digits, _ and - only)."""
    found: Measurements = {}
    records: List[Dict[str, Any]] = []
    for u in units(exp, root):
        if u.kind in ("prepare", "train") or status(u) != "done":
            continue
        if u.kind == "eval":
            report = _load(u.output)
            if not isinstance(report.get("n"), int):
                raise ExtractError(f"{u.output}: the evaluation report has no example count 'n'")
            per = [{**eval_metrics(report), _EXAMPLES: report["n"]}]
            settings: Sequence[str] = (u.setting,)
            seeds: Sequence[int] = (u.seed,)
        else:
            settings, seeds = u.settings, u.seeds
            per = extract(exp.analysis(u.source).command, _load(u.output), settings)
        for setting, seed, metrics, ckpt in zip(settings, seeds, per, u.checkpoints):
            found[(setting, seed, u.source)] = metrics
            record = {"setting": setting, "seed": seed, "source": u.source, "file": u.output,
                      "checkpoint": ckpt,
                      "metrics": _finite_or_none({k: v for k, v in metrics.items()
                                                  if k != _EXAMPLES})}
            if _EXAMPLES in metrics:
                record["n_examples"] = metrics[_EXAMPLES]
            records.append(record)
    return found, records


_EXAMPLES = "#examples"


def _summary(found: Measurements, ref: MetricRef, seeds: Sequence[int]) -> V.Summary:
    """The summary of a reference's samples; an evaluation's accuracies with their sampling
    variance."""
    values = _samples(found, ref, seeds)
    runs = [found[(ref.setting, s, ref.source)] for s in seeds if (ref.setting, s, ref.source) in found]
    examples = [int(m[_EXAMPLES]) for m in runs] if runs and all(_EXAMPLES in m for m in runs) else None
    return V.summarize(values, examples)


def _samples(found: Measurements, ref: MetricRef, seeds: Sequence[int]) -> List[float]:
    return [found[(ref.setting, s, ref.source)][ref.metric] for s in seeds
            if (ref.setting, s, ref.source) in found
            and ref.metric in found[(ref.setting, s, ref.source)]]


def _nan_seeds(values: Sequence[float], seeds: Sequence[int]) -> List[int]:
    return [seed for seed, v in zip(seeds, values) if not math.isfinite(v)]


def _finite_or_none(metrics: Mapping[str, float]) -> Dict[str, Optional[float]]:
    """Strict JSON has no NaN: an undefined metric is recorded as null."""
    return {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}


def _train_seconds(exp: Experiment, root: str) -> Dict[str, float]:
    out = {}
    for u in units(exp, root):
        if u.kind == "train" and status(u) == "done":
            out[f"{u.setting} s{u.seed}"] = float(_load(u.output).get("seconds", 0.0))
    return out


def build_result(exp: Experiment, root: str, command: str) -> Dict[str, Any]:
    """The ``advvit-findings/1`` record of ``exp`` from what has finished under ``root``.

    Tests whose samples are missing (units not run yet) are reported as ``not run``, and the
    claim's verdict is then ``cannot tell``.
    """
    found, records = collect(exp, root)
    return _judge(exp, found, records, _train_seconds(exp, root), command)


def rebuild_result(exp: Experiment, record: Mapping[str, Any], command: str) -> Dict[str, Any]:
    """``exp``'s record judged anew from the measurements an earlier record holds (a checkout
    with the records but not the runs): the current tests, verdict rule and notes applied to the
    same numbers.

    Raises:
        SchemaError: ``record`` is not an ``advvit-findings/1`` record.
    """
    validate_result(record)
    found: Measurements = {}
    for m in record["measurements"]:
        metrics = {k: (math.nan if v is None else float(v)) for k, v in m["metrics"].items()}
        if "n_examples" in m:
            metrics[_EXAMPLES] = int(m["n_examples"])
        found[(m["setting"], m["seed"], m["source"])] = metrics
    return _judge(exp, found, [dict(m) for m in record["measurements"]],
                  dict(record["train_seconds"]), command)


def _judge(exp: Experiment, found: Measurements, records: List[Dict[str, Any]],
           train_seconds: Dict[str, float], command: str) -> Dict[str, Any]:
    summaries: Dict[str, Dict[str, Any]] = {}
    tests: List[Dict[str, Any]] = []
    results: List[V.TestResult] = []
    for t in exp.tests:
        samples = {str(r): _samples(found, r, exp.seeds) for r in t.refs()}
        undefined = [r for r, v in samples.items() if not all(math.isfinite(x) for x in v)]
        refs = {str(r): r for r in t.refs()}
        for ref, vals in samples.items():
            if vals and ref not in undefined:
                summaries[ref] = _summary(found, refs[ref], exp.seeds).to_dict()
        missing = [r for r, v in samples.items() if len(v) < len(exp.seeds)]
        entry: Dict[str, Any] = {"name": t.name, "kind": t.kind, "note": t.note,
                                 "refs": list(samples), "min_effect": t.min_effect}
        if t.threshold is not None:
            entry["threshold"] = t.threshold
        if missing:
            entry.update(verdict="not run", why=f"missing seeds of {', '.join(missing)}")
            tests.append(entry)
            continue
        if undefined:
            # A metric with nothing to average (no examples fooled the source, no block with
            # the part): the measurement exists and decides nothing.
            why = "; ".join(f"{r} is undefined on seeds {_nan_seeds(samples[r], exp.seeds)}"
                            for r in undefined)
            results.append(V.TestResult(t.name, t.kind, V.CANNOT_TELL, math.nan, None, why))
            tests.append({**entry, "verdict": V.CANNOT_TELL, "why": why})
            continue
        def summary(ref: MetricRef) -> V.Summary:
            return _summary(found, ref, exp.seeds)
        if t.kind == "greater":
            r = V.greater(t.name, summary(t.higher), summary(t.lower), min_effect=t.min_effect,
                          labels=(str(t.higher), str(t.lower)))
        elif t.kind == "close":
            r = V.close(t.name, summary(t.higher), summary(t.lower), t.threshold,
                        labels=(str(t.higher), str(t.lower)))
        else:
            r = V.below(t.name, summary(t.value), t.threshold,
                        min_effect=t.min_effect, label=str(t.value))
        results.append(r)
        tests.append({**entry, **r.to_dict()})
    complete = len(results) == len(exp.tests)
    return {
        "format": FORMAT, "id": exp.id, "claim": exp.claim, "title": exp.title,
        "paper": exp.paper, "setting": exp.setting, "notes": exp.notes,
        "waits_for": exp.waits_for, "command": command, "seeds": list(exp.seeds),
        "settings": {s.name: {"train": dict(s.train), "finetune_from": s.finetune_from}
                     for s in exp.settings},
        "complete": complete,
        "verdict": V.combine(results) if complete else "not run" if not results else V.CANNOT_TELL,
        "tests": tests, "summaries": summaries, "measurements": records,
        "train_seconds": train_seconds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "advvit": __version__,
    }


_REQUIRED = {"format": str, "id": str, "claim": int, "title": str, "paper": str, "setting": str,
             "command": str, "seeds": list, "settings": dict, "complete": bool, "verdict": str,
             "tests": list, "summaries": dict, "measurements": list, "train_seconds": dict,
             "created": str}
_TEST_REQUIRED = {"name": str, "kind": str, "verdict": str, "refs": list, "why": str}
_SUMMARY_REQUIRED = ("n", "mean", "std", "min", "max", "values")
_VERDICTS = (*V.VERDICTS, "not run")


def validate_result(data: Mapping[str, Any]) -> None:
    """Check a findings record's shape.

    Raises:
        SchemaError: naming the first field that is missing or of the wrong type or value.
    """
    def need(obj: Mapping[str, Any], spec: Mapping[str, type], where: str) -> None:
        for key, tp in spec.items():
            if key not in obj:
                raise SchemaError(f"{where}: missing '{key}'")
            if not isinstance(obj[key], tp) or (tp is int and isinstance(obj[key], bool)):
                raise SchemaError(f"{where}.{key}: expected {tp.__name__}, "
                                  f"got {type(obj[key]).__name__}")
    need(data, _REQUIRED, "finding")
    if data["format"] != FORMAT:
        raise SchemaError(f"finding.format: expected {FORMAT}, got {data['format']!r}")
    if data["verdict"] not in _VERDICTS:
        raise SchemaError(f"finding.verdict: {data['verdict']!r} is not one of {_VERDICTS}")
    for i, t in enumerate(data["tests"]):
        need(t, _TEST_REQUIRED, f"finding.tests[{i}]")
        if t["verdict"] not in _VERDICTS:
            raise SchemaError(f"finding.tests[{i}].verdict: {t['verdict']!r}")
    for ref, s in data["summaries"].items():
        for key in _SUMMARY_REQUIRED:
            if key not in s:
                raise SchemaError(f"finding.summaries[{ref}]: missing '{key}'")
        if len(s["values"]) != s["n"]:
            raise SchemaError(f"finding.summaries[{ref}]: {len(s['values'])} values, n {s['n']}")
    for i, m in enumerate(data["measurements"]):
        need(m, {"setting": str, "seed": int, "source": str, "metrics": dict},
             f"finding.measurements[{i}]")


def _figure(data: Mapping[str, Any], path: str) -> Optional[str]:
    """One panel per test: each side's seeds as dots, its mean with a band of 2 standard errors
    (seeds' spread and test-set sampling); None without a test to draw or without matplotlib."""
    tests = [t for t in data["tests"] if all(r in data["summaries"] for r in t["refs"])]
    if not tests:
        return None
    panels = []
    for t in tests:
        sides = []
        for ref in t["refs"]:
            s = data["summaries"][ref]
            se = math.sqrt(V.mean_variance(s["std"], s["n"], s.get("sampling_var", 0.0)))
            sides.append({"label": ref.replace("@", "\n@"), "mean": s["mean"], "band": V.Z * se,
                          "values": s["values"]})
        threshold = t["threshold"] if t.get("threshold") is not None and t["kind"] == "below" \
            else None
        panels.append({"title": f"{t['name']}: {t['verdict']}", "threshold": threshold,
                       "sides": sides})
    title = f"claim {data['claim']}: {data['title']} ({data['verdict']})"
    return os.path.basename(path) if findings_figure(panels, title, path) else None


def write_result(data: Dict[str, Any], folder: str) -> str:
    """Validate ``data``, draw its figure and write ``<folder>/<id>.json``; returns the path."""
    validate_result(data)
    os.makedirs(folder, exist_ok=True)
    data["figure"] = _figure(data, os.path.join(folder, f"{data['id']}.png"))
    path = os.path.join(folder, f"{data['id']}.json")
    atomic_write_json(path, data, indent=1)
    return path
