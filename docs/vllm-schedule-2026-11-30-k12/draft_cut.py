"""Experiment (not part of deer-serve): each request's drafts cut to its own recent acceptance,
vLLM's engine alone, as one cell of scripts/vllm_schedule_bench.py (32 HumanEval prompts, 128
tokens, 2 passes, k max 8). A request's next drafts are cut to round(EMA of its accepted drafts
per step) + 1 (at least 1; a step that accepted all its drafts counts one more), in vLLM's
scheduler (`update_draft_token_ids`), so the target verifies fewer rows; greedy ids unchanged.

    OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind \
        .venv/bin/python docs/vllm-schedule-2026-11-30-k12/draft_cut.py on|off SEQS K

Prints one line: tok/s (median of the passes), the drafts made and kept ("on"), and a digest of
every prompt's token ids.
"""
import hashlib
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def install_cut(cut: dict) -> None:
    """Patch vLLM's scheduler (this process: the bench runs the engine in-process)."""
    from vllm.v1.core.sched import scheduler as S

    ema: dict = {}
    a_weight = float(os.environ.get("EMA_A", "0.5"))
    extra = int(os.environ.get("EXTRA", "1"))
    orig_stats = S.Scheduler.make_spec_decoding_stats
    orig_update = S.Scheduler.update_draft_token_ids

    def make_stats(self, spec_decoding_stats, num_draft_tokens, num_accepted_tokens,
                   num_invalid_spec_tokens, request_id):
        if num_draft_tokens > 0:  # all accepted says nothing of more drafts: count one more
            a = num_accepted_tokens + (num_accepted_tokens == num_draft_tokens)
            prev = ema.get(request_id)
            ema[request_id] = a if prev is None else a_weight * a + (1 - a_weight) * prev
        return orig_stats(self, spec_decoding_stats, num_draft_tokens=num_draft_tokens,
                          num_accepted_tokens=num_accepted_tokens,
                          num_invalid_spec_tokens=num_invalid_spec_tokens,
                          request_id=request_id)

    def update(self, draft_token_ids):
        for i, rid in enumerate(draft_token_ids.req_ids):
            d = draft_token_ids.draft_token_ids[i]
            cut["drafts"] += len(d)
            e = ema.get(rid)
            if e is not None:
                n = max(1, int(round(e)) + extra)
                if len(d) > n:
                    draft_token_ids.draft_token_ids[i] = list(d[:n])
            cut["kept"] += len(draft_token_ids.draft_token_ids[i])
        return orig_update(self, draft_token_ids)

    S.Scheduler.make_spec_decoding_stats = make_stats
    S.Scheduler.update_draft_token_ids = update


def main() -> None:
    mode, seqs, k = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    cut = {"drafts": 0, "kept": 0}
    if mode == "on":
        install_cut(cut)
    import vllm_schedule_bench

    r = vllm_schedule_bench.cell(seqs, k, 8, 32, 128, 2)
    ids = hashlib.sha1(json.dumps(r.pop("ids_sha1")).encode()).hexdigest()[:10]
    print("CELL " + json.dumps(dict(r, ids=ids, **({"cut": cut} if mode == "on" else {}))))


if __name__ == "__main__":
    main()
