"""`deer-serve serve`: start (or join) Ray, start Serve's HTTP and gRPC proxies, run the app,
print the URLs, block; Ctrl-C (SIGINT) or SIGTERM shuts Serve and Ray down cleanly.

Exposure: HTTP binds 127.0.0.1 unless --host (or the config's http_options.host) says
otherwise. Ray Serve 2.60's gRPC proxy has no host option and listens on every interface
([::]:PORT), so --grpc-port 0 turns gRPC off; with gRPC on, or a non-loopback HTTP host, and
no API key configured, a warning is printed. API keys: the app's `service.api_keys`, or the
DEER_SERVE_API_KEYS environment variable (comma-separated) of the process that starts Ray
(the Router replicas inherit it).

Ray's own tools work against the local Ray this starts, from another shell with no setup
(docs/ray-tools.md): the dashboard (and with it `serve status` and the state API, `ray list
actors`) runs on 127.0.0.1:8265 unless --no-dashboard, and the head's GCS address is written to
/tmp/ray/ray_current_cluster, as `ray start --head` does, so `ray status` finds it. Ray 2.60
turns token authentication on for a cluster started by `ray.init()`, and its CLI sends the
token only when RAY_AUTH_MODE=token is set in the CLI's own shell; so the local Ray starts with
RAY_AUTH_MODE=disabled unless the environment sets RAY_AUTH_MODE (then it is respected, and the
tools need the same setting). Ray's GCS and raylet ports listen on every interface whatever the
mode: with auth disabled, anyone who can reach this machine's Ray ports can run code on it, and
a note says so at start.

The only module of `deer_serve` that imports Ray (lazily, inside `main`): the core stays free
of Ray and pydantic.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "cluster/serve_config.yaml"
DASHBOARD_PORT = 8265  # Ray's default, where `serve status` and `ray list` look
DEFAULT_SERVICERS = ["deer_serve.protos.deer_pb2_grpc.add_DeerServiceServicer_to_server",
                     "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"]


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="deer-serve serve", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None,
                    help=f"Serve config YAML (default: {DEFAULT_CONFIG} when it exists)")
    ap.add_argument("--host", default=None, help="HTTP host (default from the config: 127.0.0.1)")
    ap.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    ap.add_argument("--grpc-port", type=int, default=None,
                    help="gRPC port (default 9000; 0 = no gRPC: Ray's gRPC proxy listens on "
                         "all interfaces)")
    ap.add_argument("--address", default=None,
                    help="join this Ray cluster (e.g. auto, or host:6379) instead of starting one")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default all)")
    ap.add_argument("--num-gpus", type=int, default=None, help="GPUs of a local Ray (default all)")
    ap.add_argument("--dashboard-port", type=int, default=None,
                    help=f"Ray dashboard port of a local Ray, on 127.0.0.1 (default "
                         f"{DASHBOARD_PORT}, the next free one if taken; `serve status` and "
                         "`ray list` look there)")
    ap.add_argument("--no-dashboard", action="store_true",
                    help="no Ray dashboard (one process less on a small machine; "
                         "`serve status` and `ray list` then have nothing to ask)")
    ap.add_argument("--target", default=None, help="override args.target_path")
    ap.add_argument("--drafter", default=None, help="override args.drafter_path")
    return ap.parse_args(argv)


class UsageError(Exception):
    """Reported on stderr with exit code 2."""


def find_config(path: Optional[str]) -> Optional[Path]:
    if path is not None:
        if not Path(path).is_file():
            raise UsageError(f"no such config file: {path}")
        return Path(path)
    for p in (Path(DEFAULT_CONFIG), REPO / DEFAULT_CONFIG):
        if p.is_file():
            return p
    return None  # built-in defaults: the embedded model pair, one replica each


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        plan = prepare(args)
    except UsageError as e:
        print(f"deer-serve serve: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        print(f"deer-serve serve: not available: {e} (pip install 'deer-serve[serve]')",
              file=sys.stderr)
        return 2
    return run(args, *plan)


def prepare(args: argparse.Namespace):
    """Read the config and build the applications (this checks the model files) before any
    Ray process starts: (http_options, grpc port, servicer functions, [(name, prefix, app)])."""
    import yaml

    cfg_path = find_config(args.config)
    serve_cfg = (yaml.safe_load(cfg_path.read_text()) or {}) if cfg_path else {}
    if not isinstance(serve_cfg, dict):
        raise UsageError(f"{cfg_path}: expected a Serve config mapping")
    http = {"host": "127.0.0.1", "port": 8000, **(serve_cfg.get("http_options") or {})}
    if args.host is not None:
        http["host"] = args.host
    if args.port is not None:
        http["port"] = args.port
    grpc_cfg = serve_cfg.get("grpc_options") or {}
    grpc_port = args.grpc_port if args.grpc_port is not None else grpc_cfg.get("port", 9000)
    servicers = grpc_cfg.get("grpc_servicer_functions") or DEFAULT_SERVICERS

    if (REPO / "deployments").is_dir() and str(REPO) not in sys.path:
        sys.path.append(str(REPO))  # a checkout that is not pip-installed
    apps = []
    for app in serve_cfg.get("applications") or [{"name": "deer", "args": {}}]:
        module, _, attr = app.get("import_path", "deployments.app:build_app").partition(":")
        builder = getattr(importlib.import_module(module), attr)
        app_args = dict(app.get("args") or {})
        if args.target:
            app_args["target_path"] = args.target
        if args.drafter:
            app_args["drafter_path"] = args.drafter
        try:
            built = builder(app_args)
        except ValueError as e:  # pydantic's ValidationError is one too
            raise UsageError(f"application {app.get('name', 'deer')!r}: {e}") from None
        apps.append((app.get("name", "deer"), app.get("route_prefix", "/"), built))
    warn_exposure(http["host"], grpc_port, [a for _, _, a in apps], serve_cfg)
    return http, grpc_port, servicers, apps


def warn_exposure(host: str, grpc_port: int, apps: list, serve_cfg: dict) -> None:
    """Say so when the service is reachable from other machines without an API key."""
    keys = bool(os.environ.get("DEER_SERVE_API_KEYS")) or any(
        ((a.get("args") or {}).get("service") or {}).get("api_keys")
        for a in serve_cfg.get("applications") or [])
    if keys:
        return
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"deer-serve serve: warning: HTTP on {host} with no API key (set "
              "DEER_SERVE_API_KEYS or service.api_keys)", file=sys.stderr)
    if grpc_port:
        print(f"deer-serve serve: note: Ray Serve's gRPC proxy listens on all interfaces "
              f"(port {grpc_port}) and no API key is set; --grpc-port 0 turns gRPC off",
              file=sys.stderr)


def run(args: argparse.Namespace, http: dict, grpc_port: int, servicers: list[str],
        apps: list) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    joined = args.address is not None
    # replicas import `deployments` from this checkout even when it is not pip-installed
    pythonpath = os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]]
                                                if os.environ.get("PYTHONPATH") else []))
    init_kw = {"runtime_env": {"env_vars": {"PYTHONPATH": pythonpath}}}
    gcs_address = None
    if joined:
        ray.init(address=args.address, **init_kw)
    else:
        # Ray's CLI sends its token only under RAY_AUTH_MODE=token in its own shell: off by
        # default so `ray status` & co. work from any shell; an explicit setting is kept
        auth = os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # address="local": always a fresh Ray, never a cluster found on this machine.
        # include_dashboard=None (as `ray start --head`): started, but Serve still runs if
        # the dashboard fails to come up; dashboard_port=None tries 8265, then the next ones.
        ctx = ray.init(address="local", num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                       include_dashboard=False if args.no_dashboard else None,
                       dashboard_host="127.0.0.1", dashboard_port=args.dashboard_port,
                       **init_kw)
        gcs_address = ctx.address_info["gcs_address"]
        record_cluster_address(gcs_address)
        report_ray_tools(ctx.dashboard_url, args.no_dashboard, auth)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    names = []
    try:
        grpc_opts = gRPCOptions(port=grpc_port, grpc_servicer_functions=servicers) \
            if grpc_port else gRPCOptions(port=0, grpc_servicer_functions=[])
        serve.start(http_options=http, grpc_options=grpc_opts)
        for name, prefix, app in apps:
            serve.run(app, name=name, route_prefix=prefix)
            names.append(name)
        print(f"deer-serve: HTTP  http://{http['host']}:{http['port']}/v1 (OpenAI-compatible; "
              "also /v1/models, /healthz)", flush=True)
        if grpc_port:
            print(f"deer-serve: gRPC  {http['host']}:{grpc_port} (deer.v1.DeerService)",
                  flush=True)
        print("deer-serve: Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            pass
        print("deer-serve: stopping", flush=True)
    finally:
        try:
            if joined:
                for name in names:  # leave the cluster's other applications alone
                    serve.delete(name)
            else:
                serve.shutdown()
        finally:
            ray.shutdown()
            if gcs_address:
                forget_cluster_address(gcs_address)
    return 0


def record_cluster_address(gcs_address: str) -> None:
    """Write the head's GCS address where `ray start --head` does (/tmp/ray/ray_current_cluster
    under Ray's temp dir), so Ray's CLI (`ray status`, `ray list`, ray.init("auto")) finds
    this cluster from any shell."""
    from ray._private.utils import write_ray_address

    try:
        write_ray_address(gcs_address)
    except OSError as e:  # the tools then need --address; serving is unaffected
        print(f"deer-serve serve: note: could not record the Ray address ({e}); Ray's CLI "
              f"needs --address {gcs_address}", file=sys.stderr)


def forget_cluster_address(gcs_address: str) -> None:
    """Remove the address file if it still names this cluster (as `ray stop` does), so the
    CLI does not try a stopped cluster; a newer cluster's address is left alone."""
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    try:
        if path.read_text().strip() == gcs_address:
            path.unlink()
    except OSError:
        pass


def report_ray_tools(dashboard_url: Optional[str], no_dashboard: bool, auth: str) -> None:
    """Print where Ray's own tools find this cluster, and how exposed it is."""
    if dashboard_url:
        url = dashboard_url if "://" in dashboard_url else f"http://{dashboard_url}"
        hint = "" if url.endswith(f":{DASHBOARD_PORT}") else f" (serve status -a {url})"
        print(f"deer-serve: Ray dashboard {url}{hint}; `serve status`, `ray status`, "
              "`ray list actors` work from any shell here", flush=True)
    elif not no_dashboard:
        print("deer-serve serve: warning: the Ray dashboard did not start (see "
              "/tmp/ray/session_latest/logs/dashboard.log); `serve status` and `ray list` "
              "need it", file=sys.stderr)
    if auth.lower() == "token":
        print("deer-serve serve: note: Ray token auth is on (RAY_AUTH_MODE=token): run Ray's "
              "CLI with RAY_AUTH_MODE=token too", file=sys.stderr)
    else:
        print("deer-serve serve: note: Ray token auth is off (RAY_AUTH_MODE=disabled, so "
              "Ray's CLI needs no setup); Ray's ports listen on all interfaces: anyone who can "
              "reach them can run code here. RAY_AUTH_MODE=token deer-serve serve turns it on",
              file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
