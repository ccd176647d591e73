"""The gRPC adapter of the Router: `deer.v1.DeerService` (`deer_serve/protos/deer.proto`) and
`grpc.health.v1.Health/Check`, served by Ray Serve's gRPC proxy, which calls these methods by
name. A request message becomes the dict of the fields it has set, which goes through the same
`Router.prepare` as an HTTP body; failures become status codes (INVALID_ARGUMENT,
UNAUTHENTICATED, RESOURCE_EXHAUSTED with retry-after, UNAVAILABLE, INTERNAL).

`GrpcIngress` is a mixin of `deployments.router.Router`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from deployments.clients import VerifierUnavailable
from deployments.ingress_core import IngressCore
from deployments.schemas import RequestError
from deployments.security import grpc_key

if TYPE_CHECKING:
    from deployments.router import Prepared
    from deployments.session import Outcome

log = logging.getLogger("deer_serve.router")


class GrpcIngress(IngressCore):
    """The Router's gRPC methods."""

    async def Generate(self, request, grpc_context=None):
        from deer_serve.protos import deer_pb2

        try:
            p = await self._grpc_prepare(request, grpc_context)
            o, text = await self.complete(p)
        except Exception as e:
            self._grpc_fail(grpc_context, e)
            return deer_pb2.GenerateResponse()
        return deer_pb2.GenerateResponse(text=text, token_ids=o.token_ids,
                                         finish_reason=o.finish_reason, deer=_pb_stats(o))

    async def GenerateStream(self, request, grpc_context=None):
        from deer_serve.protos import deer_pb2

        try:
            p = await self._grpc_prepare(request, grpc_context)
            async with contextlib.aclosing(self.stream(p)) as chunks:  # a cancel closes it now
                async for delta, ids, o in chunks:
                    if o is None:
                        yield deer_pb2.GenerateChunk(text=delta, token_ids=ids)
                    else:
                        yield deer_pb2.GenerateChunk(text=delta, token_ids=ids,
                                                     finish_reason=o.finish_reason,
                                                     deer=_pb_stats(o))
        except Exception as e:
            # a streaming method's status only reaches the proxy with a yielded message or an
            # exception; Serve keeps the code set on grpc_context when we raise
            self._grpc_fail(grpc_context, e)
            raise

    async def _grpc_prepare(self, request, ctx) -> Prepared:
        md = None
        if ctx is not None and hasattr(ctx, "invocation_metadata"):
            md = ctx.invocation_metadata()
        slot = self.admit(grpc_key(md), "grpc")
        try:
            if request.ByteSize() > self.settings.limits.max_body_bytes:
                raise RequestError(f"the request is larger than "
                                   f"{self.settings.limits.max_body_bytes} bytes", 413,
                                   code="request_too_large")
            p = await self.prepare(proto_fields(request), "grpc")
        except BaseException:
            slot.release()
            raise
        p.protocol, p.slot = "grpc", slot
        p.headers = {k: v for k, v in (md or ()) if k in ("traceparent", "tracestate")} or None
        return p

    def _grpc_fail(self, ctx, e: Exception) -> None:
        status = status_of(e)
        self._count_error(e, status)
        if ctx is not None and status in (429, 503) and hasattr(ctx, "set_trailing_metadata"):
            ctx.set_trailing_metadata([("retry-after", str(self.settings.retry_after_s))])
        _set_status(ctx, e)

    async def Check(self, request, grpc_context=None):
        """grpc.health.v1.Health/Check: SERVING while the verifier answers."""
        from grpc_health.v1 import health_pb2

        try:
            await asyncio.wait_for(self.verifier.health.remote(), 10.0)
            status = health_pb2.HealthCheckResponse.SERVING
        except Exception:
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)


def status_of(e: Exception) -> int:
    """The HTTP status a failure stands for (metrics, retry-after)."""
    if isinstance(e, RequestError):
        return e.status
    return 503 if isinstance(e, VerifierUnavailable) else 500


def _set_status(ctx, e: Exception) -> None:
    import grpc

    if isinstance(e, RequestError):
        code = {401: grpc.StatusCode.UNAUTHENTICATED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
                503: grpc.StatusCode.UNAVAILABLE}.get(e.status, grpc.StatusCode.INVALID_ARGUMENT)
        msg = e.message
    elif isinstance(e, VerifierUnavailable):
        code, msg = grpc.StatusCode.UNAVAILABLE, "the verifier is unavailable"
    else:
        log.exception("internal error", exc_info=e)
        code, msg = grpc.StatusCode.INTERNAL, "internal server error"
    if ctx is None:  # called through a handle, not the gRPC proxy
        raise e
    ctx.set_code(code)
    ctx.set_details(msg)


def proto_fields(msg) -> dict:
    """The fields a proto message has SET (proto3 `optional` keeps 0 apart from unset)."""
    return {f.name: (v if isinstance(v, (bool, int, float, str)) else list(v))
            for f, v in msg.ListFields()}


def _pb_stats(o: Outcome):
    from deer_serve.protos import deer_pb2

    s = o.stats()
    return deer_pb2.DeerStats(accept_lengths=s.accept_lengths, mean_accepted=s.mean_accepted,
                              cycles=s.cycles, fallback=s.fallback)
