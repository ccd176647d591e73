"""Tracing and metrics of a live app: one request's span tree (request -> cycle -> draft /
verify, with block size, accepted and replica attributes), from the Router's in-memory
exporter; the Prometheus series on the Ray node's metrics export port."""

from __future__ import annotations

import time

import pytest

from ops_app import delete, deploy, http, metrics_port, scrape

pytestmark = pytest.mark.service

APP = "obs"


@pytest.fixture(scope="module")
def app(service):
    a = deploy(service, APP, own_models=False, service={"tracing": {"exporter": "memory"}})
    try:
        yield a
    finally:
        delete(a)


def test_a_request_trace_shows_its_cycles(app):
    status, body, headers = http("POST", app.http + "/v1/completions",
                                 {"prompt": "def add(a, b):\n", "max_tokens": 12})
    assert status == 200, body
    trace_id = {k.lower(): v for k, v in headers.items()}["x-trace-id"]
    spans = app.handle("Router").recent_spans.remote(trace_id).result(timeout_s=30)
    by_id = {s["span_id"]: s for s in spans}
    roots = [s for s in spans if s["name"] == "request"]
    assert len(roots) == 1 and roots[0]["parent_id"] is None
    root = roots[0]
    assert root["attributes"]["deer.cycles"] == body["deer"]["cycles"]
    assert root["attributes"]["deer.completion_tokens"] == len(body["choices"][0]["token_ids"])
    cycles = [s for s in spans if s["name"] == "cycle"]
    assert cycles and all(c["parent_id"] == root["span_id"] for c in cycles)
    accepted = [c["attributes"]["deer.accepted"] for c in cycles if "deer.accepted" in c["attributes"]]
    assert accepted == body["deer"]["accept_lengths"]
    prefill = [s for s in spans if s["name"] == "prefill"]
    assert len(prefill) == 1 and prefill[0]["parent_id"] == root["span_id"]
    for c in cycles:
        kids = [s for s in spans if s["parent_id"] == c["span_id"]]
        names = [k["name"] for k in kids]
        if "deer.accepted" in c["attributes"]:  # a DEER cycle: one draft, then one verify
            assert names == ["draft", "verify"], names
            draft = kids[0]
            assert draft["attributes"]["deer.block_size"] == c["attributes"]["deer.block_size"]
            assert 1 <= draft["attributes"]["deer.block_size"] <= 4
        for k in kids:
            assert k["attributes"]["deer.replica"], k
            assert c["start_ns"] <= k["start_ns"] <= k["end_ns"] <= c["end_ns"]
    tree = "\n".join(f"{'  ' * depth(s, by_id)}{s['name']} {s['attributes']}"
                     for s in sorted(spans, key=lambda s: s["start_ns"]))
    print(f"trace {trace_id}:\n{tree}")


def depth(span: dict, by_id: dict) -> int:
    d = 0
    while span["parent_id"] in by_id:
        span, d = by_id[span["parent_id"]], d + 1
    return d


def test_the_metrics_endpoint_shows_the_histograms(app):
    for _ in range(2):
        status, _, _ = http("POST", app.http + "/v1/completions",
                            {"prompt": "for i in range(10):", "max_tokens": 8})
        assert status == 200
    http("POST", app.http + "/v1/completions", {"prompt": "x", "max_tokens": 0})  # an error
    port = metrics_port()
    want = ["ray_deer_accepted_length_bucket", "ray_deer_tokens_generated",
            "ray_deer_draft_latency_s_bucket", "ray_deer_verify_latency_s_bucket",
            "ray_deer_errors", "ray_deer_requests"]
    t_end, text, lines = time.monotonic() + 120, "", []
    while time.monotonic() < t_end:  # Ray exports every few seconds
        text = scrape(port)
        lines = [ln for ln in text.splitlines()
                 if ln.startswith("ray_deer_accepted_length_bucket") and f'application="{APP}"' in ln]
        if lines and all(w in text for w in want):
            break
        time.sleep(2)
    missing = [w for w in want if w not in text]
    assert not missing, missing
    assert lines, "no accepted-length series for this app"
    assert any('le="+Inf"' in ln and float(ln.rsplit(" ", 1)[1]) > 0 for ln in lines)
    assert any('kind="invalid_request"' in ln for ln in text.splitlines()
               if ln.startswith("ray_deer_errors"))
    print("\n".join(lines))


def test_tracing_exporters_can_be_built():
    """console and otlp build without a collector (nothing is sent until a span ends)."""
    from deployments.app import TracingConfig
    from deployments.telemetry import Tracing

    for cfg in (TracingConfig(exporter="console"), TracingConfig(exporter="none"),
                TracingConfig(exporter="otlp", otlp_endpoint="http://127.0.0.1:9/v1/traces")):
        t = Tracing(cfg)
        assert t.tracer is not None
        t.shutdown()
