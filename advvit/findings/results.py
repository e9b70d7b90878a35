"""A finding's result: its measurements gathered from the finished units, the tests' verdicts,
and the file ``docs/findings/<experiment>.json`` (format ``advvit-findings/1``) with one figure.

The JSON records every per-seed number and where it came from (run folder, evaluation or
analysis file), so a reader can check a verdict against the runs behind it. An evaluation's
measurement also keeps its per-example outcomes, bit-packed (``outcomes``, see
:func:`.extract.eval_outcomes`), and its gradient-masking flags (``masking``); records written
before these fields lack them, and are still read: their tests fall back to the unpaired rule,
and the record's ``gaps`` say what it could not judge. Each measurement's ``provenance``
(when, which code, threads, command, the files it read and their sha256, its time) and each
training run's entry in ``runs`` (its resolved config, code, threads, checkpoints' sha256) are
what a re-run is compared with when it does not reproduce.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import yaml

from .. import __version__
from ..io import atomic_write_json
from ..plots import findings_figure
from . import verdict as V
from .extract import COUNT, VAR, ExtractError, analysis_outcomes, eval_masking, eval_metrics, \
    eval_outcomes, extract, is_binary, outcome_metrics, sampling_keys, unpack_outcomes
from .plan import file_sha256, read_journal, recorded_hashes, status, units
from .spec import Experiment, MetricRef

__all__ = ["collect", "build_result", "rebuild_result", "validate_result", "write_result", "FORMAT",
           "SchemaError", "measurement_unit", "compare_measurement"]

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

    An evaluation's measurements also carry ``n``, its number of test examples, and an
    analysis's the sampling terms its extractor gives (under keys no metric reference can name:
    references take letters, digits, _ and - only); the record keeps the terms as
    ``sampling``."""
    found: Measurements = {}
    records: List[Dict[str, Any]] = []
    for u in units(exp, root):
        if u.kind in ("prepare", "train") or status(u) != "done":
            continue
        report = _load(u.output)
        provenance = _provenance(u, report)
        if u.kind == "eval":
            if not isinstance(report.get("n"), int):
                raise ExtractError(f"{u.output}: the evaluation report has no example count 'n'")
            per = [{**eval_metrics(report), _EXAMPLES: report["n"]}]
            extra: Dict[str, Any] = {"masking": eval_masking(report)}
            outcomes = [eval_outcomes(report)]
            settings: Sequence[str] = (u.setting,)
            seeds: Sequence[int] = (u.seed,)
        else:
            settings, seeds = u.settings, u.seeds
            command = exp.analysis(u.source).command
            per = extract(command, report, settings)
            outcomes = analysis_outcomes(command, report)
            extra = {}
        for setting, seed, metrics, ckpt, packed in zip(settings, seeds, per, u.checkpoints,
                                                        outcomes):
            found[(setting, seed, u.source)] = metrics
            record = {"setting": setting, "seed": seed, "source": u.source, "file": u.output,
                      "checkpoint": ckpt,
                      "metrics": _finite_or_none({k: v for k, v in metrics.items()
                                                  if "#" not in k})}
            if _EXAMPLES in metrics:
                record["n_examples"] = metrics[_EXAMPLES]
            terms = _sampling_terms(metrics)
            if terms:
                record["sampling"] = terms
            if packed is not None:
                record["outcomes"] = packed
            records.append({**record, **extra, "provenance": provenance})
    return found, records


def _sampling_terms(metrics: Mapping[str, float]) -> Dict[str, Dict[str, Any]]:
    """``metric -> {"var", "n"}`` for every metric that carries a sampling term."""
    out = {}
    for key in metrics:
        if key.endswith(VAR):
            metric = key[:-len(VAR)]
            out[metric] = {"var": metrics[key], "n": int(metrics[metric + COUNT])}
    return out


def _provenance(unit: Any, report: Mapping[str, Any]) -> Dict[str, Any]:
    """What made a measurement, from its report's envelope: when, the code (versions, the
    source commit), the threads and CPU kernels, the command, the sha256 of every model file it
    read, and the wall seconds of all its attempts."""
    seconds, attempts = read_journal(unit)
    return {"created": report.get("created"), "versions": report.get("versions"),
            "environment": report.get("environment"), "command": report.get("command"),
            "sha256": recorded_hashes(report, unit.kind),
            "seconds": round(seconds, 3), "attempts": attempts}


def _runs(exp: Experiment, root: str) -> Dict[str, Dict[str, Any]]:
    """Every finished training run: its folder, the resolved config ``advvit.train`` saved
    (args.yaml, every key with its default filled in), its time, code and threads, and the
    sha256 of its checkpoints, so a re-run can be compared run by run."""
    out: Dict[str, Dict[str, Any]] = {}
    for u in units(exp, root):
        if u.kind != "train" or status(u) != "done":
            continue
        marker = _load(u.output)
        try:
            with open(os.path.join(u.folder, "args.yaml")) as fh:
                resolved = yaml.safe_load(fh)
        except (OSError, yaml.YAMLError):
            resolved = None
        out[f"{u.setting} s{u.seed}"] = {
            "folder": u.folder, "config": resolved, "seconds": marker.get("seconds"),
            "finished": marker.get("finished"), "versions": marker.get("versions"),
            "omp_num_threads": marker.get("omp_num_threads"),
            "sha256": {name: file_sha256(os.path.join(u.folder, name))
                       for name in ("best.pth", "last.pth")}}
    return out


def _created(records: Sequence[Mapping[str, Any]]) -> str:
    """When the measurements were made: the newest of their reports (every report's envelope
    writes the same UTC form, so the strings sort as times); now when none says."""
    made = [m["provenance"]["created"] for m in records
            if isinstance((m.get("provenance") or {}).get("created"), str)]
    return max(made) if made else time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())


_EXAMPLES = "#examples"


def _summary(found: Measurements, ref: MetricRef, seeds: Sequence[int]) -> V.Summary:
    """The summary of a reference's samples with their sampling variance: an evaluation's
    accuracies binomial on their examples, an analysis's metric the term its extractor gave
    (missing when a seed's measurement has none)."""
    values = _samples(found, ref, seeds)
    runs = [found[(ref.setting, s, ref.source)] for s in seeds if (ref.setting, s, ref.source) in found]
    if runs and all(_EXAMPLES in m for m in runs):
        return V.summarize(values, [int(m[_EXAMPLES]) for m in runs])
    var, count = sampling_keys(ref.metric)
    if runs and all(var in m for m in runs):
        return V.summarize(values, terms=[(m[var], int(m[count])) for m in runs])
    return V.summarize(values)


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
    return _judge(exp, found, records, _train_seconds(exp, root), command, _created(records),
                  runs=_runs(exp, root))


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
        for metric, term in (m.get("sampling") or {}).items():
            var, count = sampling_keys(metric)
            metrics[var], metrics[count] = float(term["var"]), int(term["n"])
        found[(m["setting"], m["seed"], m["source"])] = metrics
    return _judge(exp, found, [dict(m) for m in record["measurements"]],
                  dict(record["train_seconds"]), command, record["created"],
                  runs=record.get("runs"))


def _paired(exp: Experiment, index: Mapping[Tuple[str, int, str], Mapping[str, Any]],
            higher: MetricRef, lower: MetricRef) -> Optional[V.Paired]:
    """Both evaluations' per-example outcomes of every seed, when the record holds them for
    the same test images; None otherwise (the unpaired rule judges)."""
    rows: Dict[str, List[Any]] = {"higher": [], "lower": []}
    images = None
    binary = True
    for side, ref in (("higher", higher), ("lower", lower)):
        for seed in exp.seeds:
            packed = index.get((ref.setting, seed, ref.source), {}).get("outcomes")
            if packed is None or ref.metric not in packed:
                return None
            indices, values = unpack_outcomes(packed, ref.metric)
            if images is not None and indices != images:
                return None
            images = indices
            binary = binary and is_binary(packed, ref.metric)
            rows[side].append(values)
    return V.Paired(np.stack(rows["higher"]), np.stack(rows["lower"]), binary=binary)


def _masked(exp: Experiment, index: Mapping[Tuple[str, int, str], Mapping[str, Any]],
            refs: Sequence[MetricRef]) -> List[str]:
    """``ref seed N (flags)`` for every evaluation behind ``refs`` that warned of masking."""
    out = []
    for ref in refs:
        if ref.metric != "robust":
            continue
        for seed in exp.seeds:
            flags = index.get((ref.setting, seed, ref.source), {}).get("masking") or []
            if flags:
                out.append(f"{ref} seed {seed} ({', '.join(flags)})")
    return out


def _gaps(exp: Experiment, index: Mapping[Tuple[str, int, str], Mapping[str, Any]],
          unpaired: Sequence[str], no_sampling: Sequence[str]) -> List[str]:
    """What the record lacks for the verdict rule, in sentences."""
    gaps = []
    if unpaired:
        gaps.append("no per-example outcomes for " + ", ".join(unpaired) + ": judged by the "
                    "unpaired rule (both binomial terms, as if the settings saw different images)")
    if no_sampling:
        gaps.append("no per-example spread for " + ", ".join(no_sampling) + ": their test-set "
                    "sampling term is missing, the seeds' spread alone is judged")
    evals = {e.name for e in exp.evals}
    if any(k[2] in evals and "masking" not in m for k, m in index.items()):
        gaps.append("the evaluations' gradient-masking checks are not in the record: none of "
                    "its tests could be marked untrustworthy")
    return gaps


def measurement_unit(exp: Experiment, record: Mapping[str, Any], index: int, root: str) -> str:
    """The key of the unit under ``root`` that measures the record's ``index``-th measurement."""
    m = record["measurements"][index]
    for u in units(exp, root):
        if u.kind in ("eval", "analysis") and u.source == m["source"] \
                and m["setting"] in (u.settings or (u.setting,)) \
                and m["seed"] in (u.seeds or (u.seed,)):
            return u.key
    raise ExtractError(f"no unit of {exp.id} measures {m['source']} of {m['setting']} "
                       f"seed {m['seed']}")


def compare_measurement(exp: Experiment, record: Mapping[str, Any], index: int,
                        root: str) -> Tuple[bool, List[str]]:
    """The record's ``index``-th measurement against the same one measured again under
    ``root``: per metric, identical (to 1e-12), within the record's band (the ``1 - alpha``
    t-interval of one seed's value: the seeds' spread and the test-set term of its summary), or
    outside it; the per-example outcomes where both have them. Returns (all identical or
    within, one line per difference)."""
    m = record["measurements"][index]
    found, records = collect(exp, root)
    key = (m["setting"], m["seed"], m["source"])
    if key not in found:
        return False, [f"{m['source']} of {m['setting']} seed {m['seed']} was not measured again"]
    again = next(r for r in records if (r["setting"], r["seed"], r["source"]) == key)
    ok, lines = True, []
    alpha = record.get("alpha", V.ALPHA)
    for metric, old in m["metrics"].items():
        new = again["metrics"].get(metric)
        name = f"{m['source']}.{metric}@{m['setting']} seed {m['seed']}"
        if old is None or new is None:
            if old != new:
                ok = False
                lines.append(f"{name}: recorded {old}, now {new}")
            continue
        if abs(new - old) <= 1e-12:
            continue
        s = record["summaries"].get(f"{m['source']}.{metric}@{m['setting']}")
        if s is None:
            ok = False
            lines.append(f"{name}: recorded {old:.6g}, now {new:.6g}; no band in the record")
            continue
        var, df = V.satterthwaite([(s["std"] ** 2, s["n"] - 1),
                                   (s.get("sampling_var", 0.0), s.get("examples", 0) - 1
                                    if s.get("examples", 0) > 1 else math.inf)])
        band = V.critical(df, 1 - alpha) * math.sqrt(var)
        inside = abs(new - old) <= band
        ok = ok and inside
        lines.append(f"{name}: recorded {old:.6g}, now {new:.6g} ({new - old:+.4g}, "
                     f"{'within' if inside else 'OUTSIDE'} the record's band +-{band:.4g})")
    if "outcomes" in m and "outcomes" in again:
        for metric in (k for k in outcome_metrics(m["outcomes"]) if k in again["outcomes"]):
            (i_old, b_old), (i_new, b_new) = (unpack_outcomes(o, metric)
                                              for o in (m["outcomes"], again["outcomes"]))
            if i_old != i_new or (b_old != b_new).any():
                lines.append(f"{m['source']}.{metric}@{m['setting']} seed {m['seed']}: "
                             f"{int((b_old != b_new).sum()) if i_old == i_new else 'other'} "
                             "images changed outcome")
    return ok, lines


def _judge(exp: Experiment, found: Measurements, records: List[Dict[str, Any]],
           train_seconds: Dict[str, float], command: str, created: str,
           runs: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    summaries: Dict[str, Dict[str, Any]] = {}
    tests: List[Dict[str, Any]] = []
    results: List[V.TestResult] = []
    index = {(m["setting"], m["seed"], m["source"]): m for m in records}
    evals = {e.name for e in exp.evals}
    unpaired: List[str] = []
    no_sampling: List[str] = []
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
            def measured(r: str) -> List[bool]:
                return [(refs[r].setting, s, refs[r].source) in found for s in exp.seeds]
            # Measured without the metric, or not at all where the setting's runs were: the
            # test was added after the recorded runs.
            unmeasured = [r for r in missing if all(measured(r)) or (
                not any(measured(r)) and any(k[0] == refs[r].setting for k in found))]
            why = f"missing seeds of {', '.join(missing)}"
            if unmeasured:
                why = (f"the recorded runs did not measure {', '.join(unmeasured)} "
                       "(added after they ran: a re-run measures it)")
            entry.update(verdict="not run", why=why)
            tests.append(entry)
            continue
        masked = _masked(exp, index, t.refs())
        if masked:
            r = V.untrustworthy(t.name, t.kind, masked)
            results.append(r)
            tests.append({**entry, **r.to_dict()})
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
        no_sampling += [str(r) for r in t.refs() if summary(r).sampling == "missing"]
        paired = None if t.kind == "below" else _paired(exp, index, t.higher, t.lower)
        if paired is None and t.kind != "below" and t.higher.source in evals \
                and t.lower.source in evals:
            unpaired.append(t.name)
        labels = (str(t.higher), str(t.lower))
        if t.kind == "greater":
            r = V.greater(t.name, summary(t.higher), summary(t.lower), min_effect=t.min_effect,
                          labels=labels, alpha=exp.alpha, paired=paired)
        elif t.kind == "close":
            r = V.close(t.name, summary(t.higher), summary(t.lower), t.threshold,
                        labels=labels, alpha=exp.alpha, paired=paired)
        else:
            r = V.below(t.name, summary(t.value), t.threshold,
                        min_effect=t.min_effect, label=str(t.value), alpha=exp.alpha)
        results.append(r)
        tests.append({**entry, **r.to_dict()})
    complete = len(results) == len(exp.tests)
    verdict = V.combine([r.verdict for r in results]) if complete \
        else "not run" if not results else V.CANNOT_TELL
    out = {
        "format": FORMAT, "id": exp.id, "claim": exp.claim, "title": exp.title,
        "paper": exp.paper, "setting": exp.setting, "notes": exp.notes,
        "waits_for": exp.waits_for, "command": command, "seeds": list(exp.seeds),
        "seeds_added_after_looking": list(exp.added_seeds), "alpha": exp.alpha,
        "settings": {s.name: {"train": dict(s.train), "finetune_from": s.finetune_from}
                     for s in exp.settings},
        "complete": complete,
        "verdict": verdict,
        "tests": tests, "summaries": summaries, "measurements": records,
        "gaps": _gaps(exp, index, unpaired, list(dict.fromkeys(no_sampling))),
        "train_seconds": train_seconds,
        "created": created,
        "advvit": __version__,
    }
    if runs is not None:
        out["runs"] = dict(runs)
    unmet = [f"{t['name']} {t['verdict']}" for t in tests
             if t["name"] in exp.premise and t["verdict"] != V.HOLDS]
    why = "; ".join(x for x in (exp.premise_not_reached,
                                "premise tests: " + ", ".join(unmet) if unmet else "") if x)
    if why and verdict not in ("not run", V.UNTRUSTWORTHY):
        # The tests measured something, but not the situation the claim is about.
        out.update(verdict=V.CANNOT_TELL, verdict_note="premise not reached",
                   premise_not_reached=why, tests_verdict=verdict)
    return out


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
    """One panel per test: each side's seeds as dots, its mean with its own ``1 - alpha``
    t-interval (seeds' spread and test-set sampling); None without a test to draw or without matplotlib."""
    tests = [t for t in data["tests"] if all(r in data["summaries"] for r in t["refs"])]
    if not tests:
        return None
    panels = []
    for t in tests:
        sides = []
        for ref in t["refs"]:
            s = data["summaries"][ref]
            var, df = V.side_variance(V.Summary(**{**s, "values": tuple(s["values"])}))
            band = V.critical(df, 1 - data.get("alpha", V.ALPHA)) * math.sqrt(var)
            sides.append({"label": ref.replace("@", "\n@"), "mean": s["mean"], "band": band,
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
