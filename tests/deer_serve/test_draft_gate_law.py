"""The law of sampled output when a DraftGate decides which requests draft (the default for
unseeded requests in the service and `deer-serve generate`), checked against the target's EXACT
law; the check shows its power by rejecting a bug planted in the real code path.

Target: a tiny random Qwen3 (2 layers, V = 4, no EOS) at TEMP = 0.8; drafter: a tiny random
target-features DeerDrafter sharing the target's config. Every request goes through ONE gate,
closed before the first request (it has seen cycles with nothing accepted) with probe_every = 2,
so requests alternate: one starts with drafting off (plain AR steps), the next probes (drafts
with adaptive k; its cycles update the gate, whose state then depends on earlier requests'
outcomes, as in a server). Lookup splice on, block_size 4. The runs are seeded to repeat, with
the gate passed explicitly (the service skips the gate for seeded requests; the law is the same).

Outcome: the WINDOW = 4 tokens of each request (x4 is a bonus token when a block of the
drafting requests is accepted whole). Check: `lawcheck.assert_prefix_laws` (the joint law and
its prefixes, each at 1e-6 / 4: false alarm <= 1e-6 in all; fixed seeds, never flakes). Planted
bug: the correction after a rejection drawn from p instead of norm(max(0, p - q))
(`engine.accept_speculative`), which only the drafting half of the requests meets.
"""

from __future__ import annotations

import os
import time
from collections import Counter

import pytest
import torch

import lawcheck
from tiny_models import make_target

import deer_serve.engine as engine
from deer_serve.adaptive import DraftGate
from deer_serve.drafters.deer import DeerDrafterBackend
from deer_serve.drafters.lookup import LookupDrafter
from deer_serve.engine import iter_generate
from deer_serve.models import make_tiny_drafter
from deer_serve.sampling import process_logits, sample
from deer_serve.targets.hf import HFTarget
from deer_serve.types import SamplingParams

pytestmark = pytest.mark.slow

V = 4
TEMP = 0.8
WINDOW = 4
PROMPT = [1, 3, 2, 2, 0, 3, 1, 1, 2, 0, 0, 3]
SCALE = float(os.environ.get("DEER_LAW_SCALE", "1"))
N = int(6_000 * SCALE)
N_BUG = int(6_000 * SCALE)
SEED0 = 9 * 10**6


@pytest.fixture(scope="module")
def models():
    model = make_target(vocab_size=V, layers=2, hidden=16, seed=5, head_scale=4.0,
                        eos_token_id=None)
    t = HFTarget(model)
    d = DeerDrafterBackend(make_tiny_drafter(model.config, context_mode="target-features",
                                             seed=6, hidden_size=16))
    return HFTarget(model, feature_layers=d.feature_layers), d, t


@pytest.fixture(scope="module")
def exact(models):
    _, _, t = models

    def next_probs(prefix):
        return process_logits(t.score("exact", PROMPT + list(prefix), 1).logits[-1], TEMP)

    law = lawcheck.sequence_law(next_probs, V, WINDOW)
    t.release("exact")
    return law


def closed_gate() -> DraftGate:
    g = DraftGate(min_tau=2.0, probe_every=2, min_cycles=4)
    for _ in range(4):
        g.observe(TEMP, 0)
    assert not g.is_open(TEMP)
    return g


def sample_runs(models, n: int, seed0: int):
    """(Counter of outcomes, requests that drafted, gate) over n seeded runs through one gate."""
    t, d, _ = models
    gate, look = closed_gate(), LookupDrafter(d, vocab_size=V)
    counts, drafted = Counter(), 0
    for s in range(seed0, seed0 + n):
        sp = SamplingParams(temperature=TEMP, max_new_tokens=WINDOW, seed=s)
        out, cycles = [], 0
        for step in iter_generate(t, look, PROMPT, sp, seq_id=f"g{s}", mode="deer",
                                  block_size=4, adaptive_k=True, gate=gate):
            out += step.new_token_ids
            cycles += step.accepted is not None
        counts[tuple(out)] += 1
        drafted += cycles > 0
    return counts, drafted, gate


def plant_correction_from_p(monkeypatch):
    real = engine.accept_speculative

    def buggy(draft_tokens, draft_lens, q_probs, p_probs, generator=None):
        n, nxt = real(draft_tokens, draft_lens, q_probs, p_probs, generator)
        redraw = sample(p_probs[torch.arange(len(n)), n].float(), generator)
        return n, torch.where(n < draft_lens, redraw, nxt)

    monkeypatch.setattr(engine, "accept_speculative", buggy)


def test_law_with_the_gate_deciding(models, exact):
    t0 = time.perf_counter()
    counts, drafted, gate = sample_runs(models, N, SEED0)
    # not vacuous: the gate both switched drafting off and let requests probe
    assert gate.gated > 0.2 * N and 0.2 * N < drafted < 0.8 * N, (gate.gated, drafted)
    print(f"{N} runs in {time.perf_counter() - t0:.0f} s; {drafted} drafted, {gate.gated} gated;",
          lawcheck.assert_prefix_laws(counts, exact))


def test_gate_law_check_catches_planted_bug(monkeypatch, models, exact):
    plant_correction_from_p(monkeypatch)
    counts, drafted, _ = sample_runs(models, N_BUG, SEED0)
    assert drafted > 0.2 * N_BUG
    print(lawcheck.assert_prefix_rejects(counts, exact))
