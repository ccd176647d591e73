"""accept_greedy on hand-made ragged batches; accept_speculative: exact cases, seeding, and
statistical losslessness against the EXACT target distribution (small V, many rows at once)."""

import math

import pytest
import torch

from deer_serve.acceptance import accept_greedy, accept_speculative
from deer_serve.sampling import sample

V, K = 6, 3


def tv(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Total-variation distance between an empirical histogram and a distribution."""
    freq = counts.double() / counts.sum()
    return 0.5 * (freq - probs.double()).abs().sum().item()


def hist(tokens: torch.Tensor, n: int = V) -> torch.Tensor:
    return torch.bincount(tokens, minlength=n)


def draw(probs: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """n independent draws from each row of probs (..., V) → (n, ...) int64, by inverse CDF:
    ~10x cheaper than multinomial here, and independent of the code under test."""
    cdf = probs.double().cumsum(-1)
    cdf = cdf / cdf[..., -1:]                       # last entry exactly 1, so u < 1 stays < V
    u = torch.rand((n, *probs.shape[:-1], 1), generator=g, dtype=torch.float64)
    return torch.searchsorted(cdf.expand(n, *cdf.shape).contiguous(), u, right=True).squeeze(-1)


def bound(cells: int, n: int) -> float:
    # E[TV] <= 0.5 * sqrt(cells / n) (Cauchy-Schwarz) and TV concentrates (sd ~ 1/sqrt(n)), so
    # 3x that mean bound never fails by chance; the seeds are fixed anyway. Observed TVs sit
    # ~5-10x below it, the bugs in test_statistical_check_has_power ~4-15x above it.
    return 1.5 * math.sqrt(cells / n)


# ----------------------------------------------------------------------------- greedy

def test_accept_greedy_ragged_batch():
    draft = torch.tensor([[9, 9, 9],    # draft_len 0: nothing to accept, bonus argmax p_1
                          [1, 2, 3],    # y_3 rejected: correction argmax p_3
                          [1, 2, 3],    # all accepted: bonus argmax p_4
                          [1, 2, 3],    # len 2: padding y_3 matches but must not count
                          [5, 2, 7]])   # first mismatch stops the run even if later match
    lens = torch.tensor([0, 3, 3, 2, 2])
    amax = torch.tensor([[4, 5, 6, 7],
                         [1, 2, 9, 8],
                         [1, 2, 3, 8],
                         [1, 2, 3, 8],
                         [1, 2, 7, 0]])
    n, nxt = accept_greedy(draft, lens, amax)
    assert n.tolist() == [0, 2, 3, 2, 0]
    assert nxt.tolist() == [4, 9, 8, 3, 1]
    assert n.dtype == nxt.dtype == torch.int64


def test_accept_greedy_k0():
    n, nxt = accept_greedy(torch.empty(2, 0, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                           torch.tensor([[3], [5]]))
    assert n.tolist() == [0, 0] and nxt.tolist() == [3, 5]


def test_shape_errors():
    with pytest.raises(ValueError):
        accept_greedy(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                      torch.zeros(2, 3, dtype=torch.long))  # needs k+1 = 4 columns
    with pytest.raises(ValueError):
        accept_speculative(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                           torch.full((2, 2, V), 1 / V), torch.full((2, 4, V), 1 / V))


# ------------------------------------------------------------------- speculative, exact

def rand_dist(g, *shape, zero=None):
    """Random rows over V; `zero` (…, V) bool forces zeros there (rows keep >= 1 nonzero)."""
    x = torch.softmax(torch.randn(*shape, V, generator=g) * 1.5, -1)
    if zero is not None:
        x = x.masked_fill(zero, 0.0)
        x = x / x.sum(-1, keepdim=True)
    return x


def test_one_hot_target_matches_greedy():
    g = torch.Generator().manual_seed(0)
    B = 200
    amax = torch.randint(0, V, (B, K + 1), generator=g)
    # drafts agree with the target often, so every accepted length shows up
    draft = torch.where(torch.rand(B, K, generator=g) < 0.7, amax[:, :K],
                        torch.randint(0, V, (B, K), generator=g))
    lens = torch.randint(0, K + 1, (B,), generator=g)
    p = torch.nn.functional.one_hot(amax, V).float()               # (B, K+1, V)
    q = torch.nn.functional.one_hot(draft, V).float()              # (B, K, V)
    want = accept_greedy(draft, lens, amax)
    for qq in (None, q):
        got = accept_speculative(draft, lens, qq, p, torch.Generator().manual_seed(1))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert set(want[0].tolist()) == {0, 1, 2, 3}


def test_p_equals_q_accepts_every_real_draft():
    g = torch.Generator().manual_seed(2)
    B = 500
    q = rand_dist(g, B, K)
    p = torch.cat([q, rand_dist(g, B, 1)], 1)
    draft = sample(q, g)
    lens = torch.randint(0, K + 1, (B,), generator=g)
    n, nxt = accept_speculative(draft, lens, q, p, g)
    assert torch.equal(n, lens)
    # every row got a bonus from p_{len+1}, which has full support here: just check range
    assert ((nxt >= 0) & (nxt < V)).all()


def test_zero_target_mass_always_rejects():
    g = torch.Generator().manual_seed(3)
    B = 500
    q = rand_dist(g, B, K)
    draft = sample(q, g)
    zero = torch.zeros(B, K + 1, V, dtype=torch.bool)
    zero[torch.arange(B), 1, draft[:, 1]] = True                    # p_2(y_2) = 0
    p = rand_dist(g, B, K + 1, zero=zero)
    n, nxt = accept_speculative(draft, torch.full((B,), K), q, p, g)
    assert (n <= 1).all() and (n == 1).any()
    rej2 = n == 1                                                    # rejected at position 2
    # correction from norm(max(0, p_2 - q_2)): never a token where p_2 is 0
    assert (p[rej2, 1].gather(1, nxt[rej2, None]) > 0).all()


@pytest.mark.parametrize("use_q", [True, False])
def test_seeded_reproducibility(use_q):
    g = torch.Generator().manual_seed(4)
    B = 1000
    q = rand_dist(g, B, K)
    p = rand_dist(g, B, K + 1)
    draft = sample(q, g)
    lens = torch.randint(0, K + 1, (B,), generator=g)
    qq = q if use_q else None
    a = accept_speculative(draft, lens, qq, p, torch.Generator().manual_seed(11))
    torch.manual_seed(123)  # the global RNG must not matter
    b = accept_speculative(draft, lens, qq, p, torch.Generator().manual_seed(11))
    c = accept_speculative(draft, lens, qq, p, torch.Generator().manual_seed(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))


# -------------------------------------------------------- speculative, statistical

class Scenario:
    """One cycle's worth of exact distributions, with p depending on the drafted prefix.

    p1 (V,); p2[x1] (V, V); p3[y2] (V, V); p4 (V,). Drafts y_i ~ r_i independently given the
    prefix (as DEER drafts them). kind "dense": q_i = r_i. "zeros": each row has zeros where the
    other is positive. "onehot": q=None (deterministic proposal per row), drafts still random.
    """

    def __init__(self, seed: int, kind: str):
        g = self.g = torch.Generator().manual_seed(seed)
        self.kind = kind
        pz = [None] * (K + 1)
        qz = [None] * K
        if kind == "zeros":
            # per position one random order: p_i is 0 on its first two tokens, q_i on the next
            # two, so q = 0 where p > 0 and p = 0 where q > 0 both occur
            perm = torch.argsort(torch.rand(K + 1, V, generator=g), -1)   # (K+1, V)
            z = torch.zeros(K + 1, 2, V, dtype=torch.bool)
            z[:, 0].scatter_(1, perm[:, :2], True)
            z[:, 1].scatter_(1, perm[:, 2:4], True)
            pz, qz = list(z[:, 0]), list(z[:K, 1])
        self.p1 = rand_dist(g, zero=pz[0])                                # (V,)
        self.p2 = rand_dist(g, V, zero=pz[1])                             # (V, V) row = x1
        self.p3 = rand_dist(g, V, zero=pz[2])                             # (V, V) row = y2
        self.p4 = rand_dist(g, zero=pz[3])                                # (V,)
        self.r = torch.stack([rand_dist(g, zero=qz[i]) for i in range(K)])  # (K, V)

    def cycle(self, N: int, lens: torch.Tensor, p1=None):
        """Draft, verify and accept N rows. p1: (N, V) rows to use instead of self.p1."""
        g = self.g
        y = draw(self.r, N, g)                                        # (N, K)
        p1 = self.p1.expand(N, V) if p1 is None else p1
        p = torch.stack([p1, self.p2[y[:, 0]], self.p3[y[:, 1]], self.p4.expand(N, V)], 1)
        q = None if self.kind == "onehot" else self.r.expand(N, K, V).clone()
        pad = torch.arange(K) >= lens[:, None]                        # (N, K) garbage there
        y_in = torch.where(pad, torch.randint(0, V, (N, K), generator=g), y)
        if q is not None:
            q[pad] = rand_dist(g, int(pad.sum()))
        n, nxt = accept_speculative(y_in, lens, q, p, g)
        return y, n, nxt

    def accept_mass(self) -> torch.Tensor:
        """P(y_1 = x and accepted), (V,): min(p1, q1), or r1 * p1 for a one-hot proposal."""
        r1 = self.r[0]
        return r1 * self.p1 if self.kind == "onehot" else torch.minimum(self.p1, r1)


CASES = [(s, kind) for kind in ("dense", "zeros", "onehot") for s in (0, 1)]


@pytest.mark.parametrize("seed,kind", CASES)
def test_first_token_marginal_is_p1(seed, kind):
    sc = Scenario(seed, kind)
    N = 100_000
    lens = torch.randint(0, K + 1, (N,), generator=sc.g)              # ragged, including 0
    y, n, nxt = sc.cycle(N, lens)
    first = torch.where(n >= 1, y[:, 0], nxt)
    assert tv(hist(first), sc.p1) < bound(V, N)


@pytest.mark.parametrize("seed,kind", CASES)
def test_second_token_given_first_accepted_is_p2(seed, kind):
    sc = Scenario(seed, kind)
    N = 100_000
    y, n, nxt = sc.cycle(N, torch.full((N,), K))
    acc = n >= 1
    x1 = y[acc, 0]
    x2 = torch.where(n[acc] >= 2, y[acc, 1], nxt[acc])
    assert acc.sum() > 5_000                                          # enough rows to judge
    want = sc.accept_mass()[:, None] * sc.p2                          # (V, V) joint ∝
    assert tv(hist(x1 * V + x2, V * V), (want / want.sum()).flatten()) < bound(V * V, len(x1))


@pytest.mark.parametrize("seed,kind", CASES)
def test_two_token_joint_across_cycles(seed, kind):
    """x1, x2 over all rows: when y_1 is rejected, x2 is the first token of the next cycle,
    whose target is p2[x1]. The joint must be p1(x1) * p2(x2 | x1)."""
    sc = Scenario(seed, kind)
    N = 100_000
    y, n, nxt = sc.cycle(N, torch.full((N,), K))
    x1 = torch.where(n >= 1, y[:, 0], nxt)
    y2c, n2c, nxt2c = sc.cycle(N, torch.full((N,), K), p1=sc.p2[x1])  # next cycle, all rows
    x2 = torch.where(n >= 2, y[:, 1], torch.where(n == 1, nxt,
                                                  torch.where(n2c >= 1, y2c[:, 0], nxt2c)))
    want = sc.p1[:, None] * sc.p2                                      # (V, V)
    assert tv(hist(x1 * V + x2, V * V), want.flatten()) < bound(V * V, N)


@pytest.mark.parametrize("bug", ["correction-from-p", "wrong-q"])
def test_statistical_check_has_power(bug):
    """Plausible bugs fail the same bound: a correction drawn from p instead of
    norm(max(0, p - q)), or acceptance told a q other than the one y was drawn from."""
    sc = Scenario(0, "onehot" if bug == "correction-from-p" else "dense")  # weakest case
    N = 100_000
    if bug == "correction-from-p":
        y, n, _ = sc.cycle(N, torch.full((N,), K))
        first = torch.where(n >= 1, y[:, 0], draw(sc.p1, N, sc.g))
    else:
        y = draw(sc.r[:1], N, sc.g)                                      # (N, 1) drafted from r_1
        p = torch.stack([sc.p1.expand(N, V), sc.p4.expand(N, V)], 1)   # (N, 2, V)
        n, nxt = accept_speculative(y, torch.ones(N, dtype=torch.long),
                                    torch.full((N, 1, V), 1 / V), p, sc.g)
        first = torch.where(n >= 1, y[:, 0], nxt)
    assert tv(hist(first), sc.p1) > 2 * bound(V, N)
