"""The Router's fault handling, admission and tracing in-process (no Ray): a verifier call that
fails mid-request is resumed from the token ids (greedy output still plain AR), one that keeps
failing ends in a 503 within the resume budget, overload is a 429, a bad key a 401, and the
span tree of one request is request -> prefill + cycles -> draft / verify."""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("fastapi")

from deployments.http_ingress import error_body  # noqa: E402
from deployments.schemas import RequestError  # noqa: E402
from test_router import (  # noqa: E402,F401  (fixtures)
    PROMPT, LocalHandle, complete, drafters, make_router, reference, stream, verifier)


def test_a_verifier_failure_mid_request_is_resumed_and_stays_lossless(tiny_checkpoints, drafters,
                                                                       verifier, reference):
    def hook(name, n):
        if name == "score" and n in (4, 9):  # two replicas "die" during the request
            raise RuntimeError("verifier replica died")

    router = make_router(tiny_checkpoints, drafters["tokens"], verifier)
    asyncio.run(router.target_meta())
    router.verifier = LocalHandle(verifier, hook)
    ref = reference(PROMPT, 24)
    o, text = complete(router, {"prompt": PROMPT, "max_tokens": 24})
    assert o.token_ids == ref.token_ids and text == ref.text and not o.fallback
    assert router.counts["resumed"] == 2
    # streamed: the same text, nothing repeated across the resume
    router.verifier = LocalHandle(verifier, hook)
    parts = stream(router, {"prompt": PROMPT, "max_tokens": 24})
    assert [i for _, ids, _ in parts for i in ids] == ref.token_ids


@pytest.mark.parametrize("budget", ["resumes", "window"])
def test_a_verifier_that_stays_down_is_a_503_within_the_resume_budget(tiny_checkpoints, drafters,
                                                                     verifier, budget):
    """The resume budget is whichever runs out first: the number of resumes (a window far too
    long to matter: exactly that many resumes), or the window (resumes far too many to matter:
    the back-off sleeps, 0.2 s, 0.4 s, ... capped at the window, end it after at most 3)."""
    resumes, window = (2, 600.0) if budget == "resumes" else (10**6, 1.0)
    router = make_router(tiny_checkpoints, drafters["tokens"], verifier,
                         verifier_resumes=resumes, verifier_resume_window_s=window)
    asyncio.run(router.target_meta())

    def hook(name, n):
        if name == "score" and n >= 3:
            raise RuntimeError("verifier replica died")
    router.verifier = LocalHandle(verifier, hook)
    t0 = time.monotonic()
    with pytest.raises(Exception) as e:
        complete(router, {"prompt": PROMPT, "max_tokens": 16})
    took = time.monotonic() - t0
    status, body = error_body(e.value)
    assert status == 503 and body["error"]["code"] == "verifier_unavailable"
    assert router._active == 0
    if budget == "resumes":
        assert router.counts["resumed"] == 2
    else:  # the window ended it: it was reached, and it cut the resumes short
        assert took >= window and 1 <= router.counts["resumed"] <= 3, router.counts


def test_admission_and_api_keys(tiny_checkpoints, drafters, verifier):
    router = make_router(tiny_checkpoints, drafters["tokens"], verifier, max_pending_requests=2,
                         api_keys=["k1"])
    with pytest.raises(RequestError) as e:
        router.admit(None, "http")
    assert e.value.status == 401
    a, b = router.admit("k1", "http"), router.admit("k1", "grpc")
    with pytest.raises(RequestError) as e:
        router.admit("k1", "http")
    assert e.value.status == 429 and e.value.code == "overloaded"
    a.release()
    a.release()  # idempotent
    c = router.admit("k1", "http")
    assert router._active == 2
    b.release()
    c.release()
    assert router._active == 0


def test_one_request_span_tree(tiny_checkpoints, drafters, verifier):
    router = make_router(tiny_checkpoints, drafters["tokens"], verifier,
                         tracing={"exporter": "memory"})

    async def go():
        p = await router.prepare({"prompt": PROMPT, "max_tokens": 12}, "completions")
        o, _ = await router.complete(p)
        return p, o
    p, o = asyncio.run(go())
    spans = router.tracing.recent(p.trace_id)
    names = [s["name"] for s in spans]
    assert names.count("request") == 1 and names.count("prefill") == 1
    root = next(s for s in spans if s["name"] == "request")
    cycles = [s for s in spans if s["name"] == "cycle"]
    assert len(cycles) == o.cycles and all(c["parent_id"] == root["span_id"] for c in cycles)
    assert [c["attributes"]["deer.accepted"] for c in cycles
            if "deer.accepted" in c["attributes"]] == o.accept_lengths
    for c in cycles:
        kids = [s["name"] for s in spans if s["parent_id"] == c["span_id"]]
        assert kids in (["draft", "verify"], ["verify"]), kids


@pytest.mark.parametrize("how", ["cancelled", "disconnect-message"])
def test_a_client_gone_while_its_body_is_read_frees_its_slot(tiny_checkpoints, drafters,
                                                              verifier, how):
    """An HTTP request that the Router admitted but whose body has not arrived when its client
    goes away (Serve cancels the replica's coroutine; or the body's read gets ASGI's
    `http.disconnect`) releases its admission slot and counts the cancel; a leaked slot would
    hold `active` for ever."""
    from starlette.requests import Request

    router = make_router(tiny_checkpoints, drafters["tokens"], verifier)

    async def go():
        reading = asyncio.Event()

        async def receive():
            reading.set()
            if how == "disconnect-message":
                return {"type": "http.disconnect"}
            await asyncio.Event().wait()  # the body never comes

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [],
                 "query_string": b""}
        task = asyncio.create_task(router._openai(Request(scope, receive), "completions"))
        await reading.wait()
        if how == "cancelled":
            assert router._active == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            assert (await task).status_code == 499

    asyncio.run(go())
    assert router._active == 0 and router.counts["cancelled"] == 1
