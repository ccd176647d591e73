"""A batched `torch` target backend with ONE persistent KV buffer per layer (for the step engine).

`HFTarget.score_batch` keeps a `DynamicCache` per sequence and copies every row's KV into a
fresh batch cache (and back out) on each call: with many rows that copying costs more than the
forward. `SlotTarget` keeps the KV of all its sequences in place instead:

    keys[l], values[l]   (slots, kv_heads, capacity, head_dim)   one row (slot) per sequence
    valid                (slots, capacity) bool                   the columns a row attends to

A forward over rows [a, b) writes every row's new positions at the same columns [C, C + N)
(C = the first column after every row's last valid one) and attends through a 4-D mask: each
query sees its row's valid columns and the new columns up to its own (causal order by column;
rotary positions are each row's logical positions, `position_ids`). So:

    rolling back rejected drafts   marks their columns invalid (no copy)
    a row with fewer than N new    its padding columns stay invalid; its padding queries see
      tokens (or none)             their own column, so no query row is fully masked (no NaN)
    a joining row                  gets a free slot; a long prefill runs as its own forward on
                                   that slot alone (no padding of the others to its length)
    a leaving row                  frees its slot
    holes (invalid columns below   `compact` copies each row's valid columns to the front once
      C) pile up or C nears the    (and packs the rows into the lowest slots); the buffer grows
      capacity                     (doubling) when that is not enough

Attention (sdpa models): the query heads that share a kv head are folded into the query length,
so the window is read in place instead of copied per head group (`repeat_kv`); the model's
`_attn_implementation` names that function for the duration of a forward, and any other call
of the model meanwhile gets plain sdpa from it. Sliding-window models are refused (one mask
serves every layer).

The contract is `HFTarget`'s: every call carries the full ids; each row keeps the longest
matching prefix of what it holds and recomputes the rest (a miss recomputes). Results equal
`HFTarget.score` up to float rounding, target features (`return_hidden`) included.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

from deer_serve.targets.hf import HFTarget, _Row, batch_rows, common_prefix_len
from deer_serve.types import ScoreResult


@dataclass
class _Seq:
    slot: int
    ids: list[int] = field(default_factory=list)   # the ids its valid columns stand for
    cols: list[int] = field(default_factory=list)  # column of each position, increasing


class _Window(Cache):
    """The slot buffer seen by one forward over rows [a, b): `update` writes the new keys and
    values at columns [c, c + n) and returns columns [0, c + n) of those rows (views)."""

    def __init__(self, keys: list, values: list, a: int, b: int, c: int):
        super().__init__(layers=[])
        self.k, self.v, self.a, self.b, self.c = keys, values, a, b, c

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        a, b, c = self.a, self.b, self.c
        end = c + key_states.shape[2]
        kb, vb = self.k[layer_idx], self.v[layer_idx]
        kb[a:b, :, c:end] = key_states
        vb[a:b, :, c:end] = value_states
        return kb[a:b, :, :end], vb[a:b, :, :end]


def _slot_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                    scaling: Optional[float] = None, slot_fold: bool = False, **kwargs):
    """SDPA over the slot buffer without copying it per kv-head group: the query heads that
    share a kv head are folded into the query length, q (B, Hq, N, d) -> (B, Hkv, G*N, d), and
    the mask comes folded the same way (B, 1, G*N, L) (`repeat_kv` would copy the whole window
    of keys and values in every layer). Any other call is plain `sdpa`."""
    if not slot_fold or attention_mask is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    B, Hq, N, d = query.shape
    Hk = key.shape[1]
    q = query.reshape(B, Hk, (Hq // Hk) * N, d)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value,
                                                           attn_mask=attention_mask,
                                                           scale=scaling)
    return out.reshape(B, Hq, N, value.shape[-1]).transpose(1, 2).contiguous(), None


SLOT_ATTENTION = "deer_slots_sdpa"
AttentionInterface.register(SLOT_ATTENTION, _slot_attention)


def supports(model) -> bool:
    """Whether SlotTarget can run `model`: every layer full causal attention (its one 4-D mask
    has no sliding window)."""
    cfg = model.config.get_text_config()
    types = getattr(cfg, "layer_types", None) or ["full_attention"]
    sliding = getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True)
    return all(t == "full_attention" for t in types) and not sliding


class SlotTarget:
    """`TargetBackend` with `score_batch` over a Hugging Face causal LM whose sequences share
    one slot-per-row KV buffer (see the module doc)."""

    def __init__(self, model, *, feature_layers: Optional[Sequence[int]] = None,
                 eos_token_id: Optional[int] = None, slots: int = 16, capacity: int = 512,
                 max_sequences: int = 64, prefill_split: int = 32):
        """slots, capacity: the buffer's initial rows and columns (both grow on demand).
        max_sequences: sequences kept (least recently used evicted). prefill_split: a row with
        more new positions than this (a prefill, a long miss) runs as its own forward."""
        if slots < 1 or capacity < 1 or max_sequences < 1:
            raise ValueError("slots, capacity and max_sequences must be >= 1")
        if not supports(model):
            raise ValueError("SlotTarget needs a model whose layers are all full attention")
        # the model's facts (feature layers, vocabulary, eos) exactly as HFTarget states them
        ref = HFTarget(model, feature_layers=feature_layers, eos_token_id=eos_token_id)
        self.model, self.config, self.device = ref.model, ref.config, ref.device
        self.num_layers, self.feature_layers = ref.num_layers, ref.feature_layers
        self.feature_dim, self.vocab_size = ref.feature_dim, ref.vocab_size
        self.eos_token_id = ref.eos_token_id
        self.max_sequences, self.prefill_split = max_sequences, int(prefill_split)
        cfg = self.config
        heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or int(cfg.hidden_size) // heads)
        self.dtype = next(model.parameters()).dtype
        self.slots, self.capacity = int(slots), int(capacity)
        self.keys = [self._empty(self.slots, self.capacity) for _ in range(self.num_layers)]
        self.values = [self._empty(self.slots, self.capacity) for _ in range(self.num_layers)]
        with torch.inference_mode():  # (all buffers inference tensors, wherever made)
            self.valid = torch.zeros(self.slots, self.capacity, dtype=torch.bool,
                                     device=self.device)
        self._end = [0] * self.slots                    # per slot: 1 + its last valid column
        self._free = list(range(self.slots))            # kept sorted: lowest slot first
        self._seqs: "OrderedDict[str, _Seq]" = OrderedDict()
        self.stats = {"forwards": 0, "compactions": 0, "grown": 0}

    @classmethod
    def from_hf(cls, target: HFTarget, **kw) -> "SlotTarget":
        """A SlotTarget over `target`'s model, feature layers and eos (its caches are separate)."""
        return cls(target.model, feature_layers=target.feature_layers,
                   eos_token_id=target.eos_token_id, **kw)

    @torch.inference_mode()
    def _empty(self, slots: int, cols: int) -> torch.Tensor:
        return torch.zeros(slots, self.kv_heads, cols, self.head_dim, dtype=self.dtype,
                           device=self.device)

    # ---- TargetBackend -------------------------------------------------------------------
    def score(self, seq_id: str, token_ids: Sequence[int], n_query: int,
              return_hidden: bool = False, n_hidden: Optional[int] = None) -> ScoreResult:
        """As `HFTarget.score`."""
        return self.score_batch([seq_id], [token_ids], [n_query], return_hidden,
                                [n_hidden])[0]

    @torch.inference_mode()
    def score_batch(self, seq_ids: Sequence[str], token_ids: Sequence[Sequence[int]],
                    n_query: Sequence[int], return_hidden: bool = False,
                    n_hidden: Optional[Sequence[Optional[int]]] = None) -> list[ScoreResult]:
        """As `HFTarget.score_batch`: per row the result equals `score` up to float rounding."""
        rows = batch_rows(seq_ids, token_ids, n_query, return_hidden, n_hidden)
        B = len(rows)

        seqs = [self._claim(r, set(seq_ids)) for r in rows]
        self._maybe_compact()
        n_new = [len(r.ids) - len(s.ids) for r, s in zip(rows, seqs)]
        out: list[Optional[ScoreResult]] = [None] * B
        shared = [i for i in range(B) if n_new[i] <= self.prefill_split]
        groups = [[i] for i in range(B) if n_new[i] > self.prefill_split]
        if shared:
            groups.append(shared)
        for g in groups:
            for i, res in zip(g, self._forward([rows[i] for i in g], [seqs[i] for i in g],
                                               return_hidden)):
                out[i] = res
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def release(self, seq_id: str) -> None:
        s = self._seqs.pop(seq_id, None)
        if s is not None:
            self._clear(s)
            self._free.append(s.slot)
            self._free.sort()

    def cached_length(self, seq_id: str) -> int:
        """Positions of KV held for `seq_id` (0 when none): for tests and stats."""
        s = self._seqs.get(seq_id)
        return 0 if s is None else len(s.ids)

    # ---- rows and slots ------------------------------------------------------------------
    def _claim(self, r: _Row, batch: set) -> _Seq:
        """The row's sequence, rolled back to the prefix it keeps (a new one gets a slot)."""
        s = self._seqs.pop(r.sid, None)
        if s is not None:
            keep = min(common_prefix_len(s.ids, r.ids), len(r.ids) - r.need)
            if keep <= 0:
                self._clear(s)
            elif keep < len(s.ids):
                drop = s.cols[keep:]
                self.valid[s.slot, torch.tensor(drop, device=self.device)] = False
                del s.ids[keep:], s.cols[keep:]
                self._end[s.slot] = s.cols[-1] + 1
        else:
            # least recently used first; a batch's own rows stay (it may hold more for a call)
            victims = iter([sid for sid in self._seqs if sid not in batch])
            while len(self._seqs) >= self.max_sequences:
                old = next(victims, None)
                if old is None:
                    break
                self.release(old)
            if not self._free:
                self._grow(slots=2 * self.slots)
            s = _Seq(self._free.pop(0))
        self._seqs[r.sid] = s  # most recently used last
        return s

    def _clear(self, s: _Seq) -> None:
        if s.cols:
            self.valid[s.slot].zero_()
        s.ids, s.cols = [], []
        self._end[s.slot] = 0

    def _grow(self, slots: Optional[int] = None, capacity: Optional[int] = None) -> None:
        """Reallocate the buffer with more slots and/or columns (one copy)."""
        S, C = slots or self.slots, capacity or self.capacity
        for bufs in (self.keys, self.values):
            for l, old in enumerate(bufs):
                new = self._empty(S, C)
                new[:self.slots, :, :self.capacity] = old
                bufs[l] = new
        valid = torch.zeros(S, C, dtype=torch.bool, device=self.device)
        valid[:self.slots, :self.capacity] = self.valid
        self.valid = valid
        self._free = sorted(self._free + list(range(self.slots, S)))
        self._end += [0] * (S - self.slots)
        self.slots, self.capacity = S, C
        self.stats["grown"] += 1

    def _maybe_compact(self) -> None:
        """Compact when the holes under the common column outweigh the longest row."""
        if not self._seqs:
            return
        top = max(self._end)
        longest = max(len(s.ids) for s in self._seqs.values())
        if top > 2 * longest + 64:
            self.compact()

    @torch.inference_mode()
    def compact(self) -> None:
        """Copy every row's valid columns to the front of its row and pack the rows into the
        lowest slots (in slot order): one copy of the live KV."""
        seqs = sorted(self._seqs.values(), key=lambda s: s.slot)
        moves = [(s, i) for i, s in enumerate(seqs)
                 if s.slot != i or (s.cols and s.cols[-1] != len(s.cols) - 1)]
        if moves:
            idx = [(torch.tensor(s.cols, dtype=torch.long, device=self.device), s.slot, i)
                   for s, i in moves if s.cols]
            for bufs in (self.keys, self.values):
                for buf in bufs:
                    parts = [buf[slot].index_select(1, cols) for cols, slot, _ in idx]
                    for (cols, _, i), part in zip(idx, parts):
                        buf[i, :, :len(cols)] = part
            self.valid.zero_()
            self._end = [0] * self.slots
            for i, s in enumerate(seqs):
                n = len(s.cols)
                self.valid[i, :n] = True
                s.slot, s.cols = i, list(range(n))
                self._end[i] = n
            self._free = list(range(len(seqs), self.slots))
        self.stats["compactions"] += 1

    # ---- one forward ---------------------------------------------------------------------
    def _forward(self, rows: list[_Row], seqs: list[_Seq], return_hidden: bool
                 ) -> list[ScoreResult]:
        n_new = [len(r.ids) - len(s.ids) for r, s in zip(rows, seqs)]
        N = max(n_new)
        for attempt in range(3):
            a = min(s.slot for s in seqs)
            b = max(s.slot for s in seqs) + 1
            C = max(self._end[a:b])
            if C + N <= self.capacity:
                break
            if attempt == 0:
                self.compact()
            else:
                self._grow(capacity=max(2 * self.capacity, C + N + 64))
        S = b - a
        dev = self.device
        input_ids = torch.zeros(S, N, dtype=torch.long)
        position_ids = torch.zeros(S, N, dtype=torch.long)
        for r, s, n in zip(rows, seqs, n_new):
            keep = len(s.ids)
            input_ids[s.slot - a, :n] = torch.tensor(r.ids[keep:])
            position_ids[s.slot - a] = torch.arange(keep, keep + N)  # padding continues
        cfg = self.model.config
        fold = cfg._attn_implementation == "sdpa"
        G = int(cfg.get_text_config().num_attention_heads) // self.kv_heads if fold else 1
        mask: Any = None
        kw: dict = {}
        if C > 0 or S > 1:  # (a fresh row alone: plain causal attention)
            # query row g*N + j (head group g, position j) sees the row's valid columns and
            # the new columns up to its own
            mask = torch.empty(S, 1, G, N, C + N, dtype=torch.bool, device=dev)
            mask[:, 0, :, :, :C] = self.valid[a:b, None, None, :C]
            mask[:, 0, :, :, C:] = torch.ones(N, N, dtype=torch.bool, device=dev).tril()
            mask = mask.view(S, 1, G * N, C + N)
            if fold:
                kw["slot_fold"] = True
            else:  # other attention implementations (eager) add the mask to the scores
                mask = torch.zeros(mask.shape, dtype=self.dtype, device=dev).masked_fill_(
                    ~mask, torch.finfo(self.dtype).min)
        first_needed = min(n - r.nq for r, n in zip(rows, n_new))
        cache = _Window(self.keys, self.values, a, b, C)
        self.stats["forwards"] += 1
        if fold:  # our sdpa for this forward (any other caller meanwhile gets plain sdpa)
            cfg._attn_implementation = SLOT_ATTENTION
        try:
            out = self.model(input_ids=input_ids.to(dev), position_ids=position_ids.to(dev),
                             attention_mask=mask, past_key_values=cache, use_cache=True,
                             output_hidden_states=return_hidden, logits_to_keep=N - first_needed,
                             **kw)
        finally:
            if fold:
                cfg._attn_implementation = "sdpa"
        off = N - out.logits.shape[1]                                          # = first_needed
        results = []
        for r, s, n in zip(rows, seqs, n_new):
            i = s.slot - a
            self.valid[s.slot, C:C + n] = True
            s.cols.extend(range(C, C + n))
            s.ids = r.ids
            self._end[s.slot] = C + n
            logits = out.logits[i, n - r.nq - off:n - off].float()             # (nq, V)
            hidden = None
            if return_hidden:
                hs = out.hidden_states
                hidden = torch.cat([hs[l][i, n - r.nh:n] for l in self.feature_layers],
                                   -1).float()
            results.append(ScoreResult(logits=logits, hidden=hidden))
        return results
