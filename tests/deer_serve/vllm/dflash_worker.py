"""Run by tests/deer_serve/vllm/test_vllm_dflash.py in a subprocess (vLLM owns process-wide state): greedy
generations of the prompts by plain vLLM and by vLLM with a DFlash drafter in its native
proposer (`speculative_config={"method": "dflash", ...}`), and vLLM's spec-decode counters.

    python tests/deer_serve/vllm/dflash_worker.py TARGET DRAFTER PROMPTS.json OUT.json K MAX_NEW

OUT.json: {"ar": [[ids]], "dflash": [[ids]], "counters": {drafts, draft_tokens, accepted}}.
"""

import json
import sys

if __name__ == "__main__":  # vLLM may spawn processes: keep the guard
    import torch

    torch.set_num_threads(1)
    from deer_serve.targets.vllm_backend import VLLMTarget
    from deer_serve.types import SamplingParams

    target, drafter, prompts, out, k, n = sys.argv[1:7]
    k, n = int(k), int(n)
    prompts = json.loads(open(prompts).read())
    vt = VLLMTarget(target, drafter_path=drafter, max_model_len=512)
    assert vt.native_dflash
    sp = SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)
    ar = [vt.generate(p, sp, mode="ar").token_ids for p in prompts]
    before = vt.spec_counters(k)
    dfl = [vt.generate(p, sp, mode="deer", block_size=k).token_ids for p in prompts]
    after = vt.spec_counters(k)
    with open(out, "w") as f:
        json.dump({"ar": ar, "dflash": dfl,
                   "counters": {c: after[c] - before[c] for c in after}}, f)
