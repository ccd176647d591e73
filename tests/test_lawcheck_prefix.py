"""`lawcheck.sequence_law` and `lawcheck.check_prefix_laws` on numpy samples (~1 s): the exact
law of a toy autoregressive model is the product of its conditionals; exact samples pass;
the false-alarm rate at alpha = 0.05 stays below 0.05 over many repetitions; a law off only in
its first token is rejected by the prefix check at a sample count where the joint check alone
misses it."""

from __future__ import annotations

import itertools

import numpy as np

import lawcheck

V, W = 4, 3


def toy_next(prefix: tuple) -> np.ndarray:
    """A fixed conditional law per prefix (any function of the prefix will do)."""
    rng = np.random.default_rng(hash(prefix) % (2**32))
    return rng.dirichlet(np.ones(V) * 0.7)


def law_and_sampler():
    law = lawcheck.sequence_law(toy_next, V, W)
    keys = list(law)
    probs = np.array([law[k] for k in keys])
    return law, keys, probs / probs.sum()


def draw(keys, probs, n, rng):
    idx = rng.choice(len(keys), size=n, p=probs)
    c: dict = {}
    for i in idx:
        c[keys[i]] = c.get(keys[i], 0) + 1
    return c


def test_sequence_law_is_the_product_of_the_conditionals():
    law = lawcheck.sequence_law(toy_next, V, W)
    assert len(law) == V ** W and abs(sum(law.values()) - 1.0) < 1e-9
    for xs in itertools.product(range(V), repeat=W):
        want = np.prod([toy_next(xs[:i])[xs[i]] for i in range(W)])
        assert abs(law[xs] - want) < 1e-12
    # prefix marginals are the shorter sequence laws
    two = lawcheck.prefix_marginal(law, 2)
    assert all(abs(two[k] - v) < 1e-9 for k, v in lawcheck.sequence_law(toy_next, V, 2).items())


def test_exact_samples_pass_and_false_alarms_stay_below_alpha():
    law, keys, probs = law_and_sampler()
    rng = np.random.default_rng(0)
    assert not lawcheck.check_prefix_laws(draw(keys, probs, 20_000, rng), law).rejected
    reps, alpha = 400, 0.05
    alarms = sum(lawcheck.check_prefix_laws(draw(keys, probs, 500, rng), law, alpha).rejected
                 for _ in range(reps))
    assert alarms / reps < alpha, alarms


def test_a_bug_in_the_first_token_is_caught_by_the_prefix_check():
    """Move 0.08 of the first token's mass (TV 0.08 on every prefix and on the joint law):
    at n = 6,000 the joint check (m = 64) cannot see it, the x1 check (m = 4) does."""
    law, keys, probs = law_and_sampler()
    first = lawcheck.prefix_marginal(law, 1)
    lo, hi = min(first, key=first.get), max(first, key=first.get)
    bad = dict(law)
    for k in keys:  # scale x1 = hi down and x1 = lo up, keeping the conditionals after x1
        if k[:1] == hi:
            bad[k] *= (first[hi] - 0.08) / first[hi]
        elif k[:1] == lo:
            bad[k] *= (first[lo] + 0.08) / first[lo]
    assert abs(lawcheck.tv({k: round(v * 10**9) for k, v in bad.items()}, law) - 0.08) < 1e-6
    rng = np.random.default_rng(1)
    p = np.array([bad[k] for k in keys])
    c = lawcheck.check_prefix_laws(draw(keys, p / p.sum(), 6_000, rng), law)
    assert c.rejected and c.checks[0].rejected, c
    assert c.joint.detectable > 0.08  # the joint check alone has no power against it here
