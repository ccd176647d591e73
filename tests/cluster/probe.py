"""Driver-side helpers for tests/cluster, run as a separate process against a running cluster
(so the pytest process never holds a Ray connection):

    python tests/cluster/probe.py placement --app deer
    python tests/cluster/probe.py deploy CONFIG.yaml
    python tests/cluster/probe.py scale --app deer --phases drafter:90,verifier:90,idle:60

RAY_ADDRESS and RAY_AUTH_MODE come from the environment (cluster/local/up.sh writes them to
$DEER_LOCAL_STATE/env). Each command prints one JSON object on the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")


def connect():
    import ray

    ray.init(log_to_driver=False, logging_level="ERROR")
    return ray


def alive_nodes(ray) -> dict[str, dict]:
    return {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}


def replicas(app: str) -> dict[str, list[dict]]:
    """deployment -> [{actor, node}] of its ALIVE replica actors (GCS actor table)."""
    import ray._private.state as state

    out: dict[str, list[dict]] = {}
    prefix = f"ServeReplica:{app}:"
    for a in state.actors().values():
        if a["State"] == "ALIVE" and a["ActorClassName"].startswith(prefix):
            out.setdefault(a["ActorClassName"][len(prefix):], []).append(
                {"actor": a["ActorID"], "node": a["Address"]["NodeID"]})
    return out


def running_counts(app: str) -> dict[str, int]:
    from ray import serve

    st = serve.status().applications.get(app)
    if st is None:
        return {}
    return {name: int(d.replica_states.get("RUNNING", 0)) for name, d in st.deployments.items()}


def cmd_placement(args) -> dict:
    ray = connect()
    from ray import serve

    nodes = alive_nodes(ray)
    reps = replicas(args.app)
    info = {}
    for name in ("Drafter", "Verifier"):  # each replica reports its own node too
        h = serve.get_deployment_handle(name, args.app)
        info[name] = h.info.remote().result(timeout_s=120)
    return {"nodes": nodes, "replicas": reps, "info": info}


def cmd_deploy(args) -> dict:
    """The Python equivalent of `serve deploy CONFIG` (no dashboard needed); waits for RUNNING."""
    import yaml

    connect()
    from ray.serve._private.api import serve_start
    from ray.serve.config import HTTPOptions, gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    cfg = ServeDeploySchema.model_validate(yaml.safe_load(Path(args.config).read_text()))
    client = serve_start(http_options=HTTPOptions(**cfg.http_options.model_dump()),
                         grpc_options=gRPCOptions(**cfg.grpc_options.model_dump()))
    t0 = time.time()
    client.deploy_apps(cfg, _blocking=False)
    status = wait_running(cfg.applications[0].name, args.timeout)
    return {"status": status, "deploy_s": round(time.time() - t0, 1)}


def wait_running(app: str, timeout: float) -> str:
    from ray import serve

    deadline = time.time() + timeout
    status = "?"
    while time.time() < deadline:
        st = serve.status().applications.get(app)
        status = st.status if st else "MISSING"
        if status == "RUNNING":
            return status
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise SystemExit(f"{app}: {status}: {st.message}")
        time.sleep(2)
    raise SystemExit(f"{app}: {status} after {timeout:.0f} s")


class Load:
    """Keeps `concurrency` calls in flight to one deployment through a handle."""

    def __init__(self, app: str, target: str, concurrency: int):
        from ray import serve

        self.handle = serve.get_deployment_handle(target, app)
        self.target, self.concurrency = target, concurrency
        self.stop = threading.Event()
        self.calls = self.errors = 0
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(concurrency)]

    def _call(self, i: int, n: int):
        import numpy as np

        from deer_serve.types import SamplingParams

        ids = np.arange(2, 2 + 24 + (n % 8), dtype=np.int32)
        if self.target == "Verifier":
            return self.handle.score.remote(f"load-{i}-{n}", ids, 4).result(timeout_s=120)
        return self.handle.draft.remote(f"load-{i}-{n}", ids, int(ids[-1]), 4,
                                        SamplingParams()).result(timeout_s=120)

    def _run(self, i: int):
        n = 0
        while not self.stop.is_set():
            try:
                self._call(i, n)
                self.calls += 1
            except Exception:
                self.errors += 1
                time.sleep(0.5)
            n += 1

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=130)


def cmd_scale(args) -> dict:
    """Phases `what:seconds` (what = drafter | verifier | idle); samples replica counts and
    nodes every 2 s. Returns the timeline and the per-phase maxima/minima."""
    ray = connect()
    timeline, phases = [], []
    t0 = time.time()
    for spec in args.phases.split(","):
        what, secs = spec.split(":")
        load = None
        if what in ("drafter", "verifier"):
            load = Load(args.app, what.capitalize(), args.concurrency).__enter__()
        p = {"phase": what, "start_s": round(time.time() - t0, 1), "counts": [], "nodes": []}
        until = time.time() + float(secs)
        while time.time() < until:
            counts = running_counts(args.app)
            reps = replicas(args.app)
            nodes = alive_nodes(ray)
            sample = {"t": round(time.time() - t0, 1), "counts": counts,
                      "nodes": len(nodes),
                      "pools": {r: sum(1 for res in nodes.values() if res.get(r))
                                for r in ("drafter", "verifier")},
                      "placed": {d: all(nodes.get(x["node"], {}).get(d.lower())
                                        for x in reps.get(d, []))
                                 for d in ("Drafter", "Verifier")}}
            timeline.append({"phase": what, **sample})
            print(json.dumps(sample), file=sys.stderr, flush=True)
            if args.until_settled and what == "idle" and counts.get("Drafter") == 1 \
                    and counts.get("Verifier") == 1 and sample["nodes"] <= args.until_settled:
                break
            loaded = what.capitalize()
            if args.scale_to and load is not None and counts.get(loaded, 0) >= args.scale_to \
                    and sample["placed"].get(loaded):
                until = min(until, time.time() + args.hold)  # reached: hold a little, then on
            time.sleep(2)
        if load is not None:
            load.__exit__(None, None, None)
            p["calls"], p["errors"] = load.calls, load.errors
        p["end_s"] = round(time.time() - t0, 1)
        phases.append(p)
    return {"timeline": timeline, "phases": phases}


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("placement")
    p.add_argument("--app", default="deer")
    p = sub.add_parser("deploy")
    p.add_argument("config")
    p.add_argument("--timeout", type=float, default=600)
    p = sub.add_parser("scale")
    p.add_argument("--app", default="deer")
    p.add_argument("--phases", required=True)
    p.add_argument("--concurrency", type=int, default=12)
    p.add_argument("--scale-to", type=int, default=0,
                   help="end a load phase early once the loaded deployment has this many "
                        "RUNNING replicas, all placed on their pool (after --hold seconds)")
    p.add_argument("--hold", type=float, default=6)
    p.add_argument("--until-settled", type=int, default=0,
                   help="end the idle phase early once both pools are at 1 replica and the "
                        "cluster has at most this many nodes")
    args = ap.parse_args()
    out = {"placement": cmd_placement, "deploy": cmd_deploy, "scale": cmd_scale}[args.cmd](args)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
