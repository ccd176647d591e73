"""The law of sampled output with a DFlash-format drafter (deer_serve.models.dflash, loaded by
`deer_serve.drafters.load_drafter` as the CLI and the service load it) through the engine
(`deer_serve.engine.iter_generate`), checked against the target's EXACT law; the check shows
its power by rejecting a bug planted in the real code path.

Target: a tiny random Qwen3 (2 layers, V = 4 tokens, no EOS) at TEMP = 0.8; the drafter: a
random tiny DFlash drafter (`make_tiny_dflash`) that reads the target's decoder layers 0 and 1
and shares its embeddings and LM head (so its q overlaps p: drafts are often accepted). Every
part is real: the target's features go to the drafter through its KV cache, draws come from the
engine's generator. Default features on: the LookupDrafter splice (as `--lookup merge` builds
it) and adaptive k with block_size 4.

Outcome: all WINDOW = 4 tokens of a request for 4 tokens: x1 from the prefill; the first cycle
drafts k = min(4, 4 - 1 - 1) = 2, so x2, x3 are accepted drafts or a correction and x4 is the
bonus from p_3 when both drafts are accepted (m <= 256 outcomes). Exact law from the target's
own logits with `process_logits` (`lawcheck.sequence_law`). The check
(`lawcheck.check_prefix_laws`): the joint law of (x1..x4) and of its prefixes, each at 1e-6 / 4,
so false alarm <= 1e-6 in all; fixed seeds, so it never flakes. At N = 6,000 runs it detects
TV >= 0.15 on the joint law and 0.063 / 0.071 / 0.095 on the prefixes' (printed with -rP).
The target's head is only mildly sharp (head_scale 4): the drafter shares it, and flatter laws
overlap more, so blocks are accepted whole, in part and not at all, and the lookup splices.

Planted bug (in `deer_serve.drafters.deer.draft_from_logits`, which the DFlash backend calls):
the drafts are argmax q_i, but q_i is handed to the acceptance rule as if they were drawn
from it (a greedy draft with sampled q).
"""

from __future__ import annotations

import os
import time
from collections import Counter

import pytest
import torch

import lawcheck
from tiny_models import make_target

import deer_serve.drafters.deer as deer
from deer_serve.drafters import load_drafter
from deer_serve.drafters.lookup import LookupDrafter
from deer_serve.engine import iter_generate
from deer_serve.models.dflash import make_tiny_dflash
from deer_serve.sampling import process_logits
from deer_serve.targets.hf import HFTarget
from deer_serve.types import DraftResult, SamplingParams

pytestmark = pytest.mark.slow

V = 4
TEMP = 0.8
WINDOW = 4
PROMPT = [2, 3, 1, 2, 0, 3, 3, 1, 2, 2, 0, 1]
SCALE = float(os.environ.get("DEER_LAW_SCALE", "1"))
N = int(6_000 * SCALE)
N_BUG = int(2_000 * SCALE)
SEED0 = 8 * 10**6
DEFAULTS = dict(mode="deer", block_size=4, adaptive_k=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(HFTarget with the drafter's feature layers, DFlash drafter backend)."""
    root = tmp_path_factory.mktemp("dflash-law")
    target = make_target(vocab_size=V, layers=2, hidden=16, seed=3, head_scale=4.0,
                         eos_token_id=None)
    target.save_pretrained(root / "target")
    make_tiny_dflash(target, [0, 1], num_layers=1, seed=2).save_pretrained(root / "drafter")
    d = load_drafter(root / "drafter", root / "target", device="cpu")
    assert d.format == "dflash" and d.context_mode == "target-features"
    t = HFTarget.from_pretrained(str(root / "target"), device="cpu",
                                 feature_layers=d.feature_layers)
    return t, d


@pytest.fixture(scope="module")
def exact(models):
    t, _ = models

    def next_probs(prefix):
        r = t.score("exact", PROMPT + list(prefix), 1).logits[-1]
        return process_logits(r, TEMP)

    law = lawcheck.sequence_law(next_probs, V, WINDOW)
    t.release("exact")
    return law


def sample_runs(models, n: int, seed0: int):
    """(Counter of outcomes, Counter of accepted drafts per cycle, blocks the lookup changed,
    seconds) over n seeded runs of `iter_generate` (seeds seed0..)."""
    t, d = models
    counts, acc = Counter(), Counter()
    look = LookupDrafter(d, vocab_size=V)
    t0 = time.perf_counter()
    for s in range(seed0, seed0 + n):
        sp = SamplingParams(temperature=TEMP, max_new_tokens=WINDOW, seed=s)
        out = []
        for step in iter_generate(t, look, PROMPT, sp, seq_id=f"r{s}", **DEFAULTS):
            out += step.new_token_ids
            if step.accepted is not None:
                acc[step.accepted] += 1
        counts[tuple(out)] += 1
    return counts, acc, look.hits, time.perf_counter() - t0


def plant_argmax_drafts_with_sampled_q(monkeypatch):
    """Drafts y_i = argmax q_i, handed over with q_i (as if y_i ~ q_i)."""

    def buggy(logits, sampling, generator):
        q = process_logits(logits.float().cpu(), sampling.temperature, sampling.top_k,
                           sampling.top_p)
        y = q.argmax(-1)
        alt = q.scatter(-1, y[:, None], -1.0).argmax(-1)
        return DraftResult(tokens=y, probs=q, conf=q.max(-1).values, alt=alt)

    monkeypatch.setattr(deer, "draft_from_logits", buggy)


def test_dflash_law_through_the_engine(models, exact):
    counts, acc, hits, secs = sample_runs(models, N, SEED0)
    cycles = sum(acc.values())
    # not vacuous: cycles end in corrections and in whole blocks (the bonus in the window),
    # and the lookup splice changed some blocks
    assert 0.1 * cycles < acc[0] and acc[2] > 0.1 * N and hits > 0.02 * cycles, (acc, hits)
    print(f"{N} runs in {secs:.0f} s; accepted per cycle {dict(acc)}; lookup in {hits} blocks;",
          lawcheck.assert_prefix_laws(counts, exact))


def test_dflash_law_check_catches_planted_bug(monkeypatch, models, exact):
    plant_argmax_drafts_with_sampled_q(monkeypatch)
    counts, _, _, secs = sample_runs(models, N_BUG, SEED0)
    print(f"{N_BUG} runs in {secs:.0f} s;", lawcheck.assert_prefix_rejects(counts, exact))


def test_the_plant_reaches_the_dflash_path(monkeypatch, models):
    """The planted function is the one the DFlash backend drafts with: patched, its drafts are
    the argmax of q."""
    t, d = models
    plant_argmax_drafts_with_sampled_q(monkeypatch)
    r = d.draft("plant", PROMPT[:-1], PROMPT[-1], 3, SamplingParams(temperature=TEMP, seed=1),
                torch.Generator().manual_seed(1),
                t.score("plant", PROMPT[:-1], 1, return_hidden=True, n_hidden=len(PROMPT) - 1).hidden)
    assert torch.equal(r.tokens, r.probs.argmax(-1))
