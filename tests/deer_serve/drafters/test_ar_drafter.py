"""The AR draft as the engine's drafter (`deer_serve.drafters.ar.ARDrafterBackend`, bench `sd-ar`).

Tiny random Qwen3 models: the target, and a draft that is the target with noise on its LM head
(so some drafts are accepted and some rejected). Checks: greedy output equals plain AR decoding
token for token (block sizes 1, 4, 16, adaptive k, pipelining); the draft KV cache is reused
(after the first cycle a cycle costs about k one-token draft forwards, never a re-encode); the
sampled law is the target's (`lawcheck`), and the check rejects a planted bug; `load_drafter`
detects an AR draft; the Drafter deployment class serves one; `deer-serve bench` runs `sd-ar`.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

import lawcheck
from tiny_models import REPO, make_target

import deer_serve.drafters.ar as ar_mod
from deer_serve import engine
from deer_serve.drafters import DrafterFormatError, drafter_feature_layers, drafter_format, load_drafter
from deer_serve.drafters.ar import ARDrafterBackend
from deer_serve.sampling import process_logits
from deer_serve.targets.hf import HFTarget
from deer_serve.types import DraftResult, SamplingParams, ScoreResult

PROMPT = [3, 5, 7, 9, 11, 3, 5, 7, 12, 4]


def noisy_copy(model, noise: float, seed: int):
    """The model with N(0, (noise * std)^2) added to its LM head: a draft that mostly agrees."""
    d = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = d.lm_head.weight
        w.add_(torch.randn(w.shape, generator=g) * noise * w.std())
    return d


@pytest.fixture(scope="module")
def pair():
    # head_scale 20: sharp distributions, argmax far from float ties
    tm = make_target(vocab_size=64, layers=2, hidden=32, seed=0, head_scale=20.0)
    return tm, noisy_copy(tm, 0.4, seed=1)


def greedy(max_new=40):
    return SamplingParams(max_new_tokens=max_new, ignore_eos=True)


@pytest.fixture(scope="module")
def ar_ref(pair):
    return engine.generate(HFTarget(pair[0]), None, PROMPT, greedy(), mode="ar").token_ids


# ---- greedy: token for token ------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(block_size=1), dict(block_size=4), dict(block_size=16),
                                dict(block_size=16, adaptive_k=True),
                                dict(block_size=4, pipeline=True),
                                dict(block_size=16, adaptive_k=True, pipeline=True)],
                         ids=["k1", "k4", "k16", "k16-adaptive", "k4-pipeline",
                              "k16-adaptive-pipeline"])
def test_greedy_sd_ar_equals_ar(pair, ar_ref, kw):
    tm, dm = pair
    d = ARDrafterBackend(dm)
    r = engine.generate(HFTarget(tm), d, PROMPT, greedy(), mode="deer", **kw)
    assert r.token_ids == ar_ref
    # not vacuous: drafts are accepted in some cycles and rejected in others
    assert any(a > 0 for a in r.accept_lengths) and 0 in r.accept_lengths, r.accept_lengths
    if kw.get("pipeline"):
        assert r.extra["pipeline_hits"] + r.extra["pipeline_misses"] > 0, r.extra
    assert len(d._caches) == 0  # the engine released the sequence's draft cache


# ---- the draft cache is reused ---------------------------------------------------------------

class ForwardLog:
    """A forward pre-hook recording the number of new tokens of each draft-model forward."""

    def __init__(self, model):
        self.sizes: list[int] = []
        self.h = model.register_forward_pre_hook(self.pre, with_kwargs=True)

    def pre(self, module, args, kwargs):
        self.sizes.append(int(kwargs["input_ids"].shape[1]))


@pytest.mark.parametrize("k", [4, 8])
def test_draft_cache_is_reused_across_cycles(pair, k):
    tm, dm = pair
    d = ARDrafterBackend(dm)
    log = ForwardLog(dm)
    try:
        r = engine.generate(HFTarget(tm), d, PROMPT, greedy(48), mode="deer", block_size=k)
    finally:
        log.h.remove()
    ks = [min(k, 48 - 1 - n) for n in _emitted_before(r)]  # the engine's k of each cycle
    # the first forward encodes the prompt + anchor; after it every forward runs 1 new token,
    # or 2 (y_k + the bonus) right after a whole block was accepted
    assert log.sizes[0] == len(PROMPT) + 1
    assert all(s in (1, 2) for s in log.sizes[1:]), log.sizes
    assert len(log.sizes) == sum(ks) == d.forwards          # k forwards per cycle, no more
    assert log.sizes.count(2) <= r.accept_lengths.count(k)
    # all of it costs about one token per forward: no prefix re-encoded
    assert sum(log.sizes) <= len(PROMPT) + 1 + sum(ks) + len(ks)


def _emitted_before(r) -> list[int]:
    """Tokens emitted before each cycle (the prefill emits 1; a cycle accepted + 1)."""
    out, n = [], 1
    for a in r.accept_lengths:
        out.append(n)
        n += a + 1
    return out


def test_without_cache_every_cycle_reencodes(pair, ar_ref):
    """use_cache=False (as the paper's DEER): same output, each cycle's first forward runs the
    whole context."""
    tm, dm = pair
    d = ARDrafterBackend(dm, use_cache=False)
    log = ForwardLog(dm)
    try:
        r = engine.generate(HFTarget(tm), d, PROMPT, greedy(), mode="deer", block_size=4)
    finally:
        log.h.remove()
    assert r.token_ids == ar_ref
    assert max(log.sizes) > len(PROMPT) + 10 and d.cached_length("any") == 0


def test_draft_matches_a_fresh_forward_and_rolls_back(pair):
    """A draft after a rollback (a context that diverges from the cached one) equals the draft
    of a backend with no cache; q rows are one-hot-free distributions at T > 0."""
    _, dm = pair
    warm, cold = ARDrafterBackend(dm), ARDrafterBackend(dm)
    sp = greedy()
    a = warm.draft("s", PROMPT, 6, 5, sp)
    ctx2 = PROMPT + [6] + a.tokens[:2].tolist() + [13, 2]  # 2 accepted, then a correction
    got = warm.draft("s", ctx2, 9, 5, sp)
    ref = cold.draft("s", ctx2, 9, 5, sp)
    assert got.tokens.tolist() == ref.tokens.tolist()
    torch.testing.assert_close(got.conf, ref.conf, atol=1e-5, rtol=1e-5)
    assert got.alt.tolist() == ref.alt.tolist() and got.probs is None
    assert warm.cached_length("s") == len(ctx2) + 1 + 4  # y_5 is never run
    s = warm.draft("s", ctx2, 9, 3, SamplingParams(temperature=0.8, top_k=10),
                   torch.Generator().manual_seed(0))
    assert s.probs.shape == (3, 64) and torch.allclose(s.probs.sum(-1), torch.ones(3))
    assert ((s.probs > 0).sum(-1) <= 10).all()                 # top-k applied to q
    assert torch.equal(s.conf, s.probs.max(-1).values)
    assert all(s.probs[i, s.tokens[i]] > 0 for i in range(3))
    # q_i is the draft's law after context + anchor + y_<i (one uncached forward of it all)
    with torch.inference_mode():
        seq = torch.tensor([ctx2 + [9] + s.tokens.tolist()])
        logits = dm(input_ids=seq).logits[0, -4:-1]                              # (3, V)
    torch.testing.assert_close(s.probs, process_logits(logits, 0.8, top_k=10), atol=1e-5, rtol=1e-4)


def test_draft_batch_equals_draft_per_row(pair):
    _, dm = pair
    one, many = ARDrafterBackend(dm), ARDrafterBackend(dm)
    ctxs = [PROMPT, PROMPT[:4], PROMPT + [1, 2, 3, 4, 5, 6]]
    sps = [greedy()] * 3
    for _ in range(2):  # the second round reuses (and rolls back) the caches
        ids = [f"r{i}" for i in range(3)]
        batch = many.draft_batch(ids, ctxs, [6, 7, 8], 4, sps, prefixes=[(), (), ()])
        for sid, c, a, b in zip(ids, ctxs, [6, 7, 8], batch):
            ref = one.draft(sid, c, a, 4, greedy())
            assert b.tokens.tolist() == ref.tokens.tolist()
            assert b.alt.tolist() == ref.alt.tolist()
        ctxs = [c + [6] + b.tokens[:1].tolist() for c, b in zip(ctxs, batch)]
    assert many.forwards == 2 * 4  # k ragged forwards per batch, not k per row
    with pytest.raises(ValueError):
        many.draft_batch(["a", "a"], ctxs[:2], [1, 2], 2, sps[:2])


# ---- sampled output keeps the target's law ---------------------------------------------------

V, TEMP, WINDOW = 4, 1.0, 3
LAW_PROMPT = [2, 3, 1, 2, 0, 3, 3, 1]
N_LAW = 3000  # detects TV >= ~0.13 on these 64 outcomes; the planted bug is at ~0.2


class MemoTarget:
    """`TargetBackend` over a real `HFTarget`, memoised by prefix (each prefix's logits row is
    computed once); the enumeration of the exact law and the engine see the same numbers."""

    def __init__(self, inner: HFTarget):
        self.inner, self.rows = inner, {}
        self.vocab_size, self.eos_token_id = inner.vocab_size, inner.eos_token_id
        self.feature_dim, self.device = inner.feature_dim, inner.device

    def row(self, ids: tuple) -> torch.Tensor:
        if ids not in self.rows:
            logits = self.inner.score("memo", ids, len(ids)).logits              # (T, V)
            for t in range(1, len(ids) + 1):
                self.rows.setdefault(ids[:t], logits[t - 1].clone())
        return self.rows[ids]

    def score(self, seq_id, token_ids, n_query, return_hidden=False, n_hidden=None):
        ids = tuple(int(t) for t in token_ids)
        return ScoreResult(torch.stack([self.row(ids[:len(ids) - n_query + 1 + i])
                                        for i in range(n_query)]))              # (n_query, V)

    def release(self, seq_id):
        pass


@pytest.fixture(scope="module")
def law_setup():
    tm = make_target(vocab_size=V, layers=1, hidden=16, seed=3, head_scale=15.0)
    target = MemoTarget(HFTarget(tm))
    draft = ARDrafterBackend(noisy_copy(tm, 0.5, seed=1))  # the real backend, real cache
    exact = {}
    for xs in itertools.product(range(V), repeat=WINDOW):
        pr = 1.0
        for i in range(WINDOW):
            pr *= float(process_logits(target.row(tuple(LAW_PROMPT) + xs[:i]), TEMP)[xs[i]])
        exact[xs] = pr
    return target, draft, exact


def sample_window(target, drafter, n, seed0=0, block_size=2):
    """Counter of the first WINDOW tokens over n seeded runs, and of accepted drafts per cycle.
    k = 2: tokens 2 and 3 are mostly y_1, y_2, so q_2 (conditioned on y_1) is in the window."""
    counts, accepted = Counter(), Counter()
    for s in range(seed0, seed0 + n):
        sp = SamplingParams(temperature=TEMP, max_new_tokens=16, seed=s, ignore_eos=True)
        it = engine.iter_generate(target, drafter, LAW_PROMPT, sp, mode="deer",
                                  block_size=block_size)
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


def test_sampled_sd_ar_has_the_targets_law(law_setup):
    target, draft, exact = law_setup
    counts, acc = sample_window(target, draft, N_LAW)
    # not vacuous: whole blocks (y_2 drawn from q_2 | y_1) and rejections both occur
    assert acc[2] > 0.3 * sum(acc.values()) and acc[0] + acc[1] > 0.05 * sum(acc.values()), acc
    print(lawcheck.assert_law(counts, exact))


def plant_q_at_another_temperature(monkeypatch):
    """y_i drawn from q_i at T, but q_i reported at 2T."""
    real = ar_mod.draft_from_logits

    def buggy(logits, sampling, generator):
        r = real(logits, sampling, generator)
        if sampling.greedy:
            return r
        q = process_logits(logits.float(), 2 * sampling.temperature)
        return DraftResult(tokens=r.tokens, probs=q, conf=r.conf, alt=r.alt)

    monkeypatch.setattr(ar_mod, "draft_from_logits", buggy)


def test_law_check_catches_a_planted_bug(law_setup, monkeypatch):
    target, draft, exact = law_setup
    plant_q_at_another_temperature(monkeypatch)
    counts, _ = sample_window(target, draft, N_LAW)
    print(lawcheck.assert_rejects(counts, exact))


# ---- format detection and loading ------------------------------------------------------------

def test_load_drafter_detects_an_ar_draft(tmp_path, tiny_checkpoints):
    make_target(vocab_size=64, layers=1, hidden=32, seed=5).save_pretrained(tmp_path / "ar")
    assert drafter_format(tmp_path / "ar") == "ar"
    assert drafter_feature_layers(tmp_path / "ar") == []
    d = load_drafter(tmp_path / "ar", device="cpu", max_sequences=8)
    assert isinstance(d, ARDrafterBackend)
    assert (d.format, d.context_mode, d.feature_layers, d.vocab_size) == ("ar", "tokens", [], 64)
    assert d.lm.max_sequences == 8
    # the other formats are still theirs; a target directory is a causal LM too
    assert drafter_format(tiny_checkpoints["drafter-tokens"]) == "deer"
    assert drafter_format(tiny_checkpoints["drafter-dflash"]) == "dflash"
    assert drafter_format(tiny_checkpoints["target"]) == "ar"
    # no architectures named: the model_type decides; a non-causal model is refused
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    assert drafter_format(tmp_path / "bare") == "ar"
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(DrafterFormatError):
        drafter_format(tmp_path / "enc")


def test_drafter_deployment_serves_an_ar_draft(tmp_path, pair):
    """The plain Drafter deployment class (what Serve wraps) over an AR draft directory."""
    np = pytest.importorskip("numpy")
    from deployments.drafter import Drafter

    _, dm = pair
    dm.save_pretrained(tmp_path / "ar")
    dep = Drafter(str(tmp_path / "ar"), device="cpu", batching=False)
    assert dep.meta() == {"context_mode": "tokens", "format": "ar", "feature_layers": [],
                          "vocab_size": 64, "caches_prefix": True}
    ref = ARDrafterBackend(dm).draft("s", PROMPT, 6, 4, greedy())
    r = dep.draft("s", np.asarray(PROMPT, dtype=np.int32), 6, 4, greedy())
    assert r.tokens.tolist() == ref.tokens.tolist() and r.alt.tolist() == ref.alt.tolist()
    r = dep.draft("s", np.asarray(PROMPT, dtype=np.int32), 6, 3, SamplingParams(temperature=1.0),
                  seed=3, prefix=np.asarray([1, 2], dtype=np.int32))
    assert r.tokens.shape == (3,) and r.probs.shape == (3, 64)
    assert dep.health()["cached_sequences"] == 1
    dep.release("s")
    assert dep.health()["cached_sequences"] == 0
    # the batch path (several rows, one block size) gives each row its draft
    rows = dep._draft_rows([(f"b{i}", PROMPT[: 4 + i], 6, 4, greedy(), None, None, ())
                            for i in range(3)])
    for i, d in enumerate(rows):
        assert d.tokens.tolist() == ARDrafterBackend(dm).draft("x", PROMPT[: 4 + i], 6, 4,
                                                               greedy()).tokens.tolist()


# ---- bench smoke -----------------------------------------------------------------------------

def test_bench_sd_ar_smoke(tmp_path):
    """`deer-serve bench` with ar and sd-ar on the embedded models: exits 0, sd-ar's outputs
    are ar's token for token."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "deer_serve", "bench", "--suite", "humaneval", "--limit", "2",
           "--methods", "ar,sd-ar,sd-ar-fixed", "--block-size", "4,2",
           "--max-new-tokens", "16", "--repeats", "1", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    m = res["methods"]
    assert set(m) == {"ar", "sd-ar", "sd-ar@k2", "sd-ar-fixed"}
    for name in ("sd-ar", "sd-ar@k2", "sd-ar-fixed"):
        assert "error" not in m[name], m[name]
        assert m[name]["identical_to_ar"] is True, m[name]
        assert m[name]["cycles"] > 0 and m[name]["mean_accepted"] > 0
    assert m["sd-ar"]["block_size"] == 4 and m["sd-ar@k2"]["block_size"] == 2
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert all(s["draft_forwards"] > 0 for s in samples if s["method"].startswith("sd-ar"))
