"""The statistical helper (tests/lawcheck.py) itself: exact samples pass, a law at TV 0.02 fails
at the sample count `samples_for(0.02)` names, the false-alarm and miss rates are within the
stated bounds (measured at loose alpha / beta, where a rate can be seen), and the edge rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

import lawcheck

M = 64  # the engine checks' outcome count: 3 tokens of a 4-token vocabulary


def dirichlet_law(m: int, seed: int, conc: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.full(m, conc))


def as_dict(vec) -> dict:
    return {i: float(v) for i, v in enumerate(vec)}


def counts_dict(counts) -> dict:
    return {i: int(c) for i, c in enumerate(counts) if c}


def shifted(p: np.ndarray, d: float, how: str) -> np.ndarray:
    """A law at TV exactly d from p: `point` moves d of mass from the largest cells onto the
    smallest one; `mix` blends toward the uniform law."""
    r = p.copy()
    if how == "point":
        left, sink = d, np.argmin(p)
        for i in np.argsort(-p):
            take = min(r[i], left)
            r[i] -= take
            left -= take
            if left <= 0:
                break
        r[sink] += d
    else:
        u = np.full(len(p), 1.0 / len(p))
        r = p + (d / (0.5 * np.abs(u - p).sum())) * (u - p)
    assert abs(0.5 * np.abs(r - p).sum() - d) < 1e-9 and r.min() >= 0
    return r


@pytest.mark.parametrize("seed", range(4))
def test_exact_samples_pass_and_a_law_at_tv_002_fails(seed):
    p = dirichlet_law(M, seed)
    law = as_dict(p)
    n = lawcheck.samples_for(0.02, law)
    assert lawcheck.detectable_tv(law, n) <= 0.02
    rng = np.random.default_rng(100 + seed)
    c = lawcheck.check_law(counts_dict(rng.multinomial(n, p)), law)
    assert not c.rejected, str(c)
    for how in ("point", "mix"):
        bad = lawcheck.check_law(counts_dict(rng.multinomial(n, shifted(p, 0.02, how))), law)
        assert bad.rejected, (how, str(bad))


def test_false_alarm_rate_is_below_alpha():
    """At alpha = 0.05 a rate can be measured: 4000 exact samples of n each reject < 5%."""
    alpha, n, reps = 0.05, 3000, 4000
    for m, conc in ((16, 1.0), (64, 1.0), (64, 0.1)):  # spread, and peaked (McDiarmid's case)
        p = dirichlet_law(m, m, conc)
        t = lawcheck.threshold(as_dict(p), n, alpha)
        tvs = 0.5 * np.abs(np.random.default_rng(7).multinomial(n, p, size=reps) / n - p).sum(1)
        assert (tvs >= t).mean() <= alpha, (m, conc, (tvs >= t).mean())
        # and the threshold is not vacuous: typical TVs are within a factor ~3 of it
        assert np.median(tvs) > t / 4, (np.median(tvs), t)


def test_miss_rate_at_the_detectable_tv_is_below_beta():
    alpha, beta, n, reps = 1e-6, 0.05, 4000, 2000
    p = dirichlet_law(M, 3)
    law = as_dict(p)
    d = lawcheck.detectable_tv(law, n, alpha, beta)
    t = lawcheck.threshold(law, n, alpha)
    for how in ("point", "mix"):
        r = shifted(p, d, how)
        tvs = 0.5 * np.abs(np.random.default_rng(11).multinomial(n, r, size=reps) / n - p).sum(1)
        assert (tvs < t).mean() <= beta, (how, (tvs < t).mean())


def test_threshold_is_the_smaller_bound_and_matches_the_formulas():
    n, alpha = 10_000, 1e-6
    spread = as_dict(np.full(M, 1.0 / M))
    bhc = math.sqrt((M * math.log(2) + math.log(2 / alpha)) / (2 * n))
    assert lawcheck.threshold(spread, n, alpha) == pytest.approx(bhc)
    peaked = as_dict(dirichlet_law(M, 0, conc=0.02))   # a few cells hold almost everything
    assert lawcheck.threshold(peaked, n, alpha) < 0.7 * bhc
    # more samples, smaller threshold; detectable = threshold + the power margin
    assert lawcheck.threshold(spread, 4 * n, alpha) == pytest.approx(bhc / 2)
    assert lawcheck.detectable_tv(spread, n, alpha, 1e-3) == pytest.approx(
        bhc + math.sqrt(math.log(1e3) / (2 * n)))


def test_samples_for_is_the_smallest_such_n():
    for m in (2, 16, 64):
        n = lawcheck.samples_for(0.02, m=m)
        law = as_dict(np.full(m, 1.0 / m))
        assert lawcheck.detectable_tv(law, n) <= 0.02 < lawcheck.detectable_tv(law, n - 1)
    assert lawcheck.samples_for(0.02, m=64) > lawcheck.samples_for(0.05, m=64)


def test_an_impossible_outcome_rejects_at_once():
    law = {0: 0.5, 1: 0.5, 2: 0.0}
    c = lawcheck.check_law({0: 50_000, 1: 50_000, 2: 1}, law)
    assert c.tv < c.threshold and c.impossible == 1 and c.rejected
    assert lawcheck.check_law({0: 5, 7: 1}, {0: 1.0}).impossible == 1  # outcome not in the law


def test_bad_input_raises():
    with pytest.raises(ValueError, match="not a distribution"):
        lawcheck.check_law({0: 1}, {0: 0.5, 1: 0.4})
    with pytest.raises(ValueError, match="no samples"):
        lawcheck.check_law({}, {0: 1.0})


def test_assert_helpers_raise_on_the_wrong_side():
    law = {0: 0.5, 1: 0.5}
    lawcheck.assert_law({0: 5000, 1: 5000}, law)
    with pytest.raises(AssertionError, match="differs"):
        lawcheck.assert_law({0: 6000, 1: 4000}, law)
    lawcheck.assert_rejects({0: 6000, 1: 4000}, law)
    with pytest.raises(AssertionError, match="missed"):
        lawcheck.assert_rejects({0: 5000, 1: 5000}, law)


def test_two_sample_check():
    m, n = 16, 40_000
    p = dirichlet_law(m, 5)
    rng = np.random.default_rng(9)
    a, b = counts_dict(rng.multinomial(n, p)), counts_dict(rng.multinomial(n, p))
    d, t = lawcheck.check_two_samples(a, b, m)
    assert d < t
    far = counts_dict(rng.multinomial(n, shifted(p, 0.08, "point")))
    d, t = lawcheck.check_two_samples(a, far, m)
    assert d >= t
    with pytest.raises(ValueError, match="more than m"):
        lawcheck.check_two_samples({0: 1, 1: 1}, {2: 1}, 2)
