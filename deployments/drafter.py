"""The Drafter deployment: a `DeerDrafterBackend` behind plain, picklable calls.

A plain class: only `deployments.app.build_app` wraps it with `serve.deployment`. It holds no
algorithm: `draft` is `Drafter.draft` with numpy in and out (ids int32, features float16, q
float32) and the sampling seed as an int instead of a `torch.Generator` (the router draws it
from the request's generator), so a remote call never carries a generator object.

Target features travel incrementally. The router sends only rows [start, len(context)) of the
context's features (the ones it has not sent for this sequence yet). When this replica's cache
for the sequence is shorter than `start` (another replica served it before, an eviction, a
restart), the backend would need rows it was not sent; the reply then says `need_rows_from=c`
and the router resends from row c. Correctness never depends on routing.

The callers' side is `deployments.clients.RemoteDrafter`: the core's `Drafter` protocol over a
handle to this deployment (it keeps the per-sequence count of rows sent).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from deer_serve.types import SamplingParams
from deployments.batching import CombiningBatcher, run_call, server_time
from deployments.telemetry import replica_id, replica_info


@dataclass
class DraftReply:
    tokens: Optional[np.ndarray] = None   # (k,) int32 draft tokens y_1..y_k
    probs: Optional[np.ndarray] = None    # (k, V) float32 q_i; None at temperature 0
    conf: Optional[np.ndarray] = None     # (k,) float32 max_v q_i(v) (DraftResult.conf)
    alt: Optional[np.ndarray] = None      # (k,) int32 the runner-up tokens (DraftResult.alt)
    need_rows_from: Optional[int] = None  # set (and nothing else) when feature rows are missing
    replica: Optional[str] = None         # the Serve replica that answered (tracing)
    server: Optional[tuple] = None        # (wait, compute) seconds in the replica (ScoreReply)


class _MissingRows(Exception):
    def __init__(self, start: int):
        self.start = start


class _RowsFrom:
    """Stands for the (n, F) features of the whole context when only rows [start, n) are here.

    The backend reads `shape` and slices the rows its cache lacks; a slice that reaches before
    `start` raises `_MissingRows` with the first row it wanted, which becomes `need_rows_from`.
    """

    def __init__(self, rows: torch.Tensor, start: int):
        self.rows, self.start = rows, start                                     # rows (n-start, F)
        self.shape = torch.Size((start + rows.shape[0], rows.shape[1]))

    def __getitem__(self, idx):
        if not isinstance(idx, slice) or idx.step not in (None, 1):
            raise TypeError("only row slices are supported")
        lo = 0 if idx.start is None else idx.start
        hi = self.shape[0] if idx.stop is None else idx.stop
        if lo < self.start and hi > lo:
            raise _MissingRows(lo)
        return self.rows[lo - self.start: hi - self.start]


class Drafter:
    def __init__(self, drafter_path: str, *, target_path: Optional[str] = None,
                 device: Optional[str] = None,
                 max_sequences: int = 64, use_cache: bool = True,
                 torch_threads: Optional[int] = None, batching: bool = True,
                 max_batch_size: int = 16):
        """target_path: the target's directory; a DFlash drafter takes the target's embeddings
        and LM head from it (not its layers)."""
        from deer_serve.drafters import load_drafter

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.drafter_path = str(drafter_path)
        self.backend = load_drafter(self.drafter_path, target_path, device=device,
                                    max_sequences=max_sequences, use_cache=use_cache)
        p = next(self.backend.model.parameters())
        self.device, self.dtype = p.device, p.dtype
        # Serve runs sync methods in a thread pool; the backend's caches are not thread-safe.
        self._lock = threading.Lock()
        # concurrent requests' draft calls -> one drafter forward per block size
        self._batcher = CombiningBatcher(self._draft_rows, max_batch_size) if batching else None

    def meta(self) -> dict:
        return {"context_mode": self.backend.context_mode, "format": self.backend.format,
                "feature_layers": list(self.backend.feature_layers),
                "vocab_size": self.backend.vocab_size,
                "caches_prefix": bool(self.backend.use_cache)}

    def draft(self, seq_id: str, context_ids: np.ndarray, anchor: int, k: int,
              sampling: SamplingParams, seed: Optional[int] = None,
              hidden: Optional[np.ndarray] = None, hidden_start: int = 0,
              prefix: Optional[np.ndarray] = None) -> DraftReply:
        """context_ids: (n,) int32 verified tokens before the anchor.
        hidden: (n - hidden_start, F) float16 features of context rows [hidden_start, n), in
        target-features mode. seed: draws y ~ q when sampling (ignored at temperature 0).
        prefix: (j,) int32 unverified tokens after the anchor (a pipelined pre-draft)."""
        t0 = time.perf_counter()
        timing: dict[str, float] = {}
        ids = np.asarray(context_ids).tolist()
        pre = () if prefix is None else tuple(int(t) for t in np.asarray(prefix).tolist())
        gen = None
        if seed is not None and not sampling.greedy:
            gen = torch.Generator().manual_seed(int(seed))
        ctx_hidden = None
        if hidden is not None:
            rows = torch.tensor(np.asarray(hidden), device=self.device, dtype=self.dtype)
            ctx_hidden = _RowsFrom(rows, int(hidden_start))
        try:
            d = run_call(self._batcher, self._lock,
                         (seq_id, ids, int(anchor), int(k), sampling, gen, ctx_hidden, pre),
                         self.backend.draft, timing)
        except _MissingRows as miss:
            return DraftReply(need_rows_from=miss.start)
        probs = None if d.probs is None else d.probs.float().cpu().numpy()     # (k, V)
        conf = None if d.conf is None else d.conf.float().cpu().numpy()        # (k,)
        alt = None if d.alt is None else d.alt.cpu().numpy().astype(np.int32)  # (k,)
        return DraftReply(tokens=d.tokens.cpu().numpy().astype(np.int32), probs=probs, conf=conf,
                          alt=alt, replica=replica_id(), server=server_time(t0, timing))

    def _draft_rows(self, items: list) -> list:
        """The batch function: items (seq_id, ids, anchor, k, sampling, generator, hidden,
        prefix). One drafter forward per (block size, prefix length) (`draft_batch`); a group
        that fails (e.g. a row
        whose feature rows this replica lacks) runs row by row, so each row gets its own
        result or error."""
        out: list = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault((it[3], len(it[7])), []).append(i)
        with self._lock:
            for (k, _), idx in groups.items():
                rows = [items[i] for i in idx]
                if len(rows) > 1 and len({r[0] for r in rows}) == len(rows):
                    try:
                        res = self.backend.draft_batch([r[0] for r in rows], [r[1] for r in rows],
                                                       [r[2] for r in rows], k, [r[4] for r in rows],
                                                       [r[5] for r in rows], [r[6] for r in rows],
                                                       [r[7] for r in rows])
                        for i, d in zip(idx, res):
                            out[i] = d
                        continue
                    except Exception:  # noqa: BLE001 - isolate the failing row below
                        pass
                for i, r in zip(idx, rows):
                    try:
                        out[i] = self.backend.draft(r[0], r[1], r[2], k, r[4], r[5], r[6], r[7])
                    except Exception as e:  # noqa: BLE001 - incl. _MissingRows for this row
                        out[i] = e
        return out

    def batch_stats(self) -> dict:
        return self._batcher.stats() if self._batcher is not None else {"batching": False}

    def channel(self) -> dict:
        """This replica's channel address (`transport: channel`; opened on first ask)."""
        from deployments.channel import open_channel

        return open_channel(self, ("draft", "release", "meta"))

    def release(self, seq_id: str) -> None:
        with self._lock:
            self.backend.release(seq_id)

    def health(self) -> dict:
        return {"ok": True, "cached_sequences": len(getattr(self.backend, "_caches", ()))}

    def info(self) -> dict:
        return replica_info("drafter", self.drafter_path, str(self.device))
