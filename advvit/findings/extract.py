"""The numbers a finding's tests compare, read from the evaluation and analysis JSON files.

An evaluation gives ``clean`` and ``robust`` accuracy. Each analysis has one extractor, which
reads the analysis's JSON and returns, per measured model, the named metrics its claim needs;
the models are the analysis's ``--checkpoint`` list in order, which the runner built from the
experiment's settings.
"""
from __future__ import annotations

import base64
import math
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = ["eval_metrics", "eval_outcomes", "eval_masking", "unpack_outcomes", "EXTRACTORS",
           "METRICS", "known_metric", "extract", "sampling_keys", "analysis_outcomes",
           "outcome_metrics", "is_binary", "ExtractError"]

Metrics = Dict[str, float]


class ExtractError(ValueError):
    """An evaluation or analysis file lacks what its claim needs."""


def eval_metrics(report: Mapping[str, Any]) -> Metrics:
    """``clean`` and ``robust`` accuracy from an ``advvit-eval/1`` report."""
    if report.get("format") != "advvit-eval/1":
        raise ExtractError(f"not an advvit-eval/1 report (format {report.get('format')!r})")
    robust = report["robust_accuracy"]
    robust = robust.get("value") if isinstance(robust, dict) else robust
    if robust is None:
        raise ExtractError("the report has no robust accuracy (did the attack fail?)")
    return {"clean": float(report["clean_accuracy"]), "robust": float(robust)}


def _bits(flags: Sequence[bool]) -> str:
    return base64.b64encode(np.packbits(np.asarray(flags, dtype=bool)).tobytes()).decode()


def eval_outcomes(report: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """An ``advvit.eval --per-example`` report's outcomes, bit-packed for a findings record:
    ``n``, the test-set ``indices`` (``{"start": i}`` when they run on from ``i``, else the
    list), and ``clean`` / ``robust`` (base64 of numpy's packbits, one bit per example, 1 for
    correct). None when the report was written without ``--per-example``."""
    rows = report.get("per_example")
    if not rows:
        return None
    return {"n": len(rows), "indices": _indices([r["index"] for r in rows]),
            "clean": _bits([r["clean"] for r in rows]), "robust": _bits([r["robust"] for r in rows])}


def _indices(indices: Sequence[int]) -> Any:
    indices = [int(i) for i in indices]
    start = indices[0] if indices else 0
    return {"start": start} if indices == list(range(start, start + len(indices))) else indices


def _counts(counts: Sequence[int], of: int) -> Dict[str, Any]:
    """Per-example counts out of ``of``; signed ones (a drop: right intact, wrong lesioned,
    counts -1) are kept as int16 and say so."""
    counts = np.asarray(counts, dtype=np.int64)
    signed = bool((counts < 0).any())
    out = {"of": int(of), "counts": base64.b64encode(
        counts.astype("<i2" if signed else "<u2").tobytes()).decode()}
    return {**out, "signed": True} if signed else out


def unpack_outcomes(packed: Mapping[str, Any], metric: str) -> Tuple[List[int], np.ndarray]:
    """The test-set indices and each example's outcome of ``metric``, from the packed form of
    :func:`eval_outcomes` (0/1 bits) or :func:`analysis_outcomes` (a count of ``of``, read as
    a share: in [0, 1] for the share right, in [-1, 1] for a signed drop; or the ratio of two
    such metrics, linearized per image)."""
    n, indices = int(packed["n"]), packed["indices"]
    if isinstance(indices, dict):
        indices = list(range(int(indices["start"]), int(indices["start"]) + n))
    value = packed[metric]
    if isinstance(value, dict) and "ratio" in value:
        return indices, _linearized_ratio(*(unpack_outcomes(packed, m)[1] for m in value["ratio"]))
    if isinstance(value, dict):
        dtype = "<i2" if value.get("signed") else "<u2"
        counts = np.frombuffer(base64.b64decode(value["counts"]), dtype=dtype)[:n]
        return indices, counts.astype(float) / int(value["of"])
    bits = np.unpackbits(np.frombuffer(base64.b64decode(value), dtype=np.uint8))[:n]
    return indices, bits.astype(float)


def _linearized_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Per image, the ratio of means R = mean(num) / mean(den) plus the image's first-order
    influence on it, (num_i - R den_i) / mean(den): their mean is R, and the variance of their
    mean is the delta method's with the covariance of the two, so a ratio pairs image by image
    like a mean."""
    r = num.mean() / den.mean()
    return r + (num - r * den) / den.mean()


def is_binary(packed: Mapping[str, Any], metric: str) -> bool:
    """Whether ``metric``'s packed outcomes are right-or-wrong bits (not shares or drops)."""
    return not isinstance(packed[metric], dict)


def outcome_metrics(packed: Mapping[str, Any]) -> List[str]:
    """The metrics a packed outcomes entry holds."""
    return [k for k in packed if k not in ("n", "indices")]


def _corruption_outcomes(result: Mapping[str, Any], n: int) -> Optional[Dict[str, Any]]:
    """The corruptions' ``mean``: how many of the corruption x severity pairs each of the
    ``n`` images is right under, ``clean``, and ``relative`` as their ratio (see
    :func:`_linearized_ratio`)."""
    per = result.get("per_example")
    if not per or len(per.get("tasks_correct") or ()) != n:
        return None
    return {"clean": _bits([bool(c) for c in per["clean_correct"]]),
            "mean": _counts(per["tasks_correct"], per["tasks"]),
            "relative": {"ratio": ["mean", "clean"]}}


def _lesion_drops(result: Mapping[str, Any]) -> Dict[str, Dict[int, np.ndarray]]:
    """Per lesion metric (``attn_drop``, ``robust_block_drop``, ...), each block's per-image
    drop: 1 right intact and wrong lesioned, -1 the reverse, 0 the same (empty without the
    report's ``per_example``)."""
    per = result.get("per_example")
    if not per:
        return {}
    out: Dict[str, Dict[int, np.ndarray]] = {}
    for prefix, key in (("", "clean"), ("robust_", "robust")):
        intact = np.asarray(per[f"baseline_{key}"], dtype=np.int64)
        for kind, row in zip(result["kinds"], per[key]):
            out[f"{prefix}{kind}_drop"] = {i: intact - np.asarray(bits, dtype=np.int64)
                                          for i, bits in enumerate(row) if bits is not None}
    return out


def _lesion_outcomes(result: Mapping[str, Any], n: int) -> Optional[Dict[str, Any]]:
    """Each lesion kind's mean drop on each of the ``n`` images, as a signed count over the
    blocks with the part, so two kinds' mean drops compare image by image."""
    drops = {metric: blocks for metric, blocks in _lesion_drops(result).items() if blocks}
    if not drops or any(len(d) != n for blocks in drops.values() for d in blocks.values()):
        return None
    return {metric: _counts(sum(blocks.values()), len(blocks)) for metric, blocks in drops.items()}


_OUTCOMES: Dict[str, Callable[[Mapping[str, Any], int], Optional[Dict[str, Any]]]] = {
    "corruptions": _corruption_outcomes,
    "lesions": _lesion_outcomes,
}


def analysis_outcomes(command: str, report: Mapping[str, Any]) -> List[Optional[Dict[str, Any]]]:
    """Per model of an analysis report, its per-example outcomes packed as for an evaluation,
    where the analysis gives them (corruptions: :func:`_corruption_outcomes`; lesions:
    :func:`_lesion_outcomes`), else None."""
    results = report["results"]
    results = results.get("models", results)
    indices = (report.get("data") or {}).get("indices")
    pack = _OUTCOMES.get(command)
    out: List[Optional[Dict[str, Any]]] = []
    for name in report["model_names"]:
        packed = (pack(results[name], len(indices)) if pack is not None and indices is not None
                  else None)
        out.append(None if packed is None
                   else {"n": len(indices), "indices": _indices(indices), **packed})
    return out


def eval_masking(report: Mapping[str, Any]) -> List[str]:
    """The gradient-masking flags of an evaluation report's headline (empty: none)."""
    head = report.get("headline") or {}
    return list(head.get("flags", [])) if head.get("code") == "gradient_masking" else []


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else math.nan


# A metric's test-set sampling term travels beside it under keys no metric reference can name
# (references take letters, digits, _ and - only): the variance of the value from the finite
# set of images, and the number of images it rests on (its degrees of freedom are that less 1).
VAR, COUNT = "#var", "#n"


def sampling_keys(metric: str) -> Tuple[str, str]:
    """The keys of ``metric``'s sampling variance and image count in an extractor's metrics."""
    return metric + VAR, metric + COUNT


def _term(out: Metrics, metric: str, var: float, n: Optional[int]) -> None:
    """Record ``metric``'s sampling variance on ``n`` images (nothing when unknown)."""
    if n and n > 1 and math.isfinite(var) and math.isfinite(out.get(metric, math.nan)):
        v, c = sampling_keys(metric)
        out[v], out[c] = float(var), int(n)


def _accuracy_var(p: float, n: Optional[int]) -> float:
    """An upper bound on the variance of a mean of per-image scores in [0, 1] with mean ``p``
    over ``n`` images: ``p (1 - p) / n``, exact for one accuracy, a bound for a mean of several
    accuracies on the same images (a score in [0, 1] with mean p has variance at most p(1-p))."""
    return p * (1 - p) / n if n and math.isfinite(p) else math.nan


def _jacobian(result: Mapping[str, Any], n: Optional[int]) -> Metrics:
    """``first`` / ``last`` block's spectral norm, the largest and mean of the blocks between,
    and ``ends_min`` (the smaller of first and last: above ``middle_max`` means both ends are
    the most sensitive blocks, the Cauchy-problem paper's claim), and every block's own
    (``block<i>``), so the record keeps the whole profile.

    Sampling terms, from the norm's spread over the ``n`` images: ``std**2 / n`` per block; for
    ``middle_max`` and ``ends_min`` the term of the block that gives the value; for
    ``middle_mean`` the bound ``mean(std)**2 / n`` (the blocks' norms are correlated over the
    images, at most perfectly)."""
    sigma = [float(s) for s in result["sigma_mean"]]
    if len(sigma) < 3:
        raise ExtractError("fewer than 3 blocks: no middle to compare the ends with")
    middle = sigma[1:-1]
    out = {"first": sigma[0], "last": sigma[-1], "middle_max": max(middle),
           "middle_mean": _mean(middle), "ends_min": min(sigma[0], sigma[-1]),
           **{f"block{i}": v for i, v in enumerate(sigma)}}
    std = result.get("sigma_std")
    if std is None or n is None:
        return out
    var = [float(s) ** 2 / n for s in std]
    top = 1 + middle.index(max(middle))
    end = 0 if sigma[0] <= sigma[-1] else len(sigma) - 1
    for i, v in enumerate(var):
        _term(out, f"block{i}", v, n)
    for metric, v in (("first", var[0]), ("last", var[-1]), ("middle_max", var[top]),
                      ("ends_min", var[end]),
                      ("middle_mean", _mean([float(s) for s in std[1:-1]]) ** 2 / n)):
        _term(out, metric, v, n)
    return out


def _lesions(result: Mapping[str, Any], n: Optional[int]) -> Metrics:
    """Mean accuracy drop (intact minus lesioned, clean and PGD) per lesion kind over the blocks
    that have the part (``attn_drop``, ``mlp_drop``, ``block_drop``, ...; ``robust_`` in front
    for PGD), the largest single-block drop (``block_drop_max``) and the largest over every
    block but the first (``block_drop_max_rest``: the lesion paper's form of "a single lesion is
    tolerated"), and each lesion's own drop (``attn_drop<i>`` for block i, ...), so the record
    keeps the whole vector.

    Sampling terms over the ``n`` images. With the report's per-example outcomes, the exact
    paired term: the variance over the images of each image's drop (its intact outcome less its
    lesioned one, averaged over the blocks for a mean drop), over n. Without them, a drop's is
    the intact and the lesioned accuracy's binomial terms added (as if on different images: the
    conservative side for two accuracies that move together), and a mean drop's takes the bound
    of :func:`_accuracy_var` for the mean lesioned accuracy. The largest drop's is the term of
    the block that gives it."""
    out: Metrics = {}
    images = _lesion_drops(result)
    for prefix, key, base in (("", "clean_accuracy", "baseline_clean"),
                              ("robust_", "robust_accuracy", "baseline_robust")):
        intact = float(result[base])
        for kind, row in zip(result["kinds"], result[key]):
            lesioned = {i: float(a) for i, a in enumerate(row) if a is not None}
            per_block = {i: intact - a for i, a in lesioned.items()}
            name = f"{prefix}{kind}_drop"
            per_image = images.get(name)
            if per_image:
                term = {i: _paired_var(d) for i, d in per_image.items()}
                mean_term = _paired_var(np.mean(list(per_image.values()), axis=0))
                n_term: Optional[int] = len(next(iter(per_image.values())))
            else:
                term = {i: _accuracy_var(intact, n) + _accuracy_var(a, n)
                        for i, a in lesioned.items()}
                mean_term = (_accuracy_var(intact, n)
                             + _accuracy_var(_mean(list(lesioned.values())), n))
                n_term = n
            out[name] = _mean(list(per_block.values()))
            _term(out, name, mean_term, n_term)
            for i, d in per_block.items():
                out[f"{name}{i}"] = d
                _term(out, f"{name}{i}", term[i], n_term)
            if kind == "block":
                for metric, blocks in ((f"{prefix}block_drop_max", list(per_block)),
                                       (f"{prefix}block_drop_max_rest",
                                        [i for i in per_block if i > 0])):
                    top = max(blocks, key=per_block.__getitem__, default=None)
                    out[metric] = math.nan if top is None else per_block[top]
                    if top is not None:
                        _term(out, metric, term[top], n_term)
    return out


def _paired_var(per_image: np.ndarray) -> float:
    """The sampling variance of a mean of per-image values: their variance over the images
    (ddof 1) over their number."""
    return float(np.var(per_image, ddof=1)) / len(per_image)


def _corruptions(result: Mapping[str, Any], n: Optional[int]) -> Metrics:
    """Mean accuracy over corruptions x severities, and its ratio to clean accuracy.

    Sampling terms over the ``n`` images (the report's own ``n`` first): the bound of
    :func:`_accuracy_var` for the mean and for clean accuracy, and the delta method's for the
    ratio, without the covariance of the two (they move together, so leaving it out can only
    widen the term)."""
    mean, clean = float(result["mean_corruption_accuracy"]), float(result["clean_accuracy"])
    out = {"mean": mean, "clean": clean, "relative": mean / clean if clean else math.nan}
    n = result.get("n", n)
    var_mean, var_clean = _accuracy_var(mean, n), _accuracy_var(clean, n)
    _term(out, "mean", var_mean, n)
    _term(out, "clean", var_clean, n)
    if clean:
        _term(out, "relative", var_mean / clean ** 2 + mean ** 2 * var_clean / clean ** 4, n)
    return out


def _examples(report: Mapping[str, Any]) -> Optional[int]:
    """The number of test images an analysis ran on (None in reports that do not say)."""
    n = (report.get("data") or {}).get("n_examples")
    return int(n) if isinstance(n, int) else None


def _per_model(fn: Callable[[Mapping[str, Any], Optional[int]], Metrics]
               ) -> Callable[..., List[Metrics]]:
    def extract_all(report: Mapping[str, Any], settings: Sequence[str]) -> List[Metrics]:
        results = report["results"]
        results = results.get("models", results)
        return [fn(results[name], _examples(report)) for name in report["model_names"]]
    extract_all.__doc__ = fn.__doc__
    return extract_all


def _transfer(report: Mapping[str, Any], settings: Sequence[str]) -> List[Metrics]:
    """Per source model: the accuracy of the other models on the examples that fooled it
    (``transfer_accuracy``), averaged over targets of the same setting (``within``: another
    seed of the same architecture) and of the other settings (``cross``). Higher accuracy
    means the examples transfer worse. Needs the models of at least two seeds per setting for
    ``within``. Sampling terms: the bound of :func:`_accuracy_var` over the source's fooled
    examples for ``within`` and ``cross``, over the test images for ``white_box``."""
    r = report["results"]
    matrix = r["transfer_accuracy"]
    out = []
    for i, source in enumerate(settings):
        within = [matrix[i][j] for j, t in enumerate(settings) if j != i and t == source]
        cross = [matrix[i][j] for j, t in enumerate(settings) if t != source]
        m = {"within": _mean(within), "cross": _mean(cross),
             "white_box": float(r["accuracy"][i][i]), "fooled": float(r["n_fooled"][i])}
        fooled = int(r["n_fooled"][i])
        for metric in ("within", "cross"):
            _term(m, metric, _accuracy_var(m[metric], fooled), fooled)
        _term(m, "white_box", _accuracy_var(m["white_box"], _examples(report)), _examples(report))
        out.append(m)
    return out


def _semantic(report: Mapping[str, Any], settings: Sequence[str]) -> List[Metrics]:
    """Per source model: the judges' mean top-1 and top-k accuracy on its perturbation images
    (chance is one over the classes), and the same on random-noise controls. Sampling terms:
    the bound of :func:`_accuracy_var` over the test images (one perturbation image each)."""
    rows = report["results"]["rows"]
    k = report["settings"].get("k", 5)
    n = _examples(report)
    out = []
    for name in report["model_names"]:
        mine = [row for row in rows if row["source"] == name]
        if not mine:
            raise ExtractError(f"no semantic rows for source {name!r}")
        m = {"top1": _mean([row["perturbation_top1"] for row in mine]),
             f"top{k}": _mean([row[f"perturbation_top{k}"] for row in mine]),
             "random_top1": _mean([row["random_top1"] for row in mine])}
        for metric in list(m):
            _term(m, metric, _accuracy_var(m[metric], n), n)
        out.append(m)
    return out


EXTRACTORS: Dict[str, Callable[[Mapping[str, Any], Sequence[str]], List[Metrics]]] = {
    "jacobian": _per_model(_jacobian),
    "lesions": _per_model(_lesions),
    "corruptions": _per_model(_corruptions),
    "transfer": _transfer,
    "semantic": _semantic,
}


# The metric names each extractor gives, for checking an experiment's references before any
# run (a misspelt one would otherwise read as "not run" forever). Lesion kinds are the block
# parts of advvit.analysis.blocks and the whole block.
_LESION = r"(robust_)?((attn|lpi|mlp|conv|block)_drop\d*|block_drop_max(_rest)?)"
METRICS: Dict[str, str] = {
    "jacobian": r"first|last|middle_max|middle_mean|ends_min|block\d+",
    "lesions": _LESION,
    "corruptions": r"mean|clean|relative",
    "transfer": r"within|cross|white_box|fooled",
    "semantic": r"top\d+|random_top1",
}


def known_metric(command: str, metric: str) -> bool:
    """Whether ``command``'s extractor gives a metric named ``metric``."""
    return re.fullmatch(METRICS[command], metric) is not None


def extract(command: str, report: Mapping[str, Any], settings: Sequence[str]) -> List[Metrics]:
    """The metrics of each model of an ``advvit-analyze/1`` report, in checkpoint order.

    Args:
        command: the analyze sub-command that wrote it.
        report: the parsed JSON.
        settings: the setting each checkpoint was trained with, in order.

    Raises:
        ExtractError: the file is not such a report, or lacks a needed field.
    """
    if report.get("format") != "advvit-analyze/1" or report.get("analysis") != command:
        raise ExtractError(f"not an advvit-analyze/1 {command} report")
    if len(report["model_names"]) != len(settings):
        raise ExtractError(f"{len(report['model_names'])} models in the report, "
                           f"{len(settings)} checkpoints given")
    try:
        return EXTRACTORS[command](report, settings)
    except (KeyError, IndexError, TypeError) as err:
        raise ExtractError(f"{command} report lacks {err}") from None
