"""The app on a real multi-node Ray cluster on this machine (cluster/local/up.sh), tiny random
models. Slow (minutes on 2 cores), run in CI.

1. Placement: `up.sh` (a head, a `drafter` node, a `verifier` node), `serve deploy` of
   cluster/local/serve_config.yaml (a copy with the tiny models and free ports), RUNNING; every
   Drafter replica is on a node with the `drafter` resource and every Verifier replica on a node
   with `verifier` (GCS actor table, and each replica's own `info()`); a completion works;
   `down.sh` leaves no process behind.
2. Autoscaling: `up.sh` with DEER_AUTOSCALING=1 (Ray's fake multi-node provider: the Ray
   autoscaler starts and stops worker nodes as local raylets), one replica per node. Load on
   the Drafter alone takes it to 2 replicas while the Verifier stays at 1; the second replica
   cannot be placed until the autoscaler adds a second `drafter` node. Then the same for the
   Verifier (the Drafter falls back to 1), then idle: both back to 1.

The load goes straight to each deployment through a handle (tests/cluster/probe.py), so one
pool is loaded at a time; under real traffic both pools get load and the ratio policy
(deployments/autoscaling.py, unit-tested in test_autoscaling_policy.py) couples them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "cluster" / "local"
PROBE = Path(__file__).resolve().parent / "probe.py"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    state: str
    env: dict            # what clients of this cluster need (RAY_ADDRESS, RAY_AUTH_MODE, ...)
    dashboard_port: int
    up_s: float


def leftovers(state: str) -> list[str]:
    r = subprocess.run(["pgrep", "-af", "--", state], capture_output=True, text=True)
    return [line for line in r.stdout.splitlines() if "pgrep" not in line]


@contextmanager
def local_cluster(**settings):
    # short: Ray's unix socket paths live under it (107 bytes at most)
    state = tempfile.mkdtemp(prefix="deer-lc-", dir="/tmp")
    dash = free_port()
    env = {**os.environ, "DEER_LOCAL_STATE": state, "DEER_RAY_PORT": str(free_port()),
           "DEER_DASHBOARD_PORT": str(dash), "RAY": str(BIN / "ray"), **settings}
    env.pop("RAY_ADDRESS", None)
    t0 = time.time()
    up = subprocess.run([str(LOCAL / "up.sh")], env=env, capture_output=True, text=True,
                        timeout=900)
    up_s = time.time() - t0
    try:
        assert up.returncode == 0, f"up.sh failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
        client = dict(env)
        for line in Path(state, "env").read_text().split("\n"):
            if line.startswith("export "):
                for kv in line[len("export "):].split():
                    k, v = kv.split("=", 1)
                    client[k] = v
        print(f"up.sh: {up_s:.0f} s\n{up.stdout}", flush=True)
        yield Cluster(state, client, dash, up_s)
    finally:
        t1 = time.time()
        down = subprocess.run([str(LOCAL / "down.sh")], env=env, capture_output=True, text=True,
                              timeout=300)
        print(f"down.sh: {time.time() - t1:.0f} s: {down.stdout.strip()}", flush=True)
        left = leftovers(state)
        shutil.rmtree(state, ignore_errors=True)
        assert down.returncode == 0, down.stderr
        assert not left, f"processes left behind: {left}"


def write_config(tmp_path: Path, target: Path, drafter: Path) -> tuple[Path, int]:
    cfg = yaml.safe_load((LOCAL / "serve_config.yaml").read_text())
    http = free_port()
    cfg["http_options"]["port"] = http
    cfg["grpc_options"]["port"] = free_port()
    args = cfg["applications"][0]["args"]
    args.update(target_path=str(target), drafter_path=str(drafter), block_size=4)
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, http


def probe(cluster: Cluster, *args: str, timeout: float = 900) -> dict:
    r = subprocess.run([sys.executable, str(PROBE), *args], env=cluster.env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"probe {args[0]} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def serve_status(cluster: Cluster) -> dict:
    r = subprocess.run([str(BIN / "serve"), "status", "-a",
                        f"http://127.0.0.1:{cluster.dashboard_port}"],
                       env=cluster.env, capture_output=True, text=True, timeout=120)
    return yaml.safe_load(r.stdout) if r.returncode == 0 and r.stdout.strip() else {}


def test_local_cluster_places_each_pool_on_its_nodes_and_serves(tiny_checkpoints, tmp_path):
    with local_cluster() as cluster:
        config, http = write_config(tmp_path, tiny_checkpoints["target"],
                                    tiny_checkpoints["drafter-target-features"])
        t0 = time.time()
        deploy = subprocess.run([str(BIN / "serve"), "deploy", str(config), "-a",
                                 f"http://127.0.0.1:{cluster.dashboard_port}"],
                                env=cluster.env, capture_output=True, text=True, timeout=300)
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        status = {}
        while time.time() - t0 < 600:
            status = serve_status(cluster)
            app = (status.get("applications") or {}).get("deer") or {}
            if app.get("status") == "RUNNING":
                break
            assert app.get("status") not in ("DEPLOY_FAILED", "UNHEALTHY"), status
            time.sleep(3)
        else:
            pytest.fail(f"not RUNNING after 600 s: {status}")
        print(f"serve deploy -> RUNNING: {time.time() - t0:.0f} s", flush=True)

        placed = probe(cluster, "placement")
        nodes = placed["nodes"]
        assert len(nodes) == 3
        assert sum(1 for r in nodes.values() if r.get("drafter")) == 1
        assert sum(1 for r in nodes.values() if r.get("verifier")) == 1
        for name, resource in (("Drafter", "drafter"), ("Verifier", "verifier")):
            reps = placed["replicas"][name]
            assert reps and all(nodes[r["node"]].get(resource) for r in reps), (name, placed)
            assert placed["info"][name]["node_id"] in {r["node"] for r in reps}
            assert placed["info"][name]["role"] == resource

        t1 = time.time()
        body = json.dumps({"prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0})
        req = urllib.request.Request(f"http://127.0.0.1:{http}/v1/completions",
                                     data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            out = json.loads(r.read())
        print(f"completion: {time.time() - t1:.1f} s", flush=True)
        assert out["object"] == "text_completion"
        assert out["usage"]["completion_tokens"] == 8
        assert out["deer"]["cycles"] >= 1 and out["deer"]["fallback"] is False


def test_pools_scale_independently_and_the_autoscaler_adds_nodes(tiny_checkpoints, tmp_path):
    settings = dict(DEER_AUTOSCALING="1", DEER_NODE_SLOTS="1", DEER_NODE_CPUS="1",
                    DEER_DASHBOARD="false", DEER_IDLE_TIMEOUT_MINUTES="0.25")
    with local_cluster(**settings) as cluster:
        # a tokens-mode drafter: the load sends draft calls without target features
        config, _ = write_config(tmp_path, tiny_checkpoints["target"],
                                 tiny_checkpoints["drafter-tokens"])
        deployed = probe(cluster, "deploy", str(config))
        print(f"deploy -> RUNNING: {deployed['deploy_s']} s", flush=True)
        run = probe(cluster, "scale", "--phases", "drafter:180,idle:15,verifier:180,idle:150",
                    "--scale-to", "2", "--hold", "6", "--until-settled", "3",
                    "--concurrency", "12")
        phases = {}
        for p in run["phases"]:
            phases.setdefault(p["phase"], []).append(p)
        for p in run["phases"]:
            print(f"{p['phase']}: {p['start_s']}..{p['end_s']} s, calls {p.get('calls')}, "
                  f"errors {p.get('errors')}", flush=True)

        def samples(i):  # the samples of the i-th phase
            p = run["phases"][i]
            return [s for s in run["timeline"] if p["start_s"] <= s["t"] <= p["end_s"]]

        drafter, verifier, idle = samples(0), samples(2), samples(3)
        first_d = next((s for s in drafter if s["counts"].get("Drafter") == 2), None)
        assert first_d is not None, f"Drafter never reached 2 replicas: {drafter[-3:]}"
        assert all(s["counts"].get("Verifier") == 1 for s in drafter), "Verifier scaled too"
        assert first_d["pools"]["drafter"] == 2 and first_d["placed"]["Drafter"]
        assert drafter[0]["pools"]["drafter"] == 1           # the node was added for it
        print(f"Drafter 1 -> 2 at {first_d['t'] - drafter[0]['t']:.0f} s of load", flush=True)

        first_v = next((s for s in verifier if s["counts"].get("Verifier") == 2), None)
        assert first_v is not None, f"Verifier never reached 2 replicas: {verifier[-3:]}"
        assert first_v["pools"]["verifier"] == 2 and first_v["placed"]["Verifier"]
        assert verifier[0]["pools"]["verifier"] == 1
        print(f"Verifier 1 -> 2 at {first_v['t'] - verifier[0]['t']:.0f} s of load", flush=True)
        # the Drafter, idle now, fell back to 1 while the Verifier was loaded (or soon after)
        assert any(s["counts"].get("Drafter") == 1 for s in verifier + idle)

        last = idle[-1]
        assert last["counts"].get("Drafter") == 1 and last["counts"].get("Verifier") == 1, last
        # and the autoscaler removed the idle nodes (idle_timeout_minutes 0.25)
        assert max(s["nodes"] for s in run["timeline"]) == 5 and last["nodes"] == 3, last
        print(f"idle: both pools at 1 after {last['t'] - idle[0]['t']:.0f} s; nodes "
              f"{max(s['nodes'] for s in run['timeline'])} -> {last['nodes']}", flush=True)
