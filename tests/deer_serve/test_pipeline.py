"""Pipelining in the decode loop (deer_serve.engine.Pipeliner): block b+1 is pre-drafted while
block b is verified, for b's most likely outcome, and used only when that outcome comes true.
Output must stay the target's (greedy: token for token), hits must be used, misses dropped."""

from __future__ import annotations

import random

import pytest
import torch

from deer_serve.drafters.deer import DeerDrafterBackend
from deer_serve.engine import Pipeliner, generate
from deer_serve.models import make_tiny_drafter
from deer_serve.types import DraftResult, SamplingParams

from test_engine import model, target  # noqa: F401  (the same tiny target fixtures)

MODES = ("tokens", "target-features")


def prompt_of(n: int, seed: int = 0, vocab: int = 300) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, vocab) for _ in range(n)]


class PredictableDrafter:
    """Knows the reference continuation and is wrong, on purpose, at block position `wrong`
    (0-based), where its runner-up (`alt`) is the right token and its confidence is low: so
    every block's most likely outcome is "`wrong` accepted, corrected to alt[wrong]", and it
    comes true. A block after an unknown context (a pre-draft for a wrong guess) is arbitrary."""

    context_mode = "tokens"

    def __init__(self, reference, wrong=2):
        self.ref, self.wrong = list(reference), wrong
        self.calls = []  # (context length, anchor, k, prefix)

    def draft(self, seq_id, context_ids, anchor, k, sampling, generator=None,
              context_hidden=None, prefix=()):
        seq = list(context_ids) + [anchor] + list(prefix)
        self.calls.append((len(context_ids), anchor, k, tuple(prefix)))
        n = len(seq)
        known = seq == self.ref[:n]
        ys = (self.ref[n:n + k] + [5] * k)[:k] if known else [6] * k
        alt = [4] * k
        conf = [0.95] * k
        if known and self.wrong < k:
            alt[self.wrong] = ys[self.wrong]
            ys[self.wrong] = 7 if ys[self.wrong] != 7 else 8
            conf[self.wrong] = 0.1
        return DraftResult(tokens=torch.tensor(ys), conf=torch.tensor(conf),
                           alt=torch.tensor(alt))

    def release(self, seq_id):
        pass


def test_a_right_hypothesis_is_used_every_cycle(target):
    prompt = prompt_of(9)
    sp = SamplingParams(max_new_tokens=60, ignore_eos=True)
    ar = generate(target, None, prompt, sp, mode="ar")
    d = PredictableDrafter(prompt + ar.token_ids, wrong=2)
    r = generate(target, d, prompt, sp, block_size=8, pipeline=True)
    assert r.token_ids == ar.token_ids
    assert set(r.accept_lengths[:-1]) == {2}      # every block: 2 right, then the wrong token
    hits, misses = r.extra["pipeline_hits"], r.extra["pipeline_misses"]
    # each cycle but the first drafts from the pre-draft sent during the previous verify
    assert misses == 0 and hits == len(r.accept_lengths) - 1 and hits >= 15
    pre = [c for c in d.calls if c[3]]
    assert len(pre) == hits
    for n_ctx, _anchor, _k, prefix in pre:         # [y_1, y_2, guess]: the right tokens
        assert len(prefix) == 3 and list(prefix) == d.ref[n_ctx + 1:n_ctx + 4]
    # without pipelining: the same output and cycles, every block drafted after its verify
    d2 = PredictableDrafter(prompt + ar.token_ids, wrong=2)
    r2 = generate(target, d2, prompt, sp, block_size=8)
    assert r2.token_ids == ar.token_ids and r2.accept_lengths == r.accept_lengths
    assert r2.extra == {} and not any(c[3] for c in d2.calls)


def test_a_wrong_hypothesis_is_never_used(target):
    """Confidences point at position 2, but the runner-up there is wrong: every pre-draft
    misses, and the output is still the target's."""
    prompt = prompt_of(9, seed=1)
    sp = SamplingParams(max_new_tokens=40, ignore_eos=True)
    ar = generate(target, None, prompt, sp, mode="ar")

    class WrongGuess(PredictableDrafter):
        def draft(self, *a, **kw):
            r = super().draft(*a, **kw)
            r.alt = torch.full_like(r.alt, 3)
            return r

    d = WrongGuess(prompt + ar.token_ids)
    r = generate(target, d, prompt, sp, block_size=8, pipeline=True)
    assert r.token_ids == ar.token_ids
    assert r.extra["pipeline_hits"] == 0 and r.extra["pipeline_misses"] >= 10


@pytest.mark.parametrize("context_mode", MODES)
def test_greedy_pipelined_deer_with_a_real_drafter_is_plain_ar(model, target, context_mode):
    drafter = DeerDrafterBackend(make_tiny_drafter(model.config, context_mode=context_mode, seed=1))
    for n in (1, 7, 40):
        prompt = prompt_of(n, seed=n)
        sp = SamplingParams(max_new_tokens=48, ignore_eos=True)
        ar = generate(target, None, prompt, sp, mode="ar")
        for bs, adaptive in ((4, False), (16, False), (16, True)):
            r = generate(target, drafter, prompt, sp, block_size=bs, pipeline=True,
                         adaptive_k=adaptive)
            assert r.token_ids == ar.token_ids, (n, bs, adaptive)
            assert r.extra["pipeline_hits"] + r.extra["pipeline_misses"] > 0


def test_seeded_sampled_pipelined_runs_repeat(model, target):
    drafter = DeerDrafterBackend(make_tiny_drafter(model.config, context_mode="tokens", seed=1))
    sp = SamplingParams(temperature=1.0, max_new_tokens=40, seed=11, ignore_eos=True)
    a = generate(target, drafter, prompt_of(5), sp, block_size=8, pipeline=True)
    b = generate(target, drafter, prompt_of(5), sp, block_size=8, pipeline=True)
    assert a.token_ids == b.token_ids and a.accept_lengths == b.accept_lengths
    assert a.extra == b.extra


def test_hypothesis_is_the_most_likely_outcome():
    d = DraftResult(tokens=torch.tensor([1, 2, 3, 4]), conf=torch.tensor([0.9, 0.8, 0.3, 0.9]),
                    alt=torch.tensor([5, 6, 7, 8]))
    # P(n=0)=.1, P(n=1)=.9*.2=.18, P(n=2)=.72*.7=.504, P(n=3)=.216*.1=.0216
    m, guess, p = Pipeliner.hypothesis(d, [1, 2, 3, 4])
    assert (m, guess) == (2, 7) and p == pytest.approx(0.504)
    assert Pipeliner.hypothesis(DraftResult(tokens=torch.tensor([1])), [1]) is None
    # a runner-up equal to the block's own token (a spliced-in token) is no outcome
    assert Pipeliner.hypothesis(d, [1, 2, 7, 4]) is None


def test_prefix_drafts_batch_like_single_calls(model):
    """`prefix` (the pre-draft's unverified tokens) in one batched forward equals per-row
    calls, and changes the block (the tokens are read)."""
    for mode in MODES:
        drafter = DeerDrafterBackend(make_tiny_drafter(model.config, context_mode=mode, seed=2))
        F = drafter.model.config.target_feature_dim if mode == "target-features" else 0
        rows = [(prompt_of(6, 1), 9, [11, 12]), (prompt_of(13, 2), 4, [5, 6])]
        sp = SamplingParams()
        feats = [torch.randn(len(c), F) if F else None for c, _, _ in rows]
        single = [drafter.draft(f"s{i}", c, a, 4, sp, None, f, prefix=p).tokens
                  for i, ((c, a, p), f) in enumerate(zip(rows, feats))]
        batch = drafter.draft_batch(["b0", "b1"], [c for c, _, _ in rows], [a for _, a, _ in rows],
                                    4, [sp, sp], None, feats, prefixes=[p for _, _, p in rows])
        for s, b in zip(single, batch):
            assert s.tolist() == b.tokens.tolist()
        m = drafter.model
        cache = m.new_cache(64)
        ctx = torch.tensor(rows[0][0]) if not F else None
        f0 = feats[0] if F else None
        with_prefix = m.draft_logits(cache, ctx, f0, 9, 4, [11, 12])
        cache2 = m.new_cache(64)
        other = m.draft_logits(cache2, ctx, f0, 9, 4, [13, 14])
        assert with_prefix.shape == (4, m.config.vocab_size)
        assert not torch.allclose(with_prefix, other)


def test_pre_drafts_below_min_p_are_skipped(model, target):
    """`pipeline_min_p`: a hypothesis less likely than the bound gets no pre-draft (counted as
    skipped); above every hypothesis's probability nothing is pre-drafted, output unchanged."""
    drafter = DeerDrafterBackend(make_tiny_drafter(model.config, context_mode="tokens", seed=1))
    prompt, sp = prompt_of(9, seed=3), SamplingParams(max_new_tokens=40, ignore_eos=True)
    ar = generate(target, None, prompt, sp, mode="ar")
    none = generate(target, drafter, prompt, sp, block_size=8, pipeline=True, pipeline_min_p=1.01)
    assert none.token_ids == ar.token_ids
    assert none.extra["pipeline_hits"] + none.extra["pipeline_misses"] == 0
    assert none.extra["pipeline_skipped"] > 0
    every = generate(target, drafter, prompt, sp, block_size=8, pipeline=True)
    assert every.token_ids == ar.token_ids and every.extra["pipeline_skipped"] == 0
    assert every.extra["pipeline_hits"] + every.extra["pipeline_misses"] == \
        none.extra["pipeline_skipped"]
