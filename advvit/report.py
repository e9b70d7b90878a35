"""Reports of robustness results and analyses: the JSON envelope, the evaluation report and
table, and the pieces analysis reports are made of (JSON-safe values, markdown).

Every report advvit writes starts with the same envelope (:func:`envelope`): its format, when it
was made, the seed, the model file and its sha256, the versions of the code that made it, and
the command. :func:`build_report` adds an evaluation's numbers (one
:class:`advvit.robustness.EnsembleResult` per eps) and the sanity-check flags; every number a
flag concerns is marked with the flag's code. When a flag says the gradients are masked or
missing (:data:`advvit.checks.GRADIENT_MASKING`), that is the report's headline, in the JSON
and first in the console table, and the robust accuracies are marked untrustworthy.

Analyses (``python -m advvit.analyze``) write the envelope with every model they used
(``models=``), their numbers made JSON-safe by :func:`to_jsonable`, and a ``report.md`` from
:func:`markdown_table` / :func:`write_markdown_report`; figures are :mod:`advvit.plots`'.

Files are written whole through :mod:`advvit.io` (their folder is created when missing).
"""
from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from . import __version__, accel, checks
from .io import atomic_write, atomic_write_text, sha256_file
from .robustness import EnsembleResult

__all__ = [
    "EVAL_FORMAT",
    "versions",
    "source_commit",
    "envelope",
    "build_report",
    "print_table",
    "print_corruption_table",
    "write_report",
    "save_tensors",
    "to_jsonable",
    "markdown_table",
    "write_markdown_report",
]

EVAL_FORMAT = "advvit-eval/1"


# ------------------------------------------------------------------------------------ envelope

def versions(**extra: str) -> dict[str, str]:
    """advvit, python, torch and timm versions, plus ``extra`` (e.g. ``autoattack=...``), and
    ``advvit_commit`` (:func:`source_commit`) when advvit runs from a git checkout."""
    import timm
    out = {"advvit": __version__, "python": platform.python_version(),
           "torch": torch.__version__, "timm": timm.__version__, **extra}
    commit = source_commit()
    if commit is not None:
        out["advvit_commit"] = commit
    return out


@functools.lru_cache(maxsize=1)
def source_commit() -> str | None:
    """The git commit of the advvit code that runs, ``+dirty`` appended when its tracked files
    under ``advvit/`` differ from that commit; None when it is not run from its own checkout
    (an installed wheel, or a site-packages folder inside somebody else's repository).

    The version string names a release, not the code between two: a number a re-run does not
    reproduce is traced by this.
    """
    return checkout_commit(Path(__file__).resolve().parent.parent)


def checkout_commit(root: Path, package: str = "advvit") -> str | None:
    """``root``'s HEAD commit (``+dirty`` when tracked files under ``package`` changed), or None
    unless ``root`` is the top of a git checkout."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                  text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != Path(root).resolve():
        return None
    head = git("rev-parse", "HEAD")
    if head is None:
        return None
    changed = git("status", "--porcelain", "--untracked-files=no", "--", package)
    return head + ("+dirty" if changed else "")


def _with_sha256(model: Mapping[str, Any] | None) -> dict[str, Any]:
    model = dict(model or {})
    if model.get("path") and "sha256" not in model:
        model["sha256"] = sha256_file(model["path"])
    return model


def envelope(format: str, *, seed: int, model: Mapping[str, Any] | None = None,
             command: Sequence[str] | None = None,
             models: Sequence[Mapping[str, Any]] | None = None,
             **extra_versions: str) -> dict[str, Any]:
    """The fields every advvit report starts with (``environment``: torch's CPU threads and
    instruction set, :func:`advvit.accel.thread_facts`).

    Args:
        format: the report's format name and version, e.g. ``advvit-eval/1``.
        seed: the seed the results were computed with.
        model: what was evaluated; a ``path`` in it gets a ``sha256`` of the file added.
        command: the command line (default: this process's).
        models: every model of a report about several (``model`` is then the first); each
            ``path`` gets its ``sha256`` too.
        extra_versions: more versions to record (``autoattack="pyautoattack 0.2.0"``).
    """
    out = {"format": format,
           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "seed": seed, "model": _with_sha256(model if model is not None or not models
                                               else models[0]),
           "versions": versions(**extra_versions),
           # Threads and the kernels' instruction set decide the float summation order, so a
           # rerun needs them to give the same numbers to the digit.
           "environment": accel.thread_facts(),
           "command": list(command) if command is not None else list(sys.argv)}
    if models is not None:
        out["models"] = [_with_sha256(m) for m in models]
    return out


# ------------------------------------------------------------------------------- the numbers

def _concerns(flag: checks.Flag, key: str) -> bool:
    return checks.ALL_ROBUST in flag.affects or key in flag.affects


def _marked(value: float, flags: Sequence[checks.Flag], key: str) -> dict[str, Any]:
    here = [f for f in flags if _concerns(f, key)]
    return {"value": value, "warnings": [f.code for f in here],
            "trustworthy": not any(f.code in checks.GRADIENT_MASKING for f in here)}


def _result_flags(result: EnsembleResult) -> list[checks.Flag]:
    """The checks one result allows: robust above clean, black box beating white box, failed
    attacks, and AutoAttack's own warnings."""
    found = [checks.check_robust_above_clean(result.clean_accuracy, result.robust_accuracy),
             checks.check_black_box_beats_white_box(
                 [(a.name, a.robust_accuracy) for a in result.attacks if a.status == "ran"]),
             checks.check_failed_attacks([(a.name, a.reason) for a in result.failed])]
    return [f for f in found if f is not None] + checks.check_autoattack_warnings(result.warnings)


def _result_entry(eps: float, result: EnsembleResult, flags: Sequence[checks.Flag]
                  ) -> dict[str, Any]:
    return {
        "eps": eps, "eps_255": round(eps * 255, 4),
        "clean_accuracy": result.clean_accuracy,
        "robust_accuracy": _marked(result.robust_accuracy, flags, "robust"),
        "attacks": [{"name": a.name, "robust_accuracy": _marked(a.robust_accuracy, flags, a.name),
                     "seconds": round(a.seconds, 3), "n_attacked": a.n_attacked,
                     "status": a.status, "reason": a.reason,
                     "settings": result.attack_settings.get(a.name, {}),
                     **({"false_breaks": a.false_breaks} if result.precision != "fp32" else {})}
                    for a in result.attacks],
        "seconds": round(sum(a.seconds for a in result.attacks), 3),
    }


def _headline(flags: Sequence[checks.Flag]) -> dict[str, Any] | None:
    masking = [f for f in flags if f.code in checks.GRADIENT_MASKING]
    if not masking:
        return None
    return {"code": "gradient_masking", "trustworthy": False,
            "message": "ROBUST ACCURACY IS UNTRUSTWORTHY: the model's gradients are masked or "
                       "missing, so gradient attacks overstate its robustness",
            "flags": list(dict.fromkeys(f.code for f in masking))}


def _flag_dict(f: checks.Flag) -> dict[str, Any]:
    return {"code": f.code, "message": f.message, "detail": f.detail, "affects": list(f.affects)}


def build_report(outcomes: Mapping[Any, EnsembleResult], *, spec: Any, norm: str, seed: int,
                 model_flags: Sequence[checks.Flag], meta: Mapping[str, Any],
                 indices: Sequence[int] | None = None, labels: torch.Tensor | None = None,
                 per_example: bool = False, threats: bool = False) -> dict[str, Any]:
    """The evaluation's JSON report for results at one or more eps, or under several threats
    (the first is the headline number).

    Args:
        outcomes: eps -> result (threat label -> result with ``threats``), in the order
            evaluated, all on the same examples.
        spec: the attack as run (``name``, ``kind``, ``version`` attributes).
        norm, seed: as run (``norm``: the threats' norms, comma-separated).
        model_flags: flags of :func:`advvit.checks.run_model_checks`.
        meta: the envelope (:func:`envelope`) and anything else to record (data, device...).
        indices, labels: each example's index in its split and its label (``per_example``).
        per_example: add each example's index, label, clean, robust and broken_by (with
            ``threats``: robust under all, and each threat's robust and broken_by).
        threats: each result is a threat model of its own: its row names its threat and
            norm, and ``union`` has the examples robust under every threat.
    """
    flags: list[checks.Flag] = list(model_flags)
    results = []
    for key, result in outcomes.items():
        eps_flags = _result_flags(result)
        flags += [f for f in eps_flags if f not in flags]
        entry = _result_entry(result.eps, result, list(model_flags) + eps_flags)
        if threats:
            entry = {"threat": key, "norm": result.norm.lower(), **entry}
        results.append(entry)
    if len(results) > 1 and not threats:
        sweep = checks.check_robust_rises_with_eps(
            [(r["eps"], r["robust_accuracy"]["value"]) for r in results])
        if sweep is not None:
            flags.append(sweep)
            for r in results:
                if f"{r['eps']:.6g}" in sweep.affects:
                    r["robust_accuracy"]["warnings"].append(sweep.code)
    first = next(iter(outcomes.values()))
    report: dict[str, Any] = {"format": meta.get("format", EVAL_FORMAT),
                              "headline": _headline(flags)}
    report.update({k: v for k, v in meta.items() if k != "format"})
    report.update({
        "attack": {"name": spec.name, "kind": spec.kind, "version": spec.version,
                   "attacks": [a.name for a in first.attacks], "norm": norm, "seed": seed,
                   "backend": f"{first.backend} {first.backend_version}".strip()},
        "n": first.n,
        "eps": results[0]["eps"],
        "clean_accuracy": results[0]["clean_accuracy"],
        "robust_accuracy": results[0]["robust_accuracy"],
        "results": results,
        "warnings": [_flag_dict(f) for f in flags],
    })
    if first.precision != "fp32":
        report["attack"]["precision"] = {
            "attack": first.precision, "verified": "fp32",
            "note": f"the attacks ran in {first.precision} under autocast; every break was "
                    "re-checked by an fp32 forward and counts only if it fools the fp32 model. "
                    "Examples the low-precision attack did not break stay robust: a weaker "
                    "attack can only overstate robustness, and the fp32 check removes false "
                    "breaks, not missed ones"}
    if threats:
        union = torch.stack([r.robust for r in outcomes.values()]).all(0)
        report["union"] = {"threats": list(outcomes),
                           "robust_accuracy": _marked(float(union.float().mean()) if first.n
                                                      else float("nan"), flags, "robust"),
                           "n_robust": int(union.sum())}
    if per_example and threats:
        report["per_example"] = [
            {"index": int(indices[k]) if indices is not None else k,
             "label": int(labels[k]) if labels is not None else None,
             "clean": bool(first.clean[k]), "robust": bool(union[k]),
             "threats": {t: {"robust": bool(r.robust[k]), "broken_by": r.broken_by[k]}
                         for t, r in outcomes.items()}}
            for k in range(first.n)]
    elif per_example:
        report["per_example"] = [
            {"index": int(indices[k]) if indices is not None else k,
             "label": int(labels[k]) if labels is not None else None,
             "clean": bool(first.clean[k]), "robust": bool(first.robust[k]),
             "broken_by": first.broken_by[k]}
            for k in range(first.n)]
    return report


# ------------------------------------------------------------------------------ presentation

def _attack_row(a: Mapping[str, Any]) -> str:
    mark = "!" if a["robust_accuracy"]["warnings"] else " "
    line = f"{'':>10} {'':>8} {a['name']:>14} {a['robust_accuracy']['value']:>8.2%}{mark}" \
           f"{a['seconds']:>9.1f}"
    # A failure's reason is long and printed with its warning; eps 0's is short.
    status = a.get("status", "ran")
    return {"ran": line, "failed": f"{line}  failed (attack_failed)"}.get(
        status, f"{line}  {status}: {a['reason']}")


def print_table(report: Mapping[str, Any], file: Any = None) -> None:
    """Print the report's numbers as a table (a '!' marks a number a warning concerns); a
    gradient-masking headline comes first."""
    out = file or sys.stdout
    head = report.get("headline")
    if head:
        print(f"\n!!! {head['message']} ({', '.join(head['flags'])})", file=out)
    print(f"\nadvvit-eval  n={report['n']}  norm={report['attack']['norm']}  "
          f"seed={report['attack']['seed']}  attack={report['attack']['name']}", file=out)
    precision = report["attack"].get("precision")
    if precision:
        print(f"attacked in {precision['attack']}, every break verified in fp32 (robust "
              "accuracy can only be overstated by the weaker attack)", file=out)
    compiled = report.get("compile")
    if compiled:
        print(f"torch.compile: {compiled['frames_compiled']} frames compiled, "
              f"{compiled['graph_breaks']} graph breaks, {compiled['recompiles']} recompiles "
              f"({compiled['recompiles_batch_size']} for a batch size)"
              + (f", {compiled['frames_run_eagerly']} frames given up and run eagerly"
                 if compiled["frames_run_eagerly"] else ""), file=out)
    print(f"{'eps':>10} {'eps*255':>8} {'attack':>14} {'accuracy':>9} {'seconds':>9}", file=out)
    for r in report["results"]:
        where = f"{r['threat']:>19}" if "threat" in r else \
            f"{r['eps']:>10.5f} {r['eps_255']:>8.2f}"
        print(f"{where} {'clean':>14} {r['clean_accuracy']:>8.2%} {'':>9}", file=out)
        for a in r["attacks"]:
            print(_attack_row(a), file=out)
        mark = "!" if r["robust_accuracy"]["warnings"] else " "
        untrusted = "" if r["robust_accuracy"].get("trustworthy", True) else "  UNTRUSTWORTHY"
        print(f"{'':>10} {'':>8} {'robust':>14} {r['robust_accuracy']['value']:>8.2%}{mark}"
              f"{untrusted}", file=out)
    if "union" in report:
        u = report["union"]["robust_accuracy"]
        mark = "!" if u["warnings"] else " "
        untrusted = "" if u.get("trustworthy", True) else "  UNTRUSTWORTHY"
        print(f"{'every threat':>19} {'robust':>14} {u['value']:>8.2%}{mark}{untrusted}",
              file=out)
    for w in report["warnings"]:
        print(f"WARNING [{w['code']}] {w['message']}" + (f" ({w['detail']})" if w["detail"] else ""),
              file=out)


def print_corruption_table(report: Mapping[str, Any], file: Any = None) -> None:
    """Print the report's common-corruption accuracies (``report["corruptions"]``, as
    :meth:`advvit.analysis.shifts.CorruptionAccuracy.to_dict` gives them): one row per
    corruption, one column per severity, then their mean; nothing when it has none."""
    c = report.get("corruptions")
    if not c:
        return
    out = file or sys.stdout
    severities = c["severities"]
    print(f"\ncommon corruptions  n={c['n']}  seed={c['seed']}  {c['library']}", file=out)
    print(f"{'corruption':>18} " + "".join(f"{'s' + str(s):>8}" for s in severities)
          + f"{'mean':>9}", file=out)
    for name in c["corruptions"]:
        accs = c["accuracy"][name]
        print(f"{name:>18} " + "".join(f"{a:>8.2%}" for a in accs)
              + f"{sum(accs) / len(accs):>9.2%}", file=out)
    width = 8 * len(severities) + 9  # under the mean column
    print(f"{'clean (8-bit)':>18} {c['clean_accuracy']:>{width}.2%}", file=out)
    print(f"{'mean corruption':>18} {c['mean_corruption_accuracy']:>{width}.2%}", file=out)


def write_report(report: Mapping[str, Any], path: str | Path) -> Path:
    """Write the report as indented JSON, atomically (the folder is created when missing)."""
    path = Path(path)
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    return path


def save_tensors(payload: Mapping[str, Any], path: str | Path) -> Path:
    """``torch.save`` a dict (adversarial examples and their facts), atomically."""
    path = Path(path)
    atomic_write(path, lambda f: torch.save(dict(payload), f))
    return path


# ---------------------------------------------------------------------------- analysis reports

def to_jsonable(value: Any) -> Any:
    """Tensors, tuples and numbers as strict JSON: tensors become (nested) lists, NaN and
    infinities None (JSON has neither)."""
    if torch.is_tensor(value):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table (floats to 4 significant digits, NaN as n/a)."""
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown_report(path: str | Path, *, title: str, lines: Sequence[str] = (),
                          tables: Sequence[tuple[str, Sequence[str], Sequence[Sequence[Any]]]] = (),
                          figures: Sequence[tuple[str, str]] = ()) -> Path:
    """Write a ``report.md``: a title, a few lines, tables (caption, header, rows) and figures
    (caption, file name relative to the report), atomically."""
    parts = [f"# {title}", ""]
    parts += [*lines, ""] if lines else []
    for caption, header, rows in tables:
        parts += [f"**{caption}**", "", markdown_table(header, rows), ""]
    for caption, file in figures:
        parts += [f"![{caption}]({file})", "", f"*{caption}* ([{file}]({file}))", ""]
    path = Path(path)
    atomic_write_text(path, "\n".join(parts))
    return path
