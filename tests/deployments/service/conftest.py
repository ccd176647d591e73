"""ONE real local Ray cluster and Serve app for every service test (started once per session).

The node declares 2 GPUs (Ray lets a CPU-only node do that); the Drafter and Verifier each ask
for one, so the test of GPU placement sees what a GPU cluster would. The models stay on the
CPU (`device: cpu`): tiny random ones, the target-features drafter mode.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
APP = "deer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    http: str            # base URL, e.g. http://127.0.0.1:PORT
    grpc: str            # host:port
    model: str           # served model name
    target_path: str
    config: dict


def start_ray(ray, attempts: int = 3, **kw) -> None:
    """ray.init, retried: on a machine this loaded Ray's agents can start slower than the
    raylet waits for them (15 s, not configurable in Ray 2.60), and the raylet aborts."""
    for i in range(attempts):
        try:
            ray.init(**kw)
            return
        except Exception:
            ray.shutdown()
            if i == attempts - 1:
                raise


@pytest.fixture(scope="session")
def service(tiny_checkpoints):
    ray = pytest.importorskip("ray")
    from ray import serve
    from ray.serve.config import gRPCOptions

    from deployments.app import build_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # a loaded 2-core machine starts Ray's agents slowly; the default wait (~15 s) kills the raylet
    os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
    http_port, grpc_port = free_port(), free_port()
    # replicas import `deployments` and `deer_serve` from this checkout, installed or not
    pythonpath = os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]]
                                                if os.environ.get("PYTHONPATH") else []))
    start_ray(ray, address="local", num_cpus=4, num_gpus=2, include_dashboard=False,
              object_store_memory=256 << 20, log_to_driver=False,
              runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                    grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[
                        "deer_serve.protos.deer_pb2_grpc.add_DeerServiceServicer_to_server",
                        "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"]))
        gpu = {"num_cpus": 1, "num_gpus": 1}
        config = {
            "target_path": str(tiny_checkpoints["target"]),
            "drafter_path": str(tiny_checkpoints["drafter-target-features"]),
            "device": "cpu", "block_size": 4, "limits": {"max_tokens": 256},
            "drafter": {"ray_actor_options": gpu}, "verifier": {"ray_actor_options": gpu},
            "router": {"ray_actor_options": {"num_cpus": 1}},
        }
        serve.run(build_app(config), name=APP, route_prefix="/")
        yield Service(http=f"http://127.0.0.1:{http_port}", grpc=f"127.0.0.1:{grpc_port}",
                      model=Path(config["target_path"]).name,
                      target_path=config["target_path"], config=config)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
