"""The verdict rule against known answers: simulated suites whose true effect is known."""
import math

import numpy as np
import pytest
from scipy import stats

from advvit.findings import verdict as V

ALPHA = 0.05


def _band(rate, n):
    """Three binomial standard errors of a rate measured over ``n`` simulated suites."""
    return 3 * math.sqrt(rate * (1 - rate) / n)


def _seed_values(rng, mean, sd, seeds):
    return V.summarize(mean + sd * rng.standard_normal(seeds))


def _outcomes(rng, u_img, accuracy, seed_sd, seeds, shared):
    """One setting's 0/1 outcomes on the suite's images, one row per seed. An image's latent
    difficulty ``u_img`` is shared by every run with probability ``shared`` (hard images are
    hard for both settings), else drawn afresh; each seed's accuracy varies by ``seed_sd``."""
    per_seed = accuracy + seed_sd * rng.standard_normal(seeds)
    own = rng.random((seeds, u_img.size))
    u = np.where(rng.random((seeds, u_img.size)) < shared, u_img, own)
    return (u < per_seed[:, None]).astype(float)


def _suite(rng, effect, *, seeds=3, n_img=500, seed_sd=0.01, shared=0.9, base=0.6):
    """(higher, lower summaries, paired outcomes) of one simulated experiment: the higher side's
    true accuracy is ``base + effect``; the images are drawn anew for each suite."""
    u_img = rng.random(n_img)
    hi = _outcomes(rng, u_img, base + effect, seed_sd, seeds, shared)
    lo = _outcomes(rng, u_img, base, seed_sd, seeds, shared)
    summary = [V.summarize(rows.mean(axis=1), [n_img] * seeds) for rows in (hi, lo)]
    return summary[0], summary[1], V.Paired(hi, lo)


def test_the_interval_covers_a_known_effect_at_its_nominal_rate_with_two_seeds():
    # Seed spread alone, two seeds a side: 1-2 degrees of freedom. The t interval covers the
    # true difference about 95% of the time; two standard errors covered far less.
    rng, n, effect = np.random.default_rng(1), 4000, 0.02
    covered = fixed_two = 0
    for _ in range(n):
        hi, lo = _seed_values(rng, 0.5 + effect, 0.01, 2), _seed_values(rng, 0.5, 0.01, 2)
        r = V.greater("t", hi, lo, min_effect=0.0)
        covered += r.interval[0] <= effect <= r.interval[1]
        fixed_two += abs(r.difference - effect) <= 2 * r.se
    assert covered / n >= 1 - ALPHA - _band(1 - ALPHA, n)
    assert fixed_two / n < 0.85


def test_a_known_effect_is_found_at_the_rate_its_power_predicts():
    # Four seeds a side, equal spread: close to a pooled t-test of 6 df whose power at this
    # effect (2.83 standard errors) the noncentral t gives. Welch's df are at most 6, so the
    # rule finds it as often or a little less often, never more.
    rng, n, seeds, sd, effect = np.random.default_rng(2), 3000, 4, 0.01, 0.02
    found = sum(V.greater("t", _seed_values(rng, 0.5 + effect, sd, seeds),
                          _seed_values(rng, 0.5, sd, seeds), min_effect=0.0).verdict == V.HOLDS
                for _ in range(n)) / n
    df, ncp = 2 * seeds - 2, effect / (sd * math.sqrt(2 / seeds))
    power = stats.nct.sf(stats.t.ppf(1 - ALPHA / 2, df), df, ncp)
    assert power - 0.08 <= found <= power + _band(power, n)


@pytest.mark.parametrize("paired", [False, True])
def test_a_null_effect_holds_at_most_at_the_nominal_rate(paired):
    rng, n = np.random.default_rng(3), 600
    holds = 0
    for _ in range(n):
        hi, lo, outcomes = _suite(rng, 0.0)
        r = V.greater("t", hi, lo, min_effect=0.0, paired=outcomes if paired else None,
                      draws=10)
        holds += r.verdict == V.HOLDS
    # "holds" is the upper side of a two-sided 95% interval: at most 2.5%.
    assert holds / n <= ALPHA / 2 + _band(ALPHA / 2, n)


def test_paired_beats_unpaired_on_correlated_outcomes():
    # Both settings find the same images hard: the per-image difference is far less noisy
    # than two independent binomial terms, so a 3-point effect is found much more often.
    rng, n = np.random.default_rng(4), 300
    found = {False: 0, True: 0}
    narrower = 0
    for _ in range(n):
        hi, lo, outcomes = _suite(rng, 0.03, seed_sd=0.005)
        r = {p: V.greater("t", hi, lo, min_effect=0.01, paired=outcomes if p else None,
                          draws=10) for p in (False, True)}
        narrower += r[True].se < r[False].se
        for p in found:
            found[p] += r[p].verdict == V.HOLDS
    assert narrower == n
    assert found[True] / n >= found[False] / n + 0.3


def test_mcnemar_counts_the_discordant_images():
    hi = np.array([1, 1, 1, 0, 1, 0], dtype=float)
    lo = np.array([1, 0, 0, 0, 1, 1], dtype=float)
    m = V.mcnemar(hi, lo)
    assert (m["b"], m["c"]) == (2, 1)
    assert m["p"] == pytest.approx(stats.binomtest(2, 3, 0.5).pvalue)


def test_the_bootstrap_interval_holds_the_paired_difference():
    rng = np.random.default_rng(5)
    hi, lo, outcomes = _suite(rng, 0.05, n_img=2000)
    low, high = V.bootstrap_interval(outcomes, 0.95, draws=400)
    assert low < hi.mean - lo.mean < high
    r = V.greater("t", hi, lo, min_effect=0.01, paired=outcomes, draws=400)
    assert r.paired and len(r.mcnemar) == 3 and r.bootstrap == pytest.approx((low, high))
    assert "McNemar per seed" in r.why and "paired per image" in r.why


def test_a_below_test_names_an_analysis_sampling_term_it_judges_with():
    value = V.summarize([0.02, 0.03], terms=[(0.0004, 128), (0.0004, 128)])
    r = V.below("t", value, 0.05)
    assert "seeds and test set" in r.why
    # The seeds: std 0.00707, std**2 / 2 = 0.000025; the images: 0.0004.
    assert r.se == pytest.approx(math.sqrt(0.000025 + 0.0004))
