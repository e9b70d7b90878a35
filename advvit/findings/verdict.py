"""From samples over seeds to a verdict: holds, does not hold, cannot tell, or untrustworthy.

Every test is a t-test on a difference of means whose variance has two kinds of terms:

- the seeds' spread, ``std ** 2 / n`` per side (``n - 1`` degrees of freedom), and
- the test set's sampling term: the seeds are scored on the same test images, so their spread
  leaves that noise out and more seeds do not shrink it. **Paired** (both settings' per-example
  outcomes on the same images in the record): the variance of the per-image difference of the
  seeds' mean outcomes over the images, ``var_i(d_i) / N``; **unpaired** (no such outcomes): the
  binomial ``p (1 - p) / N`` of each side, added as if the settings saw different images (the
  conservative side). An analysis's numbers carry the term its extractor derives from the
  images (:mod:`.extract`); records without one say so, and are judged by the seeds alone.

The degrees of freedom come from Welch-Satterthwaite over those terms (a sampling term counts
``N - 1``), and the critical value is the t quantile at them, so two seeds whose spread
dominates are judged at 1-2 degrees of freedom, not with a fixed 2. ``alpha`` is the two-sided
level (0.05 unless the experiment says otherwise).

- ``greater``: **holds** when the ``1 - alpha`` interval of the difference is above 0 and the
  difference is at least ``min_effect``; **does not hold** when the interval is below 0, or below
  ``min_effect`` (no effect worth the claim); else **cannot tell**.
- ``below``: the same for ``threshold - value`` (one sample against a fixed number).
- ``close`` ("X barely matters"): a TOST at the margin ``tolerance``: **holds** when the
  ``1 - 2 alpha`` (90%) interval lies inside ``(-tolerance, tolerance)``, **does not hold** when
  it lies wholly outside, else **cannot tell**.

Each result carries the p-value of the hypothesis its verdict rejects (for ``cannot tell``, the
smallest of them), so :func:`holm` can adjust a whole suite's tests together. A paired greater
test also reports McNemar's exact test per seed and a two-stage bootstrap interval (seeds, then
the same image indices for both sides). One seed gives no spread: ``cannot tell``. A claim holds
when all its tests hold, does not hold when any does not, and is untrustworthy when any rests on
an evaluation with masked gradients.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import stats

__all__ = ["Summary", "TestResult", "Paired", "summarize", "side_variance", "satterthwaite",
           "critical", "greater", "below", "close", "untrustworthy", "combine", "holm",
           "mcnemar", "bootstrap_interval", "HOLDS", "DOES_NOT_HOLD", "CANNOT_TELL",
           "UNTRUSTWORTHY", "VERDICTS", "ALPHA"]

HOLDS, DOES_NOT_HOLD, CANNOT_TELL = "holds", "does not hold", "cannot tell"
UNTRUSTWORTHY = "untrustworthy"
VERDICTS = (HOLDS, DOES_NOT_HOLD, CANNOT_TELL, UNTRUSTWORTHY)
ALPHA = 0.05
BOOTSTRAP_DRAWS = 2000


@dataclass(frozen=True)
class Summary:
    """Mean and spread of one metric over seeds.

    ``sampling_var``: the variance of the mean from the finite test set; ``sampling`` says where
    it comes from: ``binomial`` (an accuracy on ``examples`` images), ``per-image`` (an
    analysis's term from its images, see :mod:`.extract`), ``missing`` (the record holds no
    per-example spread: 0 is a gap, not a measurement)."""
    n: int
    mean: float
    std: float
    min: float
    max: float
    values: tuple
    sampling_var: float = 0.0
    sampling: str = "missing"
    examples: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "values": list(self.values)}


@dataclass(frozen=True)
class Paired:
    """Both sides' per-example outcomes on the same images, one row per seed, rows of the two
    sides in the same seed order: 0/1 (right or wrong), the share in [0, 1] of several
    outcomes of one image (the corruptions it is right under), or a per-image drop in [-1, 1]
    (a lesion's). ``binary``: whether both are right-or-wrong outcomes (McNemar applies);
    None reads it from the values."""
    higher: np.ndarray
    lower: np.ndarray
    binary: Optional[bool] = None

    @property
    def is_binary(self) -> bool:
        if self.binary is not None:
            return self.binary
        return all(np.isin(rows, (0.0, 1.0)).all() for rows in (self.higher, self.lower))

    def __post_init__(self) -> None:
        if self.higher.ndim != 2 or self.lower.ndim != 2 \
                or self.higher.shape[1] != self.lower.shape[1]:
            raise ValueError(f"need (seeds, images) outcomes on the same images, got "
                             f"{self.higher.shape} and {self.lower.shape}")


@dataclass(frozen=True)
class TestResult:
    """One test's numbers and verdict, with the sentence that explains it.

    ``p``: the p-value of the hypothesis the verdict rejects (None without a spread);
    ``interval``: the interval the verdict read, at ``level``."""
    name: str
    kind: str
    verdict: str
    difference: float
    se: Optional[float]
    why: str
    df: Optional[float] = None
    critical: Optional[float] = None
    p: Optional[float] = None
    level: Optional[float] = None
    interval: Optional[Tuple[float, float]] = None
    paired: bool = False
    mcnemar: List[Dict[str, Any]] = field(default_factory=list)
    bootstrap: Optional[Tuple[float, float]] = None

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        for k in ("interval", "bootstrap"):
            d[k] = None if d[k] is None else list(d[k])
        return d


def summarize(values: Sequence[float], examples: Optional[Sequence[int]] = None, *,
              terms: Optional[Sequence[Tuple[float, int]]] = None) -> Summary:
    """Mean, sample standard deviation (0 for one value), range.

    Args:
        values: one value per seed.
        examples: for accuracies, the test examples behind each value: adds the binomial
            sampling variance of the mean, mean(p (1 - p) / n), not divided by the number of
            seeds since they share the test images.
        terms: for other measurements, each value's own sampling variance and the number of
            images it rests on (an analysis's extractor gives them): their mean is the
            sampling variance, again not divided by the number of seeds.
    """
    vals = [float(v) for v in values]
    if not vals or any(math.isnan(v) for v in vals):
        raise ValueError(f"need finite values to summarize, got {vals}")
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    if terms is not None:
        if len(terms) != len(vals) or any(n < 2 or not v >= 0 for v, n in terms):
            raise ValueError(f"need one (variance >= 0, images >= 2) per value, got {terms}")
        return Summary(len(vals), statistics.fmean(vals), std, min(vals), max(vals),
                       tuple(vals), statistics.fmean(v for v, _ in terms), "per-image",
                       min(n for _, n in terms))
    if examples is None:
        return Summary(len(vals), statistics.fmean(vals), std, min(vals), max(vals), tuple(vals))
    if len(examples) != len(vals) or any(n < 1 for n in examples):
        raise ValueError(f"need one positive example count per value, got {examples}")
    sampling = statistics.fmean(p * (1 - p) / n for p, n in zip(vals, examples))
    return Summary(len(vals), statistics.fmean(vals), std, min(vals), max(vals), tuple(vals),
                   sampling, "binomial", min(examples))


def satterthwaite(parts: Sequence[Tuple[float, float]]) -> Tuple[float, float]:
    """The sum of variance terms ``(variance, df)`` and its Welch-Satterthwaite degrees of
    freedom (infinite when every term is 0 or has infinite df)."""
    total = sum(v for v, _ in parts)
    denom = sum(v * v / d for v, d in parts if v > 0 and math.isfinite(d))
    return total, (total * total / denom if denom > 0 else math.inf)


def _sampling_df(s: Summary) -> float:
    return s.examples - 1 if s.examples > 1 else math.inf


def side_variance(s: Summary) -> Tuple[float, float]:
    """One side's variance of the mean (seeds' spread and sampling term) and its df."""
    return satterthwaite([(s.std ** 2 / s.n, s.n - 1), (s.sampling_var, _sampling_df(s))])


def critical(df: float, level: float) -> float:
    """The two-sided t quantile: the half-width of a ``level`` interval in standard errors."""
    return float(stats.t.ppf(0.5 + level / 2, df)) if math.isfinite(df) \
        else float(stats.norm.ppf(0.5 + level / 2))


def _sf(x: float, df: float) -> float:
    """P(T > x); a zero standard error makes x infinite."""
    return float(stats.t.sf(x, df)) if math.isfinite(df) else float(stats.norm.sf(x))


def _ratio(num: float, se: float) -> float:
    if se > 0:
        return num / se
    return math.copysign(math.inf, num) if num else 0.0


def _paired_parts(p: Paired, a: Summary, b: Summary) -> List[Tuple[float, float]]:
    d = p.higher.mean(axis=0) - p.lower.mean(axis=0)
    n_img = d.size
    return [(a.std ** 2 / a.n, a.n - 1), (b.std ** 2 / b.n, b.n - 1),
            (float(d.var(ddof=1)) / n_img, n_img - 1)]


def _two_sided_parts(a: Summary, b: Summary, paired: Optional[Paired]
                     ) -> Tuple[float, float, str]:
    if paired is not None:
        var, df = satterthwaite(_paired_parts(paired, a, b))
        return math.sqrt(var), df, "paired per image"
    var, df = satterthwaite([(a.std ** 2 / a.n, a.n - 1), (b.std ** 2 / b.n, b.n - 1),
                             (a.sampling_var, _sampling_df(a)), (b.sampling_var, _sampling_df(b))])
    sampled = a.sampling != "missing" or b.sampling != "missing"
    return math.sqrt(var), df, "unpaired" if sampled else "seeds only"


def mcnemar(higher: np.ndarray, lower: np.ndarray) -> Dict[str, Any]:
    """McNemar's exact test of one seed's two settings on the same images: ``b`` images right
    only under ``higher``, ``c`` only under ``lower``, and the two-sided binomial p."""
    b = int(np.sum((higher == 1) & (lower == 0)))
    c = int(np.sum((higher == 0) & (lower == 1)))
    p = float(stats.binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0
    return {"b": b, "c": c, "p": p}


def bootstrap_interval(p: Paired, level: float, draws: int = BOOTSTRAP_DRAWS,
                       seed: int = 0) -> Tuple[float, float]:
    """A two-stage bootstrap of the difference of means: each side's seeds drawn with
    replacement, then the images, the same draw for both sides (which keeps the pairing)."""
    rng = np.random.default_rng(seed)
    n_img = p.higher.shape[1]
    diffs = np.empty(draws)
    chunk = max(1, min(draws, 2 ** 22 // (n_img * max(len(p.higher), len(p.lower)))))
    for start in range(0, draws, chunk):
        k = min(chunk, draws - start)
        images = rng.integers(0, n_img, size=(k, n_img))
        means = []
        for rows in (p.higher, p.lower):
            seeds = rng.integers(0, len(rows), size=(k, len(rows)))
            acc = rows[:, images].mean(axis=2)                      # (seeds, k)
            means.append(np.take_along_axis(acc.T, seeds, axis=1).mean(axis=1))
        diffs[start:start + k] = means[0] - means[1]
    tail = (1 - level) / 2
    return float(np.quantile(diffs, tail)), float(np.quantile(diffs, 1 - tail))


def _band(lo: float, hi: float, diff: float, se: float, df: float, crit: float, level: float,
          how: str) -> str:
    dfs = "inf" if not math.isfinite(df) else f"{df:.1f}"
    return (f"{diff:+.4f}, {level:.0%} interval [{lo:+.4f}, {hi:+.4f}] (se {se:.4f}, {how}, "
            f"df {dfs}, t {crit:.2f})")


def _no_spread(name: str, kind: str, diff: float, what: str) -> TestResult:
    return TestResult(name, kind, CANNOT_TELL, diff, None,
                      f"{what}: {diff:+.4f}, but one seed gives no spread to judge it by")


def _decide(name: str, kind: str, diff: float, se: float, df: float, min_effect: float,
            what: str, alpha: float, how: str, suffix: str = "", **extra: Any) -> TestResult:
    level = 1 - alpha
    crit = critical(df, level)
    lo, hi = diff - crit * se, diff + crit * se
    band = _band(lo, hi, diff, se, df, crit, level, how)
    p_zero = min(1.0, 2 * _sf(abs(_ratio(diff, se)), df))
    p_small = min(1.0, 2 * _sf(_ratio(min_effect - diff, se), df))
    if lo > 0 and diff >= min_effect:
        verdict, why, p = HOLDS, f"{what} by {band}", p_zero
    elif hi < 0:
        verdict, why, p = DOES_NOT_HOLD, f"{what}: the opposite, {band}", p_zero
    elif hi < min_effect:
        verdict, p = DOES_NOT_HOLD, p_small
        why = f"{what}: {band}, below the {min_effect:g} effect the claim needs"
    else:
        verdict, why, p = CANNOT_TELL, f"{what}: {band}, within the noise", min(p_zero, p_small)
    return TestResult(name, kind, verdict, diff, se, why + suffix, df=df, critical=crit, p=p,
                      level=level, interval=(lo, hi), **extra)


def greater(name: str, higher: Summary, lower: Summary, *, min_effect: float,
            labels: Sequence[str] = ("higher", "lower"), alpha: float = ALPHA,
            paired: Optional[Paired] = None, draws: int = BOOTSTRAP_DRAWS) -> TestResult:
    """Is ``higher``'s mean above ``lower``'s by more than the noise and ``min_effect``?

    ``paired``: both sides' per-example outcomes on the same images; their per-image
    difference replaces the two binomial terms, and McNemar per seed and the bootstrap
    interval (``draws`` resamples) are reported beside the verdict."""
    diff, what = higher.mean - lower.mean, f"{labels[0]} - {labels[1]}"
    if higher.n < 2 or lower.n < 2:
        return _no_spread(name, "greater", diff, what)
    se, df, how = _two_sided_parts(higher, lower, paired)
    if paired is None:
        return _decide(name, "greater", diff, se, df, min_effect, what, alpha, how)
    boot = bootstrap_interval(paired, 1 - alpha, draws)
    suffix = f"; bootstrap [{boot[0]:+.4f}, {boot[1]:+.4f}]"
    per_seed: List[Dict[str, Any]] = []
    if paired.is_binary:
        # McNemar counts images right under one side only: it needs right-or-wrong outcomes.
        per_seed = [mcnemar(h, lo) for h, lo in zip(paired.higher, paired.lower)]
        seeds = "; ".join(f"{m['b']}/{m['c']} p {m['p']:.3g}" for m in per_seed)
        suffix += (f"; McNemar per seed (right only under {labels[0]} / only under "
                   f"{labels[1]}): {seeds}")
    return _decide(name, "greater", diff, se, df, min_effect, what, alpha, how, suffix=suffix,
                   paired=True, bootstrap=boot, mcnemar=per_seed)


def below(name: str, value: Summary, threshold: float, *, min_effect: float = 0.0,
          label: str = "value", alpha: float = ALPHA) -> TestResult:
    """Is ``value``'s mean under ``threshold`` by more than the noise?"""
    diff, what = threshold - value.mean, f"{threshold:g} - {label}"
    if value.n < 2:
        return _no_spread(name, "below", diff, what)
    var, df = side_variance(value)
    return _decide(name, "below", diff, math.sqrt(var), df, min_effect, what, alpha,
                   "seeds and test set" if value.sampling != "missing" else "seeds only")


def close(name: str, a: Summary, b: Summary, tolerance: float,
          labels: Sequence[str] = ("a", "b"), alpha: float = ALPHA,
          paired: Optional[Paired] = None) -> TestResult:
    """Do ``a`` and ``b`` differ by less than ``tolerance``? Two one-sided tests at ``alpha``
    each, read as the ``1 - 2 alpha`` interval against the margin."""
    diff, what = a.mean - b.mean, f"{labels[0]} - {labels[1]} against +-{tolerance:g}"
    if a.n < 2 or b.n < 2:
        return _no_spread(name, "close", diff, what)
    se, df, how = _two_sided_parts(a, b, paired)
    level = 1 - 2 * alpha
    crit = critical(df, level)
    lo, hi = diff - crit * se, diff + crit * se
    band = _band(lo, hi, diff, se, df, crit, level, how)
    p_tost = max(_sf(_ratio(diff + tolerance, se), df), _sf(_ratio(tolerance - diff, se), df))
    p_out = _sf(_ratio(abs(diff) - tolerance, se), df)
    common = dict(df=df, critical=crit, level=level, interval=(lo, hi), paired=paired is not None)
    if -tolerance < lo and hi < tolerance:
        return TestResult(name, "close", HOLDS, diff, se, f"{what}: {band}, inside (TOST)",
                          p=p_tost, **common)
    if lo > tolerance or hi < -tolerance:
        return TestResult(name, "close", DOES_NOT_HOLD, diff, se, f"{what}: {band}, outside",
                          p=p_out, **common)
    return TestResult(name, "close", CANNOT_TELL, diff, se, f"{what}: {band}, not decided",
                      p=min(p_tost, p_out), **common)


def untrustworthy(name: str, kind: str, masked: Sequence[str]) -> TestResult:
    """A test whose evaluations warned of gradient masking: its numbers overstate robustness,
    so it decides nothing and says why."""
    return TestResult(name, kind, UNTRUSTWORTHY, math.nan, None,
                      "gradient masking in the evaluation of " + "; ".join(masked))


def combine(verdicts: Sequence[str]) -> str:
    """The claim's verdict from its tests'."""
    if not verdicts:
        return CANNOT_TELL
    if UNTRUSTWORTHY in verdicts:
        return UNTRUSTWORTHY
    if DOES_NOT_HOLD in verdicts:
        return DOES_NOT_HOLD
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    return CANNOT_TELL


def holm(p_values: Sequence[Optional[float]]) -> List[Optional[float]]:
    """Holm's step-down adjustment of a family of p-values (None: a test without one, which
    is left out of the family)."""
    idx = sorted((i for i, p in enumerate(p_values) if p is not None), key=lambda i: p_values[i])
    m, out, running = len(idx), [None] * len(p_values), 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = running
    return out
