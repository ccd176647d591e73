"""`service.vllm_lookup`: prompt lookup spliced into vLLM's DFlash drafts in the engine process
(deer_serve/targets/vllm_dflash_lookup.py), as deer-serve's own engine splices it.

In-process (no Ray): two `VLLMLoop`s over the embedded target and the shipped DFlash drafter,
one after the other, without and with the splice, each decoding the same HumanEval prompts one
at a time (greedy; a request alone in its steps, so its drafts do not depend on other requests).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytestmark = pytest.mark.slow

N = 160        # new tokens per request
N_PROMPTS = 24  # the first HumanEval prompts (deer_serve.bench.suites)
# tau (vLLM's accepted drafts per verify step) here: 2.84 without the splice, 3.40 with it, 2.99
# with the planted bug below (measured on the 2-core CI machine; greedy, one request at a time)
TAU_GAIN = 0.35


def test_the_lookup_splice_keeps_plain_ar_ids_and_gets_more_drafts_accepted():
    """Every request's ids are plain greedy decoding's (in-process HFTarget) with and without
    the splice; with it the engine process spliced lookup tokens into its blocks (its counters,
    read over vLLM's collective_rpc; none without), and tau by vLLM's own counts (accepted
    drafts per verify step) is at least TAU_GAIN higher than without it: the spliced drafts
    reach the verifier, and this target's greedy code repeats itself. Power: a splice that leaves
    the step's accepted tokens out of the context it looks up in (its continuations shifted)
    gains 0.15 and fails; one whose blocks do not reach the verifier gains nothing."""
    from transformers import AutoTokenizer

    from deer_serve.assets import ASSETS_DIR
    from deer_serve.bench.suites import load_suite
    from deer_serve.engine import generate
    from deer_serve.targets.hf import HFTarget
    from deer_serve.types import SamplingParams
    from deployments.session import DecodeSpec
    from deployments.vllm_loop import VLLMLoop

    target, drafter = str(ASSETS_DIR / "target"), str(ASSETS_DIR / "drafter-dflash")
    tok = AutoTokenizer.from_pretrained(target)
    prompts = [tok.encode(p.text, add_special_tokens=False)
               for p in load_suite("humaneval", N_PROMPTS)]
    hf = HFTarget.from_pretrained(target, device="cpu")
    want = [generate(hf, None, p, SamplingParams(max_new_tokens=N, ignore_eos=True),
                     mode="ar").token_ids for p in prompts]

    def spec(i: int) -> DecodeSpec:
        return DecodeSpec(token_ids=np.array(prompts[i], dtype=np.int32), emitted=0,
                          sampling=SamplingParams(max_new_tokens=N, ignore_eos=True),
                          mode="deer", block_size=8, seq_id=f"p{i}", adaptive_k=False,
                          pipeline=False, lookup=False, drafter_timeout_s=60.0)

    async def run(lookup: bool) -> tuple[list, float, dict]:
        """(each request's ids, tau by vLLM's own counts, the engine's splice counters)"""
        loop = VLLMLoop(target, drafter, block_size=8, max_running=4, device="cpu",
                        lookup=lookup)
        try:
            ids = []
            for i in range(len(prompts)):
                out: list[int] = []
                async for batch in loop.decode(spec(i)):
                    out += [t for kind, x in batch if kind == "step" for t in x.new_token_ids]
                ids.append(out)
            (stats,) = await loop.engine.collective_rpc("deer_lookup_stats")
            return ids, loop.stats.spec_accepted / max(1, loop.stats.spec_steps), stats
        finally:
            loop.shutdown()

    base_ids, base_tau, base_stats = asyncio.run(run(False))
    ids, tau, stats = asyncio.run(run(True))
    assert base_ids == [list(w) for w in want]
    assert ids == [list(w) for w in want]
    assert not base_stats["on"] and base_stats["spliced_tokens"] == 0, base_stats
    assert stats["on"] and stats["spliced_blocks"] > 0 and stats["spliced_tokens"] > 0, stats
    assert tau >= base_tau + TAU_GAIN, (tau, base_tau, stats)
