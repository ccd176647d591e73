"""The deer-serve app started in this process for `deer-serve bench`'s service methods
(`deer-ray`, `deer-ray-nopipe`) when no --url is given.

The bench finds this class through the `deer_serve.bench_services` entry point `local`
(pyproject.toml; `deer_serve.plugins`), so the library never imports Ray or `deployments`;
the bench then drives the app over HTTP with `deer_serve.bench.service.ServiceClient`, as it
drives any running service.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Optional

from deer_serve.bench.service import ServiceClient, ServiceError

REPO_ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalService:
    """The deer-serve app, started in this process on a local Ray (`with LocalService(...)`).
    `engine_url` adds, on first ask, a second app beside it with `service.loop: engine` (the
    `deer-ray-engine` method), the same models and settings otherwise."""

    active: Optional["LocalService"] = None  # the one entered in this process

    def __init__(self, target_path: str, drafter_path: str, block_size: int,
                 startup_timeout_s: float = 300.0, extra_args: Optional[dict] = None):
        self.args = {"target_path": str(target_path), "drafter_path": str(drafter_path),
                     "block_size": int(block_size), "device": "cpu", **(extra_args or {})}
        self.startup_timeout_s = startup_timeout_s
        self.url: Optional[str] = None
        self._engine_url: Optional[str] = None
        self._started_ray = False

    @classmethod
    def engine_url_for(cls, url: str) -> str:
        """The URL of the `loop: engine` app beside the local service at `url` (started now
        if needed); a service this process did not start is taken as it is."""
        s = cls.active
        if s is None or s.url is None or url.rstrip("/") != s.url:
            return url
        return s.engine_url()

    def engine_url(self) -> str:
        from ray import serve

        from deployments.app import build_app

        if self._engine_url is None:
            assert self.url is not None, "the local service is not started"
            svc = dict(self.args.get("service") or {})
            svc["loop"] = "engine"
            # its idle Drafter deployment (health and metadata only) reserves little
            args = {**self.args, "service": svc,
                    "drafter": {"ray_actor_options": {"num_cpus": 0.1}}}
            serve.run(build_app(args), name="deer-bench-engine", route_prefix="/engine")
            self._engine_url = self.url + "/engine"
            client, t0 = ServiceClient(self._engine_url), time.time()
            while not client.healthy():
                if time.time() - t0 > self.startup_timeout_s:
                    raise ServiceError("the loop: engine app did not become healthy in "
                                       f"{self.startup_timeout_s:.0f} s")
                time.sleep(0.5)
        return self._engine_url

    def __enter__(self) -> LocalService:
        try:
            import ray
            from ray import serve
        except ImportError as e:
            raise ServiceError("service methods need ray[serve] (pip install 'deer-serve[serve]')") from e

        from deployments.app import build_app

        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            # a loaded 2-core machine starts Ray's agents slowly; the default wait kills the raylet
            os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
            # replicas import `deployments` from this checkout even when it is not pip-installed
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
        LocalService.active = self
        return self

    def __exit__(self, *exc):
        if LocalService.active is self:
            LocalService.active = None
        try:
            from ray import serve

            serve.shutdown()
        finally:
            if self._started_ray:
                import ray

                ray.shutdown()
