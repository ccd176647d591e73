"""Run by tests/deer_serve/vllm/test_vllm_law.py in a subprocess (vLLM owns process-wide state): samples of
the first WINDOW tokens from vLLM verifying DEER drafts (`VLLMTarget.generate_batch`, mode
"deer": the `DeerProposer` drafts, vLLM's rejection sampler verifies), each phase's requests in
one vLLM call (continuous batching), one engine for all phases.

    python tests/deer_serve/vllm/law_worker.py TARGET DRAFTER DIR K WINDOW TEMP PHASE:N [PHASE:N ...]

DIR holds prompt.json (token ids) and receives out.json. PHASE "exact" is vLLM as installed;
"recovered-from-p" plants a bug in vLLM's rejection sampler, in this process (the engine runs
here: VLLM_ENABLE_V1_MULTIPROCESSING=0): the token after a rejected draft drawn from the
target's p instead of p with the rejected draft removed (`rejection_sampler.
sample_recovered_tokens`, which `rejection_sample` calls). The plant is undone after its phase.

out.json: {"phases": {PHASE: {"samples": [[t1..tW], ...], "accepted": [...], "generate_s"}},
"startup_s"}; accepted = the proposer's accepted drafts per cycle, all rows.
"""

import json
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # vLLM may spawn processes: keep the guard
    import torch

    torch.set_num_threads(1)
    import vllm.v1.sample.rejection_sampler as rs

    from deer_serve.targets.vllm_backend import VLLMTarget
    from deer_serve.types import SamplingParams

    target, drafter, d = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    k, window, temp = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
    phases = [(p.split(":")[0], int(p.split(":")[1])) for p in sys.argv[7:]]
    prompt = json.loads((d / "prompt.json").read_text())

    real = rs.sample_recovered_tokens

    def recovered_from_p(max_spec_len, num_draft_tokens, cu_num_draft_tokens, draft_token_ids,
                         draft_probs, target_probs, sampling_metadata, device, *a, **kw):
        return torch.multinomial(target_probs, 1).squeeze(1).to(draft_token_ids.dtype)

    plants = {"exact": real, "recovered-from-p": recovered_from_p}
    t0 = time.perf_counter()
    vt = VLLMTarget(target, drafter_path=drafter, max_model_len=64,
                    engine_kwargs={"max_num_seqs": 1024})
    vt.engine(k)
    out = {"startup_s": time.perf_counter() - t0, "phases": {}}
    sp = SamplingParams(temperature=temp, max_new_tokens=window, ignore_eos=True)
    for name, n in phases:
        rs.sample_recovered_tokens = plants[name]
        t1 = time.perf_counter()
        res = vt.generate_batch([prompt] * n, sp, mode="deer", block_size=k)
        out["phases"][name] = {"samples": [r.token_ids for r in res],
                               "accepted": vt.last_accept_log,
                               "generate_s": time.perf_counter() - t1}
        rs.sample_recovered_tokens = real
    (d / "out.json").write_text(json.dumps(out))
