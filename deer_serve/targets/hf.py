"""The `torch` target backend: any Hugging Face `AutoModelForCausalLM` as the verifier.

Per `seq_id` it keeps a transformers `DynamicCache` and the token ids that cache stands for.
Every `score` call carries the full ids; the backend keeps the KV of the longest common prefix
(rolled back with `crop`), runs the remaining tokens in ONE forward, and returns the logits (and,
when asked, the target features) of the last `n_query` positions. A cache miss (new replica,
eviction, release, divergent ids) therefore recomputes instead of failing.

Target features (for `target-features` drafters, as DFlash / EAGLE): the concatenation of
`hidden_states[l]` for l in `feature_layers`, where hidden_states[0] is the embedding output and
hidden_states[L] the last layer's output AFTER the final norm (transformers ties the last entry
to `last_hidden_state`; tests check `lm_head(hidden_states[L]) == logits`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from deer_serve.targets.features import default_feature_layers
from deer_serve.types import ScoreResult


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):  # the usual case: one extends the other
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Row:
    """One sequence of a `score_batch` call."""
    sid: str
    ids: list[int]
    nq: int      # query rows (logits)
    nh: int      # feature rows
    need: int    # positions that must run in this forward: max(nq, nh if features)


def batch_rows(seq_ids: Sequence[str], token_ids: Sequence[Sequence[int]],
               n_query: Sequence[int], return_hidden: bool,
               n_hidden: Optional[Sequence[Optional[int]]]) -> list[_Row]:
    """A `score_batch` call's rows, checked (ValueError) as `score` checks one."""
    B = len(seq_ids)
    if not B == len(token_ids) == len(n_query):
        raise ValueError("seq_ids, token_ids and n_query must have the same length")
    if len(set(seq_ids)) != B:
        raise ValueError("seq_ids in one batch must be distinct")
    nh_list = list(n_hidden) if n_hidden is not None else [None] * B
    rows = []
    for sid, toks, nq, nh in zip(seq_ids, token_ids, n_query, nh_list):
        ids = [int(t) for t in toks]
        T = len(ids)
        if not 1 <= nq <= T:
            raise ValueError(f"n_query must be in [1, {T}], got {nq}")
        nh = nq if nh is None else int(nh)
        if return_hidden and not 1 <= nh <= T:
            raise ValueError(f"n_hidden must be in [1, {T}], got {nh}")
        rows.append(_Row(sid, ids, int(nq), nh, max(nq, nh if return_hidden else 0)))
    return rows


@dataclass
class _SeqState:
    cache: Any                                      # transformers DynamicCache
    token_ids: list[int] = field(default_factory=list)  # ids the cached KV stands for


class HFTarget:
    """`TargetBackend` over a Hugging Face causal LM, with a per-sequence KV cache (LRU bound)."""

    def __init__(self, model, *, feature_layers: Optional[Sequence[int]] = None,
                 max_sequences: int = 64, eos_token_id: Optional[int] = None):
        if max_sequences < 1:
            raise ValueError(f"max_sequences must be >= 1, got {max_sequences}")
        self.model = model.eval()
        self.config = model.config.get_text_config()
        self.device = next(model.parameters()).device
        self.num_layers = int(self.config.num_hidden_layers)
        layers = default_feature_layers(self.num_layers) if feature_layers is None else feature_layers
        self.feature_layers = tuple(int(l) for l in layers)
        if not self.feature_layers or any(not 0 <= l <= self.num_layers for l in self.feature_layers):
            raise ValueError(f"feature_layers must be indices in [0, {self.num_layers}], "
                             f"got {list(self.feature_layers)}")
        self.feature_dim = len(self.feature_layers) * int(self.config.hidden_size)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.eos_token_id = eos_token_id if eos_token_id is not None else _eos_of(model)
        self.max_sequences = max_sequences
        self._seqs: "OrderedDict[str, _SeqState]" = OrderedDict()

    @classmethod
    def from_pretrained(cls, path: str, device: Optional[str] = None,
                        dtype: Optional[torch.dtype] = None, **kw) -> "HFTarget":
        """CUDA + bf16 when available, else CPU float32 (CPU bf16 matmuls are slow here)."""
        from transformers import AutoModelForCausalLM

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        return cls(model, **kw)

    # ---- TargetBackend -------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, seq_id: str, token_ids: Sequence[int], n_query: int,
              return_hidden: bool = False, n_hidden: Optional[int] = None) -> ScoreResult:
        """Logits (n_query, V) float32 of the last n_query positions; with return_hidden, the
        features (n_hidden, F) float32 of the last n_hidden positions (default n_query; the
        engine asks for the whole prompt at prefill in target-features mode)."""
        ids = [int(t) for t in token_ids]
        T = len(ids)
        if not 1 <= n_query <= T:
            raise ValueError(f"n_query must be in [1, {T}], got {n_query}")
        n_hidden = n_query if n_hidden is None else int(n_hidden)
        if return_hidden and not 1 <= n_hidden <= T:
            raise ValueError(f"n_hidden must be in [1, {T}], got {n_hidden}")
        n_new_min = max(n_query, n_hidden if return_hidden else 0)  # positions that must run

        state = self._seqs.pop(seq_id, None)
        keep = 0
        if state is not None:
            keep = min(common_prefix_len(state.token_ids, ids), T - n_new_min)
            if keep <= 0:
                state = None  # nothing reusable: start over
            else:
                cur = state.cache.get_seq_length()
                if keep < cur:
                    state.cache.crop(keep - cur)  # negative = tokens to drop from the end
                del state.token_ids[keep:]
        if state is None:
            from transformers import DynamicCache

            state, keep = _SeqState(DynamicCache(config=self.model.config)), 0
        # store before the forward so an exception leaves no half-filled entry behind
        self._seqs[seq_id] = state
        while len(self._seqs) > self.max_sequences:
            self._seqs.popitem(last=False)

        try:
            input_ids = torch.tensor([ids[keep:]], dtype=torch.long, device=self.device)  # (1, T-keep)
            position_ids = torch.arange(keep, T, device=self.device)[None]             # (1, T-keep)
            out = self.model(input_ids=input_ids, position_ids=position_ids,
                             past_key_values=state.cache, use_cache=True,
                             output_hidden_states=return_hidden, logits_to_keep=n_query)
        except BaseException:
            self._seqs.pop(seq_id, None)  # the cache may hold part of this forward
            raise
        state.token_ids = ids
        logits = out.logits[0, -n_query:].float()                                      # (n_query, V)
        hidden = None
        if return_hidden:
            hs = out.hidden_states  # L+1 tensors of (1, T-keep, H)
            hidden = torch.cat([hs[l][0, -n_hidden:] for l in self.feature_layers], -1).float()
        return ScoreResult(logits=logits, hidden=hidden)                               # hidden (n_hidden, F)

    @torch.inference_mode()
    def score_batch(self, seq_ids: Sequence[str], token_ids: Sequence[Sequence[int]],
                    n_query: Sequence[int], return_hidden: bool = False,
                    n_hidden: Optional[Sequence[Optional[int]]] = None) -> list[ScoreResult]:
        """`score` for several sequences in ONE ragged forward: each row keeps its own KV cache,
        prefix length and number of new positions. The rows' cached KV are left-padded to a
        common past length P and their new tokens right-padded to a common N; a 2-D attention
        mask hides the padding, and each row's rotary positions are its own. After the forward
        each row's cache is cut back out of the batch (valid past + its new positions).

        Per row the result equals `score` up to float rounding (different matmul shapes)."""
        B = len(seq_ids)
        if B == 1 and len(token_ids) == len(n_query) == 1:
            nh1 = None if n_hidden is None else list(n_hidden)[0]
            return [self.score(seq_ids[0], token_ids[0], n_query[0], return_hidden, nh1)]
        from transformers import DynamicCache

        rows = batch_rows(seq_ids, token_ids, n_query, return_hidden, n_hidden)
        states: list[tuple[Optional[_SeqState], int]] = []
        for r in rows:
            state = self._seqs.pop(r.sid, None)
            keep = 0
            if state is not None:
                keep = min(common_prefix_len(state.token_ids, r.ids), len(r.ids) - r.need)
                if keep <= 0:
                    state, keep = None, 0
            states.append((state, keep))
        P = max(k for _, k in states)
        n_new = [len(r.ids) - k for r, (_, k) in zip(rows, states)]
        N = max(n_new)
        dev = self.device
        L = self.num_layers
        past = []
        if P:
            for l in range(L):
                ks, vs = [], []
                ref_state = next(s for s, kk in states if kk and s is not None)
                for state, keep in states:
                    if keep and state is not None:
                        lay = state.cache.layers[l]
                        k, v = lay.keys[:, :, :keep], lay.values[:, :, :keep]
                    else:
                        ref = ref_state.cache.layers[l].keys
                        k = v = ref.new_zeros(ref.shape[0], ref.shape[1], 0, ref.shape[3])
                    ks.append(torch.nn.functional.pad(k, (0, 0, P - keep, 0)))
                    vs.append(torch.nn.functional.pad(v, (0, 0, P - keep, 0)))
                past.append((torch.cat(ks), torch.cat(vs)))                         # (B, kvh, P, d)
        cache = DynamicCache(past or None, config=self.model.config)
        input_ids = torch.zeros(B, N, dtype=torch.long)
        position_ids = torch.zeros(B, N, dtype=torch.long)
        attn = torch.zeros(B, P + N, dtype=torch.long)
        for i, (r, (_, keep), n) in enumerate(zip(rows, states, n_new)):
            input_ids[i, :n] = torch.tensor(r.ids[keep:])
            position_ids[i] = keep + torch.arange(N)   # padding continues the count (ignored)
            attn[i, P - keep:P + n] = 1
        first_needed = min(n - r.nq for r, n in zip(rows, n_new))
        try:
            out = self.model(input_ids=input_ids.to(dev), position_ids=position_ids.to(dev),
                             attention_mask=attn.to(dev), past_key_values=cache, use_cache=True,
                             output_hidden_states=return_hidden, logits_to_keep=N - first_needed)
        except BaseException:
            for r in rows:
                self._seqs.pop(r.sid, None)
            raise
        results = []
        off = N - out.logits.shape[1]                                              # = first_needed
        for i, (r, (_, keep), n) in enumerate(zip(rows, states, n_new)):
            sid, ids, nq, nh = r.sid, r.ids, r.nq, r.nh
            row_layers = []
            for l in range(L):
                lay = cache.layers[l]
                k = torch.cat([lay.keys[i:i + 1, :, P - keep:P], lay.keys[i:i + 1, :, P:P + n]], 2)
                v = torch.cat([lay.values[i:i + 1, :, P - keep:P], lay.values[i:i + 1, :, P:P + n]], 2)
                row_layers.append((k, v))
            self._seqs[sid] = _SeqState(DynamicCache(row_layers, config=self.model.config), ids)
            logits = out.logits[i, n - nq - off:n - off].float()                   # (nq, V)
            hidden = None
            if return_hidden:
                hs = out.hidden_states
                hidden = torch.cat([hs[l][i, n - nh:n] for l in self.feature_layers], -1).float()
            results.append(ScoreResult(logits=logits, hidden=hidden))
        while len(self._seqs) > self.max_sequences:
            self._seqs.popitem(last=False)
        return results

    def release(self, seq_id: str) -> None:
        self._seqs.pop(seq_id, None)

    def cached_length(self, seq_id: str) -> int:
        """Positions of KV held for `seq_id` (0 when none): for tests and stats."""
        state = self._seqs.get(seq_id)
        return 0 if state is None else state.cache.get_seq_length()


def _eos_of(model) -> Optional[int]:
    for cfg in (getattr(model, "generation_config", None), model.config):
        eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        if eos is not None:
            return int(eos)
    return None
