"""vLLM's DFlash proposer at k = 0: no drafter forward, and the drafter's context written later.

vLLM's dynamic speculative decoding (`num_speculative_tokens_per_batch_size`) picks k per engine
step by the batch size; at k = 0 the DFlash proposer (`vllm.v1.spec_decode.dflash`) still runs
the drafter's full first pass (the context K/V projection, then a forward of every request's
query token through the drafter and its head) and throws the result away. Only the first half
matters afterwards: a DFlash drafter attends to the target's hidden states of every context
token, which `precompute_and_store_context_kv` writes into the drafter's KV cache; the query
token's K/V lands one position past the context and the next step's context overwrites it.

`patch()` makes `DFlashProposer.propose` at k = 0 skip the forward and *defer* the context:
the step's target hidden states (the auxiliary layers, before the drafter's `fc`) and positions
are kept per request, and written (one `combine_hidden_states` and one
`precompute_and_store_context_kv` over all of them) just before the drafter next runs (the
next k > 0 step), for the requests of that step only. A request that ends while k = 0 (the
usual case under load, where the schedule says k = 0) never has its context projected at all.
Rows of a request that is still alive but not in the step are kept; rows of a request that has
ended are dropped; at most `MAX_DEFERRED_ROWS` rows wait (beyond that they are written at the
k = 0 step). A later row for the same request and position replaces an earlier one. A k = 0
step that verifies the previous step's drafts and rejects some writes its context at once
(after the waiting rows), as the full pass would. The
writes use the KV slots of the request's block table at the write (a preempted request's new
blocks). At k > 0 nothing changes: vLLM's own proposer runs.

Drafts made after k = 0 steps are the same as vLLM's own proposer's
(tests/deer_serve/vllm/test_vllm_fixes.py compares the per-step accepted counts of a request
that drafts after k = 0 steps). Where the proposer was built before the patch (no model runner
known), k = 0 writes the context at once instead.
"""

from __future__ import annotations

import itertools

import torch

_ORIGINAL = "_deer_original_propose"
_ORIGINAL_INIT = "_deer_original_init"
MAX_DEFERRED_ROWS = 16384  # per engine: 16384 x (aux layers x hidden) floats at most
DEFER = True  # False: k = 0 steps write their context at once (scripts/vllm_schedule_bench.py's
#               k "0now", to measure what the deferral saves)


class _Deferred:
    """k = 0 context rows waiting for the drafter's next forward."""

    def __init__(self):
        self.hidden: list[torch.Tensor] = []     # [n, aux layers x hidden] per k = 0 step
        self.positions: list[torch.Tensor] = []  # [n]
        self.keys: list[torch.Tensor] = []       # [n]: the request's key (key_of)
        self.rows = 0
        self.key_of: dict[str, int] = {}
        self._next = itertools.count()

    def key(self, req_id: str) -> int:
        k = self.key_of.get(req_id)
        if k is None:
            k = self.key_of[req_id] = next(self._next)
        return k


def _write(proposer, raw_hidden: torch.Tensor, positions: torch.Tensor,
           slots: torch.Tensor) -> None:
    """The drafter's context K/V of these rows into its KV cache (what the full pass does)."""
    hidden = proposer.model.combine_hidden_states(raw_hidden)
    proposer.model.precompute_and_store_context_kv(hidden, positions, slots)


def _defer(self, target_positions, target_hidden_states, cad) -> bool:
    """Keep this k = 0 step's context; False when it cannot be kept (then it is written now)."""
    runner = getattr(self, "_deer_runner", None)
    b = cad.batch_size()
    qsl = cad.query_start_loc_cpu
    if runner is None or target_positions.dim() != 1 or qsl is None:
        return False
    n = int(target_hidden_states.shape[0])
    counts = (qsl[1:b + 1] - qsl[:b]).to(torch.int64)
    if int(counts.sum()) != n:
        return False
    st = self.__dict__.setdefault("_deer_deferred", _Deferred())
    keys = torch.tensor([st.key(r) for r in runner.input_batch.req_ids[:b]], dtype=torch.int64)
    hidden = target_hidden_states  # n rows (checked above)
    if hidden._base is not None:  # a view of a buffer the next step reuses
        hidden = hidden.clone()
    st.hidden.append(hidden)
    st.positions.append(target_positions[:n].to(torch.int64, copy=True))  # a reused buffer
    st.keys.append(keys.repeat_interleave(counts).to(hidden.device, non_blocking=True))
    st.rows += n
    if st.rows > MAX_DEFERRED_ROWS:
        _flush(self, cad)
    return True


def _flush(self, cad) -> None:
    """Write the waiting rows of this step's requests; keep those of live requests not in it."""
    st = getattr(self, "_deer_deferred", None)
    if st is None or not st.rows:
        return
    runner = self._deer_runner
    ids = runner.input_batch.req_ids[:cad.batch_size()]
    hidden = torch.cat(st.hidden) if len(st.hidden) > 1 else st.hidden[0]
    pos = torch.cat(st.positions)
    keys = torch.cat(st.keys)
    nkeys = max(st.key_of.values()) + 1
    row_of_key = torch.full((nkeys,), -1, dtype=torch.int64)
    for i, r in enumerate(ids):
        k = st.key_of.get(r)
        if k is not None:
            row_of_key[k] = i
    alive = torch.zeros(nkeys, dtype=torch.bool)
    for r, k in list(st.key_of.items()):
        if r in runner.requests:
            alive[k] = True
        else:
            del st.key_of[r]  # ended: its rows are dropped below
    dev = hidden.device
    rows = row_of_key.to(dev)[keys]
    now = rows >= 0
    later = alive.to(dev)[keys] & ~now
    if bool(now.any()):
        h, p, r = hidden[now], pos[now], rows[now]
        # the last row per (request, position) wins, as the eager writes would have it
        uniq, inv = torch.unique(r * (int(p.max()) + 1) + p, return_inverse=True)
        last = torch.full((uniq.numel(),), -1, dtype=torch.int64, device=dev).scatter_reduce(
            0, inv, torch.arange(inv.numel(), device=dev), "amax")
        h, p, r = h[last], p[last], r[last]
        bs = int(self.block_size)
        slots = cad.block_table_tensor[r, p // bs].to(torch.int64) * bs + p % bs
        _write(self, h, p, slots)
    st.hidden, st.positions, st.keys = [], [], []
    st.rows = int(later.sum())
    if st.rows:
        st.hidden, st.positions, st.keys = [hidden[later]], [pos[later]], [keys[later]]


def _propose(self, num_speculative_tokens, target_token_ids, target_positions,
             target_hidden_states, next_token_ids, token_indices_to_sample,
             common_attn_metadata, sampling_metadata, mm_embed_inputs=None,
             num_rejected_tokens_gpu=None, slot_mappings=None):
    if num_speculative_tokens != 0:
        _flush(self, common_attn_metadata)  # the deferred context first, then this step's
        return getattr(type(self), _ORIGINAL)(
            self, num_speculative_tokens, target_token_ids, target_positions,
            target_hidden_states, next_token_ids, token_indices_to_sample,
            common_attn_metadata, sampling_metadata, mm_embed_inputs=mm_embed_inputs,
            num_rejected_tokens_gpu=num_rejected_tokens_gpu, slot_mappings=slot_mappings)
    self.num_speculative_tokens = 0
    self._last_draft_probs = None
    batch_size = common_attn_metadata.batch_size()
    empty = torch.empty(batch_size, 0, device=target_hidden_states.device, dtype=torch.int64)
    # a step that verifies drafts (tokens rejected) writes at once: only its accepted rows count
    if DEFER and (num_rejected_tokens_gpu is None or not bool(num_rejected_tokens_gpu.any())) and _defer(
            self, target_positions, target_hidden_states, common_attn_metadata):
        return empty
    _flush(self, common_attn_metadata)  # keep the order of the writes
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
    return empty


def _init(self, vllm_config, device, runner=None, *args, **kwargs):
    getattr(type(self), _ORIGINAL_INIT)(self, vllm_config, device, runner, *args, **kwargs)
    self._deer_runner = runner  # its request ids and live requests, for the deferred context


def patch() -> bool:
    """Install the k = 0 path in this process; True when vLLM's DFlash proposer was patched."""
    try:
        from vllm.v1.spec_decode.dflash import DFlashProposer
    except Exception:  # vLLM absent, or a vLLM without DFlash
        return False
    if getattr(DFlashProposer, _ORIGINAL, None) is None:
        setattr(DFlashProposer, _ORIGINAL, DFlashProposer.propose)
        setattr(DFlashProposer, _ORIGINAL_INIT, DFlashProposer.__init__)
        DFlashProposer.propose = _propose
        DFlashProposer.__init__ = _init
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
        DFlashProposer.__init__ = getattr(DFlashProposer, _ORIGINAL_INIT)
        delattr(DFlashProposer, _ORIGINAL)
        delattr(DFlashProposer, _ORIGINAL_INIT)
