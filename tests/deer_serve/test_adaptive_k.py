"""Adaptive block size: k follows each request's acceptance, and output stays the target's."""

import random

import pytest
import torch

from tiny_models import make_target

from deer_serve.adaptive import AdaptiveK
from deer_serve.drafters.deer import DeerDrafterBackend
from deer_serve.engine import generate
from deer_serve.models import make_tiny_drafter
from deer_serve.targets.hf import HFTarget
from deer_serve.types import DraftResult, SamplingParams


def test_k_grows_with_whole_blocks_and_shrinks_with_rejections():
    a = AdaptiveK(max_k=32, ar_below=0)         # (never switches to plain AR steps)
    assert a.next_k() == 8                      # tau 3 -> 2*3+2 = 8
    for _ in range(10):
        k = a.next_k()
        a.update(k, k)                          # everything accepted
    assert a.next_k() == 32
    for _ in range(30):
        a.update(0, a.next_k())                 # nothing accepted
    assert a.next_k() == 2
    assert AdaptiveK(max_k=4).next_k() == 4 and AdaptiveK(max_k=1).next_k() == 1


def test_low_acceptance_switches_to_ar_steps_and_probes_with_backoff():
    a = AdaptiveK(max_k=16, ar_below=1.0, ar_steps=4, max_ar_steps=16)
    ks = []
    for _ in range(40):
        k = a.next_k()
        ks.append(k)
        if k:
            a.update(0, k)                      # drafts never accepted
    first_ar = ks.index(0)
    assert all(k > 0 for k in ks[:first_ar])
    runs, n = [], 0                             # lengths of the AR stretches between probes
    for k in ks[first_ar:]:
        if k == 0:
            n += 1
        else:
            runs.append(n)
            n = 0
    assert runs[:3] == [4, 8, 16] and all(r == 16 for r in runs[3:])  # doubling, capped
    for _ in range(20):                         # a probe accepts whole blocks: drafting again
        k = a.next_k()
        if k:
            a.update(k, k)
    assert a.next_k() > 0 and a.ar_len == 4


class ScriptedDrafter:
    """Proposes the reference continuation with its first `good` tokens right, then wrong ones:
    the first cycles accept whole blocks, the later ones nothing."""

    context_mode = "tokens"

    def __init__(self, reference, switch_at):
        self.ref, self.switch_at, self.asked = list(reference), switch_at, []

    def draft(self, seq_id, context_ids, anchor, k, sampling, generator=None, context_hidden=None):
        n = len(context_ids)
        self.asked.append(k)
        ys = (self.ref[n + 1:n + 1 + k] + [5] * k)[:k]
        if n >= self.switch_at:
            ys = [t + 1 if t + 1 < 300 else 2 for t in ys]
        return DraftResult(tokens=torch.tensor(ys))

    def release(self, seq_id):
        pass


def test_engine_adapts_k_and_stays_lossless():
    target = HFTarget(make_target(vocab_size=300, layers=2, hidden=64, seed=0))
    prompt = [random.Random(1).randrange(2, 300) for _ in range(9)]
    sp = SamplingParams(max_new_tokens=96, ignore_eos=True)
    ref = generate(target, None, prompt, sp, mode="ar")
    full = prompt + ref.token_ids
    d = ScriptedDrafter(full, switch_at=len(prompt) + 48)
    r = generate(target, d, prompt, sp, mode="deer", block_size=32, adaptive_k=True)
    assert r.token_ids == ref.token_ids
    assert max(d.asked) == 32                  # grew while blocks were accepted whole
    assert d.asked[-1] <= 4                    # shrank once nothing was accepted
    fixed = ScriptedDrafter(full, switch_at=len(prompt) + 48)
    generate(target, fixed, prompt, sp, mode="deer", block_size=32)
    # without adaptation every rejected cycle still drafts (up to) 32 tokens
    assert sum(d.asked) < 0.8 * sum(fixed.asked)
    # once nothing is accepted it mostly stops drafting: far fewer draft calls than cycles
    late = generate(target, ScriptedDrafter(full, switch_at=len(prompt)), prompt, sp,
                    mode="deer", block_size=32, adaptive_k=True)
    assert late.token_ids == ref.token_ids
    assert len(late.accept_lengths) < 0.5 * late.cycles


def test_adaptive_k_sampled_runs_repeat_with_a_seed():
    model = make_target(vocab_size=300, layers=2, hidden=64, seed=4)
    target = HFTarget(model)
    drafter = DeerDrafterBackend(make_tiny_drafter(model.config, context_mode="tokens", seed=5))
    sp = SamplingParams(max_new_tokens=48, temperature=0.9, seed=11, ignore_eos=True)
    prompt = [random.Random(3).randrange(2, 300) for _ in range(7)]
    a = generate(target, drafter, prompt, sp, mode="deer", block_size=16, adaptive_k=True)
    b = generate(target, drafter, prompt, sp, mode="deer", block_size=16, adaptive_k=True)
    assert a.token_ids == b.token_ids and a.accept_lengths == b.accept_lengths


@pytest.mark.parametrize("mode", ["tokens", "target-features"])
def test_adaptive_k_with_a_real_drafter_is_greedy_ar(mode):
    model = make_target(vocab_size=300, layers=2, hidden=64, seed=2)
    target = HFTarget(model)
    drafter = DeerDrafterBackend(make_tiny_drafter(model.config, context_mode=mode, seed=3))
    sp = SamplingParams(max_new_tokens=40, ignore_eos=True)
    for n in (1, 13):
        prompt = [random.Random(n).randrange(2, 300) for _ in range(n)]
        ref = generate(target, None, prompt, sp, mode="ar")
        got = generate(target, drafter, prompt, sp, mode="deer", block_size=16, adaptive_k=True)
        assert got.token_ids == ref.token_ids
