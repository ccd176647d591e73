"""`transport: channel` (deployments.channel) in-process: real sockets, real Drafter and Verifier
classes with tiny models; the Router's `channel()` call goes through `LocalHandle` (Serve's call
shape), everything after it over the socket. The service tests run it on a real Ray."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

pytest.importorskip("pydantic")
pytest.importorskip("fastapi")

from test_router import (  # noqa: E402,F401  (fixtures)
    PROMPT, LocalHandle, complete, drafters, make_router, reference, stream, verifier)

from deer_serve.types import SamplingParams  # noqa: E402
from deployments.channel import ChannelClient, ChannelError, ChannelHandle, ChannelServer  # noqa: E402
from deployments.clients import DrafterUnavailable, RemoteDrafter  # noqa: E402


class Echo:
    def __init__(self):
        self.seen = []

    def add(self, a, b):
        return a + b

    def boom(self):
        raise ValueError("bad input")

    def note(self, x):
        self.seen.append(x)

    def secret(self):
        return "never over the channel"


@pytest.fixture()
def echo():
    obj = Echo()
    server = ChannelServer(obj, ("add", "boom", "note"), host="127.0.0.1")
    yield obj, server
    server.close()


def test_calls_replies_errors_and_order(echo):
    obj, server = echo
    c = ChannelClient(server.address())
    assert c.call("add", (2, 3), {}).result(5) == 5
    a, b = c.call("add", ([1],), {"b": [2]}), c.call("add", ("x", "y"), {})
    assert b.result(5) == "xy" and a.result(5) == [1, 2]  # read out of order: kept for a
    with pytest.raises(ChannelError, match="ValueError: bad input"):
        c.call("boom", (), {}).result(5)
    with pytest.raises(ChannelError, match="no method 'secret'"):
        c.call("secret", (), {}).result(5)
    dropped = c.call("add", (1, 1), {})
    dropped.cancel()                                  # its reply is read and dropped
    assert c.call("add", (4, 4), {}).result(5) == 8
    c.call("note", ("one-way",), {}, oneway=True)     # no reply comes back for it
    assert c.call("add", (0, 1), {}).result(5) == 1 and obj.seen == ["one-way"]
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(c.call("add", (arr, arr), {}).result(5), 2 * arr)
    assert server.connections == 1 and server.calls == 10
    c.close()


def test_a_wrong_key_gets_no_connection(echo):
    from multiprocessing import AuthenticationError

    _, server = echo
    addr = dict(server.address(), key=bytes(32).hex())
    with pytest.raises(AuthenticationError):
        ChannelClient(addr)
    assert server.connections == 0
    assert ChannelClient(server.address()).call("add", (1, 2), {}).result(5) == 3


def test_a_dead_replica_is_an_error_not_a_hang(echo):
    _, server = echo
    c = ChannelClient(server.address())
    assert c.call("add", (1, 2), {}).result(5) == 3
    server.close()  # as the replica process dying: its sockets close
    with pytest.raises(ChannelError):
        c.call("add", (1, 2), {}).result(5)
    with pytest.raises(OSError):  # and nobody listens any more
        socket.create_connection((server.host, server.port), timeout=2)


def test_a_timeout_breaks_the_channel(echo):
    import threading

    obj, server = echo
    gate = threading.Event()
    obj.add = lambda a, b: (gate.wait(10), a + b)[1]  # a replica stuck in a call
    c = ChannelClient(server.address())
    with pytest.raises(TimeoutError):
        c.call("add", (1, 2), {}).result(0.2)
    gate.set()
    with pytest.raises(ChannelError, match="timed out"):  # reply order lost: no reuse
        c.call("add", (1, 2), {}).result(5)


def test_remote_drafter_over_a_channel_matches_the_serve_path(drafters):
    d = drafters["target-features"]
    h = ChannelHandle(LocalHandle(d))
    meta = h.meta.remote().result(timeout_s=5)
    over_channel = RemoteDrafter(h, meta, 30.0)
    over_serve = RemoteDrafter(LocalHandle(d), d.meta(), 30.0)
    rng = np.random.default_rng(0)
    ctx = rng.integers(3, 200, size=9).tolist()
    F = d.backend.model.config.target_feature_dim
    hidden = torch.from_numpy(rng.standard_normal((9, F)).astype(np.float32))
    greedy = SamplingParams(max_new_tokens=8)
    a = over_channel.draft("ch-1", ctx, 5, 4, greedy, context_hidden=hidden)
    b = over_serve.draft("sv-1", ctx, 5, 4, greedy, context_hidden=hidden)
    assert a.tokens.tolist() == b.tokens.tolist() and a.conf.tolist() == b.conf.tolist()
    d._channel.close()
    h.close()
    d._channel = None  # the next channel() opens a new server
    dead = ChannelHandle(LocalHandle(d))
    meta = dead.meta.remote().result(timeout_s=5)
    r = RemoteDrafter(dead, meta, 30.0)
    d._channel.close()  # the replica is gone (its server and connections)
    with pytest.raises(DrafterUnavailable):
        r.draft("ch-2", ctx, 5, 4, greedy, context_hidden=hidden)
    d._channel = None


@pytest.mark.parametrize("loop_opts", [{}, {"pipeline": True}, {"adaptive_k": False}])
def test_greedy_deer_over_channels_is_plain_ar(tiny_checkpoints, drafters, verifier, reference,
                                               loop_opts):
    router = make_router(tiny_checkpoints, drafters["target-features"], verifier,
                         transport="channel", **loop_opts)
    ref = reference(PROMPT, 24)
    o, text = complete(router, {"prompt": PROMPT, "max_tokens": 24})
    assert o.token_ids == ref.token_ids and text == ref.text and not o.fallback
    assert len(o.accept_lengths) >= 1
    parts = stream(router, {"prompt": PROMPT, "max_tokens": 24})
    assert [i for _, ids, _ in parts for i in ids] == o.token_ids
    seeded = [complete(router, {"prompt": PROMPT, "max_tokens": 12, "temperature": 0.8,
                                "seed": 5})[0].token_ids for _ in range(2)]
    assert seeded[0] == seeded[1]
    # one channel per pool and request, each closed when its request ended
    for obj in (drafters["target-features"], verifier):
        assert obj._channel.connections >= 4 and obj._channel.calls > obj._channel.connections


def test_channel_is_the_default_transport_and_keeps_the_session(tiny_checkpoints, drafters,
                                                                verifier):
    from deployments.router import Router, RouterSettings

    settings = RouterSettings(served_model_name="target", block_size=4,
                              tokenizer_path=str(tiny_checkpoints["target"]))
    assert settings.transport == "channel"
    router = Router(LocalHandle(drafters["tokens"]), LocalHandle(verifier), settings.model_dump())
    h = router.call_handle(LocalHandle(verifier), "req-1")
    assert isinstance(h, ChannelHandle)
    # the one Serve call (channel()) goes by value, routed by the request's hash
    assert h.handle.last_options == {"_by_reference": False, "session_id": "req-1"}


def test_a_broken_channel_is_reopened_through_serve(echo):
    """A replica that died: the next call asks Serve again (which routes to a live replica)."""
    obj, first = echo

    class Replica:
        def __init__(self):
            self.server, self.asked = first, 0

        def channel(self):
            self.asked += 1
            return self.server.address()

    rep = Replica()
    h = ChannelHandle(LocalHandle(rep))
    assert h.add.remote(1, 2).result(5) == 3 and rep.asked == 1
    first.close()
    with pytest.raises(ChannelError):
        h.add.remote(1, 2).result(5)
    rep.server = ChannelServer(obj, ("add",), host="127.0.0.1")  # the replacement replica
    try:
        assert h.add.remote(2, 2).result(5) == 4 and rep.asked == 2
    finally:
        rep.server.close()
