"""Observability of the Router: OpenTelemetry spans and Prometheus metrics.

Spans, one trace per request (the Router makes them all; the decode loop runs in a worker
thread, so parents are passed explicitly, never through the thread's current context):

    request                     protocol, mode, prompt_tokens, max_tokens, finish_reason, cycles
      cycle                     index, block_size (k asked), accepted, new_tokens
        prefill | draft | verify   block_size / tokens / n_query, replica (who answered)

A resumed or AR-fallback request goes on adding cycles under the same request span.
Exporters (`TracingConfig.exporter`): none (a no-op tracer), console (JSON on the Router
replica's stdout), otlp (OTLP/HTTP), memory (kept in the replica; `Router.recent_spans` hands
them out, for tests and debugging).

Metrics go through Ray Serve's metrics API (`ray.serve.metrics`), so every series also carries
the deployment, replica and application tags, and Ray exports them on each node's metrics
export port (Prometheus text; names get Ray's `ray_` prefix). Outside a Ray worker (in-process
tests) the metrics are no-ops.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from contextlib import contextmanager
from typing import Any, Optional

log = logging.getLogger("deer_serve.telemetry")

ACCEPT_BUCKETS = [0.5, 1.5, 2.5, 3.5, 4.5, 6.5, 8.5, 12.5, 16.5, 24.5, 32.5, 48.5, 64.5]
LATENCY_BUCKETS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 120]


@functools.lru_cache(maxsize=1)
def replica_id() -> str:
    """This Serve replica's id (or the process id outside Serve): span attribute `replica`."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return f"pid-{os.getpid()}"


def replica_info(role: str, path: str, device: str) -> dict:
    """Where this replica runs: process, Ray node and actor, GPU ids Ray gave it."""
    info = {"role": role, "pid": os.getpid(), "model_path": path, "device": device,
            "node_id": None, "actor_id": None, "gpu_ids": []}
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            info.update(node_id=ctx.get_node_id(), actor_id=ctx.get_actor_id(),
                        gpu_ids=[str(g) for g in ray.get_gpu_ids()])
    except Exception:  # in-process use without Ray
        pass
    return info


# ---- metrics -------------------------------------------------------------------------------------
class _Null:
    def inc(self, *a, **k):
        pass

    observe = set = inc


class _Safe:
    """A metric whose updates never raise (Ray rejects a counter increment of 0, for one)."""

    def __init__(self, metric):
        self.metric = metric

    def inc(self, value: float = 1.0, tags: Optional[dict] = None) -> None:
        if value > 0:
            self._do(self.metric.inc, value, tags)

    def observe(self, value: float, tags: Optional[dict] = None) -> None:
        self._do(self.metric.observe, value, tags)

    def set(self, value: float, tags: Optional[dict] = None) -> None:
        self._do(self.metric.set, value, tags)

    @staticmethod
    def _do(fn, value, tags):
        try:
            fn(value, tags=tags)
        except Exception as e:  # metrics must never fail a request
            log.warning("metric update failed: %r", e)


class Metrics:
    """The Router's Prometheus series (`ray.serve.metrics`; no-ops without Ray)."""

    def __init__(self):
        self.enabled = False
        try:
            import ray

            if ray.is_initialized():
                from ray.serve import metrics as m
                self._make(*(lambda *a, _c=c, **k: _Safe(_c(*a, **k))
                             for c in (m.Counter, m.Gauge, m.Histogram)))
                self.enabled = True
        except Exception as e:  # metrics must never take the service down
            log.warning("metrics disabled: %r", e)
        if not self.enabled:
            n = _Null()
            for name in ("requests", "tokens", "accepted", "draft_s", "verify_s", "prefill_s",
                         "request_s", "ttft_s", "pipeline_hits", "pipeline_misses", "fallbacks",
                         "errors", "inflight"):
                setattr(self, name, n)

    def _make(self, Counter, Gauge, Histogram):
        self.requests = Counter("deer_requests", description="requests admitted",
                                tag_keys=("protocol",))
        self.tokens = Counter("deer_tokens_generated", description="tokens sent to clients")
        self.accepted = Histogram("deer_accepted_length", boundaries=ACCEPT_BUCKETS,
                                  description="accepted draft tokens per cycle (tau's samples)")
        self.draft_s = Histogram("deer_draft_latency_s", boundaries=LATENCY_BUCKETS,
                                 description="drafter call latency seen by the router, seconds")
        self.verify_s = Histogram("deer_verify_latency_s", boundaries=LATENCY_BUCKETS,
                                  description="verifier call latency seen by the router, seconds")
        self.prefill_s = Histogram("deer_prefill_latency_s", boundaries=LATENCY_BUCKETS,
                                   description="prefill (first verifier call) latency, seconds")
        self.request_s = Histogram("deer_request_latency_s", boundaries=LATENCY_BUCKETS,
                                   description="decode time of a request, seconds")
        self.ttft_s = Histogram("deer_time_to_first_token_s", boundaries=LATENCY_BUCKETS,
                                description="request admitted -> first token, seconds")
        self.pipeline_hits = Counter("deer_pipeline_hits",
                                     description="pre-drafted blocks used (pipelining)")
        self.pipeline_misses = Counter("deer_pipeline_misses",
                                       description="pre-drafted blocks thrown away")
        self.fallbacks = Counter("deer_fallbacks", tag_keys=("kind",),
                                 description="drafter_to_ar: drafter failed, plain AR went on; "
                                             "verifier_resume: resumed after a verifier failure")
        self.errors = Counter("deer_errors", tag_keys=("kind",),
                              description="requests that failed, by kind")
        self.inflight = Gauge("deer_requests_in_flight", description="requests decoding now")

    def error(self, kind: str) -> None:
        self.errors.inc(1, tags={"kind": kind})

    def fallback(self, kind: str) -> None:
        self.fallbacks.inc(1, tags={"kind": kind})


# ---- tracing -------------------------------------------------------------------------------------
class Tracing:
    """A tracer from `TracingConfig` (its own TracerProvider: the global one is left alone)."""

    def __init__(self, cfg):
        self.cfg, self.memory = cfg, None
        from opentelemetry import trace

        self.trace = trace
        if cfg.exporter == "none":
            self.tracer = trace.NoOpTracer()
            self.provider = None
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        self.provider = TracerProvider(resource=Resource.create(
            {"service.name": cfg.service_name}))
        if cfg.exporter == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter
            proc = SimpleSpanProcessor(ConsoleSpanExporter())
        elif cfg.exporter == "memory":
            proc = SimpleSpanProcessor(_BoundedMemoryExporter(cfg.memory_spans))
            self.memory = proc.span_exporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            exp = OTLPSpanExporter(endpoint=cfg.otlp_endpoint) if cfg.otlp_endpoint \
                else OTLPSpanExporter()
            proc = BatchSpanProcessor(exp)
        self.provider.add_span_processor(proc)
        self.tracer = self.provider.get_tracer("deer_serve.router")

    def start_request(self, headers: Optional[dict], attributes: dict):
        """The root span of a request; `headers` may carry a W3C `traceparent` to join."""
        ctx = None
        if headers:
            from opentelemetry.propagate import extract
            ctx = extract(headers)
        return self.tracer.start_span("request", context=ctx, attributes=attributes)

    def spans_of(self, span) -> "CycleSpans":
        return CycleSpans(self, span)

    @staticmethod
    def trace_id(span) -> Optional[str]:
        c = span.get_span_context()
        return format(c.trace_id, "032x") if c.is_valid else None

    def recent(self, trace_id: Optional[str] = None) -> list[dict]:
        """Finished spans the memory exporter holds (all, or one trace's), oldest first."""
        if self.memory is None:
            return []
        out = []
        for s in self.memory.get_finished_spans():
            d = {"name": s.name, "trace_id": format(s.context.trace_id, "032x"),
                 "span_id": format(s.context.span_id, "016x"),
                 "parent_id": format(s.parent.span_id, "016x") if s.parent else None,
                 "start_ns": s.start_time, "end_ns": s.end_time,
                 "attributes": dict(s.attributes or {})}
            if trace_id is None or d["trace_id"] == trace_id:
                out.append(d)
        return out

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


class _BoundedMemoryExporter:
    """InMemorySpanExporter that keeps the newest `n` spans (a long-running replica)."""

    def __init__(self, n: int):
        import collections

        from opentelemetry.sdk.trace.export import SpanExportResult

        self._ok = SpanExportResult.SUCCESS
        self._spans: collections.deque = collections.deque(maxlen=n)

    def export(self, spans):
        self._spans.extend(spans)
        return self._ok

    def get_finished_spans(self):
        return list(self._spans)

    def shutdown(self):
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class CycleSpans:
    """One request's cycle spans, fed by the traced proxies below and the decode loop:
    a cycle span opens at the first call after the previous step and closes at the step."""

    def __init__(self, tracing: Tracing, request_span):
        self.tracing, self.request = tracing, request_span
        self.cycle, self.index = None, 0
        self.metrics: Any = None   # Metrics, for the call latencies
        self.on_replica: Any = None  # (role, replica id) -> None: who answered each call

    def _parent(self):
        trace = self.tracing.trace
        if self.cycle is None:
            self.cycle = self.tracing.tracer.start_span(
                "cycle", context=trace.set_span_in_context(self.request),
                attributes={"deer.cycle": self.index})
        return trace.set_span_in_context(self.cycle)

    @contextmanager
    def call(self, name: str, attributes: dict):
        # the prefill belongs to the request (before the first cycle), the rest to a cycle
        parent = self.tracing.trace.set_span_in_context(self.request) if name == "prefill" \
            else self._parent()
        span = self.tracing.tracer.start_span(name, context=parent, attributes=attributes)
        t0 = time.perf_counter()
        try:
            yield span
        except BaseException as e:
            span.record_exception(e)
            span.set_status(self.tracing.trace.Status(self.tracing.trace.StatusCode.ERROR))
            raise
        finally:
            span.end()
            if self.metrics is not None:
                getattr(self.metrics, f"{name}_s").observe(time.perf_counter() - t0)

    def end_cycle(self, step, block_size: Optional[int]) -> None:
        if self.cycle is None:
            return
        attrs = {"deer.new_tokens": len(step.new_token_ids)}
        if step.accepted is not None:
            attrs["deer.accepted"] = int(step.accepted)
        if block_size:
            attrs["deer.block_size"] = int(block_size)
        self.cycle.set_attributes(attrs)
        self.cycle.end()
        self.cycle, self.index = None, self.index + 1

    def close(self) -> None:
        if self.cycle is not None:  # a cycle cut short (error, cancel)
            self.cycle.set_attribute("deer.interrupted", True)
            self.cycle.end()
            self.cycle = None


class TracedTarget:
    """A `TargetBackend` that wraps each score call in a prefill/verify span."""

    def __init__(self, inner, spans: CycleSpans):
        self.inner, self.spans, self.calls = inner, spans, 0

    def __getattr__(self, name):  # vocab_size, eos_token_id, feature_dim, device, ...
        return getattr(self.inner, name)

    def score(self, seq_id, token_ids, n_query, return_hidden=False, n_hidden=None):
        name = "prefill" if self.calls == 0 else "verify"
        self.calls += 1
        with self.spans.call(name, {"deer.tokens": len(token_ids),
                                    "deer.n_query": int(n_query)}) as span:
            r = self.inner.score(seq_id, token_ids, n_query, return_hidden, n_hidden)
            rid = getattr(self.inner, "last_replica", None) or ""
            span.set_attribute("deer.replica", rid)
        if self.spans.on_replica is not None:
            self.spans.on_replica("verifier", rid)
        return r

    def release(self, seq_id):
        self.inner.release(seq_id)


class TracedDrafter:
    """A `Drafter` that wraps each draft call in a draft span (block size, replica)."""

    def __init__(self, inner, spans: CycleSpans):
        self.inner, self.spans = inner, spans
        self.last_k: Optional[int] = None

    def __getattr__(self, name):  # context_mode, caches_prefix, ...
        return getattr(self.inner, name)

    def draft(self, seq_id, context_ids, anchor, k, sampling, generator=None,
              context_hidden=None):
        self.last_k = int(k)
        with self.spans.call("draft", {"deer.block_size": int(k),
                                       "deer.context_tokens": len(context_ids)}) as span:
            d = self.inner.draft(seq_id, context_ids, anchor, k, sampling, generator,
                                 context_hidden)
            rid = getattr(self.inner, "last_replica", None) or ""
            span.set_attribute("deer.replica", rid)
        if self.spans.on_replica is not None:
            self.spans.on_replica("drafter", rid)
        return d

    def release(self, seq_id):
        self.inner.release(seq_id)
