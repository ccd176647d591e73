"""A continuously batching step engine: ONE loop over all running requests.

Each step runs, over every running request at once:

    plan    each deer request's block size: its own choice (AdaptiveK or block_size), cut to a
            share of the step's verify budget (`verify_budget` tokens in the verify forward)
    draft   ONE batched drafter forward per block size over the requests that draft (k > 0)
    verify  ONE ragged target forward (`score_batch`) over every running request: prefills of
            requests that joined this step, plain AR rows (mode ar, k = 0) and deer blocks

Requests join (`submit`) and leave (finish, `cancel`) at step boundaries, each with its own KV
in the target and the drafter (keyed by its seq_id, released when it leaves), its own block
size, sampling parameters and `torch.Generator`. Their tokens stream back per request
(`EngineRequest`, an iterable of StepOutput returning the GenerationResult, as
`engine.iter_generate`).

The per-request logic is the engine's own (`deer_serve.engine._decode`, a generator of calls,
`deer_serve.calls`); this module only batches its calls. Exactness: acceptance is the engine's;
a request's block size depends on its past acceptance and on how many requests share the step,
never on the current draft's content, so greedy output equals plain AR decoding and sampled
output keeps the target's law. A seeded request repeats exactly when it runs with the same
batch-mates; with others, its block sizes (and so its random draws) can differ when the budget
binds, and batched forwards round differently: the law is the same, the sample may not be.
No pipelining here (`iter_generate(pipeline=True)` has it).
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Optional, Sequence, Union

import torch

from deer_serve.calls import Draft, Plan, Score
from deer_serve.adaptive import DraftGate, gate_for
from deer_serve.engine import (StepOutput, _decode, _validate, adaptive_plan, eos_set,
                               uses_features)
from deer_serve.engine_request import EngineRequest
from deer_serve.types import GenerationResult, SamplingParams

# Verify tokens per step (rows x (k+1), prefills not counted) above which blocks shrink, by the
# target's device (docs/RESULTS.md): on a CPU a batched verify is compute-bound, and 64 leaves one
# stream its whole block (k <= 32) and gives 16 streams k = 3 each; on a GPU a step of a small
# batch costs about the same for many more tokens.
DEFAULT_VERIFY_BUDGET = 64
GPU_VERIFY_BUDGET = 256


def default_verify_budget(device) -> int:
    """The verify budget for a target on `device` (a torch.device, a string or None = CPU)."""
    return GPU_VERIFY_BUDGET if str(device or "cpu").startswith("cuda") else DEFAULT_VERIFY_BUDGET


class DraftFailed(Exception):
    """The drafter failed on this request's row (a service falls back to plain AR)."""


@dataclass
class EngineStats:
    steps: int = 0          # loop iterations that ran a verify
    rows: int = 0           # request rows over all verifies (mean batch = rows / steps)
    verify_tokens: int = 0  # decode positions verified (k + 1 per row; prefills not counted)
    draft_forwards: int = 0
    admitted: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    released: int = 0       # requests whose caches were released (every one that left)
    by_k: dict = field(default_factory=dict)  # block size -> rows drafted with it


class StepEngine:
    def __init__(self, target, drafter=None, *, max_running: int = 16,
                 verify_budget: Union[int, str, None] = "auto",
                 lock: Optional[threading.Lock] = None, start: bool = True,
                 gate: Optional[DraftGate] = None, kv: str = "auto"):
        """target: a TargetBackend with `score_batch` (HFTarget); drafter: a block drafter
        (with `draft_batch` for batched drafting), or None for mode ar only. max_running:
        requests in the step at once (more wait in order). verify_budget: verify tokens a step
        above which blocks shrink; None = no cap; "auto" = `default_verify_budget` of the
        target's device. lock: held around every backend call (a replica shares its backend with
        other callers). start=False: no thread; the caller runs `step()`. gate: the
        `DraftGate` of adaptive-k requests (deer_serve.adaptive). kv: where the running
        requests' target KV lives: "slots" = one persistent slot buffer over an HFTarget's model
        (`deer_serve.targets.hf_slots.SlotTarget`, its caches apart from the HFTarget's),
        "per-sequence" = the target as given; "auto" = slots for an HFTarget when
        max_running > 1 (one row per step has nothing to batch) and its model's layers are all
        full attention (`hf_slots.supports`)."""
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {max_running}")
        if kv not in ("auto", "slots", "per-sequence"):
            raise ValueError(f"kv must be auto, slots or per-sequence, got {kv!r}")
        from deer_serve.targets.hf import HFTarget
        from deer_serve.targets.hf_slots import SlotTarget, supports

        if kv == "slots" or (kv == "auto" and max_running > 1 and isinstance(target, HFTarget)
                             and supports(target.model)):
            if not isinstance(target, (HFTarget, SlotTarget)):
                raise ValueError("kv='slots' needs an HFTarget")
            if isinstance(target, HFTarget):
                target = SlotTarget.from_hf(target, slots=max_running)
        budget: Optional[int]
        if isinstance(verify_budget, str):
            if verify_budget != "auto":
                raise ValueError(f"verify_budget must be >= 1, None or 'auto', got {verify_budget!r}")
            budget = default_verify_budget(getattr(target, "device", None))
        else:
            budget = verify_budget
        if budget is not None and budget < 1:
            raise ValueError(f"verify_budget must be >= 1, None or 'auto', got {budget}")
        self.target, self.drafter, self.gate = target, drafter, gate
        self.max_running, self.verify_budget = max_running, budget
        self.lock = lock or threading.Lock()
        self.stats = EngineStats()
        self.changed = threading.Condition()  # notified on every join, leave and step
        self._waiting: "deque[EngineRequest]" = deque()
        self._running: list[EngineRequest] = []
        self._closed = False
        self._lookup = None
        if drafter is not None:
            from deer_serve.drafters.lookup import LookupDrafter

            self._lookup = LookupDrafter(drafter, vocab_size=target.vocab_size)
        self._thread: Optional[threading.Thread] = None
        if start:
            self._thread = threading.Thread(target=self._run, name="deer-step-engine",
                                            daemon=True)
            self._thread.start()

    # ---- the caller's side -------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], sampling: SamplingParams, *, mode: str = "deer",
               block_size: int = 16, seq_id: Optional[str] = None, adaptive_k: bool = False,
               lookup: bool = False, detokenize: Optional[Callable[[list[int]], str]] = None,
               eos_token_id: Union[int, Collection[int], None] = None) -> EngineRequest:
        """Queue a request (it joins at the next step boundary). As `engine.iter_generate`
        (ValueError now on bad arguments); lookup: prompt lookup spliced into each drafted
        block (`LookupDrafter`)."""
        prompt = _validate(self.target, self.drafter, prompt_ids, sampling, mode, block_size)
        if sampling.stop and detokenize is None:
            raise ValueError("stop strings need a detokenize function")
        if self._closed:
            raise RuntimeError("the step engine is closed")
        seq_id = seq_id or f"step-{uuid.uuid4().hex}"
        mode, adapt = adaptive_plan(mode, block_size, adaptive_k,
                                    gate_for(self.gate, sampling.seed), sampling)
        core = _decode(self.target, prompt, sampling, mode, int(block_size), detokenize, seq_id,
                       eos_set(self.target, sampling, eos_token_id),
                       uses_features(self.drafter, mode), adapt)
        req = EngineRequest(self, seq_id, core, mode == "deer", lookup and mode == "deer")
        with self.changed:
            if any(r.seq_id == seq_id for r in (*self._running, *self._waiting)):
                raise ValueError(f"seq_id {seq_id!r} is already in the engine")
            self._waiting.append(req)
            self.changed.notify_all()
        return req

    def generate(self, prompt_ids: Sequence[int], sampling: SamplingParams,
                 **kw) -> GenerationResult:
        """Submit and wait for the result (the steps are dropped)."""
        req = self.submit(prompt_ids, sampling, **kw)
        it = iter(req)
        while True:
            try:
                next(it)
            except StopIteration as stop:
                return stop.value

    def running(self) -> list[str]:
        """seq_ids of the requests in the step now."""
        with self.changed:
            return [r.seq_id for r in self._running]

    def waiting(self) -> int:
        with self.changed:
            return len(self._waiting)

    def wait_until(self, pred: Callable[["StepEngine"], bool],
                   timeout: Optional[float] = None) -> bool:
        """Block until pred(self) holds (checked at every join, leave and step)."""
        with self.changed:
            return self.changed.wait_for(lambda: pred(self), timeout)

    def close(self) -> None:
        """Cancel every request and stop the loop."""
        with self.changed:
            self._closed = True
            for r in (*self._running, *self._waiting):
                r.cancelled.set()
            self.changed.notify_all()
        if self._thread is not None:
            self._thread.join()
        else:
            self.step()

    def _wake(self) -> None:
        with self.changed:
            self.changed.notify_all()

    # ---- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self._closed or bool(self._running or self._waiting))
                if self._closed and not (self._running or self._waiting):
                    return
            self.step()

    def step(self) -> bool:
        """One step: admit, plan, draft, verify. False when no request ran."""
        with self.changed:
            for r in [r for r in (*self._running, *self._waiting) if r.cancelled.is_set()]:
                self._leave(r, "cancelled")
            while self._waiting and len(self._running) < self.max_running:
                r = self._waiting.popleft()
                self._running.append(r)
                self.stats.admitted += 1
                self._advance(r, None)  # -> its prefill Score
            rows = list(self._running)
        if not rows:
            return False
        plans = [r for r in rows if isinstance(r.call, Plan)]
        for r, k in zip(plans, self.share([r.call.want for r in plans], len(rows))):
            self._advance(r, k)
        self._draft([r for r in rows if isinstance(r.call, Draft)])
        self._verify([r for r in rows if isinstance(r.call, Score)])
        with self.changed:
            self.changed.notify_all()
        return True

    def share(self, wants: list[int], n_rows: int) -> list[int]:
        """Each planning request's block size: its want, within an even share of the verify
        budget left after one position per row (water-filling: what a small want leaves goes
        to the others). Depends on the wants and the row count only."""
        if self.verify_budget is None:
            return list(wants)
        extra = max(0, self.verify_budget - n_rows)
        out = [0] * len(wants)
        order = sorted(range(len(wants)), key=lambda i: wants[i])
        for j, i in enumerate(order):
            out[i] = min(wants[i], extra // (len(order) - j))
            extra -= out[i]
        return out

    def _advance(self, r: EngineRequest, answer: Any) -> None:
        """Send `answer` to the request's decode and run it to its next Plan / Draft / Score
        call, delivering its StepOutputs; a finished or failed decode leaves the engine."""
        try:
            while True:
                call = r.core.send(answer)
                if isinstance(call, StepOutput):
                    r._put("step", call)
                    answer = None
                    continue
                r.call = call
                return
        except StopIteration as stop:
            r.result = stop.value
            self._leave(r, "done")
        except Exception as e:  # noqa: BLE001 - the request's own error, to its consumer
            self._fail(r, e)

    def _fail(self, r: EngineRequest, e: BaseException) -> None:
        r.error = e
        self._leave(r, "error")

    def _leave(self, r: EngineRequest, how: str) -> None:
        with self.changed:
            if r.finished.is_set():
                return
            if r in self._running:
                self._running.remove(r)
            if r in self._waiting:
                self._waiting.remove(r)
            r.call = None
            try:
                r.core.close()
            finally:
                with self.lock:
                    self.target.release(r.seq_id)
                    if r.use_drafter and self.drafter is not None:
                        self.drafter.release(r.seq_id)
                self.stats.released += 1
                r.finished.set()  # before the last event: its consumer's cancel is then a no-op
                if how == "done":
                    self.stats.finished += 1
                    r._put("done", r.result)
                elif how == "error":
                    self.stats.failed += 1
                    r._put("error", r.error)
                else:
                    self.stats.cancelled += 1
                    r._put("error", RuntimeError("the request was cancelled"))
                self.changed.notify_all()

    def _draft(self, rows: list[EngineRequest]) -> None:
        groups: dict[int, list[EngineRequest]] = {}
        for r in rows:
            groups.setdefault(r.call.k, []).append(r)
        for k, group in groups.items():
            self.stats.by_k[k] = self.stats.by_k.get(k, 0) + len(group)
            results = self._draft_group(k, group)
            for r, d in zip(group, results):
                if isinstance(d, BaseException):
                    self._fail(r, d if isinstance(d, DraftFailed) else DraftFailed(repr(d)))
                    continue
                if r.lookup and self._lookup is not None:
                    d = self._lookup.splice(r.call.ctx, r.call.anchor, d)
                self._advance(r, d)

    def _draft_group(self, k: int, group: list[EngineRequest]) -> list:
        d = self.drafter
        calls = [r.call for r in group]
        feats = [self._to_drafter(c.feats) for c in calls]
        with self.lock:
            self.stats.draft_forwards += 1
            if len(group) > 1 and hasattr(d, "draft_batch"):
                try:
                    return d.draft_batch([r.seq_id for r in group], [c.ctx for c in calls],
                                         [c.anchor for c in calls], k,
                                         [c.sampling for c in calls], [c.gen for c in calls],
                                         feats)
                except Exception:  # noqa: BLE001 - isolate the failing row below
                    pass
            out: list = []
            for r, c, f in zip(group, calls, feats):
                try:
                    out.append(d.draft(r.seq_id, c.ctx, c.anchor, k, c.sampling, c.gen, f))
                except Exception as e:  # noqa: BLE001 - this row's own error
                    out.append(e)
            return out

    def _to_drafter(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        model = getattr(self.drafter, "model", None)
        if t is None or model is None:
            return t
        p = next(model.parameters())
        return t.to(device=p.device, dtype=p.dtype)

    def _verify(self, rows: list[EngineRequest]) -> None:
        if not rows:
            return
        calls = [r.call for r in rows]
        hidden = any(c.return_hidden for c in calls)
        self.stats.steps += 1
        self.stats.rows += len(rows)
        self.stats.verify_tokens += sum(c.n_query for c in calls if c.n_hidden is None)
        results: list = []
        with self.lock:
            if len(rows) > 1:
                try:
                    kw = {"n_hidden": [c.n_hidden for c in calls]} if hidden else {}
                    results = self.target.score_batch([r.seq_id for r in rows],
                                                      [c.ids for c in calls],
                                                      [c.n_query for c in calls],
                                                      return_hidden=hidden, **kw)
                except Exception:  # noqa: BLE001 - isolate the failing row below
                    results = []
            if not results:
                for r, c in zip(rows, calls):
                    try:
                        if c.n_hidden is None:
                            results.append(self.target.score(r.seq_id, c.ids, c.n_query,
                                                             return_hidden=c.return_hidden))
                        else:
                            results.append(self.target.score(r.seq_id, c.ids, c.n_query,
                                                             return_hidden=True,
                                                             n_hidden=c.n_hidden))
                    except Exception as e:  # noqa: BLE001 - this row's own error
                        results.append(e)
        for r, res in zip(rows, results):
            if isinstance(res, BaseException):
                self._fail(r, res)
            else:
                self._advance(r, res)

