"""Ragged batching: one forward for many sequences gives each row what its own call gives.

`HFTarget.score_batch` (verify / prefill of B sequences, each with its own cached prefix, new
positions and rollback) and `DeerDrafterBackend.draft_batch` (B drafts, each row with its own
context cache) are checked row by row against the single-sequence calls, over several rounds
in which rows grow by different amounts, roll back and start fresh.
"""

import pytest
import torch

from tiny_models import make_target  # noqa: F401  (sets 1 torch thread)

from deer_serve.drafters.deer import DeerDrafterBackend
from deer_serve.models import make_tiny_drafter
from deer_serve.targets.hf import HFTarget
from deer_serve.types import SamplingParams


def _rand(n, g, vocab=300):
    return torch.randint(2, vocab, (n,), generator=g).tolist()


def _evolve(seqs, g, rnd):
    for i, s in enumerate(sorted(seqs)):
        if (i + rnd) % 3 == 1:
            seqs[s] = seqs[s][:-2]                  # a rejected tail: the caches roll back
        seqs[s] = seqs[s] + _rand(1 + 4 * i, g)


@pytest.mark.parametrize("return_hidden", [False, True])
def test_score_batch_equals_score_per_row(return_hidden):
    model = make_target(vocab_size=300, layers=2, hidden=64, seed=3)
    single, batched = HFTarget(model, max_sequences=16), HFTarget(model, max_sequences=16)
    g = torch.Generator().manual_seed(0)
    seqs = {f"s{i}": _rand(5 + 9 * i, g) for i in range(5)}
    for rnd in range(4):
        if rnd == 2:
            seqs["fresh"] = _rand(11, g)               # a new row joins mid-way (prefill + decode mix)
        sids = sorted(seqs)
        nq = [len(seqs[s]) if rnd == 0 else 1 + (i % 3) * 2 for i, s in enumerate(sids)]
        a = [single.score(s, seqs[s], n, return_hidden=return_hidden) for s, n in zip(sids, nq)]
        b = batched.score_batch(sids, [seqs[s] for s in sids], nq, return_hidden=return_hidden)
        assert len(b) == len(sids)
        for x, y, n in zip(a, b, nq):
            assert y.logits.shape == (n, 300)
            torch.testing.assert_close(y.logits, x.logits, atol=1e-4, rtol=1e-4)
            assert torch.equal(y.logits.argmax(-1), x.logits.argmax(-1))
            if return_hidden:
                torch.testing.assert_close(y.hidden, x.hidden, atol=1e-4, rtol=1e-4)
            else:
                assert y.hidden is None
        for s in sids:  # each row's cache holds exactly its own sequence
            assert batched.cached_length(s) == len(seqs[s])
        _evolve(seqs, g, rnd)


def test_score_batch_rejects_bad_batches():
    t = HFTarget(make_target(seed=1))
    with pytest.raises(ValueError):
        t.score_batch(["a", "a"], [[3, 4], [3, 5]], [1, 1])
    with pytest.raises(ValueError):
        t.score_batch(["a", "b"], [[3, 4], [3, 5]], [1, 3])
    with pytest.raises(ValueError):
        t.score_batch(["a", "b"], [[3, 4]], [1, 1])


@pytest.mark.parametrize("mode", ["tokens", "target-features"])
def test_draft_batch_equals_draft_per_row(mode):
    target = make_target(vocab_size=300, layers=2, hidden=64, seed=4)
    feat = HFTarget(target, max_sequences=32)
    drafter = make_tiny_drafter(target.config, context_mode=mode, seed=2)
    single = DeerDrafterBackend(drafter)
    batched = DeerDrafterBackend(drafter)
    g = torch.Generator().manual_seed(1)
    greedy = SamplingParams(temperature=0.0)
    seqs = {f"s{i}": _rand(4 + 7 * i, g) for i in range(4)}
    for rnd, k in enumerate([4, 8, 1, 16]):
        sids = sorted(seqs)
        hid = [feat.score("h" + s, seqs[s], len(seqs[s]), return_hidden=True,
                          n_hidden=len(seqs[s])).hidden if mode != "tokens" else None for s in sids]
        anchors = [seqs[s][-1] for s in sids]
        a = [single.draft(s, seqs[s], an, k, greedy, context_hidden=h) for s, an, h in zip(sids, anchors, hid)]
        b = batched.draft_batch(sids, [seqs[s] for s in sids], anchors, k, [greedy] * len(sids),
                                context_hiddens=hid)
        for x, y in zip(a, b):
            assert y.tokens.shape == (k,)
            assert torch.equal(x.tokens, y.tokens)
        # the batched logits themselves match (not only their argmax)
        for s in sids:
            assert batched._caches[s].length == single._caches[s].length == len(seqs[s])
        _evolve(seqs, g, rnd)


@pytest.mark.parametrize("mode", ["tokens", "target-features"])
def test_draft_batch_logits_match_single(mode):
    target = make_target(vocab_size=300, layers=2, hidden=64, seed=5)
    drafter = make_tiny_drafter(target.config, context_mode=mode, seed=3)
    F = drafter.config.target_feature_dim
    g = torch.Generator().manual_seed(2)

    def src(n):
        return torch.tensor(_rand(n, g)) if mode == "tokens" else torch.randn(n, F, generator=g)

    singles = [drafter.new_cache(8) for _ in range(3)]
    batched = [drafter.new_cache(8) for _ in range(3)]
    for rnd, (lens, k) in enumerate([((3, 17, 9), 6), ((0, 5, 2), 3), ((4, 1, 12), 9)]):
        news = [src(n) if n else None for n in lens]
        anchors = [7 + rnd, 9, 11]
        one = [drafter.draft_logits(c, *((x, None) if mode == "tokens" else (None, x)), a, k)
               for c, x, a in zip(singles, news, anchors)]
        many = drafter.draft_logits_batch(batched, news, anchors, k)
        assert many.shape == (3, k, 300)
        for i, s in enumerate(one):   # rows with different cached lengths (padded past)
            torch.testing.assert_close(many[i], s, atol=1e-4, rtol=1e-4)
        assert [c.length for c in batched] == [c.length for c in singles]
