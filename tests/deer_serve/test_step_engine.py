"""The step engine (`deer_serve.step_engine.StepEngine`): one loop, one batched draft and one
batched verify per step over every running request, with real tiny models.

Greedy output of every request equals plain AR decoding of the target, whatever joins, leaves
or shares its steps; mode ar rows share the verify with deer rows; a cancelled request leaves
the running set and its caches are released (its slot goes to a waiting request); seeded
sampled requests repeat; the sampled law through the engine (lookup, adaptive k, a verify
budget that shrinks blocks) is the target's, and the check rejects a planted acceptance bug.
Tests wait on the engine's events and counters, never on wall-clock windows.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
import torch

import lawcheck
from tiny_models import make_target

import deer_serve.engine as engine
from deer_serve.drafters.deer import DeerDrafterBackend
from deer_serve.models import make_tiny_drafter
from deer_serve.sampling import process_logits
from deer_serve.step_engine import StepEngine
from deer_serve.targets.hf import HFTarget
from deer_serve.types import DraftResult, SamplingParams

import test_engine_law as law

V = 300


def prompt_of(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed * 1000 + n)
    return [rng.randrange(2, V) for _ in range(n)]


@pytest.fixture(scope="module")
def model():
    return make_target(vocab_size=V, layers=2, hidden=64, seed=0)


@pytest.fixture(scope="module")
def drafters(model):
    return {m: DeerDrafterBackend(make_tiny_drafter(model.config, context_mode=m, seed=1))
            for m in ("tokens", "target-features")}


def reference(model, prompt, n):
    """Plain greedy AR decoding, in-process, one sequence."""
    return engine.generate(HFTarget(model), None, prompt, SamplingParams(max_new_tokens=n,
                                                                        ignore_eos=True),
                           mode="ar").token_ids


class OracleDrafter:
    """Proposes each sequence's reference continuation (looked up by seq_id), with one wrong
    token in every other block: cycles accept whole blocks, partial runs and nothing. No
    `draft_batch`: the engine drafts it row by row."""

    context_mode = "tokens"

    def __init__(self):
        self.refs: dict[str, list[int]] = {}
        self.calls = 0

    def draft(self, seq_id, context_ids, anchor, k, sampling, generator=None, context_hidden=None):
        ref, n = self.refs[seq_id], len(context_ids)
        assert list(context_ids) == ref[:n] and anchor == ref[n]
        self.calls += 1
        ys = (ref[n + 1:n + 1 + k] + [5] * k)[:k]
        if self.calls % 2:
            ys[(self.calls // 2) % k] = 7 if ys[(self.calls // 2) % k] != 7 else 8
        return DraftResult(tokens=torch.tensor(ys))

    def release(self, seq_id):
        pass


# (prompt length, block size, max tokens, step it joins at, mode, adaptive_k, lookup)
REQUESTS = [(1, 4, 30, 0, "deer", False, False), (7, 16, 12, 0, "deer", True, False),
            (40, 32, 25, 0, "ar", False, False), (3, 1, 20, 1, "deer", False, True),
            (12, 8, 33, 2, "deer", True, True), (25, 2, 5, 2, "ar", False, False),
            (9, 16, 40, 4, "deer", False, False), (2, 4, 1, 4, "deer", False, False),
            (60, 4, 18, 7, "deer", True, False), (5, 32, 28, 9, "ar", False, False)]


def run_staggered(eng: StepEngine, requests, seq_prefix="r"):
    """Submit each request at its step (the caller runs the steps); return their results."""
    handles, step = {}, 0
    while len(handles) < len(requests) or eng.running() or eng.waiting():
        for i, (n, bs, mx, at, mode, ak, lk) in enumerate(requests):
            if at == step and i not in handles:
                handles[i] = eng.submit(prompt_of(n, i), SamplingParams(max_new_tokens=mx,
                                                                        ignore_eos=True),
                                        mode=mode, block_size=bs, adaptive_k=ak, lookup=lk,
                                        seq_id=f"{seq_prefix}{i}")
        eng.step()
        step += 1
    return {i: eng_result(h) for i, h in handles.items()}


def eng_result(h):
    it = iter(h)
    while True:
        try:
            next(it)
        except StopIteration as stop:
            return stop.value


@pytest.mark.parametrize("context_mode", ["tokens", "target-features"])
@pytest.mark.parametrize("budget", [None, 24])
def test_greedy_concurrent_requests_equal_plain_ar(model, drafters, context_mode, budget):
    target = HFTarget(model)
    eng = StepEngine(target, drafters[context_mode], max_running=6, verify_budget=budget,
                     start=False)
    out = run_staggered(eng, REQUESTS)
    for i, (n, _bs, mx, *_rest) in enumerate(REQUESTS):
        assert out[i].token_ids == reference(model, prompt_of(n, i), mx), i
        assert out[i].finish_reason == "length"
    s = eng.stats
    assert s.finished == len(REQUESTS) and s.released == len(REQUESTS) and not eng.running()
    assert s.rows > 2 * s.steps                # rows shared their verifies
    assert max(s.by_k) > 1 and s.draft_forwards < sum(s.by_k.values())  # batched drafts
    for i in range(len(REQUESTS)):             # every request's KV released
        assert target.cached_length(f"r{i}") == 0 and f"r{i}" not in drafters[context_mode]._caches
    if budget is not None:                     # blocks were cut to the budget's share
        assert max(s.by_k) <= budget


def test_greedy_long_accepts_with_ar_rows_mixed_in(model):
    """A drafter that is often right (whole blocks accepted, bonus tokens) next to mode ar
    rows in the same verifies."""
    oracle = OracleDrafter()
    reqs = [(5 + 3 * i, (4, 8, 16)[i % 3], 30 + i, i % 3, "ar" if i % 4 == 3 else "deer",
             False, False) for i in range(8)]
    for i, (n, _bs, mx, *_r) in enumerate(reqs):
        oracle.refs[f"o{i}"] = prompt_of(n, i) + reference(model, prompt_of(n, i), mx)
    eng = StepEngine(HFTarget(model), oracle, max_running=8, verify_budget=None, start=False)
    out = run_staggered(eng, reqs, "o")
    whole = 0
    for i, (n, bs, mx, _at, mode, *_r) in enumerate(reqs):
        assert out[i].token_ids == oracle.refs[f"o{i}"][n:n + mx], i
        if mode == "deer":
            assert max(out[i].accept_lengths) > 1, out[i].accept_lengths
            whole += out[i].accept_lengths.count(bs)
        else:
            assert out[i].accept_lengths == []
    assert whole > 0  # whole blocks accepted: bonus tokens


def test_budget_shares_blocks_by_water_filling(model):
    eng = StepEngine(HFTarget(model), None, verify_budget=20, start=False)
    assert eng.share([16, 16, 16, 16], 4) == [4, 4, 4, 4]
    assert eng.share([1, 16, 16], 4) == [1, 7, 8]   # a small want leaves its share to the rest
    assert eng.share([16] * 20, 20) == [0] * 20    # a full batch: plain steps
    assert StepEngine(HFTarget(model), None, verify_budget=None, start=False).share([9], 3) == [9]


def test_the_default_budget_follows_the_targets_device(model):
    """verify_budget="auto" (the default): 64 verify tokens a step for a CPU target, 256 for a
    GPU one (a GPU step costs about the same for many more tokens); other strings refused."""
    from deer_serve.step_engine import default_verify_budget

    assert StepEngine(HFTarget(model), None, start=False).verify_budget == 64
    assert default_verify_budget(torch.device("cpu")) == default_verify_budget(None) == 64
    assert default_verify_budget(torch.device("cuda", 0)) == default_verify_budget("cuda") == 256
    with pytest.raises(ValueError, match="auto"):
        StepEngine(HFTarget(model), None, verify_budget="fast", start=False)
    with pytest.raises(ValueError, match=">= 1"):
        StepEngine(HFTarget(model), None, verify_budget=0, start=False)


def test_cancel_frees_the_slot_and_the_caches(model, drafters):
    target, drafter = HFTarget(model), drafters["tokens"]
    eng = StepEngine(target, drafter, max_running=1, verify_budget=None)  # its own thread
    try:
        sp = SamplingParams(max_new_tokens=2000, ignore_eos=True)
        long = eng.submit(prompt_of(8), sp, block_size=4, seq_id="long")
        waiting = eng.submit(prompt_of(5), SamplingParams(max_new_tokens=6, ignore_eos=True),
                             block_size=4, seq_id="next")
        it = iter(long)
        next(it), next(it)                     # it runs: two steps streamed
        assert eng.running() == ["long"] and eng.waiting() == 1
        with eng.lock:                         # (the loop's forwards hold it)
            assert target.cached_length("long") > 0 and "long" in drafter._caches
        it.close()                             # the consumer goes away: cancels
        assert eng.wait_until(lambda e: e.stats.cancelled == 1, timeout=120)
        assert "long" not in eng.running()
        with eng.lock:
            assert target.cached_length("long") == 0 and "long" not in drafter._caches
        r = eng_result(waiting)                # the freed slot ran the waiting request
        assert r.token_ids == reference(model, prompt_of(5), 6)
        assert eng.wait_until(lambda e: e.stats.finished == 1 and not e.running(), timeout=120)
    finally:
        eng.close()


def sampled(model, drafter, seeds, budget, mates=(), prefix="s"):
    """Token ids of seeded sampled requests run together with `mates` (more seeded requests)."""
    eng = StepEngine(HFTarget(model), drafter, max_running=16, verify_budget=budget, start=False)
    reqs = [eng.submit(prompt_of(4 + s % 5, s), SamplingParams(temperature=1.0, max_new_tokens=24,
                                                               seed=s, ignore_eos=True),
                       block_size=4 + 4 * (s % 2), adaptive_k=bool(s % 3), seq_id=f"{prefix}{s}")
            for s in list(seeds) + list(mates)]
    while eng.step():
        pass
    return [eng_result(r).token_ids for r in reqs[:len(seeds)]]


def test_seeded_sampled_requests_repeat(model, drafters):
    d = drafters["target-features"]
    seeds = [11, 12, 13]
    alone = sampled(model, d, seeds, None)
    assert alone == sampled(model, d, seeds, None)
    # other requests in the steps: no budget, so each request's block sizes are its own
    assert alone == sampled(model, d, seeds, None, mates=range(100, 108), prefix="m")
    # with a binding budget the same batch repeats exactly
    a = sampled(model, d, seeds, 12, mates=range(100, 108))
    assert a == sampled(model, d, seeds, 12, mates=range(100, 108))
    assert len(set(map(tuple, alone))) == 3  # not a degenerate sampler


# ---- the sampled law through the step engine ---------------------------------------------

class BatchedPrefixTarget(law.PrefixTarget):
    """The memoised real target of tests/deer_serve/test_engine_law.py, with `score_batch` (row by row:
    the same memoised rows)."""

    def score_batch(self, seq_ids, token_ids, n_query, return_hidden=False, n_hidden=None):
        return [self.score(s, t, n) for s, t, n in zip(seq_ids, token_ids, n_query)]


class RowDrafter:
    """The memoised real drafter without `draft_batch` (its rows come from the memo)."""

    context_mode = "tokens"

    def __init__(self, inner):
        self.inner = inner

    def draft(self, *a, **kw):
        return self.inner.draft(*a, **kw)

    def release(self, seq_id):
        pass


@pytest.fixture(scope="module")
def law_target():
    return BatchedPrefixTarget(HFTarget(make_target(vocab_size=law.V, layers=1, hidden=16,
                                                    seed=3, head_scale=15.0)))


@pytest.fixture(scope="module")
def law_drafter(law_target):
    return RowDrafter(law.MemoDrafter(make_tiny_drafter(
        law_target.inner.model.config, context_mode="tokens", seed=4, hidden_size=16,
        num_layers=1)))


@pytest.fixture(scope="module")
def exact(law_target):
    """outcome -> its exact probability under the target (as test_engine_law's `exact`)."""
    out = {}
    for xs in itertools.product(range(law.V), repeat=law.WINDOW):
        pr = 1.0
        for i in range(law.WINDOW):
            pr *= float(process_logits(law_target.row(tuple(law.PROMPT) + xs[:i]), law.TEMP)[xs[i]])
        out[xs] = pr
    return out


def sample_window_engine(target, drafter, n, seed0, batch=16, budget=40):
    """As test_engine_law.sample_window, through the step engine: `batch` seeded requests at a
    time (lookup, adaptive k, block size 4), each cancelled once it has WINDOW tokens. The
    budget (40 verify tokens for 16 rows) shrinks blocks to 1-2 tokens in full steps."""
    counts, ks = Counter(), Counter()
    eng = StepEngine(target, drafter, max_running=batch, verify_budget=budget, start=False)
    for s0 in range(seed0, seed0 + n, batch):
        reqs = {s: eng.submit(law.PROMPT, SamplingParams(temperature=law.TEMP, max_new_tokens=16,
                                                         seed=s, ignore_eos=True),
                              seq_id=f"w{s}", lookup=True, **law.DEFAULTS)
                for s in range(s0, min(s0 + batch, seed0 + n))}
        outs: dict[int, list[int]] = {s: [] for s in reqs}
        while len(outs) and eng.step():
            for s in list(outs):
                for step in reqs[s].poll():
                    outs[s] += step.new_token_ids
                if len(outs[s]) >= law.WINDOW:
                    counts[tuple(outs.pop(s)[:law.WINDOW])] += 1
                    reqs[s].cancel()
        eng.step()  # the cancelled ones leave
    ks.update(eng.stats.by_k)
    assert not eng.running() and eng.stats.cancelled + eng.stats.finished == n
    return counts, ks


@pytest.mark.slow
def test_law_through_the_step_engine(law_target, law_drafter, exact):
    counts, ks = sample_window_engine(law_target, law_drafter, law.N_MAIN, 4 * 10**6)
    assert ks[1] + ks[2] > 0 and len(ks) >= 2, ks  # blocks the budget cut, and others
    print(dict(ks), lawcheck.assert_law(counts, exact))


@pytest.mark.slow
def test_step_engine_law_check_catches_planted_bug(monkeypatch, law_target, law_drafter, exact):
    law.plant_correction_from_p(monkeypatch)  # engine.accept_speculative, the real call site
    counts, _ = sample_window_engine(law_target, law_drafter, law.N_MAIN, 4 * 10**6)
    print(lawcheck.assert_rejects(counts, exact))


def test_submit_validates_and_a_closed_engine_refuses(model):
    eng = StepEngine(HFTarget(model), None)
    with pytest.raises(ValueError):
        eng.submit([3, 4], SamplingParams(), mode="deer")  # no drafter
    with pytest.raises(ValueError):
        eng.submit([], SamplingParams(), mode="ar")
    r = eng.submit([3, 4], SamplingParams(max_new_tokens=3, ignore_eos=True), mode="ar")
    assert eng_result(r).token_ids == reference(model, [3, 4], 3)
    eng.close()
    with pytest.raises(RuntimeError):
        eng.submit([3, 4], SamplingParams(), mode="ar")


# ---- the slot KV backend (deer_serve/targets/hf_slots.py) ----------------------------------

@pytest.mark.parametrize("context_mode", ["tokens", "target-features"])
def test_greedy_with_the_slot_backend_equals_plain_ar(model, drafters, context_mode):
    """Staggered joins and leaves, deer and ar rows, a buffer that starts too small (it grows
    and compacts): every request's output is plain AR's, and every slot is freed."""
    from deer_serve.targets.hf_slots import SlotTarget

    slots = SlotTarget(model, feature_layers=drafters["target-features"].feature_layers
                       if context_mode == "target-features" else None, slots=2, capacity=48,
                       prefill_split=16)
    eng = StepEngine(slots, drafters[context_mode], max_running=6, verify_budget=24,
                     start=False, kv="slots")
    assert eng.target is slots
    out = run_staggered(eng, REQUESTS, "k")
    for i, (n, _bs, mx, *_rest) in enumerate(REQUESTS):
        assert out[i].token_ids == reference(model, prompt_of(n, i), mx), i
    assert eng.stats.rows > 2 * eng.stats.steps
    assert slots.stats["grown"] > 0 and slots.stats["compactions"] > 0, slots.stats
    assert not slots._seqs and sorted(slots._free) == list(range(slots.slots))
    assert not bool(slots.valid.any())


def test_step_engine_picks_the_slot_backend_for_an_hf_target(model):
    from deer_serve.targets.hf_slots import SlotTarget

    target = HFTarget(model)
    assert isinstance(StepEngine(target, None, max_running=4, start=False).target, SlotTarget)
    assert StepEngine(target, None, max_running=1, start=False).target is target
    assert StepEngine(target, None, max_running=4, start=False, kv="per-sequence").target \
        is target
    with pytest.raises(ValueError):
        StepEngine(target, None, kv="paged")
    eng = StepEngine(target, None, max_running=4, start=False)
    reqs = [eng.submit(prompt_of(3 + i, i), SamplingParams(max_new_tokens=9, ignore_eos=True),
                       mode="ar", seq_id=f"p{i}") for i in range(6)]
    while eng.step():
        pass
    for i, r in enumerate(reqs):
        assert eng_result(r).token_ids == reference(model, prompt_of(3 + i, i), 9)
        assert eng.target.cached_length(f"p{i}") == 0
