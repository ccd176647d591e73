"""Run by tests/deer_serve/vllm/test_vllm_generate.py in a subprocess (vLLM owns process-wide state):
N samples of a short continuation from vLLM with the DEER proposer, all in one vLLM call.

    python tests/deer_serve/vllm/sample_worker.py TARGET DRAFTER OUT.json N K

OUT.json: {"prompt_ids", "samples": [[t1, t2, t3], ...], "accepted": [...], "startup_s",
"generate_s"}; accepted = the proposer's accepted drafts per cycle, all rows.
"""

import json
import sys
import time

if __name__ == "__main__":  # vLLM may spawn processes: keep the guard
    import torch

    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from deer_serve.targets.vllm_backend import VLLMTarget
    from deer_serve.types import SamplingParams

    target, drafter, out, n, k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    tok = AutoTokenizer.from_pretrained(target)
    prompt = tok.encode("def fibonacci(n):\n    ", add_special_tokens=False)
    t0 = time.perf_counter()
    vt = VLLMTarget(target, drafter_path=drafter, max_model_len=256)
    vt.engine(k)
    t1 = time.perf_counter()
    sp = SamplingParams(temperature=1.0, max_new_tokens=3, ignore_eos=True)
    res = vt.generate_batch([prompt] * n, sp, mode="deer", block_size=k)
    t2 = time.perf_counter()
    with open(out, "w") as f:
        json.dump({"prompt_ids": prompt, "samples": [r.token_ids for r in res],
                   "accepted": vt.last_accept_log, "startup_s": t1 - t0,
                   "generate_s": t2 - t1}, f)
