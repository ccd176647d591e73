"""DeerDrafter: the cached single-block inference path equals the all-blocks training forward."""

import pytest
import torch
from transformers import AutoConfig, AutoModel, Qwen3Config

from deer_serve.drafters.deer import DeerDrafterBackend
from deer_serve.models import DeerDrafter, DeerDrafterConfig, make_tiny_drafter
from deer_serve.types import SamplingParams

TARGET_CFG = Qwen3Config(vocab_size=97, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)


def _feats(n, F, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, F, generator=g)


@pytest.mark.parametrize("mode", ["tokens", "target-features"])
@pytest.mark.parametrize("k", [1, 4, 16, 33])
def test_cached_draft_equals_training_forward(mode, k):
    model = make_tiny_drafter(TARGET_CFG, context_mode=mode, seed=1)
    F = model.config.target_feature_dim
    ids = torch.randint(2, 97, (60,), generator=torch.Generator().manual_seed(3))
    feats = _feats(60, F) if F else None
    anchors = [5, 23, 40]
    block = torch.full((1, len(anchors), k + 1), model.config.mask_token_id)
    for b, s in enumerate(anchors):
        block[0, b, 0] = ids[s]
    with torch.no_grad():
        train_logits = model(context_ids=ids[None], context_features=None if F == 0 else feats[None],
                             block_ids=block, anchor_pos=torch.tensor([anchors]))  # (1, nb, k, V)

    cache = model.new_cache(capacity=8)  # small, so the buffers must grow
    done = 0
    for b, s in enumerate(anchors):  # incremental: each call adds only the new context
        new_ids = ids[done:s] if mode == "tokens" else None
        new_f = feats[done:s] if mode != "tokens" else None
        logits = model.draft_logits(cache, new_ids, new_f, int(ids[s]), k)
        done = s
        assert logits.shape == (k, 97)
        torch.testing.assert_close(logits, train_logits[0, b], atol=1e-4, rtol=1e-4)
    assert cache.length == anchors[-1]


def test_block_attends_bidirectionally_and_context_causally():
    model = make_tiny_drafter(TARGET_CFG, seed=2)
    ids = torch.randint(2, 97, (20,), generator=torch.Generator().manual_seed(0))
    out1 = model.draft_logits(model.new_cache(), ids[:10], None, 7, 4)
    ids2 = ids.clone()
    ids2[3] = (ids2[3] + 1) % 97
    out2 = model.draft_logits(model.new_cache(), ids2[:10], None, 7, 4)
    assert not torch.allclose(out1, out2)  # the block reads the context
    # changing tokens AFTER the context (not given) cannot matter: same call twice is identical
    out3 = model.draft_logits(model.new_cache(), ids[:10], None, 7, 4)
    torch.testing.assert_close(out1, out3)


def test_save_load_auto_classes(tmp_path):
    model = make_tiny_drafter(TARGET_CFG, context_mode="target-features", seed=4)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, DeerDrafterConfig) and cfg.context_mode == "target-features"
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, DeerDrafter)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2)


def test_backend_cache_miss_and_rollback_recompute():
    model = make_tiny_drafter(TARGET_CFG, seed=5)
    be = DeerDrafterBackend(model)
    greedy = SamplingParams(temperature=0.0)
    ids = torch.randint(2, 97, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    first = be.draft("s", ids[:12], ids[12], 8, greedy).tokens
    be.draft("s", ids[:20], ids[20], 8, greedy)
    # a different history for the same seq id (e.g. another replica's sequence): must recompute
    again = be.draft("s", ids[:12], ids[12], 8, greedy).tokens
    assert torch.equal(first, again)
    be.release("s")
    fresh = be.draft("s", ids[:12], ids[12], 8, greedy).tokens
    assert torch.equal(first, fresh)


def test_bad_config():
    with pytest.raises(ValueError):
        DeerDrafterConfig(context_mode="pixels")
    with pytest.raises(ValueError):
        DeerDrafterConfig(context_mode="target-features")
