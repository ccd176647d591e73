"""vLLM's DFlash proposer at k = 0: keep the drafter's context, skip its forward.

vLLM's dynamic speculative decoding (`num_speculative_tokens_per_batch_size`) picks k per engine
step by the batch size; at k = 0 the DFlash proposer (`vllm.v1.spec_decode.dflash`) still runs
the drafter's full first pass (the context K/V projection, then a forward of every request's
query token through the drafter and its head) and throws the result away. Only the first half
matters afterwards: a DFlash drafter attends to the target's hidden states of every context
token, which `precompute_and_store_context_kv` writes into the drafter's KV cache; the query
token's K/V lands one position past the context and the next step's context overwrites it.

`patch()` makes `DFlashProposer.propose` at k = 0 write the context K/V (the same call the full
pass makes, on the same inputs) and return no drafts, without the drafter's forward. Drafts made
after a k = 0 step are the same as without the patch (tests/deer_serve/vllm/test_vllm_fixes.py
checks the acceptance counts of a request that drafts after k = 0 steps); at k > 0 nothing
changes.
"""

from __future__ import annotations

import torch

_ORIGINAL = "_deer_original_propose"


def _propose(self, num_speculative_tokens, target_token_ids, target_positions,
             target_hidden_states, next_token_ids, token_indices_to_sample,
             common_attn_metadata, sampling_metadata, mm_embed_inputs=None,
             num_rejected_tokens_gpu=None, slot_mappings=None):
    if num_speculative_tokens != 0:
        return getattr(type(self), _ORIGINAL)(
            self, num_speculative_tokens, target_token_ids, target_positions,
            target_hidden_states, next_token_ids, token_indices_to_sample,
            common_attn_metadata, sampling_metadata, mm_embed_inputs=mm_embed_inputs,
            num_rejected_tokens_gpu=num_rejected_tokens_gpu, slot_mappings=slot_mappings)
    self.num_speculative_tokens = 0
    self._last_draft_probs = None
    batch_size = common_attn_metadata.batch_size()
    hidden = self.model.combine_hidden_states(target_hidden_states)
    # the context's positions and KV slots, as the full pass computes them
    self.set_inputs_first_pass(
        target_token_ids=target_token_ids, next_token_ids=next_token_ids,
        target_positions=target_positions, target_hidden_states=hidden,
        token_indices_to_sample=token_indices_to_sample, cad=common_attn_metadata,
        num_rejected_tokens_gpu=num_rejected_tokens_gpu)
    n = self._dflash_num_context
    self.model.precompute_and_store_context_kv(
        self._dflash_hidden_states, self._context_positions_buffer[:n],
        self._context_slot_mapping_buffer[:n])
    return torch.empty(batch_size, 0, device=hidden.device, dtype=torch.int64)


def patch() -> bool:
    """Install the k = 0 path in this process; True when vLLM's DFlash proposer was patched."""
    try:
        from vllm.v1.spec_decode.dflash import DFlashProposer
    except Exception:  # vLLM absent, or a vLLM without DFlash
        return False
    from deer_serve.targets.vllm_fixes import replace_once

    replace_once(DFlashProposer, "propose", _propose, _ORIGINAL)
    return True


def unpatch() -> None:
    """vLLM's own proposer again (tests compare the two)."""
    try:
        from vllm.v1.spec_decode.dflash import DFlashProposer
    except Exception:  # noqa: BLE001
        return
    original = getattr(DFlashProposer, _ORIGINAL, None)
    if original is not None:
        DFlashProposer.propose = original
        delattr(DFlashProposer, _ORIGINAL)
