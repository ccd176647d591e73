import numpy as np
import pytest
import torch

from deer_serve.drafters.lookup import LookupDrafter, lookup_continuation
from deer_serve.types import SamplingParams


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


def _tiny_backend():
    from transformers import Qwen3Config

    from deer_serve.drafters.deer import DeerDrafterBackend
    from deer_serve.models import make_tiny_drafter

    cfg = Qwen3Config(vocab_size=10, hidden_size=16, num_hidden_layers=1, intermediate_size=32,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    return DeerDrafterBackend(make_tiny_drafter(cfg, hidden_size=16, num_layers=1))


def test_merge_uses_lookup_on_hit_and_the_diffusion_drafter_otherwise():
    inner = _tiny_backend()
    d = LookupDrafter(inner, ngram_max=2, min_tokens=2)
    hit = d.draft("s", [1, 2, 3, 4, 1], 2, 4, SamplingParams())   # (1,2) seen -> 3, 4, 1, 2
    assert hit.tokens.tolist() == [3, 4, 1, 2] and d.hits == 1
    miss = d.draft("s", [1, 2, 3], 5, 4, SamplingParams())         # 5 unseen -> the drafter
    direct = inner.draft("t", [1, 2, 3], 5, 4, SamplingParams())
    assert miss.tokens.tolist() == direct.tokens.tolist() and d.hits == 1 and d.calls == 2


def test_sampled_lookup_proposal_is_one_hot():
    d = LookupDrafter(None, vocab_size=10)
    r = d.draft("s", [1, 2, 3, 1], 2, 3, SamplingParams(temperature=1.0))
    assert r.tokens.tolist() == [3, 1, 2]
    assert r.probs.shape == (3, 10)
    assert torch.equal(r.probs.argmax(-1), r.tokens) and torch.all(r.probs.sum(-1) == 1)
    with pytest.raises(ValueError):
        LookupDrafter(None)
