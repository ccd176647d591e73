"""The Verifier deployment: a target backend (`HFTarget`) behind plain, picklable calls.

A plain class: only `deployments.app.build_app` wraps it with `serve.deployment`, so tests and
tools can run it in-process. It holds no algorithm: `score` is `TargetBackend.score` with the
tensors turned into numpy arrays (token ids int32 in, logits float32 and target features
float16 out). The per-sequence KV cache lives in the backend, keyed by `seq_id`; every call
carries the full ids, so a cache miss (another replica, a restart) recomputes.

With `loop: colocated` a replica also hosts decode loops: `decode` runs one segment of a
request's loop (`deployments.session.run_segment`) over this replica's target and a drafter in
its own process. The callers' side is `deployments.clients` (`RemoteTarget`, `remote_segment`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from deer_serve.types import ScoreResult
from deployments.batching import CombiningBatcher, run_call, server_time
from deployments.channel import LocalHandle
from deployments.clients import DrafterUnavailable, RemoteDrafter, reply_to_result
from deployments.session import DecodeSpec, run_segment
from deployments.telemetry import replica_id, replica_info


@dataclass
class ScoreReply:
    logits: Optional[np.ndarray]         # (n_query, V) float32 raw logits; None with argmax_only
    hidden: Optional[np.ndarray] = None  # (n_hidden, F) float16 target features, when asked
    replica: Optional[str] = None        # the Serve replica that answered (tracing)
    argmax: Optional[np.ndarray] = None  # (n_query,) int32 greedy tokens, with argmax_only
    server: Optional[tuple] = None       # (wait, compute) seconds in the replica: queued behind
                                         # other calls' forwards / this call's (timing split)


class Verifier:
    def __init__(self, target_path: str, *, device: Optional[str] = None,
                 max_sequences: int = 64, feature_layers: Optional[Sequence[int]] = None,
                 torch_threads: Optional[int] = None, batching: bool = True,
                 max_batch_size: int = 16, backend: str = "torch",
                 tokenizer_path: Optional[str] = None, colocated_drafter: Optional[dict] = None,
                 engine: Optional[dict] = None, vllm_loop: Optional[dict] = None):
        """colocated_drafter: the keyword arguments of a `Drafter` that this replica holds in its
        own process, for `decode` (the decode loop in this replica, `ServiceOptions.loop:
        colocated`; its torch threads are this replica's); tokenizer_path: for the stop strings
        of `decode`. engine: the `StepEngine` options (`loop: engine`): `decode` then runs
        each request in this replica's step engine, over its target and the colocated
        drafter. vllm_loop: the `VLLMLoop` options (`loop: vllm`): `decode` then runs each
        request in this replica's vLLM AsyncLLM (deployments.vllm_loop)."""
        self.local_drafter = self._local_pool = None
        self.vllm_loop = None
        self.tokenizer_path = tokenizer_path or str(target_path)
        self._tokenizer = None
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.target_path = str(target_path)
        if vllm_loop is not None:  # `loop: vllm`: meta from a VLLMTarget that never starts
            backend = "vllm-loop"     # an engine; the AsyncLLM below decodes
            from deer_serve.targets.vllm_backend import VLLMTarget as Target
        elif backend == "vllm":  # the vLLM engine scores (deer_serve.targets.vllm_backend)
            from deer_serve.targets.vllm_backend import VLLMTarget as Target
        elif backend == "torch":
            # the other backend class under the same name: both are TargetBackends
            from deer_serve.targets.hf import HFTarget as Target  # type: ignore[assignment]
        else:
            raise ValueError(f"verifier backend must be 'torch' or 'vllm', got {backend!r}")
        self.backend = Target.from_pretrained(self.target_path, device=device,
                                              max_sequences=max_sequences,
                                              feature_layers=feature_layers)
        if backend == "vllm":
            self.backend.engine(0)  # start vLLM now, not on the first request
        if vllm_loop is not None:
            from deployments.vllm_loop import VLLMLoop

            self.vllm_loop = VLLMLoop(self.target_path, device=device,
                                      tokenizer_path=self.tokenizer_path, **vllm_loop)
        # Serve runs sync methods in a thread pool; the backend's caches are not thread-safe.
        self._lock = threading.Lock()
        # concurrent requests' verify calls -> one ragged forward (off: one forward per call)
        self._batcher = CombiningBatcher(self._score_rows, max_batch_size) if batching else None
        if colocated_drafter is not None:
            from concurrent.futures import ThreadPoolExecutor

            from deployments.drafter import Drafter

            self.local_drafter = Drafter(**colocated_drafter)  # (torch threads: this replica's)
            self._local_pool = ThreadPoolExecutor(2 * max_batch_size,
                                                  thread_name_prefix="deer-local-draft")
        self.step_engine = None
        from deer_serve.adaptive import DraftGate

        self.gate = DraftGate()  # the loops hosted here: whether drafting pays, per temperature
        if engine is not None:
            from deer_serve.step_engine import StepEngine

            drafter_backend = self.local_drafter.backend if self.local_drafter else None
            self.step_engine = StepEngine(self.backend, drafter_backend, lock=self._lock,
                                          gate=self.gate, **engine)

    def meta(self) -> dict:
        """What a remote `TargetBackend` proxy needs to know about this target."""
        b = self.backend
        return {"vocab_size": b.vocab_size, "eos_token_id": b.eos_token_id,
                "feature_dim": b.feature_dim, "feature_layers": list(b.feature_layers),
                "backend": type(b).__name__}

    def score(self, seq_id: str, token_ids: np.ndarray, n_query: int, return_hidden: bool = False,
              n_hidden: Optional[int] = None, argmax_only: bool = False) -> ScoreReply:
        """token_ids: (T,) int32, the FULL sequence. See `HFTarget.score`. argmax_only: reply
        with each query position's greedy token instead of its logits (greedy decoding: n_query
        ints cross the network instead of n_query x V floats)."""
        t0 = time.perf_counter()
        timing: dict[str, float] = {}
        ids = np.asarray(token_ids).tolist()
        res = run_call(self._batcher, self._lock,
                       (seq_id, ids, int(n_query), bool(return_hidden), n_hidden),
                       self.backend.score, timing)
        hidden = None
        if res.hidden is not None:
            hidden = res.hidden.to(torch.float16).cpu().numpy()                  # (n_hidden, F)
        if argmax_only:
            reply = ScoreReply(logits=None, hidden=hidden, replica=replica_id(),
                               argmax=res.logits.argmax(-1).to(torch.int32).cpu().numpy())
        else:
            reply = ScoreReply(logits=res.logits.float().cpu().numpy(), hidden=hidden,  # (n_query, V)
                               replica=replica_id())
        reply.server = server_time(t0, timing)
        return reply

    def _score_rows(self, items: list) -> list:
        """The batch function: items (seq_id, ids, n_query, return_hidden, n_hidden). One ragged
        forward (`score_batch`); if it fails, each item runs alone so a bad row fails alone."""
        with self._lock:
            if len(items) > 1 and len({it[0] for it in items}) == len(items):
                want = any(it[3] for it in items)
                try:
                    res = self.backend.score_batch([it[0] for it in items], [it[1] for it in items],
                                                   [it[2] for it in items], return_hidden=want,
                                                   n_hidden=[it[4] if it[3] else None for it in items])
                    for r, it in zip(res, items):
                        if not it[3]:
                            r.hidden = None
                    return res
                except Exception:  # noqa: BLE001 - isolate the failing row below
                    pass
            out: list = []  # ScoreResult, or the exception of that caller's row
            for sid, ids, nq, rh, nh in items:
                try:
                    out.append(self.backend.score(sid, ids, nq, return_hidden=rh, n_hidden=nh))
                except Exception as e:  # noqa: BLE001 - this caller gets its own error
                    out.append(e)
            return out

    def batch_stats(self) -> dict:
        """Forwards run and calls served by the batcher (mean batch size = items / batches)."""
        return self._batcher.stats() if self._batcher is not None else {"batching": False}

    def channel(self) -> dict:
        """This replica's channel address (`transport: channel`; opened on first ask)."""
        from deployments.channel import open_channel

        return open_channel(self, ("score", "release", "meta"))

    def release(self, seq_id: str) -> None:
        with self._lock:
            self.backend.release(seq_id)

    async def decode(self, spec: DecodeSpec):
        """`_segment(spec)` as an async generator of BATCHES of events (lists): the loop runs
        freely in a thread of its own (it never waits for the stream's consumer), and each
        batch carries every event that came since the last one, so a cycle costs no hop
        through this replica's event loop and a slow consumer gets fewer, larger messages.
        When the Router cancels the stream (its client went away), Serve cancels this coroutine
        and the loop stops after its current step and releases its caches. A segment that is
        not `streamed` (a non-streamed request) is sent as one batch when it ends."""
        if not spec.streamed:  # nobody reads the steps before the result: one reply
            everything: list = []
            async for events in self._decode(spec):
                everything += events
            yield everything
            return
        async for events in self._decode(spec):
            yield events

    async def _decode(self, spec: DecodeSpec):
        import asyncio

        if self.vllm_loop is not None:  # `loop: vllm`: the replica's AsyncLLM decodes it
            async for events in self.vllm_loop.decode(spec):
                yield events
            return
        loop = asyncio.get_running_loop()
        it = self._segment(spec) if self.step_engine is None else self._engine_segment(spec)
        wake, stop, lock = asyncio.Event(), threading.Event(), threading.Lock()
        pending: list = []  # the events since the last batch
        end = object()

        def put(item) -> None:
            with lock:
                ring = not pending  # the first event of a batch wakes the stream
                pending.append(item)
            if ring:  # one wake-up per batch, not per event
                try:
                    loop.call_soon_threadsafe(wake.set)
                except RuntimeError:  # the event loop is gone
                    stop.set()

        def run() -> None:
            try:
                for item in it:
                    put(item)
                    if stop.is_set():
                        break
            except BaseException as e:  # noqa: BLE001 - raised in the stream below
                put(("__error__", e))
            finally:
                it.close()  # the caches of this segment
                put(end)

        threading.Thread(target=run, name="deer-vloop", daemon=True).start()
        try:
            while True:
                await wake.wait()
                wake.clear()
                with lock:
                    items = pending[:]
                    pending.clear()
                batch: list = []
                for item in items:
                    if item is end:
                        if batch:
                            yield batch
                        return
                    if item[0] == "__error__":
                        raise item[1]
                    batch.append(item)
                if batch:
                    yield batch
        finally:
            stop.set()

    def _segment(self, spec: DecodeSpec):
        """One segment of a request's decode loop in this replica (`loop: colocated`):
        `run_segment` over this replica's target (through the batcher, so concurrent loops
        share forwards) and the drafter in this process: no remote call in the cycle. Yields
        ("step", StepOutput) per target forward, then ("done", GenerationResult), or
        ("drafter_unavailable", why) when the drafter fails: the Router's session then goes on
        in plain AR from the tokens emitted so far."""
        drafter: Any = None                  # RemoteDrafter, or the LookupDrafter around it
        client: Optional[RemoteDrafter] = None
        if spec.mode == "deer":
            if self.local_drafter is None:
                raise ValueError("loop: colocated, but this Verifier holds no drafter")
            h = LocalHandle(self.local_drafter, self._local_pool)
            try:
                client = RemoteDrafter(h, h.meta.remote().result(timeout_s=spec.drafter_timeout_s),
                                       spec.drafter_timeout_s)
            except Exception as e:  # noqa: BLE001 - the Router falls back to AR
                yield "drafter_unavailable", f"drafter meta failed: {e!r}"
                return
            drafter = client
            if spec.lookup:
                from deer_serve.drafters.lookup import LookupDrafter

                drafter = LookupDrafter(client, vocab_size=self.backend.vocab_size)
        local = _LocalTarget(self)
        it = run_segment(local, drafter, spec, target_client=local, drafter_client=client,
                         gate=self.gate,
                         detokenize=self._detokenizer() if spec.sampling.stop else None)
        yield from _events(it, DrafterUnavailable, "")

    def _engine_segment(self, spec: DecodeSpec):
        """One segment in this replica's step engine (`loop: engine`), with the events of
        `_segment`. Closing it (the stream was cancelled) cancels the request in the engine,
        which frees its slot and caches at the next step boundary. (No pipelining here.)"""
        from deer_serve.step_engine import DraftFailed

        assert self.step_engine is not None
        ids = np.asarray(spec.token_ids).tolist()
        detok = None
        if spec.sampling.stop:
            full, before = self._detokenizer(), ids[len(ids) - spec.emitted:]
            detok = lambda new: full(before + new)  # noqa: E731
        req = self.step_engine.submit(ids, spec.sampling, mode=spec.mode,
                                      block_size=spec.block_size, seq_id=spec.seq_id,
                                      adaptive_k=spec.adaptive_k, lookup=spec.lookup,
                                      detokenize=detok)
        yield from _events(iter(req), DraftFailed, "draft failed: ")  # closing it cancels

    def engine_stats(self) -> dict:
        """The step engine's counters and running requests (`loop: engine`; tests, operators)."""
        if self.vllm_loop is not None:  # `loop: vllm`: its counters, vLLM's unfinished count
            return self.vllm_loop.state()
        if self.step_engine is None:
            return {"engine": False}
        from dataclasses import asdict

        e = self.step_engine
        return {"engine": True, **asdict(e.stats), "running": e.running(), "waiting": e.waiting()}

    def _detokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        tok = self._tokenizer
        return lambda ids: tok.decode(list(ids), skip_special_tokens=True)

    def health(self) -> dict:
        return {"ok": True, "cached_sequences": len(getattr(self.backend, "_seqs", ()))}

    def info(self) -> dict:
        return replica_info("verifier", self.target_path, str(self.backend.device))


class _LocalTarget:
    """This replica's `score` (batched, metered) as a `TargetBackend`, for `Verifier.decode`;
    replies take the same form as over the network (features in float16)."""

    device = None

    def __init__(self, v: Verifier):
        self.v = v
        meta = v.meta()
        self.vocab_size, self.eos_token_id = int(meta["vocab_size"]), meta["eos_token_id"]
        self.feature_dim = int(meta["feature_dim"])
        self.calls: list = []  # per call (wait, compute), as RemoteTarget

    def score(self, seq_id, token_ids, n_query, return_hidden=False, n_hidden=None) -> ScoreResult:
        r = self.v.score(seq_id, np.asarray(token_ids, dtype=np.int32), n_query, return_hidden,
                         n_hidden)
        self.calls.append(r.server)
        return reply_to_result(r)

    def score_batch(self, seq_ids, token_ids, n_query, return_hidden=False) -> list[ScoreResult]:
        return [self.score(s, t, n, return_hidden) for s, t, n in zip(seq_ids, token_ids, n_query)]

    def release(self, seq_id: str) -> None:
        self.v.release(seq_id)


def _events(it, drafter_error: type[BaseException], prefix: str):
    """A segment's decode generator as `decode`'s events: ("step", StepOutput)..., then
    ("done", GenerationResult), or ("drafter_unavailable", why) on `drafter_error`. Closed
    when the stream is (the decode stops; the engine's request is cancelled)."""
    try:
        while True:
            try:
                step = next(it)
            except StopIteration as stop:
                yield "done", stop.value
                return
            except drafter_error as e:
                yield "drafter_unavailable", f"{prefix}{e}"
                return
            yield "step", step
    finally:
        it.close()
