"""The decode loop (deer_serve.engine) and the torch target backend (deer_serve.targets.hf).

Greedy DEER must be token-for-token identical to plain greedy decoding; sampled DEER must have
the target's distribution (checked statistically against the exact one); seeded runs repeat.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from deer_serve.drafters.deer import DeerDrafterBackend
from deer_serve.engine import StepOutput, generate, iter_generate
from deer_serve.models import make_tiny_drafter
from deer_serve.sampling import process_logits, sample
from deer_serve.targets.hf import HFTarget
from deer_serve.types import DraftResult, SamplingParams, ScoreResult

from tiny_models import make_target

MODES = ("tokens", "target-features")
PROMPT_LENS = (1, 7, 40)
BLOCK_SIZES = (1, 4, 16, 32)


def prompt_of(n: int, seed: int = 0, vocab: int = 300) -> list[int]:
    rng = random.Random(seed * 1000 + n)
    return [rng.randrange(2, vocab) for _ in range(n)]


@pytest.fixture(scope="module")
def model():
    return make_target(vocab_size=300, layers=2, hidden=64, seed=0)


@pytest.fixture(scope="module")
def target(model):
    return HFTarget(model)


@pytest.fixture(scope="module")
def drafters(model):
    return {m: DeerDrafterBackend(make_tiny_drafter(model.config, context_mode=m, seed=1))
            for m in MODES}


def features_of(model, ids, layers) -> torch.Tensor:
    """(len(ids), F) target features from one fresh full forward."""
    with torch.inference_mode():
        hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    return torch.cat([hs[l][0] for l in layers], -1).float()


class OracleDrafter:
    """Proposes the reference continuation: every second block entirely right, the others with
    one wrong token at a random place, so cycles accept whole blocks, partial runs and nothing. Checks what the engine hands over: the
    context is the verified prefix, and in target-features mode `context_hidden` equals the
    features of a fresh forward of that prefix."""

    def __init__(self, reference, context_mode="tokens", ref_features=None, seed=0):
        self.ref, self.context_mode, self.ref_features = list(reference), context_mode, ref_features
        self.rng = random.Random(seed)
        self.asked: list[int] = []
        self.released = []

    def draft(self, seq_id, context_ids, anchor, k, sampling, generator=None, context_hidden=None):
        n = len(context_ids)
        assert list(context_ids) == self.ref[:n] and anchor == self.ref[n]
        if self.context_mode == "target-features":
            assert context_hidden.shape == (n, self.ref_features.shape[1])
            torch.testing.assert_close(context_hidden, self.ref_features[:n], atol=1e-4, rtol=1e-4)
        self.asked.append(k)
        ys = (self.ref[n + 1:n + 1 + k] + [5] * k)[:k]
        if len(self.asked) % 2 == 1:
            wrong = self.rng.randrange(0, k)
            ys[wrong] = 7 if ys[wrong] != 7 else 8
        return DraftResult(tokens=torch.tensor(ys))

    def release(self, seq_id):
        self.released.append(seq_id)


def run(target, drafter, prompt, mode="deer", **kw):
    sp = dict(max_new_tokens=48, ignore_eos=True)
    block_size = kw.pop("block_size", 16)
    sp.update(kw)
    return generate(target, drafter, prompt, SamplingParams(**sp), mode=mode, block_size=block_size)


# ---- greedy losslessness -----------------------------------------------------------------

@pytest.mark.parametrize("n_prompt", PROMPT_LENS)
@pytest.mark.parametrize("context_mode", MODES)
def test_greedy_deer_identical_to_ar(target, drafters, context_mode, n_prompt):
    prompt = prompt_of(n_prompt)
    ar = run(target, None, prompt, mode="ar")
    assert len(ar.token_ids) == 48 and ar.accept_lengths == [] and ar.cycles == 47
    for bs in BLOCK_SIZES:
        r = run(target, drafters[context_mode], prompt, block_size=bs)
        assert r.token_ids == ar.token_ids, f"block_size {bs}"
        assert r.finish_reason == "length"
        assert all(0 <= a <= bs for a in r.accept_lengths)


@pytest.mark.parametrize("context_mode", MODES)
def test_greedy_long_accepts_and_features(model, target, context_mode):
    prompt = prompt_of(7)
    ar = run(target, None, prompt, mode="ar", max_new_tokens=80)
    ref = prompt + ar.token_ids
    feats = features_of(model, ref, target.feature_layers)
    for bs in (1, 4, 16, 32):
        oracle = OracleDrafter(ref, context_mode, feats, seed=bs)
        r = run(target, oracle, prompt, block_size=bs, max_new_tokens=80)
        assert r.token_ids == ar.token_ids
        assert max(r.accept_lengths) == bs  # some blocks were accepted whole
        # prefill emits 1 token, a draft cycle accepted + 1, an AR step (k clamped to 0) 1; the
        # clamp on k means nothing is ever cut
        n_ar = r.cycles - len(r.accept_lengths)
        assert 1 + sum(a + 1 for a in r.accept_lengths) + n_ar == 80 and n_ar <= 1
        # the block never asks past the budget: k <= tokens still missing - 1
        done = 1
        for k, a in zip(oracle.asked, r.accept_lengths):
            assert 1 <= k <= min(bs, 80 - done - 1)
            done += a + 1
        assert len(oracle.released) == 1


def test_eos_stops_and_is_not_emitted(target, drafters):
    prompt = prompt_of(7)
    ar = run(target, None, prompt, mode="ar", max_new_tokens=30)
    eos = ar.token_ids[12]
    first = ar.token_ids.index(eos)
    for mode, d in (("ar", None), ("deer", drafters["tokens"])):
        r = generate(target, d, prompt, SamplingParams(max_new_tokens=30), mode=mode,
                     eos_token_id=eos)
        assert r.token_ids == ar.token_ids[:first] and r.finish_reason == "stop"
        r = generate(target, d, prompt, SamplingParams(max_new_tokens=30, ignore_eos=True),
                     mode=mode, eos_token_id=eos)
        assert r.token_ids == ar.token_ids and r.finish_reason == "length"


def test_stop_strings(target, drafters, tokenizer):
    prompt = prompt_of(7)
    detok = lambda ids: tokenizer.decode(ids)  # noqa: E731
    ar = run(target, None, prompt, mode="ar", max_new_tokens=30)
    full = detok(ar.token_ids)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = full.find(stop)
    for mode, d in (("ar", None), ("deer", drafters["tokens"])):
        sp = SamplingParams(max_new_tokens=30, ignore_eos=True, stop=(stop, "\x00never"))
        r = generate(target, d, prompt, sp, mode=mode, detokenize=detok)
        assert r.finish_reason == "stop" and r.text == full[:cut]
        # the ids end with the token that completes the stop string
        n = len(r.token_ids)
        assert r.token_ids == ar.token_ids[:n]
        assert stop in detok(r.token_ids) and stop not in detok(r.token_ids[:-1])


@pytest.mark.parametrize("max_new", (1, 2, 3, 17))
def test_max_new_tokens_exact(target, drafters, max_new):
    for mode, d in (("ar", None), ("deer", drafters["target-features"])):
        r = run(target, d, prompt_of(7), mode=mode, max_new_tokens=max_new, block_size=32)
        assert len(r.token_ids) == max_new and r.finish_reason == "length"


def test_streaming_and_result(target, drafters):
    sp = SamplingParams(max_new_tokens=20, ignore_eos=True)
    it = iter_generate(target, drafters["tokens"], prompt_of(7), sp, block_size=4)
    steps = []
    while True:
        try:
            steps.append(next(it))
        except StopIteration as stop:
            result = stop.value
            break
    assert all(isinstance(s, StepOutput) for s in steps)
    assert steps[0].accepted is None and len(steps[0].new_token_ids) == 1
    assert [t for s in steps for t in s.new_token_ids] == result.token_ids
    # draft cycles report their accepted count; an AR step (k clamped to 0 at the end) None
    assert [s.accepted for s in steps[1:] if s.accepted is not None] == result.accept_lengths
    assert [s.finish_reason for s in steps] == [None] * (len(steps) - 1) + ["length"]
    assert result.cycles == len(steps) - 1
    assert set(result.timings) == {"prefill", "draft", "verify", "other"}
    assert abs(sum(result.timings.values()) - result.elapsed_s) < 1e-6
    assert target._seqs == {} and drafters["tokens"]._caches == {}  # released


def test_abandoned_stream_releases_caches(target, drafters):
    it = iter_generate(target, drafters["tokens"], prompt_of(7), SamplingParams(max_new_tokens=40),
                       seq_id="abandoned")
    next(it), next(it)
    assert target.cached_length("abandoned") > 0
    it.close()
    assert target.cached_length("abandoned") == 0 and "abandoned" not in drafters["tokens"]._caches


# ---- sampling: reproducibility -----------------------------------------------------------

@pytest.mark.parametrize("context_mode", MODES)
def test_seeded_runs_repeat(target, drafters, context_mode):
    d = drafters[context_mode]
    kw = dict(max_new_tokens=40, temperature=1.0, top_p=0.95, block_size=8)
    a = run(target, d, prompt_of(7), seed=123, **kw)
    b = run(target, d, prompt_of(7), seed=123, **kw)
    c = run(target, d, prompt_of(7), seed=124, **kw)
    assert a.token_ids == b.token_ids and a.accept_lengths == b.accept_lengths
    assert a.token_ids != c.token_ids
    ar1 = run(target, None, prompt_of(7), mode="ar", seed=5, **kw)
    ar2 = run(target, None, prompt_of(7), mode="ar", seed=5, **kw)
    assert ar1.token_ids == ar2.token_ids


# ---- validation --------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    (dict(prompt=[]), "prompt must contain at least one token"),
    (dict(prompt=[1, 300]), r"prompt token ids must be in \[0, 300\)"),
    (dict(block_size=0), r"block_size must be an integer in \[1, 64\]"),
    (dict(block_size=65), r"block_size must be an integer in \[1, 64\]"),
    (dict(block_size=2.0), "block_size"),
    (dict(mode="beam"), "mode must be one of"),
    (dict(drafter=None), "needs a drafter"),
    (dict(sampling=SamplingParams(temperature=-1.0)), "temperature must be >= 0"),
    (dict(sampling=SamplingParams(top_p=0.0)), r"top_p must be in \(0, 1\]"),
    (dict(sampling=SamplingParams(top_k=-2)), "top_k must be >= 0"),
    (dict(sampling=SamplingParams(max_new_tokens=0)), "max_new_tokens must be >= 1"),
    (dict(sampling=SamplingParams(stop=("x",))), "stop strings need a detokenize"),
])
def test_bad_parameters_raise(target, drafters, kw, match):
    args = dict(prompt=[5, 6], drafter=drafters["tokens"], sampling=SamplingParams(),
                mode="deer", block_size=4)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        iter_generate(target, args["drafter"], args["prompt"], args["sampling"],
                      mode=args["mode"], block_size=args["block_size"])


# ---- the torch target backend ------------------------------------------------------------

def test_hf_target_cache_miss_equals_fresh(model):
    t = HFTarget(model, max_sequences=2)
    fresh = lambda ids, n, h=False: HFTarget(model).score("x", ids, n, h)  # noqa: E731
    a = prompt_of(40, seed=1)
    b = a[:10] + prompt_of(25, seed=2)  # diverges at position 10
    t.score("s", a, 1)
    assert t.cached_length("s") == 40
    for ids, n in ((b, 3), (b[:20], 1), (b[:20], 20), (b + [9, 9], 5)):  # miss, shrink, extend
        got, want = t.score("s", ids, n, True), fresh(ids, n, True)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.hidden, want.hidden, atol=1e-5, rtol=1e-5)
        assert got.logits.shape == (n, t.vocab_size) and got.hidden.shape == (n, t.feature_dim)
        assert t.cached_length("s") == len(ids)
    t.release("s")
    assert t.cached_length("s") == 0
    torch.testing.assert_close(t.score("s", a, 2).logits, fresh(a, 2).logits, atol=1e-5, rtol=1e-5)
    # LRU: a third sequence evicts the least recently used
    t.score("u", a, 1), t.score("v", b, 1)
    assert t.cached_length("s") == 0 and t.cached_length("u") == 40


def test_hf_target_features(model):
    t = HFTarget(model)
    assert t.feature_layers == (1, 2) and t.feature_dim == 2 * 64
    ids = prompt_of(12)
    r = t.score("f", ids, 3, return_hidden=True, n_hidden=12)
    assert r.logits.dtype == torch.float32 and r.hidden.shape == (12, 128)
    torch.testing.assert_close(r.hidden, features_of(model, ids, (1, 2)), atol=1e-5, rtol=1e-5)
    # the last feature layer is final-normed: the LM head applied to it gives the logits
    with torch.inference_mode():
        head = model.lm_head(r.hidden[-3:, 64:])
    torch.testing.assert_close(head, r.logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="n_query"):
        t.score("f", ids, 13)
    with pytest.raises(ValueError, match="feature_layers"):
        HFTarget(model, feature_layers=[3])


# ---- sampling: the distribution is the target's -----------------------------------------

class MemoTarget:
    """Wraps a target and memoises `score` by (ids, n_query, hidden): with a fixed prompt and a
    16-token vocabulary the first tokens hit a few hundred distinct calls, so 20k runs of the
    engine cost about as much as 20k drafter forwards."""

    def __init__(self, inner):
        self.inner, self.memo = inner, {}
        self.vocab_size, self.eos_token_id = inner.vocab_size, None
        self.feature_dim, self.device = inner.feature_dim, inner.device

    def score(self, seq_id, token_ids, n_query, return_hidden=False, n_hidden=None):
        key = (tuple(token_ids), n_query, return_hidden, n_hidden)
        if key not in self.memo:
            r = self.inner.score("memo", token_ids, n_query, return_hidden, n_hidden=n_hidden)
            self.memo[key] = ScoreResult(r.logits.clone(), None if r.hidden is None else r.hidden.clone())
        return self.memo[key]

    def release(self, seq_id):
        pass


class MemoDrafter:
    """Wraps a DeerDrafterBackend: memoises q by (context, anchor, k) and draws y_i ~ q_i with the
    engine's generator, exactly as the backend does (`draft_from_logits`), so the statistics
    cost no drafter forwards after the first few hundred."""

    def __init__(self, inner):
        self.inner, self.memo = inner, {}
        self.context_mode = inner.context_mode

    def draft(self, seq_id, context_ids, anchor, k, sampling, generator=None, context_hidden=None):
        key = (tuple(context_ids), anchor, k)
        if key not in self.memo:
            r = self.inner.draft("memo", context_ids, anchor, k, sampling, generator, context_hidden)
            self.inner.release("memo")
            self.memo[key] = r.probs
            return r
        return DraftResult(tokens=sample(self.memo[key], generator), probs=self.memo[key])

    def release(self, seq_id):
        pass


def tv(p: dict, q: dict) -> float:
    return 0.5 * sum(abs(p.get(x, 0.0) - q.get(x, 0.0)) for x in set(p) | set(q))


def tv_bound(cells: int, n: int) -> float:
    # E[TV(empirical, true)] <= 0.5 * sqrt(cells / n); TV moves by <= 1/n per sample, so by
    # McDiarmid it exceeds its mean by 3/sqrt(n) with probability <= exp(-18).
    return 0.5 * math.sqrt(cells / n) + 3.0 / math.sqrt(n)


@pytest.mark.slow
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampled_distribution_matches_target(temperature, top_p):
    V, N = 16, 20_000
    model = make_target(vocab_size=V, layers=1, hidden=16, seed=3, head_scale=40.0)
    target = MemoTarget(HFTarget(model))
    dmodel = make_tiny_drafter(model.config, context_mode="tokens", seed=4, hidden_size=16,
                               num_layers=1)
    with torch.no_grad():
        dmodel.embed_tokens.weight.mul_(60.0)  # a peaked q, unlike p: many rejections
    drafter = DeerDrafterBackend(dmodel)
    prompt = [3, 9, 4]
    memo_drafter = MemoDrafter(drafter)
    proc = lambda logits: process_logits(logits, temperature, 0, top_p)  # noqa: E731

    # exact law of the first two tokens: p(t1) p(t2 | t1), and the drafter's law for t2
    p1 = proc(target.score("x", prompt, 1).logits[0])
    exact, proposal = {}, {}
    sp = SamplingParams(temperature=temperature, top_p=top_p)
    for t1 in range(V):
        p2 = proc(target.score("x", prompt + [t1], 1).logits[0])
        q2 = drafter.draft(f"q{t1}", prompt, t1, 2, sp, torch.Generator().manual_seed(0)).probs[0]
        drafter.release(f"q{t1}")
        for t2 in range(V):
            exact[(t1, t2)] = float(p1[t1] * p2[t2])
            proposal[(t1, t2)] = float(p1[t1] * q2[t2])
    cells = sum(1 for v in exact.values() if v > 0)
    bound = tv_bound(cells, N)
    assert tv(exact, proposal) > 3 * bound, "the test has no power: q is too close to p"

    for mode in ("deer", "ar"):
        counts = Counter()
        for seed in range(N):
            # max_new_tokens 3: the cycle after the first token drafts k = 2
            r = generate(target, memo_drafter if mode == "deer" else None, prompt,
                         SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=3,
                                        seed=seed, ignore_eos=True), mode=mode, block_size=4)
            counts[tuple(r.token_ids[:2])] += 1
        emp = {x: c / N for x, c in counts.items()}
        assert tv(emp, exact) < bound, (mode, tv(emp, exact), bound)
