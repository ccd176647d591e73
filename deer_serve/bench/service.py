"""Service methods of the bench (`deer-ray`, `deer-ray-nopipe`): an HTTP client for a running
deer-serve app, and a helper that starts one in this process (Ray + `deployments.app:build_app`).

The service is driven through its OpenAI-compatible HTTP API, as a user would: POST
/v1/completions with the prompt as token ids (so every method sees the same ids) and the
extension fields `mode`, `block_size` and `pipeline` (false = pipelining off for this request).
The response's `choices[0].token_ids` are the new tokens; its `deer` object gives
`accept_lengths` and `cycles`, and, when the service reports them, `pipeline_hits` /
`pipeline_misses` and a per-cycle `timings` dict (seconds: draft, verify, transport, waiting).
A service that ignores `pipeline` (no pipeline counters in its answer) is reported as such.

Ray is imported only here, and only when a service method runs.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import urlparse

from deer_serve.bench.methods import Sample, cut_at_eos
from deer_serve.types import SamplingParams

REPO_ROOT = Path(__file__).resolve().parents[2]


class ServiceError(RuntimeError):
    pass


class ServiceClient:
    """A minimal keep-alive HTTP client (one connection per thread; stdlib only)."""

    def __init__(self, url: str, timeout_s: float = 600.0):
        u = urlparse(url if "://" in url else f"http://{url}")
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"--url must be http://HOST:PORT, got {url!r}")
        self.host, self.port, self.timeout_s = u.hostname, u.port or 80, timeout_s
        self.prefix = u.path.rstrip("/")
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = self._local.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        return c

    def request(self, method: str, path: str, body: Optional[dict] = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        for attempt in (0, 1):  # a kept-alive connection the server closed: reconnect once
            c = self._conn()
            try:
                c.request(method, self.prefix + path, body=data, headers=headers)
                r = c.getresponse()
                raw = r.read()
                break
            except (http.client.HTTPException, ConnectionError, socket.timeout, OSError):
                c.close()
                self._local.conn = None
                if attempt:
                    raise
        try:
            return r.status, json.loads(raw or b"{}")
        except json.JSONDecodeError:
            return r.status, {"raw": raw[:500].decode(errors="replace")}

    def healthy(self) -> bool:
        try:
            return self.request("GET", "/healthz")[0] == 200
        except OSError:
            return False

    def complete(self, prompt_ids: Sequence[int], sampling: SamplingParams, block_size: int,
                 pipeline: bool) -> dict:
        body = {"prompt": [int(t) for t in prompt_ids], "max_tokens": sampling.max_new_tokens,
                "temperature": sampling.temperature, "top_p": sampling.top_p,
                "top_k": sampling.top_k, "seed": sampling.seed, "block_size": block_size,
                "mode": "deer", "pipeline": pipeline}
        status, out = self.request("POST", "/v1/completions", {k: v for k, v in body.items()
                                                               if v is not None})
        if status != 200:
            raise ServiceError(f"POST /v1/completions -> {status}: {json.dumps(out)[:300]}")
        return out


class ServiceMethod:
    """`deer-ray` (pipeline as the service has it) or `deer-ray-nopipe` (pipeline off)."""

    def __init__(self, name: str, client: ServiceClient, block_size: int, eos: Optional[int]):
        self.name, self.client, self.block_size, self.eos = name, client, block_size, eos
        self.pipeline = name != "deer-ray-nopipe"

    def run(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> Sample:
        t0 = time.perf_counter()
        out = self.client.complete(prompt_ids, sampling, self.block_size, self.pipeline)
        wall = time.perf_counter() - t0
        return sample_of(out, wall, self.eos)


def sample_of(resp: dict, wall: float, eos: Optional[int]) -> Sample:
    ids = resp["choices"][0].get("token_ids") or []
    d = resp.get("deer") or {}
    extra = {}
    for key in ("pipeline_hits", "pipeline_misses", "fallback"):
        if d.get(key) is not None:  # null: the request did not pipeline
            extra[key] = d[key]
    timings = {k: float(v) for k, v in (d.get("timings") or {}).items()
               if isinstance(v, (int, float))}
    cycles = int(d.get("cycles") or 0)
    return Sample(token_ids=cut_at_eos(ids, eos), wall_s=wall,
                  accept_lengths=list(d.get("accept_lengths") or []), timings=timings,
                  cycles=cycles, target_forwards=cycles + 1, extra=extra)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalService:
    """The deer-serve app, started in this process on a local Ray (`with LocalService(...)`)."""

    def __init__(self, target_path: str, drafter_path: str, block_size: int,
                 startup_timeout_s: float = 300.0, extra_args: Optional[dict] = None):
        self.args = {"target_path": str(target_path), "drafter_path": str(drafter_path),
                     "block_size": int(block_size), "device": "cpu", **(extra_args or {})}
        self.startup_timeout_s = startup_timeout_s
        self.url: Optional[str] = None
        self._started_ray = False

    def __enter__(self) -> "LocalService":
        if not (REPO_ROOT / "deployments" / "app.py").is_file():
            raise ServiceError("service methods need deployments/ (deployments/app.py with "
                               "build_app), or --url of a running deer-serve service")
        try:
            import ray
            from ray import serve
        except ImportError as e:
            raise ServiceError("service methods need ray[serve] (pip install 'deer-serve[serve]')") from e
        import sys

        if str(REPO_ROOT) not in sys.path:
            sys.path.insert(0, str(REPO_ROOT))
        from deployments.app import build_app

        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            # a loaded 2-core machine starts Ray's agents slowly; the default wait kills the raylet
            os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
            pp = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
            for attempt in range(3):  # and Ray's node start-up wait (30 s) is not configurable
                try:
                    # address="local": a fresh instance, never someone else's cluster (we shut
                    # it down); logical CPUs, not cores: the app reserves one per replica.
                    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1),
                             include_dashboard=False, log_to_driver=False,
                             object_store_memory=256 << 20,
                             runtime_env={"env_vars": {"PYTHONPATH": pp, "OMP_NUM_THREADS": "1"}})
                    break
                except Exception:
                    ray.shutdown()
                    if attempt == 2:
                        raise
            self._started_ray = True
        try:
            port = _free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(self.args), name="deer-bench", route_prefix="/")
            self.url = f"http://127.0.0.1:{port}"
            client, t0 = ServiceClient(self.url), time.time()
            while not client.healthy():
                if time.time() - t0 > self.startup_timeout_s:
                    raise ServiceError(f"the local service did not become healthy in "
                                       f"{self.startup_timeout_s:.0f} s")
                time.sleep(0.5)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        try:
            from ray import serve

            serve.shutdown()
        finally:
            if self._started_ray:
                import ray

                ray.shutdown()


class UnavailableMethod:
    """A service method whose service could not be reached or started: every run says why."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason, self.block_size = name, reason, None

    def run(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> Sample:
        raise ServiceError(self.reason)
