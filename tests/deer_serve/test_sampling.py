"""process_logits / sample / greedy on hand-made examples."""

import math

import pytest
import torch

from deer_serve.sampling import greedy, process_logits, sample


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    # plain allclose: torch.testing.assert_close's first call costs seconds of lazy imports
    assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a, b)


def support(probs: torch.Tensor) -> set[int]:
    return set(torch.nonzero(probs > 0).flatten().tolist())


def test_temperature_matches_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 50, generator=g) * 3
    for T in (0.3, 1.0, 2.5):
        probs = process_logits(logits, T)
        assert probs.dtype == torch.float32 and probs.shape == logits.shape
        close(probs, torch.softmax(logits / T, dim=-1))
    # lower temperature sharpens: the argmax gets more mass
    assert process_logits(logits, 0.3).amax(-1).gt(process_logits(logits, 2.5).amax(-1)).all()


def test_top_k_keeps_k_largest():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    probs = process_logits(logits, 1.0, top_k=2)
    assert support(probs) == {1, 3}
    close(probs[[1, 3]], torch.softmax(torch.tensor([5.0, 4.0]), 0))
    assert support(process_logits(logits, 1.0, top_k=1)) == {1}
    # top_k >= V is a no-op
    close(process_logits(logits, 1.0, top_k=5), torch.softmax(logits, 0))


def test_top_k_ties_are_deterministic():
    logits = torch.tensor([2.0, 2.0, 2.0, 1.0])
    assert support(process_logits(logits, 1.0, top_k=2)) == {0, 1}  # lower ids first


@pytest.mark.parametrize("top_p,kept", [(0.4, {2}), (0.7, {2, 0}), (0.9, {2, 0, 3}),
                                        (0.99, {2, 0, 3, 1}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_crossing_token(top_p, kept):
    # probs in shuffled order: token 2 = 0.5, token 0 = 0.3, token 3 = 0.15, token 1 = 0.05
    base = torch.tensor([0.3, 0.05, 0.5, 0.15])
    probs = process_logits(base.log(), 1.0, top_p=top_p)
    assert support(probs) == kept
    # the kept tokens keep their relative mass
    kept_idx = sorted(kept)
    close(probs[kept_idx], base[kept_idx] / base[kept_idx].sum())


def test_tiny_top_p_keeps_argmax():
    logits = torch.tensor([[0.1, 0.2, 3.0], [1.0, 1.0, 1.0]])
    probs = process_logits(logits, 1.0, top_p=1e-6)
    assert support(probs[0]) == {2}
    assert support(probs[1]) == {0}  # uniform row: one token, the lowest id


def test_top_k_then_top_p_on_renormalised_mass():
    base = torch.tensor([0.4, 0.3, 0.2, 0.1])
    # after top_k=2 the mass is (4/7, 3/7): top_p=0.5 keeps only token 0, 0.6 keeps both
    assert support(process_logits(base.log(), 1.0, top_k=2, top_p=0.5)) == {0}
    assert support(process_logits(base.log(), 1.0, top_k=2, top_p=0.6)) == {0, 1}


def test_batched_rows_sum_to_one_and_handle_neg_inf():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 40, generator=g).to(torch.bfloat16)
    logits[0, 0, :30] = float("-inf")
    for kw in ({}, {"top_k": 5}, {"top_p": 0.8}, {"top_k": 7, "top_p": 0.5}):
        probs = process_logits(logits, 0.7, **kw)
        assert probs.dtype == torch.float32 and probs.shape == (2, 3, 40)
        close(probs.sum(-1), torch.ones(2, 3))
        assert (probs[0, 0, :30] == 0).all()
        if "top_k" in kw:
            assert ((probs > 0).sum(-1) <= kw["top_k"]).all()


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_raises(bad):
    with pytest.raises(ValueError):
        process_logits(torch.zeros(4), bad)


def test_bad_filters_raise():
    with pytest.raises(ValueError):
        process_logits(torch.zeros(4), 1.0, top_p=0.0)
    with pytest.raises(ValueError):
        process_logits(torch.zeros(4), 1.0, top_p=1.5)
    with pytest.raises(ValueError):
        process_logits(torch.zeros(4), 1.0, top_k=-1)


def test_sample_shape_support_and_frequencies():
    probs = torch.tensor([0.5, 0.0, 0.2, 0.3])
    N = 20_000
    toks = sample(probs.expand(N, 4), torch.Generator().manual_seed(0))
    assert toks.shape == (N,) and toks.dtype == torch.int64
    freq = torch.bincount(toks, minlength=4).float() / N
    assert freq[1] == 0  # zero-probability token never drawn
    tv = 0.5 * (freq - probs).abs().sum().item()
    assert tv < 3 * math.sqrt(4 / N)
    # leading dims are kept
    assert sample(probs.expand(2, 3, 4), torch.Generator().manual_seed(0)).shape == (2, 3)
    assert sample(torch.empty(0, 4)).shape == (0,)


def test_sample_is_reproducible_from_seed():
    probs = torch.softmax(torch.randn(64, 100, generator=torch.Generator().manual_seed(2)), -1)
    a = sample(probs, torch.Generator().manual_seed(7))
    b = sample(probs, torch.Generator().manual_seed(7))
    c = sample(probs, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_greedy_is_argmax_first_on_ties():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 2.0, 0.0]])
    assert greedy(logits).tolist() == [1, 0]
