"""SlotTarget (deer_serve/targets/hf_slots.py): the step engine's batched target backend with one
persistent slot buffer per layer.

Per row its logits and target features equal `HFTarget.score` (1e-4) over long random runs of
`score_batch` calls in which sequences join, grow, roll back drafts, diverge (cache misses),
leave and get evicted, batches cover some rows and not others (padding rows), prefills run as
their own forwards, and the buffer compacts and grows.
"""

from __future__ import annotations

import random

import pytest
import torch

from tiny_models import make_target

from deer_serve.targets.hf import HFTarget
from deer_serve.targets.hf_slots import SlotTarget

V = 300
TOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return make_target(vocab_size=V, layers=2, hidden=64, seed=0)  # GQA: 4 heads, 2 kv heads


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.isfinite(a).all()) \
        and float((a - b).abs().max()) < TOL


def random_run(model, *, steps: int, hidden: bool, seed: int, **kw):
    """Random score_batch calls against a SlotTarget, each row checked against HFTarget.score."""
    ref, st = HFTarget(model, feature_layers=(0, 1, 2)), \
        SlotTarget(model, feature_layers=(0, 1, 2), **kw)
    rng = random.Random(seed)
    seqs: dict[str, list[int]] = {}
    kinds = {"prefill": 0, "rollback": 0, "miss": 0, "release": 0}
    for step in range(steps):
        if len(seqs) < 7 and rng.random() < 0.3:  # a request joins
            seqs[f"s{step}"] = [rng.randrange(V) for _ in range(rng.randrange(1, 70))]
            kinds["prefill"] += 1
        if seqs and rng.random() < 0.08:          # one leaves
            sid = rng.choice(sorted(seqs))
            del seqs[sid]
            st.release(sid)
            ref.release(sid)
            kinds["release"] += 1
        if not seqs:
            continue
        sids = rng.sample(sorted(seqs), rng.randrange(1, len(seqs) + 1))
        ids, nq, nh = [], [], []
        for sid in sids:
            s = seqs[sid]
            r = rng.random()
            if r < 0.05:                          # divergent ids: a cache miss
                s[rng.randrange(len(s))] = rng.randrange(V)
                kinds["miss"] += 1
            elif r < 0.5 and len(s) > 4:          # rejected drafts: roll back
                del s[len(s) - rng.randrange(1, 4):]
                kinds["rollback"] += 1
            s += [rng.randrange(V) for _ in range(rng.randrange(1, 7))]
            ids.append(list(s))
            nq.append(rng.randrange(1, min(len(s), 6) + 1))
            nh.append(rng.randrange(1, len(s) + 1) if rng.random() < 0.2 else None)
        got = st.score_batch(sids, ids, nq, return_hidden=hidden,
                             n_hidden=nh if hidden else None)
        for sid, t, n, h, x in zip(sids, ids, nq, nh, got):
            y = ref.score(sid, t, n, return_hidden=hidden, n_hidden=h if hidden else None)
            assert close(x.logits, y.logits), (step, sid)
            if hidden:
                assert close(x.hidden, y.hidden), (step, sid)
            else:
                assert x.hidden is None
            assert st.cached_length(sid) == len(t)
    assert all(kinds.values()), kinds
    return st


@pytest.mark.parametrize("hidden", [False, True])
def test_rows_equal_hf_score_through_joins_leaves_rollbacks_and_misses(model, hidden):
    st = random_run(model, steps=160, hidden=hidden, seed=1 + hidden, slots=2, capacity=32,
                    prefill_split=24)
    s = st.stats
    assert s["compactions"] > 0 and s["grown"] > 0, s  # the buffer compacted and grew
    assert st.slots >= 4


def test_no_split_and_small_split_agree(model):
    """Every row in the shared forward (long prefills padded) and every row alone."""
    random_run(model, steps=60, hidden=False, seed=5, prefill_split=10**6)
    random_run(model, steps=60, hidden=False, seed=5, prefill_split=0)


def test_eviction_over_max_sequences_recomputes(model):
    ref, st = HFTarget(model), SlotTarget(model, max_sequences=2, slots=1, capacity=8)
    seqs = {f"e{i}": [3 + i, 4, 5 + i] for i in range(3)}
    for _ in range(3):
        for sid, s in seqs.items():
            s.append(7)
            assert close(st.score(sid, s, 2).logits, ref.score(sid, s, 2).logits)
    assert sum(st.cached_length(sid) > 0 for sid in seqs) == 2
    # a batch holds more sequences than max_sequences: none of its own rows is evicted
    out = st.score_batch(list(seqs), list(seqs.values()), [1, 1, 1])
    for (sid, s), x in zip(seqs.items(), out):
        assert close(x.logits, ref.score(sid, s, 1).logits)


def test_rollback_marks_columns_invalid_and_release_frees_the_slot(model):
    st = SlotTarget(model, slots=2, capacity=64)
    st.score("a", list(range(2, 12)), 1)
    slot = st._seqs["a"].slot
    assert int(st.valid[slot].sum()) == 10
    st.score("a", list(range(2, 8)) + [40, 41], 3)  # keeps 6, runs 2
    assert int(st.valid[slot].sum()) == 8 and st.cached_length("a") == 8
    st.release("a")
    assert int(st.valid[slot].sum()) == 0 and st.cached_length("a") == 0
    assert slot in st._free


def test_validates_like_hf_target(model):
    st = SlotTarget(model)
    with pytest.raises(ValueError):
        st.score("x", [1, 2], 3)
    with pytest.raises(ValueError):
        st.score_batch(["x", "x"], [[1], [2]], [1, 1])
    with pytest.raises(ValueError):
        st.score("x", [1, 2], 1, return_hidden=True, n_hidden=5)
    assert st.feature_dim == HFTarget(model).feature_dim and st.vocab_size == V


def test_eager_attention_and_no_gqa(model):
    """Without sdpa (no folded-GQA attention) and with as many kv heads as query heads."""
    eager = make_target(vocab_size=V, layers=2, hidden=64, seed=0)
    eager.set_attn_implementation("eager")
    random_run(eager, steps=40, hidden=True, seed=7, slots=2, capacity=32)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(2)
    mha = Qwen3ForCausalLM(Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=2, head_dim=16)).eval()
    random_run(mha, steps=40, hidden=False, seed=8, slots=2, capacity=32)
    assert model.config._attn_implementation == "sdpa"  # restored after every forward


def test_refuses_sliding_window_models():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from deer_serve.targets.hf_slots import supports

    cfg = Qwen3Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      use_sliding_window=True, sliding_window=8, max_window_layers=0)
    m = Qwen3ForCausalLM(cfg).eval()
    assert not supports(m)
    with pytest.raises(ValueError):
        SlotTarget(m)
