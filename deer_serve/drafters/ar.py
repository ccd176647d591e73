"""The AR draft: a small Hugging Face causal LM on the target's tokenizer as a `Drafter`.

Classic draft-model speculative decoding (`sd-ar`, the EAGLE-style peer of DEER): the draft
model proposes y_1..y_k ONE AT A TIME, y_i from q_i = q(. | context, anchor, prefix, y_<i),
with its own per-sequence KV cache. The cache is an `HFTarget` over the draft model, so it
behaves as the target's does: every call carries the full ids and keeps the KV of the longest
matching prefix (a rejection rolls back by itself, a cache miss recomputes). One draft call:

    score(ctx + [anchor] + prefix)        -> q_1   (runs what the cache lacks: after a cycle,
                                                    the anchor, or y_k + anchor after a whole
                                                    block was accepted; the prompt at first)
    score(... + y_1), ..., score(... + y_<k) -> q_2..q_k   (k-1 one-token forwards)

y_k itself is never run here; the next call runs it if the target accepted it.

Acceptance stays exact at any temperature (DESIGN.md section 2): y_i is argmax q_i at T = 0,
else a draw from q_i = process_logits(l_i, T, top_k, top_p), and q_i is returned as
`DraftResult.probs`; the rule only needs y_i ~ q_i given everything before it, and q_i may
depend on y_<i (an AR proposal). `conf` and `alt` are as `draft_from_logits` makes them
(max q_i, the runner-up), so lookup splicing, pipelining and adaptive k work unchanged; for an
AR draft conf_i depends on y_<i, never on y_i itself.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from deer_serve.drafters.deer import draft_from_logits
from deer_serve.targets.hf import HFTarget
from deer_serve.types import DraftResult, SamplingParams


class ARDrafterBackend:
    format = "ar"                  # drafter checkpoint format (`deer_serve.drafters.FORMATS`)
    context_mode = "tokens"        # reads token ids only, never target features
    feature_layers: list[int] = []

    def __init__(self, model, max_sequences: int = 64, use_cache: bool = True):
        """model: a Hugging Face causal LM on the target's tokenizer.
        use_cache: off = drop the sequence's KV after every call (re-encode every cycle)."""
        self.lm = HFTarget(model, max_sequences=max_sequences)
        self.model = self.lm.model
        self.vocab_size = self.lm.vocab_size
        self.use_cache = use_cache
        self.forwards = 0          # draft-model forwards run (for stats and tests)

    @classmethod
    def from_pretrained(cls, path: str, device: Optional[str] = None,
                        dtype: Optional[torch.dtype] = None, **kw) -> "ARDrafterBackend":
        """CUDA + bf16 when available, else CPU float32 (`HFTarget.from_pretrained` loads it)."""
        return cls(HFTarget.from_pretrained(path, device=device, dtype=dtype).model, **kw)

    @property
    def _caches(self):  # the sequences holding KV (the Drafter deployment's health reads it)
        return self.lm._seqs

    def draft(self, seq_id: str, context_ids: Sequence[int], anchor: int, k: int,
              sampling: SamplingParams, generator: Optional[torch.Generator] = None,
              context_hidden: Optional[torch.Tensor] = None,
              prefix: Sequence[int] = ()) -> DraftResult:
        """k draft tokens after context + anchor + prefix (prefix: unverified tokens, a
        pipelined pre-draft), k draft-model forwards."""
        seq = [int(t) for t in context_ids] + [int(anchor)] + [int(t) for t in prefix]
        rows = []
        for _ in range(int(k)):
            logits = self.lm.score(seq_id, seq, 1).logits                      # (1, V)
            assert logits is not None  # HFTarget always returns logits
            self.forwards += 1
            d = draft_from_logits(logits, sampling, generator)                 # y_i, q_i
            rows.append(d)
            seq.append(int(d.tokens[0]))
        if not self.use_cache:
            self.lm.release(seq_id)
        return _stack(rows)

    def draft_batch(self, seq_ids: Sequence[str], contexts: Sequence[Sequence[int]],
                    anchors: Sequence[int], k: int, sampling: Sequence[SamplingParams],
                    generators: Optional[Sequence[Optional[torch.Generator]]] = None,
                    context_hiddens: Optional[Sequence[Optional[torch.Tensor]]] = None,
                    prefixes: Optional[Sequence[Sequence[int]]] = None) -> list[DraftResult]:
        """`draft` for several sequences (one block size k): k ragged forwards of all rows
        (`HFTarget.score_batch`: each row keeps its own cache and prefix length) instead of
        k per row. Per row equal to `draft` up to float rounding."""
        B = len(seq_ids)
        if not B == len(contexts) == len(anchors) == len(sampling):
            raise ValueError("seq_ids, contexts, anchors and sampling must have the same length")
        if len(set(seq_ids)) != B:
            raise ValueError("seq_ids in one batch must be distinct")
        gens = list(generators) if generators is not None else [None] * B
        pres = list(prefixes) if prefixes is not None else [()] * B
        seqs = [[int(t) for t in c] + [int(a)] + [int(t) for t in p]
                for c, a, p in zip(contexts, anchors, pres)]
        rows: list[list[DraftResult]] = [[] for _ in range(B)]
        for _ in range(int(k)):
            res = self.lm.score_batch(list(seq_ids), seqs, [1] * B)
            self.forwards += 1
            for b, r in enumerate(res):
                assert r.logits is not None
                d = draft_from_logits(r.logits, sampling[b], gens[b])          # (1, V) -> y_i
                rows[b].append(d)
                seqs[b].append(int(d.tokens[0]))
        if not self.use_cache:
            for sid in seq_ids:
                self.lm.release(sid)
        return [_stack(r) for r in rows]

    def release(self, seq_id: str) -> None:
        self.lm.release(seq_id)

    def cached_length(self, seq_id: str) -> int:
        """Positions of draft KV held for `seq_id` (0 when none)."""
        return self.lm.cached_length(seq_id)


def _stack(rows: list[DraftResult]) -> DraftResult:
    """k one-token DraftResults -> one of k tokens: tokens (k,), probs (k, V), conf / alt (k,)."""
    def cat(name):
        parts = [getattr(r, name) for r in rows]
        return None if any(p is None for p in parts) else torch.cat(parts)

    return DraftResult(tokens=cat("tokens"), probs=cat("probs"), conf=cat("conf"), alt=cat("alt"))
