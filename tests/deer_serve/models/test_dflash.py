"""The DFlash drafter against z-lab's reference `dflash/model.py` (the `dflash` package, installed
with --no-deps by `make install`): same checkpoint, same context features and block -> the same
block logits, with and without a cached prefix, single and batched."""

from __future__ import annotations

import json

import pytest
import torch

from tiny_models import make_target

dflash_ref = pytest.importorskip("dflash.model", reason="the reference package `dflash` is "
                                 "installed by `make install` (test extra)")

from deer_serve.models.dflash import (DFlashConfig, DrafterFormatError, load_dflash,  # noqa: E402
                                      make_tiny_dflash)

LAYERS = [0, 1]   # target layer ids the drafter reads (0-based decoder layers)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(target dir, reference drafter dir, reference model, target model)."""
    from transformers import Qwen3Config

    d = tmp_path_factory.mktemp("dflash")
    target = make_target(vocab_size=300, layers=3, hidden=64, seed=3)
    target.save_pretrained(d / "target")
    tc = target.config
    cfg = Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=tc.num_attention_heads,
                      num_key_value_heads=tc.num_key_value_heads, head_dim=tc.head_dim,
                      max_position_embeddings=1024, rope_parameters=tc.rope_parameters)
    cfg.dflash_config = {"mask_token_id": 1, "target_layer_ids": LAYERS, "block_size": 16}
    cfg.num_target_layers = 3
    cfg.architectures = ["DFlashDraftModel"]
    torch.manual_seed(7)
    ref = dflash_ref.DFlashDraftModel(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a norm in the wrong place shows
        for n, p in ref.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    ref.save_pretrained(d / "drafter")
    return d / "target", d / "drafter", ref, target


def ref_block_logits(ref, target, feats_chunks, anchor_block, start):
    """The reference's draft step (as `dflash_generate`): context features arrive in chunks;
    after each draft the cache is cropped back to the context. Returns the logits of the last
    call: (k, V)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=ref.config)
    pos = torch.arange(start + anchor_block.shape[1] + 8)[None]
    done = 0
    out = None
    for i, f in enumerate(feats_chunks):
        last = i == len(feats_chunks) - 1
        n = f.shape[1]
        blk = anchor_block if last else anchor_block[:, :1]
        # intermediate calls draft a throwaway 1-token block at the end of their chunk
        blk_start = done + n
        emb = torch.nn.functional.embedding(blk, target.get_input_embeddings().weight)
        h = ref(target_hidden=f, noise_embedding=emb,
                position_ids=pos[:, done:blk_start + blk.shape[1]], past_key_values=cache,
                use_cache=True)
        cache.crop(blk_start)
        done = blk_start
        if last:
            out = ref.compute_logits(h[:, 1:], target.lm_head)[0]
    return out


def features(target, ids):
    with torch.no_grad():
        hs = target(ids, output_hidden_states=True).hidden_states
    return torch.cat([hs[i + 1] for i in LAYERS], -1)                       # (1, T, 2H)


@pytest.mark.parametrize("k", [4, 16])
@pytest.mark.parametrize("ctx_len,split", [(5, None), (23, None), (40, 17), (40, 31)])
def test_block_logits_match_reference(pair, k, ctx_len, split):
    target_dir, drafter_dir, ref, target = pair
    mine = load_dflash(drafter_dir, target_dir, device="cpu")
    g = torch.Generator().manual_seed(ctx_len * 100 + k)
    ids = torch.randint(2, 300, (1, ctx_len + 1), generator=g)
    f = features(target, ids[:, :ctx_len])
    anchor = int(ids[0, ctx_len])
    block = torch.tensor([[anchor] + [1] * k])
    chunks = [f] if split is None else [f[:, :split], f[:, split:]]
    want = ref_block_logits(ref, target, chunks, block, ctx_len)

    cache = mine.new_cache(64)
    if split is not None:   # a cached prefix: the first chunk arrives with an earlier draft
        mine.draft_logits(cache, None, f[0, :split], int(ids[0, split]), 1)
    got = mine.draft_logits(cache, None, f[0, split or 0:], anchor, k)
    assert got.shape == want.shape == (k, 300)
    torch.testing.assert_close(got, want.float(), atol=2e-4, rtol=1e-4)
    assert cache.length == ctx_len


def test_batched_rows_equal_single_calls(pair):
    target_dir, drafter_dir, _, target = pair
    mine = load_dflash(drafter_dir, target_dir, device="cpu")
    g = torch.Generator().manual_seed(1)
    lens = [7, 19, 12]
    ids = [torch.randint(2, 300, (1, n + 1), generator=g) for n in lens]
    fs = [features(target, x[:, :-1])[0] for x in ids]
    single = [mine.draft_logits(mine.new_cache(), None, f, int(x[0, -1]), 8) for f, x in zip(fs, ids)]
    caches = [mine.new_cache() for _ in lens]
    # row 1 has part of its context cached already, so rows differ in cached and new lengths
    mine.draft_logits(caches[1], None, fs[1][:10], int(ids[1][0, 10]), 2)
    batch = mine.draft_logits_batch(caches, [fs[0], fs[1][10:], fs[2]],
                                     [int(x[0, -1]) for x in ids], 8)
    for i in range(3):
        torch.testing.assert_close(batch[i], single[i], atol=2e-4, rtol=1e-4)


def test_training_forward_equals_inference(pair):
    """The multi-block training forward gives each block the logits a draft call gives it."""
    target_dir, drafter_dir, _, target = pair
    mine = load_dflash(drafter_dir, target_dir, device="cpu")
    ids = torch.randint(2, 300, (1, 30), generator=torch.Generator().manual_seed(2))
    f = features(target, ids)
    anchors = torch.tensor([[4, 11, 20]])
    k = 6
    block = torch.full((1, 3, k + 1), 1)
    block[0, :, 0] = ids[0, anchors[0]]
    with torch.no_grad():
        lg = mine(context_features=f, block_ids=block, anchor_pos=anchors)   # (1, 3, k, V)
    for b, a in enumerate(anchors[0].tolist()):
        want = mine.draft_logits(mine.new_cache(), None, f[0, :a], int(ids[0, a]), k)
        torch.testing.assert_close(lg[0, b], want, atol=2e-4, rtol=1e-4)


def test_saved_checkpoint_loads_in_reference(pair, tmp_path):
    """Our save_pretrained writes what the reference loads, with the same weights."""
    target_dir, _, _, target = pair
    mine = make_tiny_dflash(target, LAYERS, num_layers=1, block_size=8)
    mine.save_pretrained(tmp_path / "d")
    ref = dflash_ref.DFlashDraftModel.from_pretrained(str(tmp_path / "d")).eval()
    assert ref.target_layer_ids == LAYERS and ref.mask_token_id == 1 and ref.block_size == 8
    ids = torch.randint(2, 300, (1, 12), generator=torch.Generator().manual_seed(5))
    f = features(target, ids[:, :11])
    want = ref_block_logits(ref, target, [f], torch.tensor([[int(ids[0, 11])] + [1] * 7]), 11)
    back = load_dflash(tmp_path / "d", target_dir, device="cpu")
    got = back.draft_logits(back.new_cache(), None, f[0], int(ids[0, 11]), 7)
    torch.testing.assert_close(got, want.float(), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("edit,msg", [
    (lambda c: c["dflash_config"].pop("target_layer_ids") and c.pop("num_target_layers"),
     "names no target_layer_ids"),
    (lambda c: c["dflash_config"].update(target_layer_ids=[0, 3]), "past the target's depth"),
    (lambda c: c.update(hidden_size=32, head_dim=8), "hidden size"),
    (lambda c: c["dflash_config"].pop("mask_token_id"), "no mask_token_id"),
    (lambda c: c.update(layer_types=["sliding_attention"] * 2, sliding_window=8), "sliding"),
])
def test_bad_config_is_refused(pair, tmp_path, edit, msg):
    target_dir, drafter_dir, _, _ = pair
    import shutil

    d = tmp_path / "bad"
    shutil.copytree(drafter_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DrafterFormatError, match=msg):
        load_dflash(d, target_dir, device="cpu")


def test_config_round_trip():
    cfg = DFlashConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                       target_layer_ids=[0, 2], mask_token_id=3, block_size=8,
                       output_multiplier=0.5)
    back = DFlashConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back.to_dict() == cfg.to_dict()
    assert back.target_feature_layers == [1, 3] and back.target_feature_dim == 16
