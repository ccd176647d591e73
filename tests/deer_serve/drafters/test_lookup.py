import numpy as np
import pytest
import torch

from deer_serve.drafters.lookup import LookupDrafter, lookup_continuation, splice_block
from deer_serve.types import DraftResult, SamplingParams


def test_lookup_prefers_longest_ngram_and_latest_match():
    seq = np.array([5, 6, 7, 1, 2, 9, 6, 7, 3, 4, 8, 6, 7])
    # last 2 tokens (6, 7) occur at 1 and 6; the latest earlier one (6) wins -> 3, 4, 8
    assert lookup_continuation(seq, 3, ngram_max=2).tolist() == [3, 4, 8]
    # with trigram (8, 6, 7) no earlier match: falls back to the bigram
    assert lookup_continuation(seq, 2, ngram_max=3).tolist() == [3, 4]
    # k caps the proposal; a match right before the end gives what is there
    assert lookup_continuation(np.array([1, 2, 1, 2]), 5, ngram_max=2).tolist() == [1, 2]


def test_lookup_no_match_is_empty():
    assert lookup_continuation(np.array([1, 2, 3, 4]), 4).size == 0
    assert lookup_continuation(np.array([7]), 4).size == 0


class FixedDrafter:
    """An inner drafter whose block and confidences are given (the splice's input)."""

    context_mode = "tokens"
    vocab_size = 10

    def __init__(self, tokens, conf, probs=None):
        self.r = DraftResult(torch.tensor(tokens), probs, torch.tensor(conf, dtype=torch.float32))

    def draft(self, *a, **kw):
        return self.r

    def release(self, seq_id):
        pass


def test_splice_keeps_the_confident_head_then_looks_up_from_its_end():
    # context + anchor = 1 2 3 4 5 1 | 2 ; confident head: y1 = 3 (cumprod 0.9, then 0.45)
    inner = FixedDrafter([3, 7, 7, 7, 7], [0.9, 0.5, 0.9, 0.9, 0.9])
    d = LookupDrafter(inner, ngram_max=2, ngram_min=2, min_conf=0.5)
    r = d.draft("s", [1, 2, 3, 4, 5, 1], 2, 5, SamplingParams())
    # ... 1 2 3: "2 3" was seen after position 1 -> 4 5 1 2 fills the block
    assert r.tokens.tolist() == [3, 4, 5, 1, 2]
    assert d.hits == 1 and d.spliced == 4 and d.drafted == 5


def test_splice_falls_back_to_the_drafter_tokens_at_their_positions():
    inner = FixedDrafter([8, 6, 6, 6, 6], [0.2, 0.9, 0.9, 0.9, 0.9])   # no confident head
    d = LookupDrafter(inner, ngram_max=2, ngram_min=2)
    # context + anchor = 3 4 0 3 4 : "3 4" seen at 0 -> 0 3 4 0 3 ... takes the whole block
    r = d.draft("s", [3, 4, 0, 3], 4, 5, SamplingParams())
    assert r.tokens.tolist() == [0, 3, 4, 0, 3]
    # nothing to look up: the drafter's block unchanged (the same object)
    r2 = d.draft("s", [1, 2, 3], 5, 5, SamplingParams())
    assert r2 is inner.r and d.hits == 1 and d.calls == 2


def test_splice_grows_the_block_only_with_an_unbroken_lookup_chain():
    """`max_len`: a lookup chain that runs on past the block grows it, up to max_len (a chain
    that found its start goes on: each continuation ends where the copied text does, whose
    last tokens occurred before); no lookup after the head: the block as drafted; without
    max_len (or at or below the block's length) the block keeps its length."""
    seq = np.array([5, 6, 7, 8, 9, 10, 11, 12, 5, 6])     # "5 6" seen at 0 -> 7 8 9 10 11 12 5 6
    y, low = [1, 2, 3], np.array([0.1, 0.1, 0.1])           # no confident head
    assert splice_block(seq, y, low) == ([7, 8, 9], 0, 3)
    assert splice_block(seq, y, low, max_len=3) == ([7, 8, 9], 0, 3)
    assert splice_block(seq, y, low, max_len=6) == ([7, 8, 9, 10, 11, 12], 0, 6)
    # the chain goes on through its own repeat ("5 6" again): capped at max_len
    z, j, spliced = splice_block(seq, y, low, max_len=12)
    assert z == [7, 8, 9, 10, 11, 12, 5, 6, 7, 8, 9, 10] and (j, spliced) == (0, 12)
    # a head the context never continues: no lookup, the block as drafted, not grown
    assert splice_block(seq, [4, 2, 3], np.array([0.9, 0.1, 0.1]), max_len=8) == (
        [4, 2, 3], 1, 0)


def test_spliced_lookup_tokens_get_one_hot_q_and_drafted_ones_keep_theirs():
    q = torch.full((4, 10), 0.1)
    inner = FixedDrafter([5, 5, 5, 5], [0.95, 0.3, 0.3, 0.3], probs=q)
    d = LookupDrafter(inner, ngram_max=2, ngram_min=2)
    # context + anchor = 7 5 1 | 7 ; head y1 = 5 -> seq ... 7 5 -> "7 5" seen at 0 -> 1 7 5 ...
    r = d.draft("s", [7, 5, 1], 7, 4, SamplingParams(temperature=1.0))
    assert r.tokens.tolist() == [5, 1, 7, 5]
    assert torch.equal(r.probs[0], q[0])                      # the drafter's own token keeps q_1
    for i in (1, 2, 3):
        assert r.probs[i, r.tokens[i]] == 1.0 and r.probs[i].sum() == 1.0
    assert torch.equal(q, torch.full((4, 10), 0.1))          # the inner result is not modified


def test_splice_needs_confidences():
    inner = FixedDrafter([1], [1.0])
    inner.r.conf = None
    with pytest.raises(ValueError, match="confidences"):
        LookupDrafter(inner).draft("s", [1, 2], 3, 1, SamplingParams())


def test_sampled_lookup_proposal_is_one_hot():
    d = LookupDrafter(None, vocab_size=10)
    r = d.draft("s", [1, 2, 3, 1], 2, 3, SamplingParams(temperature=1.0))
    assert r.tokens.tolist() == [3, 1, 2]
    assert r.probs.shape == (3, 10)
    assert torch.equal(r.probs.argmax(-1), r.tokens) and torch.all(r.probs.sum(-1) == 1)
    with pytest.raises(ValueError):
        LookupDrafter(None)


def test_deer_drafter_confidence_is_the_softmax_max():
    from transformers import Qwen3Config

    from deer_serve.drafters.deer import DeerDrafterBackend
    from deer_serve.models import make_tiny_drafter

    cfg = Qwen3Config(vocab_size=10, hidden_size=16, num_hidden_layers=1, intermediate_size=32,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    b = DeerDrafterBackend(make_tiny_drafter(cfg, hidden_size=16, num_layers=1))
    g = b.draft("a", [1, 2, 3], 4, 3, SamplingParams())
    s = b.draft("b", [1, 2, 3], 4, 3, SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    assert g.conf.shape == (3,) and torch.allclose(s.probs.max(-1).values, s.conf)
    assert torch.allclose(g.conf, s.conf, atol=1e-5)  # T=1, no top-k/p: the same softmax


def _lookup_reference(seq, k, ngram_max, ngram_min):
    """The definition, by brute force: largest n with an earlier match, its latest match."""
    seq = list(seq)
    L = len(seq)
    for n in range(min(ngram_max, L - 1), ngram_min - 1, -1):
        starts = [s for s in range(L - n) if seq[s:s + n] == seq[L - n:]]
        if starts:
            return seq[starts[-1] + n:starts[-1] + n + k]
    return []


def test_lookup_matches_its_definition_on_random_sequences():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        seq = rng.integers(0, int(rng.integers(2, 6)), int(rng.integers(1, 40)))
        lo = int(rng.integers(1, 4))
        hi = lo + int(rng.integers(0, 3))
        k = int(rng.integers(1, 8))
        assert lookup_continuation(seq, k, hi, lo).tolist() == _lookup_reference(seq, k, hi, lo)
