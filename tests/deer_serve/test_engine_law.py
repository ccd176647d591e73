"""The law of sampled output from the in-process engine (`deer_serve.engine.iter_generate`) with
the default features on, checked against the target's EXACT law; each check proves its power
by rejecting a bug planted in the real code path (a function the engine calls, monkeypatched).

Outcome: the first WINDOW = 3 generated tokens of a tiny random Qwen3 target with V = 4 tokens
(m = 64 outcomes) at temperature TEMP = 1; x1 comes from the prefill, x2 and x3 from the first
cycle(s). The exact law p(x1) p(x2 | x1) p(x3 | x1, x2) is enumerated from the target's own
logits with `process_logits`. Each sample is one seeded run, closed once it has WINDOW tokens
(the law of a prefix does not depend on when the caller stops reading). `lawcheck` decides:
false alarm <= 1e-6 per check; the TV each check detects is in its message (run with -rP) and
in docs/TESTING.md.

1. lookup + adaptive k: the real DeerDrafter wrapped in `LookupDrafter` as the CLI builds it,
   adaptive_k with block_size 4 (the first cycle drafts k = 4). Planted: the correction drawn
   from p instead of norm(max(0, p - q)); a spliced lookup token handed over with the
   drafter's q instead of one-hot.
2. pipelining (+ lookup + adaptive k, block_size 2): `DecoyDrafter`, made so that the Pipeliner's hypothesis
   comes true in about a third of the runs, and the window's third token then comes from a
   verified pre-draft (the real DeerDrafter's hypothesis comes true in ~3% of runs here: too
   few to see anything). Planted: the pre-draft's generator seeded with the request's seed
   (it replays the draws that made the first tokens). Also checked: a pre-draft used on a
   MISS keeps the law (it is still a valid proposal), so that is not a correctness bug.
3. every block accepted: `TargetAsDrafter` (q = p), block size 1, so x3 is always the bonus
   token from p_2. Planted: the bonus drawn from p_k instead of p_{k+1}.

Speed: the target backend is the real `HFTarget`, memoised by prefix (`PrefixTarget`: each
prefix's logits row is computed once and reused, so the enumeration and the engine see the same
numbers); the DeerDrafter's logits are memoised (`MemoDrafter`; tokens, q, confidences and
runner-ups still come from the real `draft_from_logits` with the engine's generator).
Everything else is the real code. DEER_LAW_SCALE=k multiplies every sample count by k.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter

import pytest
import torch

import lawcheck
from tiny_models import make_target

import deer_serve.engine as engine
from deer_serve.drafters.deer import DeerDrafterBackend, draft_from_logits
from deer_serve.drafters.lookup import LookupDrafter
from deer_serve.models import make_tiny_drafter
from deer_serve.sampling import process_logits, sample
from deer_serve.targets.hf import HFTarget
from deer_serve.types import DraftResult, PendingDraft, SamplingParams, ScoreResult

pytestmark = pytest.mark.slow  # ~2 minutes in all on 2 busy cores (docs/TESTING.md)

V = 4
TEMP = 1.0
WINDOW = 3
PROMPT = [2, 3, 1, 2, 0, 3, 3, 1, 2, 2, 0, 1]   # repeats: lookup finds n-gram matches
# samples per check; DEER_LAW_SCALE=10 makes every check detect ~3x smaller TV (10x the time)
SCALE = float(os.environ.get("DEER_LAW_SCALE", "1"))
N_MAIN, N_PIPE, N_BONUS = int(12_000 * SCALE), int(12_000 * SCALE), int(6_000 * SCALE)
# adaptive k with the largest k = 4 (the first cycle drafts 4; only positions 1-2 reach the
# window, and longer blocks make every verify a new sequence for the memoised target: slow)
DEFAULTS = dict(mode="deer", block_size=4, adaptive_k=True)
PIPELINED = dict(DEFAULTS, block_size=2, pipeline=True)  # k = 2: fewer distinct verifies


class PrefixTarget:
    """`TargetBackend` over a real `HFTarget`, memoised by prefix: row(prefix) = the target's
    logits for the token after `prefix`, computed once (one forward gives every prefix of the
    ids) and reused by every later call."""

    def __init__(self, inner: HFTarget):
        self.inner, self.rows = inner, {}
        self.vocab_size, self.eos_token_id = inner.vocab_size, inner.eos_token_id
        self.feature_dim, self.device = inner.feature_dim, inner.device

    def row(self, ids: tuple) -> torch.Tensor:
        r = self.rows.get(ids)
        if r is None:
            logits = self.inner.score("memo", ids, len(ids)).logits       # (T, V)
            for t in range(1, len(ids) + 1):
                self.rows.setdefault(ids[:t], logits[t - 1].clone())
            r = self.rows[ids]
        return r

    def score(self, seq_id, token_ids, n_query, return_hidden=False, n_hidden=None):
        ids = tuple(int(t) for t in token_ids)
        T = len(ids)
        return ScoreResult(torch.stack([self.row(ids[:T - n_query + 1 + i])
                                        for i in range(n_query)]))           # (n_query, V)

    def release(self, seq_id):
        pass


class MemoDrafter(DeerDrafterBackend):
    """The real drafter, its logits memoised by (context, anchor, k, prefix); the draft itself
    (y_i ~ q_i with the engine's generator, conf, alt) is the real `draft_from_logits`."""

    def __init__(self, model):
        super().__init__(model)
        self.memo = {}

    def draft(self, seq_id, context_ids, anchor, k, sampling, generator=None,
              context_hidden=None, prefix=()):
        key = (tuple(int(t) for t in context_ids), int(anchor), int(k), tuple(int(t) for t in prefix))
        logits = self.memo.get(key)
        if logits is None:
            cache = self.model.new_cache(64)
            logits = self.model.draft_logits(cache, torch.tensor(key[0]), None, key[1], key[2],
                                             key[3]).clone()                # (k, V)
            self.memo[key] = logits
        return draft_from_logits(logits, sampling, generator)

    def release(self, seq_id):
        pass


class TargetAsDrafter:
    """q_i = the target's own p_i: y_i drawn one at a time from p(. | context, anchor, y_<i)
    (an AR draft: the acceptance rule lets q_i depend on y_<i). u * q < p then accepts every
    draft, so every cycle emits its bonus token from p_{k+1}."""

    context_mode = "tokens"

    def __init__(self, target: PrefixTarget):
        self.target = target

    def draft(self, seq_id, context_ids, anchor, k, sampling, generator=None,
              context_hidden=None, prefix=()):
        seq = tuple(int(t) for t in (*context_ids, anchor, *prefix))
        ys, qs = [], []
        for _ in range(k):
            q = process_logits(self.target.row(seq + tuple(ys)), sampling.temperature)   # (V,)
            ys.append(int(sample(q, generator)))
            qs.append(q)
        q = torch.stack(qs)                                                          # (k, V)
        return DraftResult(tokens=torch.tensor(ys), probs=q, conf=q.max(-1).values,
                           alt=q.scatter(-1, torch.tensor(ys)[:, None], -1.0).argmax(-1))

    def release(self, seq_id):
        pass


class DecoyDrafter:
    """A drafter made so that the pipeline's hypothesis comes true often, and with it the
    pre-draft is used inside the window. At block position i, from the target's p after the
    context, anchor, prefix and the target's greedy chain of i-1 tokens: q_i puts 0.45 on p's
    least likely token, 0.25 on its most likely, the rest evenly on the others. Its confidence
    0.45 < 1/2 makes "y_1 rejected, corrected to alt_1" the Pipeliner's hypothesis; y_1 is
    mostly the unlikely token, rejected, and the correction, drawn from norm(max(0, p - q)),
    is mostly p's argmax = alt_1. Tokens, conf and alt come from the real `draft_from_logits`
    (logits TEMP * log q, so q is exactly what `process_logits` makes of them).

    `draft_async` drafts at once and hands back a finished `PendingDraft` (as a remote
    drafter's call would): the engine then needs no pre-draft thread, which keeps the
    statistics fast; the pre-draft's own generator stream is the engine's either way."""

    context_mode = "tokens"

    def __init__(self, target: PrefixTarget):
        self.target = target
        self.memo = {}
        self.used = 0  # pre-drafts whose result the engine asked for (= verified)

    def logits(self, seq: tuple, k: int) -> torch.Tensor:
        key = (seq, k)
        if key not in self.memo:
            rows, chain = [], seq
            for _ in range(k):
                p = process_logits(self.target.row(chain), TEMP)                     # (V,)
                q = torch.full((V,), 0.26 / (V - 2))
                q[p.argmin()] = 0.49
                q[p.argmax()] = 0.25
                rows.append(TEMP * q.log())
                chain = chain + (int(p.argmax()),)
            self.memo[key] = torch.stack(rows)                                       # (k, V)
        return self.memo[key]

    def draft(self, seq_id, context_ids, anchor, k, sampling, generator=None,
              context_hidden=None, prefix=()):
        seq = tuple(int(t) for t in (*context_ids, anchor, *prefix))
        return draft_from_logits(self.logits(seq, int(k)), sampling, generator)

    def draft_async(self, seq_id, context_ids, anchor, k, sampling, generator=None,
                    context_hidden=None, prefix=()):
        r = self.draft(seq_id, context_ids, anchor, k, sampling, generator, context_hidden, prefix)

        def finish():
            self.used += 1
            return r

        return PendingDraft(finish)

    def release(self, seq_id):
        pass


@pytest.fixture(scope="module")
def target():
    # head_scale 15: each p has a clear favourite but keeps every token likely enough (TEMP 1)
    return PrefixTarget(HFTarget(make_target(vocab_size=V, layers=1, hidden=16, seed=3,
                                             head_scale=15.0)))


@pytest.fixture(scope="module")
def deer_drafter(target):
    """The real tiny DeerDrafter (tokens mode), logits memoised; shared by the tests (it keeps
    no per-request state)."""
    return MemoDrafter(make_tiny_drafter(target.inner.model.config, context_mode="tokens",
                                         seed=4, hidden_size=16, num_layers=1))


@pytest.fixture(scope="module")
def exact(target):
    """outcome (x1, x2, x3) -> p(x1) p(x2 | x1) p(x3 | x1, x2), over all V^3 outcomes, from
    the same logits rows the engine gets."""
    law = {}
    for xs in itertools.product(range(V), repeat=WINDOW):
        pr = 1.0
        for i in range(WINDOW):
            pr *= float(process_logits(target.row(tuple(PROMPT) + xs[:i]), TEMP)[xs[i]])
        law[xs] = pr
    return law


def sample_window(target, drafter, n, seed0, **kw):
    """(Counter of the first WINDOW tokens, Counter of accepted drafts per cycle) over n runs of
    `iter_generate` with seeds seed0.. ; each run is closed once it has WINDOW tokens."""
    counts, accepted = Counter(), Counter()
    for s in range(seed0, seed0 + n):
        sp = SamplingParams(temperature=TEMP, max_new_tokens=16, seed=s, ignore_eos=True)
        it = engine.iter_generate(target, drafter, PROMPT, sp, **kw)
        out = []
        for step in it:
            if step.accepted is not None:
                accepted[step.accepted] += 1
            out += step.new_token_ids
            if len(out) >= WINDOW:
                break
        it.close()
        counts[tuple(out[:WINDOW])] += 1
    return counts, accepted


# ---- planted bugs: each replaces a function of the real code path with a buggy copy ----------

def plant_correction_from_p(monkeypatch):
    """The correction after a rejection drawn from p_{n+1} instead of norm(max(0, p - q))."""
    real = engine.accept_speculative

    def buggy(draft_tokens, draft_lens, q_probs, p_probs, generator=None):
        n, nxt = real(draft_tokens, draft_lens, q_probs, p_probs, generator)
        rows = torch.arange(len(n))
        redraw = sample(p_probs[rows, n].float(), generator)
        return n, torch.where(n < draft_lens, redraw, nxt)

    monkeypatch.setattr(engine, "accept_speculative", buggy)


def plant_bonus_from_p_k(monkeypatch):
    """The bonus after a whole block drawn from p_k (off by one) instead of p_{k+1}."""
    real = engine.accept_speculative

    def buggy(draft_tokens, draft_lens, q_probs, p_probs, generator=None):
        n, nxt = real(draft_tokens, draft_lens, q_probs, p_probs, generator)
        rows = torch.arange(len(n))
        redraw = sample(p_probs[rows, (n - 1).clamp(min=0)].float(), generator)
        return n, torch.where((n == draft_lens) & (n > 0), redraw, nxt)

    monkeypatch.setattr(engine, "accept_speculative", buggy)


def plant_lookup_keeps_drafter_q(monkeypatch):
    """A spliced lookup token handed to acceptance with the drafter's q_i instead of one-hot."""
    real = LookupDrafter._splice

    def buggy(self, seq, d):
        r = real(self, seq, d)
        return DraftResult(tokens=r.tokens, probs=d.probs, conf=r.conf, alt=r.alt)

    monkeypatch.setattr(LookupDrafter, "_splice", buggy)


class _AlwaysEqual(int):
    def __eq__(self, other):
        return True

    __hash__ = int.__hash__


def plant_predraft_used_on_miss(monkeypatch):
    """Every pre-draft is used, also when block b's outcome was not its hypothesis."""
    real = engine._pre_draft

    def buggy(*a, **kw):
        r = real(*a, **kw)
        if r is None:
            return None
        pd, m, guess, p_hyp = r
        return pd, _AlwaysEqual(m), _AlwaysEqual(guess), p_hyp

    monkeypatch.setattr(engine, "_pre_draft", buggy)


def plant_predraft_replays_seed(monkeypatch):
    """The pre-draft's generator seeded with the request's seed instead of a fresh stream drawn
    from the engine's: it replays the draws that made the first tokens."""
    real = engine.Pipeliner.submit

    def buggy(self, seq_id, ctx, anchor, k, sampling, generator, feats, **kw):
        g = torch.Generator().manual_seed(sampling.seed)
        return real(self, seq_id, ctx, anchor, k, sampling, g, feats, **kw)

    monkeypatch.setattr(engine.Pipeliner, "submit", buggy)


# ---- 1. lookup splice + adaptive k, the real drafter -----------------------------------------

def lookup_over(inner):
    return LookupDrafter(inner, vocab_size=V)  # as `cli.load_models` builds it (--lookup merge)


def test_law_with_lookup_and_adaptive_k(target, deer_drafter, exact):
    d = lookup_over(deer_drafter)
    counts, acc = sample_window(target, d, N_MAIN, 10**6, **DEFAULTS)
    cycles = sum(acc.values())
    # not vacuous: blocks carry lookup tokens; cycles end in corrections and in accepts
    assert d.spliced > 0.15 * d.drafted, (d.spliced, d.drafted)
    assert 0.25 * cycles < acc[0] < 0.75 * cycles, acc
    print(lawcheck.assert_law(counts, exact))


@pytest.mark.parametrize("plant", [plant_correction_from_p, plant_lookup_keeps_drafter_q],
                         ids=["correction-from-p", "lookup-token-keeps-drafter-q"])
def test_lookup_adaptive_check_catches_planted_bug(plant, monkeypatch, target, deer_drafter, exact):
    plant(monkeypatch)
    counts, _ = sample_window(target, lookup_over(deer_drafter), N_MAIN, 10**6, **DEFAULTS)
    print(lawcheck.assert_rejects(counts, exact))


# ---- 2. pipelining (+ lookup + adaptive k) ---------------------------------------------------

def test_law_with_pipelining(target, exact):
    decoy = DecoyDrafter(target)
    counts, _ = sample_window(target, lookup_over(decoy), N_PIPE, 2 * 10**6, **PIPELINED)
    # not vacuous: in this many runs the window's third token came from a verified pre-draft
    assert decoy.used > 0.15 * N_PIPE, decoy.used
    print(f"pre-drafts verified in {decoy.used} of {N_PIPE} runs;", lawcheck.assert_law(counts, exact))


def test_pipelining_check_catches_planted_bug(monkeypatch, target, exact):
    plant_predraft_replays_seed(monkeypatch)
    decoy = DecoyDrafter(target)
    counts, _ = sample_window(target, lookup_over(decoy), N_PIPE, 2 * 10**6, **PIPELINED)
    assert decoy.used > 0.15 * N_PIPE, decoy.used
    print(f"pre-drafts verified in {decoy.used} of {N_PIPE} runs;", lawcheck.assert_rejects(counts, exact))


def test_a_predraft_used_on_a_miss_still_keeps_the_law(monkeypatch, target, exact):
    """Not a bug, and the check must not call it one: a pre-draft for the wrong hypothesis is
    still a valid proposal (its tokens were drawn from the q it reports, from a stream of their
    own, and choosing to verify them does not look at them), so the acceptance rule keeps the
    output exact; a miss costs acceptance, not correctness. (Likewise a pre-draft that lost its
    q: the one-hot rule is exact for ANY proposal chosen without looking at the uniforms.)
    Here every pre-draft is verified, so this is also the check with the most pre-drafts in it."""
    plant_predraft_used_on_miss(monkeypatch)
    decoy = DecoyDrafter(target)
    n = N_PIPE // 2  # a must-pass check of a claim; half the runs keep the suite's time down
    counts, _ = sample_window(target, lookup_over(decoy), n, 2 * 10**6, **PIPELINED)
    assert decoy.used > 0.4 * n, decoy.used
    print(f"pre-drafts verified in {decoy.used} of {n} runs;", lawcheck.assert_law(counts, exact))


# ---- 3. whole blocks accepted: the bonus token -----------------------------------------------

BONUS = dict(mode="deer", block_size=1, adaptive_k=True)


def test_law_when_every_block_is_accepted_and_the_bonus_emitted(target, exact):
    counts, acc = sample_window(target, TargetAsDrafter(target), N_BONUS, 3 * 10**6, **BONUS)
    # every run: x2 = the accepted draft of the first cycle, x3 = its bonus from p_2
    assert acc == Counter({1: N_BONUS}), acc
    print(lawcheck.assert_law(counts, exact))


def test_bonus_check_catches_planted_bug(monkeypatch, target, exact):
    plant_bonus_from_p_k(monkeypatch)
    counts, _ = sample_window(target, TargetAsDrafter(target), N_BONUS, 3 * 10**6, **BONUS)
    print(lawcheck.assert_rejects(counts, exact))
