"""Run by tests/deer_serve/vllm/test_vllm_fixes.py in a subprocess (vLLM owns process-wide
state): one vLLM engine, the loop's engine arguments (the embedded target, the shipped DFlash
drafter), k = 0 while two requests share a step and k = K when one runs alone. Request A stops
early; request B runs on alone and drafts over a context whose drafter K/V was written by k = 0
steps. B's token ids and vLLM's per-step accepted counts, with the proposer as:

* vllm: vLLM's own (the drafter's full forward at k = 0);
* skip: deer_serve.targets.vllm_dflash_skip (the context K/V only at k = 0);
* planted: the skip with a planted bug, the context K/V not written at k = 0.

    python tests/deer_serve/vllm/skip_worker.py OUT.json K

OUT.json: {mode: {"a": [ids], "b": [ids], "b_accepted": [per-step accepted]}}.
"""

import json
import sys

if __name__ == "__main__":  # vLLM may spawn processes: keep the guard
    import torch

    torch.set_num_threads(1)
    from deer_serve.targets.vllm_backend import _set_env

    _set_env("cpu")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.v1.spec_decode.dflash import DFlashProposer

    from deer_serve.assets import ASSETS_DIR
    from deer_serve.targets import vllm_dflash_skip
    from deployments.vllm_loop import engine_args

    out_path, k = sys.argv[1], int(sys.argv[2])
    NB, A_TOKENS, B_TOKENS = 4, 48, 128
    target, drafter = str(ASSETS_DIR / "target"), str(ASSETS_DIR / "drafter-dflash")
    kw = engine_args(target, drafter, block_size=k, max_running=2, cpu=True,
                     spec_schedule=[[1, 1, k], [2, 64, 0]])
    kw.update(enable_prefix_caching=False, max_model_len=512)  # every run computes its own K/V
    llm = LLM(**kw)
    tok = AutoTokenizer.from_pretrained(target)
    from deer_serve.bench.suites import load_suite

    texts = [p.text for p in load_suite("humaneval", NB + 1)]
    prompts = [TokensPrompt(prompt_token_ids=tok.encode(t, add_special_tokens=False))
               for t in texts]
    params = [SamplingParams(temperature=0.0, max_tokens=A_TOKENS, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=B_TOKENS, ignore_eos=True)]

    def run() -> dict:
        r: dict = {"a": [], "b": [], "b_accepted": []}
        for b_prompt in prompts[1:]:
            a, b = llm.generate([prompts[0], b_prompt], params, use_tqdm=False)
            m = b.outputs[0].spec_decode_metrics
            r["a"].append(list(a.outputs[0].token_ids))
            r["b"].append(list(b.outputs[0].token_ids))
            r["b_accepted"].append(list(m.to_dict().get("per_step_accepted", [])) if m else [])
        return r

    results = {}
    vllm_dflash_skip.unpatch()
    results["vllm"] = run()
    assert vllm_dflash_skip.patch()
    results["skip"] = run()
    skip_propose = DFlashProposer.propose

    def planted(self, num_speculative_tokens, *args, **kwargs):
        if num_speculative_tokens != 0:
            return skip_propose(self, num_speculative_tokens, *args, **kwargs)
        store = self.model.precompute_and_store_context_kv
        self.model.precompute_and_store_context_kv = lambda *a, **kw: None  # the bug
        try:
            return skip_propose(self, num_speculative_tokens, *args, **kwargs)
        finally:
            self.model.precompute_and_store_context_kv = store

    DFlashProposer.propose = planted
    results["planted"] = run()
    DFlashProposer.propose = skip_propose
    results["skip_again"] = run()
    with open(out_path, "w") as f:
        json.dump(results, f)
