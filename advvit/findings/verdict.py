"""From samples over seeds to a verdict: holds, does not hold, or cannot tell at this scale.

A ``greater`` test compares two settings' samples: the difference of their means against
twice its standard error: the seeds' spread (Welch: unpooled variances), plus, for accuracies
measured on a finite test set, its binomial sampling variance p(1 - p) / n_examples. Every seed
is scored on the same test images, so their spread leaves that noise out, and more seeds do not
shrink it: p(1 - p) / n is its bound, reached when the seeds are right on the same images, and
adding it for both settings as if their test sets were independent is the conservative side.
With one seed there is no spread, so no verdict either way except "cannot tell". Two standard errors is a rule of thumb:
with two seeds per side a 95% t-interval would be 4 to 13 standard errors wide, so a verdict
from two seeds is a reading of this scale, not a significance test. It **holds** when the difference is above twice its standard
error and at least ``min_effect``; it **does not hold** when the opposite is as clear, or when
even the upper end of the interval is below ``min_effect`` (the seeds agree there is no effect
worth the claim); otherwise we **cannot tell** at this scale. A ``below`` test does the same for
one sample against a fixed threshold. A ``close`` test asks that two settings differ by less
than a tolerance (a claim that something "barely matters"): it holds when the whole interval of
the absolute difference is inside the tolerance and does not hold when it is wholly outside.
A claim holds when all its tests hold, does not hold when
any does not, and is undecided otherwise.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["Summary", "TestResult", "summarize", "mean_variance", "greater", "below", "close",
           "combine", "HOLDS", "DOES_NOT_HOLD", "CANNOT_TELL", "VERDICTS", "Z"]

HOLDS, DOES_NOT_HOLD, CANNOT_TELL = "holds", "does not hold", "cannot tell"
VERDICTS = (HOLDS, DOES_NOT_HOLD, CANNOT_TELL)
Z = 2.0  # standard errors either side: the rule of thumb above


@dataclass(frozen=True)
class Summary:
    """Mean and spread of one metric over seeds; ``sampling_var``: the variance of the mean
    from the finite test set (0 where the metric is not a proportion of examples)."""
    n: int
    mean: float
    std: float
    min: float
    max: float
    values: tuple
    sampling_var: float = 0.0

    def to_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "values": list(self.values)}


@dataclass(frozen=True)
class TestResult:
    """One test's numbers and verdict, with the sentence that explains it."""
    name: str
    kind: str
    verdict: str
    difference: float
    se: Optional[float]
    why: str

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def summarize(values: Sequence[float], examples: Optional[Sequence[int]] = None) -> Summary:
    """Mean, sample standard deviation (0 for one value), range.

    Args:
        values: one value per seed.
        examples: for accuracies, the test examples behind each value: adds the binomial
            sampling variance of the mean, mean(p (1 - p) / n), not divided by the number of
            seeds since they share the test images.
    """
    vals = [float(v) for v in values]
    if not vals or any(math.isnan(v) for v in vals):
        raise ValueError(f"need finite values to summarize, got {vals}")
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    sampling = 0.0
    if examples is not None:
        if len(examples) != len(vals) or any(n < 1 for n in examples):
            raise ValueError(f"need one positive example count per value, got {examples}")
        sampling = statistics.fmean(p * (1 - p) / n for p, n in zip(vals, examples))
    return Summary(len(vals), statistics.fmean(vals), std, min(vals), max(vals), tuple(vals),
                   sampling)


def mean_variance(std: float, n: int, sampling_var: float = 0.0) -> float:
    """The variance of a mean over ``n`` seeds: their spread ``std ** 2 / n`` plus the test
    set's sampling variance (which the seeds share)."""
    return std ** 2 / n + sampling_var


def _se(*samples: Summary) -> Optional[float]:
    if any(s.n < 2 for s in samples):
        return None
    return math.sqrt(sum(mean_variance(s.std, s.n, s.sampling_var) for s in samples))


def _decide(name: str, kind: str, diff: float, se: Optional[float], min_effect: float,
            what: str) -> TestResult:
    if se is None:
        return TestResult(name, kind, CANNOT_TELL, diff, None,
                          f"{what}: {diff:+.4f}, but one seed gives no spread to judge it by")
    lo, hi = diff - Z * se, diff + Z * se
    band = f"{diff:+.4f} (+- {Z * se:.4f}, {Z:g} standard errors)"
    if lo > 0 and diff >= min_effect:
        return TestResult(name, kind, HOLDS, diff, se, f"{what} by {band}")
    if hi < 0:
        return TestResult(name, kind, DOES_NOT_HOLD, diff, se, f"{what}: the opposite, {band}")
    if hi < min_effect:
        return TestResult(name, kind, DOES_NOT_HOLD, diff, se,
                          f"{what}: {band}, below the {min_effect:g} effect the claim needs")
    return TestResult(name, kind, CANNOT_TELL, diff, se, f"{what}: {band}, within the noise")


def greater(name: str, higher: Summary, lower: Summary, *, min_effect: float,
            labels: Sequence[str] = ("higher", "lower")) -> TestResult:
    """Is ``higher``'s mean above ``lower``'s by more than the noise and ``min_effect``?"""
    return _decide(name, "greater", higher.mean - lower.mean, _se(higher, lower), min_effect,
                   f"{labels[0]} - {labels[1]}")


def below(name: str, value: Summary, threshold: float, *, min_effect: float = 0.0,
          label: str = "value") -> TestResult:
    """Is ``value``'s mean under ``threshold`` by more than the noise?"""
    return _decide(name, "below", threshold - value.mean, _se(value), min_effect,
                   f"{threshold:g} - {label}")


def close(name: str, a: Summary, b: Summary, tolerance: float,
          labels: Sequence[str] = ("a", "b")) -> TestResult:
    """Do ``a`` and ``b`` differ by less than ``tolerance``, beyond the noise?"""
    diff, se = a.mean - b.mean, _se(a, b)
    what = f"|{labels[0]} - {labels[1]}| against {tolerance:g}"
    if se is None:
        return TestResult(name, "close", CANNOT_TELL, diff, None,
                          f"{what}: {abs(diff):.4f}, but one seed gives no spread to judge it by")
    band = f"{abs(diff):.4f} (+- {Z * se:.4f}, {Z:g} standard errors)"
    if abs(diff) + Z * se < tolerance:
        return TestResult(name, "close", HOLDS, diff, se, f"{what}: {band}, inside")
    if abs(diff) - Z * se > tolerance:
        return TestResult(name, "close", DOES_NOT_HOLD, diff, se, f"{what}: {band}, outside")
    return TestResult(name, "close", CANNOT_TELL, diff, se, f"{what}: {band}, not decided")


def combine(results: Sequence[TestResult]) -> str:
    """The claim's verdict from its tests'."""
    verdicts: List[str] = [r.verdict for r in results]
    if not verdicts:
        return CANNOT_TELL
    if DOES_NOT_HOLD in verdicts:
        return DOES_NOT_HOLD
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    return CANNOT_TELL
