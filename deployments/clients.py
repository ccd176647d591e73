"""The callers' side of the Drafter and Verifier deployments: the core's `TargetBackend` and
`Drafter` protocols over a handle, so `deer_serve.engine` drives remote models unchanged.

- `RemoteTarget` calls `Verifier.score`; a failed call raises `VerifierUnavailable` (the session
  resumes the request from its token ids, else 503 / UNAVAILABLE).
- `RemoteDrafter` calls `Drafter.draft`; a failed or slow call raises `DrafterUnavailable` (the
  session finishes the request in plain AR).
- `aremote_segment` runs one segment of the decode loop in a Verifier replica (`Verifier.decode`,
  `loop: colocated` / `engine` / `vllm`) as a stream read in the caller's event loop.
- `route_handle` picks the transport of one request's calls (`ServiceOptions.transport`): Serve's
  handle (`object-store`) or a `ChannelHandle` (`channel`); `close_channels` closes those when
  the request ends.

Token ids go as int32 numpy arrays; `as_tensor` turns the numpy replies back into tensors. Every
wait has a timeout, so nothing hangs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, AsyncGenerator, Optional, Sequence

import numpy as np
import torch

from deer_serve.types import DraftResult, PendingDraft, SamplingParams, ScoreResult

if TYPE_CHECKING:
    from deployments.session import DecodeSpec
    from deployments.verifier import ScoreReply


class DrafterUnavailable(Exception):
    """The drafter failed or timed out: the request falls back to plain AR decoding."""


class VerifierUnavailable(Exception):
    """The verifier failed: nothing can answer the request (503)."""


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """Ray hands numpy results over read-only (zero-copy from the object store); torch must
    not share memory it may not write."""
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def reply_to_result(r: ScoreReply) -> ScoreResult:
    hidden = None if r.hidden is None else as_tensor(r.hidden)                     # (n, F) fp16
    if r.argmax is not None:
        return ScoreResult(logits=None, hidden=hidden, greedy_ids=as_tensor(r.argmax).long())
    if r.logits is None:
        raise ValueError("a score reply carries logits or argmax")
    return ScoreResult(logits=as_tensor(r.logits), hidden=hidden)                   # (n_query, V)


class RemoteTarget:
    """`TargetBackend` over the Verifier deployment. Token ids go as int32 arrays."""

    device = None  # timings need no device sync here

    def __init__(self, handle, meta: dict, timeout_s: float, argmax_only: bool = False):
        """argmax_only: ask for greedy tokens instead of logits (only for greedy decoding: the
        results then carry `greedy_ids` and no logits)."""
        self.handle, self.timeout_s, self.argmax_only = handle, timeout_s, argmax_only
        self.vocab_size = int(meta["vocab_size"])
        self.eos_token_id = meta["eos_token_id"]
        self.feature_dim = int(meta["feature_dim"])
        self.calls: list = []  # per call, the replica's (wait, compute) seconds (split_timings)

    def score(self, seq_id: str, token_ids: Sequence[int], n_query: int,
              return_hidden: bool = False, n_hidden: Optional[int] = None) -> ScoreResult:
        ids = np.asarray(token_ids, dtype=np.int32)                                 # (T,)
        try:
            r = self.handle.score.remote(seq_id, ids, n_query, return_hidden, n_hidden,
                                         self.argmax_only).result(timeout_s=self.timeout_s)
        except Exception as e:
            raise VerifierUnavailable(f"verifier call failed: {e!r}") from e
        self.last_replica = r.replica
        self.calls.append(r.server)
        return reply_to_result(r)

    def score_batch(self, seq_ids, token_ids, n_query, return_hidden=False) -> list[ScoreResult]:
        return [self.score(s, t, n, return_hidden) for s, t, n in zip(seq_ids, token_ids, n_query)]

    def release(self, seq_id: str) -> None:
        try:
            self.handle.release.remote(seq_id)  # fire and forget: the ids are never reused
        except Exception:  # a dead verifier holds no cache
            pass


class RemoteDrafter:
    """`Drafter` over the Drafter deployment; one per request (it remembers, for its sequence,
    how many target-feature rows the drafter was sent, and sends only the rest: see
    deployments.drafter for the rows a replica may ask for again)."""

    def __init__(self, handle, meta: dict, timeout_s: float):
        self.handle, self.timeout_s = handle, timeout_s
        self.context_mode = meta["context_mode"]
        self.feature_layers: list[int] = list(meta.get("feature_layers") or [])  # target layers read
        self.caches_prefix = bool(meta.get("caches_prefix", True))
        self._sent: dict[str, int] = {}  # seq_id -> feature rows the drafter has been sent
        self.server_s = [0.0, 0.0]       # the replica's (wait, compute) seconds, replies read

    def draft(self, seq_id: str, context_ids: Sequence[int], anchor: int, k: int,
              sampling: SamplingParams, generator: Optional[torch.Generator] = None,
              context_hidden: Optional[torch.Tensor] = None,
              prefix: Sequence[int] = ()) -> DraftResult:
        return self.draft_async(seq_id, context_ids, anchor, k, sampling, generator,
                                context_hidden, prefix).result()

    def draft_async(self, seq_id: str, context_ids: Sequence[int], anchor: int, k: int,
                    sampling: SamplingParams, generator: Optional[torch.Generator] = None,
                    context_hidden: Optional[torch.Tensor] = None,
                    prefix: Sequence[int] = ()) -> "PendingDraft":
        """Send the draft call now; `.result()` waits for it (a pipelined pre-draft is sent
        before the verify and waited for, or cancelled, after it)."""
        # the remote drafter gets a seed drawn from the request's generator, not the generator
        seed = None if sampling.greedy else int(torch.randint(0, 2**62, (1,), generator=generator))
        ids = np.asarray(context_ids, dtype=np.int32)                               # (n,)
        n = len(ids)
        pre = np.asarray(prefix, dtype=np.int32) if len(prefix) else None          # (j,)
        state = {"start": self._sent.get(seq_id, 0) if self.caches_prefix else 0}

        def send():
            rows = None
            if context_hidden is not None:
                rows = context_hidden[state["start"]:n].to(torch.float16).numpy()  # (n-start, F)
            try:
                return self.handle.draft.remote(seq_id, ids, int(anchor), int(k), sampling, seed,
                                                rows, state["start"], pre)
            except Exception as e:
                raise DrafterUnavailable(f"drafter call failed: {e!r}") from e

        resp = send()

        def finish() -> DraftResult:
            nonlocal resp
            for _ in range(3):  # normally one call; a replica that lacks rows asks once for them
                try:
                    r = resp.result(timeout_s=self.timeout_s)
                except Exception as e:
                    raise DrafterUnavailable(f"drafter call failed: {e!r}") from e
                if r.server:
                    self.server_s[0] += r.server[0]
                    self.server_s[1] += r.server[1]
                if r.need_rows_from is None:
                    break
                state["start"] = min(int(r.need_rows_from), state["start"])
                resp = send()
            else:
                raise DrafterUnavailable("the drafter kept asking for feature rows")
            self._sent[seq_id] = n
            self.last_replica = r.replica
            probs = None if r.probs is None else as_tensor(r.probs)                # (k, V)
            conf = None if r.conf is None else as_tensor(r.conf)                   # (k,)
            alt = None if r.alt is None else as_tensor(r.alt).long()               # (k,)
            return DraftResult(tokens=as_tensor(r.tokens).long(), probs=probs, conf=conf, alt=alt)

        return PendingDraft(finish, lambda: resp.cancel())

    def release(self, seq_id: str) -> None:
        self._sent.pop(seq_id, None)
        try:
            self.handle.release.remote(seq_id)
        except Exception:
            pass


async def aremote_segment(handle, spec: DecodeSpec) -> AsyncGenerator[tuple[str, Any], None]:
    """`loop: colocated` / `engine` / `vllm`: one segment of the loop as one streaming call to
    a Verifier replica (`Verifier.decode`), which drafts with its own drafter, read in the
    caller's event loop: ("step", StepOutput) ... then ("done", GenerationResult). Raises
    DrafterUnavailable when the drafter failed there and VerifierUnavailable when the stream
    failed, as the Router's own segments do (deployments.session)."""
    stream = handle.options(stream=True).decode.remote(spec)
    try:
        async for batch in stream:  # the events since the last batch (Verifier.decode)
            for kind, val in batch:
                if kind == "step":
                    yield "step", val
                elif kind == "drafter_unavailable":
                    raise DrafterUnavailable(val)
                else:
                    yield "done", val
                    return
    except DrafterUnavailable:
        raise
    except Exception as e:
        raise VerifierUnavailable(f"verifier decode failed: {e!r}") from e
    finally:
        try:
            stream.cancel()  # the client went away or the loop ended: stop the remote loop
        except Exception:  # noqa: BLE001 - best effort
            pass
    raise VerifierUnavailable("the verifier's decode stream ended without a result")


def route_handle(handle, transport: str, session: Optional[str]):
    """The handle one request's calls go through: Serve's (`transport: object-store`), or a
    socket to the one replica its `channel()` call reached (`transport: channel`,
    deployments.channel; the `channel()` call goes by value; `close_channels` when the request
    ends); given a session (the request id, with `affinity`), kept on one replica by Serve's
    consistent-hash request router."""
    kw: dict = {}
    if transport == "channel":
        kw["_by_reference"] = False
    if session is not None:
        kw["session_id"] = session
    h = handle.options(**kw) if kw else handle
    if transport == "channel":
        from deployments.channel import ChannelHandle

        return ChannelHandle(h)
    return h


def close_channels(*users) -> None:
    """Close the channels of a request's handles, RemoteTarget/RemoteDrafter (or a wrapper
    with `.inner`); anything else is left alone."""
    from deployments.channel import ChannelHandle

    for u in users:
        for h in (u, getattr(u, "handle", None), getattr(getattr(u, "inner", None), "handle", None)):
            if isinstance(h, ChannelHandle):
                h.close()
