"""`transport: channel`: a request's per-cycle calls over a direct socket to one replica.

A Serve handle call costs about 7 ms here (the caller's router, the replica's queue, gRPC), as
much as a forward of the small models, and the decode loop makes one or two of them per
cycle. With this transport a request makes ONE Serve call per replica pool, `channel()`, which
Serve routes as any call (power of two choices or, with affinity, the request's consistent
hash) and which answers with that replica's channel address; every later call of the request
(draft, score, release) goes over a socket to that replica: a pickled (method, args) frame and
a pickled reply, a fraction of a millisecond. The replica serves each connection in a thread of
its own and calls the same methods Serve would call, so concurrent requests still meet in the
replica's `CombiningBatcher` (one ragged forward).

The listener binds the node's IP (the cluster's network, as Ray's own ports) and every
connection must pass `multiprocessing.connection`'s HMAC challenge with the replica's random key,
which only a caller that went through Serve has. What this gives up: Serve does not see these
calls, so they do not count towards the replica's ongoing requests (its autoscaling signal for
the Drafter); the request's `channel()` call and the Verifier's `decode` stream still do.

`ChannelHandle` mimics the part of a Serve `DeploymentHandle` the decode loop uses
(`h.method.remote(...)` -> a response with `.result(timeout_s)` and `.cancel()`, `h.options`),
so `RemoteDrafter` and `RemoteTarget` run over it unchanged. A broken or timed-out channel
raises, which they turn into DrafterUnavailable (AR fallback) or VerifierUnavailable (resume).
"""

from __future__ import annotations

import os
import socket
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import Any, Iterable, Optional


def node_ip() -> str:
    """The address other nodes reach this process at (Ray's node IP; loopback without Ray)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - no Ray: a single machine
        pass
    return "127.0.0.1"


def _recv_timeout(s: socket.socket, seconds: float) -> None:
    """SO_RCVTIMEO on a blocking socket (0 = none): unlike settimeout, it survives `detach`."""
    import struct

    sec = int(seconds)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                 struct.pack("ll", sec, int((seconds - sec) * 1e6)))


class ChannelServer:
    """Serves `methods` of `obj` over authenticated socket connections, one thread each."""

    def __init__(self, obj: Any, methods: Iterable[str], host: Optional[str] = None):
        self.obj, self.methods = obj, frozenset(methods)
        self.key = os.urandom(32)
        self.host = host or node_ip()
        self._sock = socket.create_server((self.host, 0))
        self.port = self._sock.getsockname()[1]
        self.connections = 0          # accepted and authenticated
        self.calls = 0
        self._closed = False
        self._live: set = set()
        threading.Thread(target=self._accept, name="deer-channel-accept", daemon=True).start()

    def address(self) -> dict:
        return {"host": self.host, "port": self.port, "key": self.key.hex()}

    def close(self) -> None:
        """Stop listening and drop every connection (their callers get ChannelError)."""
        self._closed = True
        for c in [self._sock] + list(self._live):
            try:
                if isinstance(c, socket.socket):  # the listener: wakes accept(), then closes
                    try:
                        c.shutdown(socket.SHUT_RDWR)
                    finally:
                        c.close()
                else:
                    with _on_dup(c.fileno()) as d:
                        d.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._closed:
            try:
                s, _ = self._sock.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._serve, args=(s,), name="deer-channel", daemon=True).start()

    def _serve(self, s: socket.socket) -> None:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(True)
        _recv_timeout(s, 10.0)  # a peer that stalls the handshake is dropped
        conn = Connection(s.detach())
        try:
            deliver_challenge(conn, self.key)
            answer_challenge(conn, self.key)
            with _on_dup(conn.fileno()) as d:
                _recv_timeout(d, 0.0)  # then: blocking
        except Exception:  # noqa: BLE001 - a stranger or a dead peer: drop it
            conn.close()
            return
        self.connections += 1
        self._live.add(conn)
        try:
            while True:
                try:
                    call_id, method, args, kwargs = conn.recv()
                except (EOFError, OSError):
                    return  # the caller closed its end: the request is over
                if method not in self.methods:
                    reply = (call_id, False, f"no method {method!r} on this channel")
                else:
                    try:
                        reply = (call_id, True, getattr(self.obj, method)(*args, **kwargs))
                    except Exception as e:  # noqa: BLE001 - the caller gets it
                        reply = (call_id, False, f"{type(e).__name__}: {e}")
                self.calls += 1
                if call_id is not None:  # None: a one-way call (release)
                    try:
                        conn.send(reply)
                    except OSError:  # the caller went away (closed, reset): the request is over
                        return
        finally:
            self._live.discard(conn)
            conn.close()


_OPEN_LOCK = threading.Lock()


def open_channel(replica, methods: Iterable[str]) -> dict:
    """The address of `replica`'s ChannelServer (started on the first ask) for `methods`."""
    with _OPEN_LOCK:
        if getattr(replica, "_channel", None) is None:
            replica._channel = ChannelServer(replica, methods)
    return replica._channel.address()


def _on_dup(fd: int) -> socket.socket:
    """A socket object over a duplicate of `fd` (to set options on or shut down a socket that a
    Connection owns); close it (`with`) when done: the socket itself stays open."""
    return socket.socket(fileno=os.dup(fd))


class ChannelError(RuntimeError):
    """The channel failed (connection lost, timeout) or the remote method raised."""


class _Response:
    """One call's reply, as a Serve DeploymentResponse: `.result(timeout_s)`, `.cancel()`."""

    def __init__(self, client: "ChannelClient", call_id: Optional[int]):
        self.client, self.call_id = client, call_id  # call_id None: one-way, no reply comes

    def result(self, timeout_s: Optional[float] = None):
        if self.call_id is None:
            return None
        return self.client.wait(self.call_id, timeout_s)

    def cancel(self) -> None:
        if self.call_id is not None:
            self.client.discard(self.call_id)  # the remote call runs on; its reply is dropped


class ChannelClient:
    """One connection; calls are answered in order, so a reply is read when asked for (the
    replies before it are kept for their callers, or dropped if cancelled)."""

    def __init__(self, address: dict, connect_timeout_s: float = 10.0):
        s = socket.create_connection((address["host"], int(address["port"])),
                                     timeout=connect_timeout_s)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(True)  # Connection reads the raw fd
        key = bytes.fromhex(address["key"])
        self.conn = Connection(s.detach())
        answer_challenge(self.conn, key)
        deliver_challenge(self.conn, key)
        self._lock = threading.RLock()
        self._next = 0
        self._replies: dict[int, tuple] = {}
        self._dropped: set[int] = set()
        self._outstanding: list[int] = []
        self.broken: Optional[str] = None

    def call(self, method: str, args: tuple, kwargs: dict, oneway: bool = False) -> _Response:
        with self._lock:
            if self.broken:
                raise ChannelError(f"channel broken: {self.broken}")
            call_id = None if oneway else self._next
            self._next += 1
            try:
                self.conn.send((call_id, method, args, kwargs))
            except Exception as e:  # noqa: BLE001
                self._break(repr(e))
                raise ChannelError(f"channel send failed: {e!r}") from e
            if call_id is not None:
                self._outstanding.append(call_id)
            return _Response(self, call_id)

    def wait(self, call_id: int, timeout_s: Optional[float]):
        with self._lock:
            while call_id not in self._replies:
                if self.broken:
                    raise ChannelError(f"channel broken: {self.broken}")
                try:
                    if not self.conn.poll(timeout_s):
                        self._break("timed out")  # the reply order is lost: no reuse
                        raise TimeoutError(f"no reply in {timeout_s} s")
                    rid, ok, val = self.conn.recv()
                except TimeoutError:
                    raise
                except Exception as e:  # noqa: BLE001 - EOF, reset: the replica is gone
                    self._break(repr(e))
                    raise ChannelError(f"channel lost: {e!r}") from e
                if rid in self._outstanding:
                    self._outstanding.remove(rid)
                if rid in self._dropped:
                    self._dropped.discard(rid)
                else:
                    self._replies[rid] = (ok, val)
            ok, val = self._replies.pop(call_id)
        if not ok:
            raise ChannelError(val)
        return val

    def discard(self, call_id: int) -> None:
        with self._lock:
            if self._replies.pop(call_id, None) is None and call_id in self._outstanding:
                self._dropped.add(call_id)

    def _break(self, why: str) -> None:
        self.broken = why
        try:
            self.conn.close()
        except OSError:
            pass

    def close(self) -> None:
        with self._lock:
            if not self.broken:
                self._break("closed")


class _Method:
    def __init__(self, owner: "HandleShape", name: str):
        self.owner, self.name = owner, name

    def remote(self, *args, **kwargs):
        return self.owner._client().call(self.name, args, kwargs,
                                          oneway=self.name in self.owner.oneway)


class HandleShape:
    """The part of a Serve handle the decode loop uses: `h.method.remote(...)` is
    `self._client().call(method, args, kwargs, oneway)`, whose response has `.result(timeout_s)`
    and `.cancel()`; release is one-way."""

    oneway = frozenset({"release"})

    def _client(self):
        raise NotImplementedError

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(self, name)


class ChannelHandle(HandleShape):
    """A Serve handle's decode-loop subset over a channel to the replica that `handle`'s
    `channel()` call reaches (connected on first use; `close()` when the request ends)."""

    def __init__(self, handle, timeout_s: float = 30.0):
        self.handle, self.timeout_s = handle, timeout_s
        self._conn: Optional[ChannelClient] = None
        self._lock = threading.Lock()

    def _client(self) -> ChannelClient:
        """The open channel; a broken one (a dead replica, a timeout) is replaced by a new one
        through Serve, which routes it to a live replica (as a resumed request's next call)."""
        with self._lock:
            if self._conn is not None and self._conn.broken:
                self._conn = None
            if self._conn is None:
                try:
                    addr = self.handle.channel.remote().result(timeout_s=self.timeout_s)
                    self._conn = ChannelClient(addr)
                except Exception as e:  # noqa: BLE001 - as a failed call of the handle
                    raise ChannelError(f"opening the channel failed: {e!r}") from e
            return self._conn

    def options(self, **kw):
        """Streams and other Serve-only calls go through Serve (the same session)."""
        return self.handle.options(**kw)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class LocalHandle(HandleShape):
    """The decode loop's subset of a Serve handle over an object in this process (`loop:
    colocated`): `h.method.remote(...)` runs the method in a thread of `pool` and returns a
    response with `.result(timeout_s)` and `.cancel()`, so `RemoteDrafter` runs over it
    unchanged and a pipelined pre-draft still overlaps the verify. One-way calls (release)
    run at once."""

    def __init__(self, obj, pool):
        self.obj, self.pool = obj, pool

    def _client(self) -> "LocalHandle":
        return self

    def call(self, method: str, args: tuple, kwargs: dict, oneway: bool = False):
        fn = getattr(self.obj, method)
        if oneway:
            fn(*args, **kwargs)
            return _LocalResponse(None)
        return _LocalResponse(self.pool.submit(fn, *args, **kwargs))

    def options(self, **kw) -> "LocalHandle":
        return self


class _LocalResponse:
    def __init__(self, fut):
        self.fut = fut

    def result(self, timeout_s: Optional[float] = None):
        if self.fut is None:
            return None
        try:
            return self.fut.result(timeout_s)
        except FutureTimeout:
            raise TimeoutError(f"no result in {timeout_s} s") from None

    def cancel(self) -> None:
        if self.fut is not None:
            self.fut.cancel()  # a call that already runs finishes; its result is dropped
