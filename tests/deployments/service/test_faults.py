"""Fault injection on live replicas (`ray.kill`) while 16 streams are running, and clients that
go away. One app for the module, 2 Drafter and 2 Verifier replicas (tests/deployments/service/ops_app.py).

Must show: killing a Drafter replica loses no request and every greedy text is the plain AR
text; killing a Verifier replica gives each request its full correct text (resumed from its
token ids on the other replica) or a retriable error, within seconds, never a hang.

The replica killed is the one that answered the most calls since the streams started, once
every stream has its first tokens (an event, not a wait). A kill that hits no stream must not
pass, so each test also asserts that it hit some: the app's transport is `channel` with
affinity, so each request's draft and verify calls all go over a socket to ONE replica of each
pool; a stream still decoding on the killed replica fails its next call there and takes the
Router's own path (drafter -> AR fallback, verifier -> resume from the token ids), which the
Router counts (`ops_state`). The requests have `adaptive_k: false`, so every cycle drafts (no
plain-AR stretch can carry a stream past a dead drafter without a call to it), and are long
(MAX_TOKENS): many cycles after the kill. The same paths run deterministically in-process in
tests/deployments/test_router_faults.py.
"""

from __future__ import annotations

import select
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ops_app import delete, deploy, http, kill_replica, plain_ar, replica_actors, wait_replicas

pytestmark = [pytest.mark.service, pytest.mark.slow]

APP = "faults"
N_STREAMS = 16
MAX_TOKENS = 384  # long: the streams are far from their end when every one has its first tokens
WORDS = ["def", "for", "class", "import", "while", "print", "return", "if"]
PROMPTS = [f"{WORDS[i % 8]} x{i} in range({i}):\n" for i in range(N_STREAMS)]
DEADLINE_S = 120.0  # how long a test waits for a condition before it fails


@pytest.fixture(scope="module")
def app(service):
    # max_tokens up to 1024: the cancel test's requests must outlast its client's timeout
    # transport channel with affinity (the defaults, named: the kill tests count on them)
    a = deploy(service, APP, drafter={"num_replicas": 2}, verifier={"num_replicas": 2},
               service={"verifier_resume_window_s": 20.0, "transport": "channel",
                        "affinity": True}, limits={"max_tokens": 1024})
    try:
        yield a
    finally:
        delete(a)


@pytest.fixture(scope="module")
def reference(service):
    return plain_ar(service.target_path, PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="module")
def client(app):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=app.http + "/v1", api_key="unused", max_retries=0, timeout=180)


def stream_all(client, app, kill):
    """16 streamed completions at once; `kill()` runs once every stream has its first tokens.
    Returns (per prompt {text, ids, deer, error, t_end}, t_kill, the Router's ops_state just
    before the kill)."""
    started = threading.Barrier(N_STREAMS + 1, timeout=180)
    out = {}

    def one(prompt):
        text, ids, deer, error, first = "", [], None, None, True
        try:
            for chunk in client.completions.create(model=app.model, prompt=prompt,
                                                   max_tokens=MAX_TOKENS, temperature=0,
                                                   stream=True,
                                                   extra_body={"adaptive_k": False}):
                for ch in chunk.choices:
                    text += ch.text
                    ids += ch.token_ids
                deer = chunk.model_extra.get("deer") or deer
                if first:
                    first = False
                    started.wait()
        except Exception as e:  # noqa: BLE001 (judged by the caller)
            error = e
        finally:
            if first:
                started.abort()
        out[prompt] = {"text": text, "ids": ids, "deer": deer, "error": error,
                       "t_end": time.monotonic()}

    with ThreadPoolExecutor(N_STREAMS) as pool:
        futures = [pool.submit(one, p) for p in PROMPTS]
        started.wait()
        t_kill = time.monotonic()
        at_kill = app.handle("Router").ops_state.remote().result(timeout_s=30)
        kill()
        for f in futures:
            f.result(timeout=300)  # never hangs
    return out, t_kill, at_kill


def test_killing_a_drafter_replica_loses_no_stream_and_stays_lossless(app, client, reference):
    wait_replicas(APP, "Drafter", 2)  # (Serve replaces a killed replica; no test waits for it)
    killed = []
    state0 = app.handle("Router").ops_state.remote().result(timeout_s=30)
    out, _, at_kill = stream_all(client, app, lambda: killed.append(
        kill_replica(APP, "Drafter", busiest_since=state0)))
    for p in PROMPTS:
        r, ref = out[p], reference[p]
        assert r["error"] is None, (p, r["error"])
        assert r["ids"] == ref.token_ids and r["text"] == ref.text, p
    assert killed[0] not in replica_actors(APP, "Drafter")
    state = app.handle("Router").ops_state.remote().result(timeout_s=30)
    fell_back = sum(bool(out[p]["deer"] and out[p]["deer"]["fallback"]) for p in PROMPTS)
    print(f"drafter kill ({killed[0]}): {at_kill['active']} streams admitted "
          f"and unfinished just before it, {fell_back} finished by AR fallback, all {N_STREAMS} "
          "equal plain AR")
    # the kill hit streams: each one the dead replica was drafting for fell back to plain AR
    # at its next cycle (its channel broke), and the Router counted exactly those
    assert fell_back >= 1, "no stream was drafting on the killed replica when it died"
    assert state["fallbacks"] - state0["fallbacks"] == fell_back, (state0, state)


def test_killing_a_verifier_replica_gives_full_text_or_a_retriable_error(app, client, reference):
    import openai

    wait_replicas(APP, "Verifier", 2)
    state0 = app.handle("Router").ops_state.remote().result(timeout_s=30)
    killed = []
    out, _, at_kill = stream_all(client, app, lambda: killed.append(
        kill_replica(APP, "Verifier", busiest_since=state0)))
    full, retriable = 0, 0
    for p in PROMPTS:
        r, ref = out[p], reference[p]
        if r["error"] is None:
            assert r["ids"] == ref.token_ids and r["text"] == ref.text, p
            full += 1
        else:  # mid-stream: the last event is OpenAI's error object, code verifier_unavailable
            e = r["error"]
            assert isinstance(e, openai.APIError), repr(e)
            body = e.body if isinstance(e.body, dict) else {}
            assert body.get("code") == "verifier_unavailable" or \
                getattr(e, "status_code", None) == 503, repr(e)
            # (a hang would end in the client's own timeout: an APITimeoutError, no code)
            # what was streamed before the error is a prefix of the right answer
            assert ref.token_ids[:len(r["ids"])] == r["ids"]
            retriable += 1
    state = app.handle("Router").ops_state.remote().result(timeout_s=30)
    print(f"verifier kill ({killed[0]}): {at_kill['active']} streams "
          f"admitted and unfinished just before it; {full} full and correct, {retriable} "
          f"retriable errors; {state['resumed'] - state0['resumed']} resumes")
    assert full + retriable == N_STREAMS
    assert killed[0] not in replica_actors(APP, "Verifier")
    # recovery, not only clean errors: streams finished whole and exact after the kill, and
    # the kill hit streams: those the dead replica was verifying (their channel broke at their
    # next call) were resumed from their token ids
    assert full >= 1, "no stream finished after the kill"
    assert state["resumed"] - state0["resumed"] >= 1, \
        "no stream was verifying on the killed replica when it died"


def test_a_client_that_goes_away_cancels_its_decode(app):
    """HTTP stream closed, non-streamed request's connection closed while it decodes: each time
    the Router stops the decode loop (no more draft/verify calls; the engine releases both
    caches). (gRPC: Ray Serve 2.60's gRPC proxy does not pass a client's cancel of a server
    stream on to the replica; the decode then runs to its end.)"""
    import http.client as httpclient
    import json
    from urllib.parse import urlparse

    import requests

    router = app.handle("Router")

    def state() -> dict:
        return router.ops_state.remote().result(timeout_s=30)

    def wait_until(cond, what: str) -> dict:
        t_end = time.monotonic() + DEADLINE_S
        while not cond(st := state()):
            assert time.monotonic() < t_end, f"timed out waiting for {what}: {st}"
            time.sleep(0.05)
        return st

    before = wait_until(lambda st: st["active"] == 0, "an idle router")["cancelled"]
    # 1024 plain AR steps (the app's limit): seconds even over the fast `channel` transport
    body = {"prompt": PROMPTS[0], "max_tokens": 1024, "mode": "ar", "stream": True}
    with requests.post(app.http + "/v1/completions", json=body, stream=True, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    wait_until(lambda st: st["cancelled"] - before >= 1 and st["active"] == 0,
               "the closed stream's cancel")
    # non-streamed: the client closes its connection once the Router has admitted the request.
    # Its whole decode takes about 2 s here; on a loaded machine the polls that see it start
    # can take longer, and an attempt whose answer had already come before the close shows
    # nothing: it is tried again (at most 3 times). One that closed with no answer yet must
    # be counted as cancelled.
    u = urlparse(app.http)
    for _ in range(3):
        conn = httpclient.HTTPConnection(u.hostname, u.port, timeout=60)
        conn.request("POST", u.path + "/v1/completions", json.dumps({**body, "stream": False}),
                     {"Content-Type": "application/json"})
        wait_until(lambda st: st["active"] == 1, "the non-streamed request to start")
        answered = bool(select.select([conn.sock], [], [], 0)[0])  # any reply byte yet?
        conn.sock.shutdown(2)
        conn.close()
        if not answered:
            break
        wait_until(lambda st: st["active"] == 0, "the answered request to end")
    assert not answered, "each non-streamed request was answered before its client left"
    st = wait_until(lambda st: st["cancelled"] - before >= 2 and st["active"] == 0,
                    "the closed request's cancel")
    # no draft or verify call is made any more for them (the release calls are fire-and-forget
    # and routed like any call, so with 2 replicas a cache may wait for its LRU eviction)
    # (a call already in flight at the cancel still completes: wait for two equal snapshots)
    calls, t_end = st["replica_calls"], time.monotonic() + DEADLINE_S
    while True:
        time.sleep(2.0)
        later = state()["replica_calls"]
        if later == calls or time.monotonic() > t_end:
            break
        calls = later
    assert later == calls, "draft/verify calls went on after the clients left"
    status, _, _ = http("GET", app.http + "/healthz")
    assert status == 200
