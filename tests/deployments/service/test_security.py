"""API keys (HTTP bearer, gRPC metadata), request limits and backpressure on a live app.

The app requires a key and admits 2 requests at a time (one decode thread), so that overload
is easy to reach: a third concurrent request gets 429 + Retry-After (gRPC RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from deer_serve.protos import deer_pb2, deer_pb2_grpc
from deployments.security import ApiKeys, bearer, grpc_key
from ops_app import delete, deploy, http

pytestmark = pytest.mark.service

APP = "secure"
KEY = "sk-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
DEADLINE_S = 120.0  # how long a test waits for a condition before it fails


@pytest.fixture(scope="module")
def app(service):
    a = deploy(service, APP, own_models=False, max_concurrent_decodes=1,
               limits={"max_tokens": 400, "max_body_bytes": 4096, "max_prompt_tokens": 50,
                       "max_stop_chars": 16, "max_messages": 4},
               service={"api_keys": [KEY, "another-key"], "max_pending_requests": 2,
                        "retry_after_s": 2})
    try:
        yield a
    finally:
        delete(a)


def check_error(status, body, want, code=None):
    assert status == want, body
    assert set(body) == {"error"} and body["error"]["message"]
    if code:
        assert body["error"]["code"] == code, body


def test_http_api_keys(app):
    url = app.http + "/v1/completions"
    req = {"prompt": "def f(x):\n", "max_tokens": 3}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                    {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer "}):
        status, body, h = http("POST", url, req, headers=headers)
        check_error(status, body, 401, "invalid_api_key")
        assert h.get("www-authenticate") == "Bearer"
    status, body, _ = http("GET", app.http + "/v1/models")
    check_error(status, body, 401)
    status, body, _ = http("POST", url, req, headers=AUTH)
    assert status == 200 and body["choices"][0]["token_ids"]
    status, _, _ = http("POST", url, req, headers={"x-api-key": "another-key"})
    assert status == 200
    status, body, _ = http("GET", app.http + "/v1/models", headers=AUTH)
    assert status == 200 and body["data"]
    status, _, _ = http("GET", app.http + "/healthz")  # health checks need no key
    assert status == 200
    openai = pytest.importorskip("openai")
    good = openai.OpenAI(base_url=app.http + "/v1", api_key=KEY, max_retries=0, timeout=120)
    assert good.completions.create(model=app.model, prompt="x", max_tokens=2).choices
    bad = openai.OpenAI(base_url=app.http + "/v1", api_key="nope", max_retries=0, timeout=120)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=app.model, prompt="x", max_tokens=2)


def test_grpc_api_keys(app):
    req = deer_pb2.GenerateRequest(prompt="def f(x):\n", max_tokens=3)
    with grpc.insecure_channel(app.grpc) as ch:
        stub = deer_pb2_grpc.DeerServiceStub(ch)
        for md in ((), (("authorization", "Bearer wrong"),), (("x-api-key", "nope"),)):
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(req, metadata=app.metadata + md, timeout=60)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as e:
                list(stub.GenerateStream(req, metadata=app.metadata + md, timeout=60))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        r = stub.Generate(req, metadata=app.metadata + (("authorization", f"Bearer {KEY}"),),
                          timeout=60)
        assert r.token_ids
        r = list(stub.GenerateStream(req, metadata=app.metadata + (("x-api-key", KEY),),
                                     timeout=60))
        assert r[-1].finish_reason


def test_limits(app):
    url = app.http + "/v1/completions"
    cases = [({"prompt": "x", "stop": ["a"] * 5}, 400),
             ({"prompt": "x", "stop": "s" * 17}, 400),
             ({"prompt": "x", "max_tokens": 401}, 400),
             ({"prompt": list(range(2, 60))}, 400),                      # 58 tokens > 50
             ({"prompt": "x", "temperature": 1e-9}, 400),
             ({"prompt": "x" * 5000}, 413)]                              # body > 4096 bytes
    for body, want in cases:
        status, err, _ = http("POST", url, body, headers=AUTH)
        check_error(status, err, want)
    status, err, _ = http("POST", app.http + "/v1/chat/completions",
                          {"messages": [{"role": "user", "content": "hi"}] * 5}, headers=AUTH)
    check_error(status, err, 400)
    with grpc.insecure_channel(app.grpc) as ch:
        stub = deer_pb2_grpc.DeerServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(deer_pb2.GenerateRequest(prompt="x" * 5000), timeout=60,
                          metadata=app.metadata + (("x-api-key", KEY),))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_overload_gets_429_with_retry_after_not_a_timeout(app):
    """Two long requests hold both admission slots; the next ones are refused at once."""
    import requests

    body = {"prompt": "def f(x):\n", "max_tokens": 400, "mode": "ar", "stream": True}
    streams, stop = [], threading.Event()

    def hold():
        with requests.post(app.http + "/v1/completions", json=body, headers=AUTH, stream=True,
                           timeout=120) as r:
            streams.append(r.status_code)
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    router = app.handle("Router")

    def state() -> dict:
        return router.ops_state.remote().result(timeout_s=30)
    t_end = time.monotonic() + DEADLINE_S
    while (st := state())["active"] < 2:
        assert time.monotonic() < t_end, "the two holding requests never started"
        time.sleep(0.1)
    try:
        rejected = st["rejected"]
        status, err, headers = http("POST", app.http + "/v1/completions",
                                    {"prompt": "x", "max_tokens": 2}, headers=AUTH)
        check_error(status, err, 429, "overloaded")
        assert {k.lower(): v for k, v in headers.items()}["retry-after"] == "2"
        # refused by admission at once (its counter moved), not queued until a timeout
        assert state()["rejected"] == rejected + 1
        with grpc.insecure_channel(app.grpc) as ch:
            stub = deer_pb2_grpc.DeerServiceStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(deer_pb2.GenerateRequest(prompt="x", max_tokens=2), timeout=60,
                              metadata=app.metadata + (("x-api-key", KEY),))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert dict(e.value.trailing_metadata() or ()).get("retry-after") == "2"
            assert state()["rejected"] == rejected + 2
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=DEADLINE_S)
            assert not t.is_alive(), "a holding request never ended"
    assert streams == [200, 200]
    t_end = time.monotonic() + DEADLINE_S
    while state()["active"]:
        assert time.monotonic() < t_end
        time.sleep(0.2)
    status, _, _ = http("POST", app.http + "/v1/completions", {"prompt": "x", "max_tokens": 2},
                        headers=AUTH)
    assert status == 200


def test_api_keys_unit(monkeypatch):
    monkeypatch.setenv("DEER_TEST_KEYS", "k2, k3")
    keys = ApiKeys(["k1"], env="DEER_TEST_KEYS")
    assert keys.required
    assert all(keys.check(k) for k in ("k1", "k2", "k3"))
    assert not any(keys.check(k) for k in (None, "", "k", "k1 ", "K1"))
    assert ApiKeys([], env="DEER_NO_SUCH_VAR").check(None)
    assert bearer("Bearer abc") == "abc" and bearer("bearer  abc ") == "abc"
    assert bearer("Basic abc") is None and bearer(None) is None
    assert grpc_key([("Authorization", "Bearer z")]) == "z"
    assert grpc_key([("x-api-key", "y")]) == "y" and grpc_key(None) is None
