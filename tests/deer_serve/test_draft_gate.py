"""DraftGate: drafting switched off for new requests at a temperature where it does not pay,
learned from other requests' acceptance; output stays the target's."""

import random

import pytest

from tiny_models import make_target

from deer_serve.adaptive import OFF, AdaptiveK, DraftGate
from deer_serve.drafters.deer import DeerDrafterBackend
from deer_serve.engine import generate
from deer_serve.models import make_tiny_drafter
from deer_serve.targets.hf import HFTarget
from deer_serve.types import SamplingParams


def test_gate_opens_until_it_has_seen_enough_cycles_then_follows_tau():
    g = DraftGate(min_tau=2.0, probe_every=4, min_cycles=10)
    assert g.start(0.6) == 0                      # nothing seen: draft
    for _ in range(9):
        g.observe(0.6, 0)
    assert g.is_open(0.6) and g.start(0.6) == 0   # 9 < min_cycles
    g.observe(0.6, 0)
    assert not g.is_open(0.6)
    starts = [g.start(0.6) for _ in range(12)]
    assert starts.count(0) == 3 and starts[3] == starts[7] == starts[11] == 0  # every 4th probes
    assert all(s == OFF for i, s in enumerate(starts) if i % 4 != 3)
    assert g.gated == 9 and g.probes == 3
    assert g.is_open(0.4) and g.start(0.4) == 0   # another temperature: its own estimate
    for _ in range(50):                           # greedy requests are never gated
        g.observe(0.0, 0)
    assert g.is_open(0.0) and g.start(0.0) == 0 and 0.0 not in g.state()
    for _ in range(200):                          # the probes now accept a lot: open again
        g.observe(0.6, 6)
    assert g.is_open(0.6) and g.start(0.6) == 0
    assert g.state()[0.6]["open"] is True


def test_adaptive_k_with_a_closed_gate_never_drafts_and_reports_its_cycles():
    g = DraftGate(min_tau=100.0, probe_every=2, min_cycles=1)
    g.observe(0.7, 0)
    gated = AdaptiveK(16, gate=g, temperature=0.7)
    assert all(gated.next_k() == 0 for _ in range(1000))
    probe = AdaptiveK(16, gate=g, temperature=0.7)
    assert probe.next_k() == 8
    probe.update(3, 8)
    assert g.state()[0.7]["cycles"] == 2


def test_bad_gate_settings_are_refused():
    with pytest.raises(ValueError):
        DraftGate(probe_every=0)


@pytest.mark.parametrize("temperature", [0.5, 0.8])
def test_engine_with_a_gate_stops_drafting_for_new_requests_and_stays_exact(temperature):
    model = make_target(vocab_size=300, layers=2, hidden=64, seed=6)
    target = HFTarget(model)
    drafter = DeerDrafterBackend(make_tiny_drafter(model.config, context_mode="tokens", seed=7))
    # min_tau above any block: the gate closes as soon as it has seen min_cycles cycles
    gate = DraftGate(min_tau=1000.0, probe_every=3, min_cycles=8)
    cycles_per_request = []
    for i in range(10):
        prompt = [random.Random(i).randrange(2, 300) for _ in range(5 + i)]
        sp = SamplingParams(max_new_tokens=24, temperature=temperature, seed=100 + i,
                            ignore_eos=True)
        r = generate(target, drafter, prompt, sp, mode="deer", block_size=8, adaptive_k=True,
                     gate=gate)
        cycles_per_request.append(len(r.accept_lengths))
        assert len(r.token_ids) == 24
        if cycles_per_request[-1] == 0:  # gated: a plain sampled run of the same seed
            assert r.token_ids == generate(target, None, prompt, sp, mode="ar").token_ids
    # the first requests drafted until the gate had 8 cycles; then 2 of every 3 did not draft
    assert cycles_per_request[0] > 0
    closed_at = next(i for i in range(10) if sum(cycles_per_request[:i + 1]) >= 8) + 1
    after = cycles_per_request[closed_at:]
    assert after and sum(1 for c in after if c == 0) >= len(after) // 2
    assert gate.gated >= len(after) // 2 and not gate.is_open(temperature)


def test_greedy_requests_draft_whatever_the_gate_saw():
    model = make_target(vocab_size=300, layers=2, hidden=64, seed=6)
    target = HFTarget(model)
    drafter = DeerDrafterBackend(make_tiny_drafter(model.config, context_mode="tokens", seed=7))
    gate = DraftGate(min_tau=1000.0, probe_every=1000, min_cycles=1)
    prompt = [random.Random(1).randrange(2, 300) for _ in range(9)]
    sp = SamplingParams(max_new_tokens=24, ignore_eos=True)
    for _ in range(3):
        r = generate(target, drafter, prompt, sp, mode="deer", block_size=8, adaptive_k=True,
                     gate=gate)
        assert r.accept_lengths and r.token_ids == generate(target, None, prompt, sp,
                                                            mode="ar").token_ids
    assert gate.gated == 0
