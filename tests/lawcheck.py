"""Sound goodness-of-fit checks for sampled laws: is a sample drawn from the exact law p?

Words: p is the law under test (exact, e.g. enumerated from the target model); n samples fall on
outcomes (any hashable: token tuples); p_hat is their empirical law; m = |support of p|;
TV(a, b) = 1/2 sum |a - b| = max over events A of a(A) - b(A).

The check rejects when TV(p_hat, p) >= t, or when any sample falls where p = 0 (impossible
under p, so that rule never raises a false alarm). t is the smaller of two thresholds, each at
false-alarm probability alpha/2, so P(reject | samples ~ p) <= alpha:

  t_BHC = sqrt((m ln 2 + ln(2/alpha)) / (2n))
      Bretagnolle-Huber-Carol: P(||p_hat - p||_1 >= eps) <= 2^m exp(-n eps^2 / 2). Proof: TV is
      the max over the 2^m events A of p_hat(A) - p(A); each is a mean of n bounded iid
      variables, so Hoeffding gives P(p_hat(A) - p(A) >= t) <= exp(-2 n t^2); union bound.
  t_McD = 1/2 sum_i sqrt(p_i (1 - p_i) / n) + sqrt(ln(2/alpha) / (2n))
      E TV(p_hat, p) <= 1/2 sum_i sd(p_hat_i) (Jensen), and one sample moves TV by at most
      1/n, so McDiarmid gives P(TV - E TV >= s) <= exp(-2 n s^2). Smaller than t_BHC when p
      is concentrated on a few of its m outcomes.

Power (why the counts are what they are): let the samples come from r with TV(r, p) = d > t.
For the FIXED event A* = {r > p}, TV(p_hat, p) >= p_hat(A*) - p(A*), and p_hat(A*) is a mean
of n Bernoulli(r(A*)), so Hoeffding without any union bound gives
  P(accept) <= P(p_hat(A*) - r(A*) <= -(d - t)) <= exp(-2 n (d - t)^2).
So every law at TV >= detectable_tv = t + sqrt(ln(1/beta) / (2n)) from p is rejected with
probability >= 1 - beta (beta = 1e-3 here). With alpha = 1e-6, beta = 1e-3 (t_BHC, which
does not depend on the law; a peaked law needs fewer):

  outcomes m   n for d = 0.02   n for d = 0.05   detectable d at n = 12k   at n = 30k
       2            55k               8.8k               0.043               0.027
      16            74k              12k                 0.050               0.031
      64           133k              21k                 0.066               0.042
     256           340k              54k                 0.106               0.067

(`samples_for` computes these; the McDiarmid threshold lowers them when p is peaked.)
The engine checks (tests/deer_serve/test_engine_law.py, m = 64) take 12k runs each, about 1 ms a run, so
they detect TV >= 0.066; TV 0.02 there needs 133k runs (DEER_LAW_SCALE=11, ~10x the time).
tests/test_lawcheck.py shows the 0.02 case at that count on numpy samples.

Independence: the bounds assume iid samples; engine runs with seeds s, s+1, ... are taken as
independent (torch's generator streams for distinct seeds). Tests use fixed seeds, so a run is reproducible and never flakes; alpha is the chance that a
CORRECT sampler with a seed picked at random would fail, and beta that a sampler off by d
would pass.

Floating point: an "exact" law enumerated from a float32 model differs from what the sampler
uses by ~1e-6 per probability; against thresholds of ~1e-2 that is negligible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Mapping, Optional

ALPHA = 1e-6   # false-alarm probability of one check
BETA = 1e-3    # miss probability at `detectable_tv`


def tv(counts: Mapping[Hashable, int], law: Mapping[Hashable, float]) -> float:
    """TV(p_hat, p) between the empirical law of `counts` and `law`."""
    n = sum(counts.values())
    keys = set(counts) | set(law)
    return 0.5 * sum(abs(counts.get(x, 0) / n - law.get(x, 0.0)) for x in keys)


def _support(law: Mapping[Hashable, float]) -> list[float]:
    return [v for v in law.values() if v > 0.0]


def threshold(law: Mapping[Hashable, float], n: int, alpha: float = ALPHA) -> float:
    """t with P(TV(p_hat, p) >= t) <= alpha for n iid samples from `law` (module docstring)."""
    ps = _support(law)
    log_a = math.log(2.0 / alpha)                      # alpha/2 to each bound
    t_bhc = math.sqrt((len(ps) * math.log(2.0) + log_a) / (2.0 * n))
    t_mcd = 0.5 * sum(math.sqrt(p * (1.0 - p)) for p in ps) / math.sqrt(n) \
        + math.sqrt(log_a / (2.0 * n))
    return min(t_bhc, t_mcd)


def detectable_tv(law: Mapping[Hashable, float], n: int, alpha: float = ALPHA,
                  beta: float = BETA) -> float:
    """Every law at least this far (TV) from `law` is rejected with probability >= 1 - beta."""
    return threshold(law, n, alpha) + math.sqrt(math.log(1.0 / beta) / (2.0 * n))


def samples_for(d: float, law: Optional[Mapping[Hashable, float]] = None, m: Optional[int] = None,
                alpha: float = ALPHA, beta: float = BETA) -> int:
    """Smallest n with detectable_tv <= d, for `law`, or for a uniform law on m outcomes
    (then t_BHC, which does not depend on the law)."""
    if law is None:
        law = {i: 1.0 / m for i in range(m)}
    lo, hi = 1, 1
    while detectable_tv(law, hi, alpha, beta) > d:
        hi *= 2
    while lo < hi:  # detectable_tv falls with n
        mid = (lo + hi) // 2
        if detectable_tv(law, mid, alpha, beta) <= d:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass
class LawCheck:
    n: int
    cells: int                 # m: outcomes with p > 0
    tv: float                  # TV(p_hat, p)
    threshold: float           # reject at tv >= threshold (false alarm <= alpha)
    detectable: float          # any law this far is rejected w.p. >= 1 - beta
    impossible: int            # samples on outcomes with p = 0
    alpha: float
    worst: list                # [(outcome, observed freq, p)], the largest |differences|

    @property
    def rejected(self) -> bool:
        return self.impossible > 0 or self.tv >= self.threshold

    def __str__(self) -> str:
        cells = ", ".join(f"{x}: {f:.4f} vs {p:.4f}" for x, f, p in self.worst)
        return (f"TV {self.tv:.4f} vs threshold {self.threshold:.4f} (n={self.n}, m={self.cells}, "
                f"false alarm <= {self.alpha:g}, detects TV >= {self.detectable:.4f}); "
                f"{self.impossible} impossible samples; largest gaps {cells}")


def check_law(counts: Mapping[Hashable, int], law: Mapping[Hashable, float],
              alpha: float = ALPHA, beta: float = BETA) -> LawCheck:
    """counts: outcome -> number of samples (a Counter); law: outcome -> exact probability."""
    n = sum(counts.values())
    if n <= 0:
        raise ValueError("no samples")
    total = sum(law.values())
    if abs(total - 1.0) > 1e-4 or any(v < 0 for v in law.values()):
        raise ValueError(f"law is not a distribution (sums to {total})")
    keys = set(counts) | set(law)
    gaps = sorted(((x, counts.get(x, 0) / n, law.get(x, 0.0)) for x in keys),
                  key=lambda r: -abs(r[1] - r[2]))
    return LawCheck(n=n, cells=len(_support(law)), tv=tv(counts, law),
                    threshold=threshold(law, n, alpha), detectable=detectable_tv(law, n, alpha, beta),
                    impossible=sum(c for x, c in counts.items() if law.get(x, 0.0) <= 0.0),
                    alpha=alpha, worst=gaps[:4])


def assert_law(counts, law, alpha: float = ALPHA) -> LawCheck:
    """Fail (AssertionError) when the samples reject `law`; return the check otherwise."""
    c = check_law(counts, law, alpha)
    assert not c.rejected, f"sampled law differs from the exact one: {c}"
    return c


def assert_rejects(counts, law, alpha: float = ALPHA) -> LawCheck:
    """The planted-bug side: fail when the samples do NOT reject `law`."""
    c = check_law(counts, law, alpha)
    assert c.rejected, f"the check missed a planted bug: {c}"
    return c


# ---- two samples: when p is not enumerable, compare with an independent reference sample ----

def two_sample_threshold(m: int, n1: int, n2: int, alpha: float = ALPHA) -> float:
    """t with P(TV(p_hat_1, p_hat_2) >= t) <= alpha when both samples come from one law on at
    most m outcomes: TV(p_hat_1, p_hat_2) <= TV(p_hat_1, p) + TV(p_hat_2, p), each bounded by
    t_BHC at alpha/2. A law at TV d is then detected (w.p. >= 1 - 2 beta) once
    d >= t + sqrt(ln(1/beta) / (2 n1)) + sqrt(ln(1/beta) / (2 n2))."""
    def bhc(n):
        return math.sqrt((m * math.log(2.0) + math.log(2.0 / alpha)) / (2.0 * n))
    return bhc(n1) + bhc(n2)


def check_two_samples(a: Mapping[Hashable, int], b: Mapping[Hashable, int], m: int,
                      alpha: float = ALPHA) -> tuple[float, float]:
    """(TV between the two empirical laws, threshold); m bounds the outcomes either can take."""
    na, nb = sum(a.values()), sum(b.values())
    seen = set(a) | set(b)
    if len(seen) > m:
        raise ValueError(f"{len(seen)} outcomes seen, more than m = {m}")
    d = 0.5 * sum(abs(a.get(x, 0) / na - b.get(x, 0) / nb) for x in seen)
    return d, two_sample_threshold(m, na, nb, alpha)


# ---- the exact law of the first tokens of an autoregressive model ----------------------------

def sequence_law(next_probs, vocab: int, window: int) -> dict:
    """{(x_1..x_window): prod_i p(x_i | x_<i)} over every sequence of `window` tokens from
    range(vocab); next_probs(prefix tuple) -> the model's next-token probabilities after the
    prompt and `prefix` (indexable by token, e.g. a (vocab,) tensor). Each prefix is asked
    once: 1 + vocab + ... + vocab^(window-1) calls."""
    law: dict = {}

    def walk(prefix: tuple, pr: float) -> None:
        if len(prefix) == window:
            law[prefix] = pr
            return
        p = next_probs(prefix)
        for t in range(vocab):
            walk(prefix + (t,), pr * float(p[t]))

    walk((), 1.0)
    return law


# ---- a sequence's law and the laws of its prefixes, in one check ----------------------------

def prefix_marginal(x: Mapping[Hashable, float], j: int) -> dict:
    """The law (or counts) of the first j tokens of tuple outcomes."""
    out: dict = {}
    for key, v in x.items():
        k = key[:j] if isinstance(key, tuple) else key
        out[k] = out.get(k, 0) + v
    return out


@dataclass
class PrefixCheck:
    """`check_law` of the first j tokens' law for j = 1..W (W: the outcomes' length), each at
    alpha / W: by the union bound a correct sampler fails ANY of them with probability <= alpha.
    The last is the joint law of all W tokens, so everything `check_law` detects at alpha / W
    this detects too; the shorter prefixes (far fewer outcomes, so smaller thresholds) catch
    a bug in the first tokens with far fewer samples."""
    checks: list   # LawCheck of prefixes of length 1..W

    @property
    def rejected(self) -> bool:
        return any(c.rejected for c in self.checks)

    @property
    def joint(self) -> LawCheck:
        return self.checks[-1]

    def __str__(self) -> str:
        rows = "; ".join(f"x1..x{j + 1}: TV {c.tv:.4f} vs {c.threshold:.4f} (m={c.cells}, detects "
                         f"{c.detectable:.4f}{', REJECTS' if c.rejected else ''})"
                         for j, c in enumerate(self.checks))
        return (f"n={self.joint.n}, false alarm <= {self.joint.alpha * len(self.checks):g} in all; "
                f"{rows}; {self.joint.impossible} impossible samples; largest gaps (joint) "
                + ", ".join(f"{x}: {f:.4f} vs {p:.4f}" for x, f, p in self.joint.worst))


def check_prefix_laws(counts: Mapping[Hashable, int], law: Mapping[Hashable, float],
                      alpha: float = ALPHA, beta: float = BETA) -> PrefixCheck:
    """counts / law over tuples of W tokens (e.g. from `sequence_law`)."""
    w = max(len(k) for k in law if isinstance(k, tuple))
    return PrefixCheck([check_law(prefix_marginal(counts, j), prefix_marginal(law, j),
                                  alpha / w, beta) for j in range(1, w + 1)])


def assert_prefix_laws(counts, law, alpha: float = ALPHA) -> PrefixCheck:
    c = check_prefix_laws(counts, law, alpha)
    assert not c.rejected, f"sampled law differs from the exact one: {c}"
    return c


def assert_prefix_rejects(counts, law, alpha: float = ALPHA) -> PrefixCheck:
    c = check_prefix_laws(counts, law, alpha)
    assert c.rejected, f"the check missed a planted bug: {c}"
    return c
