"""The torch target backend (`HFTarget`) on causal LMs other than Qwen3: per-sequence caches
that extend, roll back (crop) and diverge, the ragged batched score, and the target features,
each equal to one plain forward of the whole sequence."""

from __future__ import annotations

import pytest
import torch

from deer_serve.targets.hf import HFTarget

V = 320


def _models():
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM,
                              LlamaConfig, LlamaForCausalLM)

    torch.manual_seed(0)
    return {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(
            vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            eos_token_id=0, bos_token_id=None, pad_token_id=0)),
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=64, n_layer=3, n_head=4,
                                                   n_positions=512, eos_token_id=0, bos_token_id=0)),
        "neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(
            vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=512, eos_token_id=0, bos_token_id=0,
            rotary_pct=0.25)),
    }


@pytest.mark.parametrize("arch", ["llama", "gpt2", "neox"])
def test_cache_crop_and_batched_score_equal_a_plain_forward(arch):
    torch.manual_seed(1)
    model = _models()[arch]().eval()
    target = HFTarget(model)
    ids = torch.randint(2, V, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        full = model(torch.tensor([ids]), output_hidden_states=True)
    logits = full.logits[0]
    L = model.config.num_hidden_layers
    # the last hidden state is the final-normed one (the features' definition)
    head = model.get_output_embeddings()
    assert torch.allclose(head(full.hidden_states[L])[0], logits, atol=1e-4)
    feats = torch.cat([full.hidden_states[l][0] for l in target.feature_layers], -1)

    def close(a, b):
        return torch.allclose(a, b, atol=1e-4)

    r = target.score("a", ids[:30], 5, return_hidden=True)
    assert close(r.logits, logits[25:30]) and close(r.hidden, feats[25:30])
    assert close(target.score("a", ids[:36], 6).logits, logits[30:36])         # extend
    assert target.cached_length("a") == 36
    other = ids[:33] + [5, 6, 7]                                               # roll back, diverge
    with torch.no_grad():
        ref = model(torch.tensor([other])).logits[0]
    assert close(target.score("a", other, 3).logits, ref[-3:])
    assert target.cached_length("a") == 36
    target.score("b", ids[:20], 1)
    rows = [(ids[:38], 3), (ids[:25], 5), (ids[:12], 2)]                       # a: diverged cache
    res = target.score_batch(["a", "b", "c"], [r_ for r_, _ in rows], [q for _, q in rows],
                             return_hidden=True)
    for (toks, q), rr in zip(rows, res):
        n = len(toks)
        assert close(rr.logits, logits[n - q:n]) and close(rr.hidden, feats[n - q:n])
    assert close(target.score("b", ids[:28], 3).logits, logits[25:28])        # cut out of the batch
