"""Ragged batching inside a replica: concurrent calls become one batched forward.

Serve runs a deployment's sync methods on a thread pool, so a replica with
`max_ongoing_requests > 1` sees several `score` / `draft` calls at once (one per request in
flight; each request has one call outstanding). `CombiningBatcher` joins them without a timer
(flat combining): a caller enqueues its item; if no batch is running it becomes the leader,
takes everything queued (up to `max_batch_size`) and runs the batch function once; the
others wait and receive their row. Under low load a call runs alone at once (no added
latency); under load every forward carries all the calls that arrived while the previous one
ran. A batch function returns one result per item, or an exception object for an item that
failed alone; an exception it raises fails every item of that batch.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional, Sequence


class _Slot:
    __slots__ = ("item", "done", "result", "error", "t_in", "t_start", "t_end")

    def __init__(self, item):
        self.item, self.done, self.result, self.error = item, False, None, None
        self.t_in = time.perf_counter()
        self.t_start = self.t_end = None


class CombiningBatcher:
    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]], max_batch_size: int = 16):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.run_batch, self.max_batch_size = run_batch, max_batch_size
        self._cond = threading.Condition()
        self._queue: list[_Slot] = []
        self._busy = False
        self.batches = 0          # forwards run
        self.items = 0            # calls served (items / batches = mean batch size)
        self.max_seen = 0

    def submit(self, item, timing: Optional[dict] = None):
        """Run `item` in a batch and return its result (or raise its error). timing: a dict
        that receives "wait" (seconds queued behind other batches) and "run" (seconds of the
        batch that ran it)."""
        slot = _Slot(item)
        try:
            return self._submit(slot)
        finally:
            if timing is not None and slot.t_start is not None and slot.t_end is not None:
                timing["wait"] = slot.t_start - slot.t_in
                timing["run"] = slot.t_end - slot.t_start

    def _submit(self, slot: "_Slot"):
        with self._cond:
            self._queue.append(slot)
        while True:
            with self._cond:
                while not slot.done and self._busy:
                    self._cond.wait()
                if slot.done:
                    return self._unwrap(slot)
                self._busy = True                   # leader: own item first, then the queue
                self._queue.remove(slot)
                batch = [slot] + self._queue[:self.max_batch_size - 1]
                del self._queue[:len(batch) - 1]
            self._run(batch)

    def _run(self, batch: list) -> None:
        t_start = time.perf_counter()
        for s in batch:
            s.t_start = t_start
        try:
            try:
                results = list(self.run_batch([s.item for s in batch]))
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
                for s, r in zip(batch, results):
                    if isinstance(r, BaseException):
                        s.error = r
                    else:
                        s.result = r
            except BaseException as e:  # noqa: BLE001 - every caller of this batch gets it
                for s in batch:
                    s.error = e
        finally:
            t_end = time.perf_counter()
            with self._cond:
                for s in batch:
                    s.done, s.t_end = True, t_end
                self.batches += 1
                self.items += len(batch)
                self.max_seen = max(self.max_seen, len(batch))
                self._busy = False
                self._cond.notify_all()

    @staticmethod
    def _unwrap(slot: _Slot):
        if slot.error is not None:
            raise slot.error
        return slot.result

    def stats(self) -> dict:
        with self._cond:
            return {"batches": self.batches, "items": self.items, "max_batch": self.max_seen,
                    "mean_batch": round(self.items / self.batches, 3) if self.batches else 0.0}


def run_call(batcher: Optional[CombiningBatcher], lock: threading.Lock, item: tuple,
             run_one: Callable, timing: dict):
    """One replica call: `batcher.submit(item)`, or without batching `run_one(*item)` under
    `lock`. timing["wait"] receives the seconds the call was queued (behind other batches, or
    for the lock); with a batcher also "run"."""
    if batcher is not None:
        return batcher.submit(item, timing)
    t0 = time.perf_counter()
    with lock:
        timing["wait"] = time.perf_counter() - t0
        return run_one(*item)


def server_time(t0: float, timing: dict) -> tuple[float, float]:
    """(wait, compute) of a replica call that began at t0 (perf_counter): what it reports in
    its reply's `server` field."""
    wait = timing.get("wait", 0.0)
    return wait, time.perf_counter() - t0 - wait
