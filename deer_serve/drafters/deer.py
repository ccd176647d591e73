"""The block-drafter backend: a one-pass block drafter plus per-sequence prefix caches.

Implements the `Drafter` protocol of `deer_serve.types` over either model format (`load_drafter`
in `deer_serve.drafters` picks it from config.json): a `DeerDrafter`, or a `DFlashDrafter` (z-lab's
DFlash format, `deer_serve.models.dflash`). Both offer `new_cache`, `draft_logits` and
`draft_logits_batch` over a `DrafterCache`. Every call carries the full verified context; the
backend runs only the positions its cache for `seq_id` lacks (a cache miss, or a mismatch after
a replica change, recomputes instead of failing).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch

from deer_serve.models import DeerDrafter, DrafterCache
from deer_serve.types import DraftResult, SamplingParams


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):  # the usual case: one extends the other
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class DeerDrafterBackend:
    def __init__(self, model, max_sequences: int = 64, use_cache: bool = True):
        """model: a DeerDrafter or a DFlashDrafter."""
        self.model = model.eval()
        self.context_mode = model.config.context_mode
        self.feature_layers = list(model.config.target_feature_layers)
        self.vocab_size = model.config.vocab_size
        self.max_sequences = max_sequences
        self.use_cache = use_cache  # off = re-encode the whole prefix every cycle (as the paper)
        self._caches: "OrderedDict[str, DrafterCache]" = OrderedDict()

    @classmethod
    def from_pretrained(cls, path: str, device: Optional[str] = None, **kw) -> "DeerDrafterBackend":
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model = DeerDrafter.from_pretrained(path, dtype=dtype).to(device)
        return cls(model, **kw)

    @property
    def format(self) -> str:
        """"deer" or "dflash": the checkpoint format of the model."""
        return "deer" if isinstance(self.model, DeerDrafter) else "dflash"

    def _cache_for(self, seq_id: str, context_ids: Sequence[int]) -> tuple[DrafterCache, int]:
        cache = self._caches.pop(seq_id, None) if self.use_cache else None
        if cache is None:
            cache = self.model.new_cache(max(512, 2 * len(context_ids)))
        c = common_prefix_len(cache.token_ids, context_ids) if cache.length else 0
        c = min(c, cache.length)
        cache.length = c  # roll back to what still matches
        del cache.token_ids[c:]
        self._caches[seq_id] = cache
        while len(self._caches) > self.max_sequences:
            self._caches.popitem(last=False)
        return cache, c

    def draft(self, seq_id: str, context_ids: Sequence[int], anchor: int, k: int,
              sampling: SamplingParams, generator: Optional[torch.Generator] = None,
              context_hidden: Optional[torch.Tensor] = None,
              prefix: Sequence[int] = ()) -> DraftResult:
        """prefix: tokens after the anchor that are not verified yet (a pipelined pre-draft;
        `DeerDrafter.draft_logits`); the k drafts follow them."""
        cache, c = self._cache_for(seq_id, context_ids)
        new = list(context_ids[c:])
        new_ids = torch.tensor(new, dtype=torch.long) if (new and self.context_mode == "tokens") else None
        new_feats = None
        if new and self.context_mode == "target-features":
            if context_hidden is None or context_hidden.shape[0] < len(context_ids):
                raise ValueError("target-features drafter needs context_hidden for every context position")
            new_feats = context_hidden[c:len(context_ids)]
        logits = self.model.draft_logits(cache, new_ids, new_feats, int(anchor), int(k),
                                         prefix)                                    # (k, V)
        cache.token_ids.extend(new)
        return draft_from_logits(logits, sampling, generator)

    def draft_batch(self, seq_ids: Sequence[str], contexts: Sequence[Sequence[int]],
                    anchors: Sequence[int], k: int, sampling: Sequence[SamplingParams],
                    generators: Optional[Sequence[Optional[torch.Generator]]] = None,
                    context_hiddens: Optional[Sequence[Optional[torch.Tensor]]] = None,
                    prefixes: Optional[Sequence[Sequence[int]]] = None) -> list[DraftResult]:
        """`draft` for several sequences (one block size k, one prefix length) in ONE drafter
        forward."""
        B = len(seq_ids)
        if not B == len(contexts) == len(anchors) == len(sampling):
            raise ValueError("seq_ids, contexts, anchors and sampling must have the same length")
        if len(set(seq_ids)) != B:
            raise ValueError("seq_ids in one batch must be distinct")
        generators = list(generators) if generators is not None else [None] * B
        hiddens = list(context_hiddens) if context_hiddens is not None else [None] * B
        caches, srcs, news = [], [], []
        for sid, ctx, hid in zip(seq_ids, contexts, hiddens):
            cache, c = self._cache_for(sid, ctx)
            new = list(ctx[c:])
            src = None
            if new and self.context_mode == "tokens":
                src = torch.tensor(new, dtype=torch.long)
            elif new:
                if hid is None or hid.shape[0] < len(ctx):
                    raise ValueError("target-features drafter needs context_hidden for every context position")
                src = hid[c:len(ctx)]
            caches.append(cache)
            srcs.append(src)
            news.append(new)
        logits = self.model.draft_logits_batch(caches, srcs, list(anchors), int(k),
                                               None if prefixes is None else list(prefixes))  # (B, k, V)
        for cache, new in zip(caches, news):
            cache.token_ids.extend(new)
        return [draft_from_logits(logits[i], sp, g) for i, (sp, g) in enumerate(zip(sampling, generators))]

    def release(self, seq_id: str) -> None:
        self._caches.pop(seq_id, None)


def draft_from_logits(logits: torch.Tensor, sampling: SamplingParams,
                      generator: Optional[torch.Generator]) -> DraftResult:
    """logits (k, V) -> draft tokens y_i = argmax q_i (T=0) or y_i ~ q_i, drawn independently,
    each position's confidence max_v q_i(v) and its most likely token other than y_i."""
    if sampling.greedy:
        logits = logits.float()
        y = logits.argmax(-1)                                                # (k,)
        top = logits.gather(-1, y[:, None])[:, 0]
        conf = torch.exp(top - torch.logsumexp(logits, -1))                  # softmax at the argmax
        alt = logits.scatter(-1, y[:, None], float("-inf")).argmax(-1)
        return DraftResult(tokens=y.cpu(), conf=conf.cpu(), alt=alt.cpu())
    from deer_serve.sampling import process_logits, sample

    q = process_logits(logits.float().cpu(), sampling.temperature, sampling.top_k, sampling.top_p)
    y = sample(q, generator)
    alt = q.scatter(-1, y[:, None], -1.0).argmax(-1)
    return DraftResult(tokens=y, probs=q, conf=q.max(-1).values, alt=alt)
