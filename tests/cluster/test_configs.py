"""Every cluster config file, loaded and validated with Ray's own schemas (no cluster started):

- the default (cluster/serve_config.yaml, `make serve`): the embedded pair on vLLM's engine,
  on a 2-core laptop;
- the two-pool Serve configs (cluster/serve_config_router.yaml, serve_config.gpu.yaml,
  local/serve_config.yaml and the RayService's embedded serveConfigV2): ServeDeploySchema, our
  AppConfig for `args`,
  Ray's AutoscalingConfig / RayActorOptionsSchema per deployment, the application-level policy
  resolved as the Serve controller resolves it;
- they are one application: equal apart from the documented placement and sizes
  (cluster/README.md), and the RayService's serveConfigV2 equals serve_config.gpu.yaml apart
  from min/max replicas;
- cluster/ray-cluster.yaml: Ray's cluster-config schema, node types with their resources,
  capacity for every replica the GPU config may ask for;
- the RayService's RayCluster: the autoscaling config KubeRay's autoscaler derives from it.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
DEFAULT_CONFIG = CLUSTER / "serve_config.yaml"
SERVE_CONFIGS = {  # the design's two-pool shape, one application in several sizes
    "router": CLUSTER / "serve_config_router.yaml",
    "gpu": CLUSTER / "serve_config.gpu.yaml",
    "local": CLUSTER / "local" / "serve_config.yaml",
}
POOLS = {"drafter": "drafter", "verifier": "verifier"}  # AppConfig field -> custom resource
ACCELERATORS = {"drafter": "L4", "verifier": "H100"}

# What may differ between the configs of the one application (cluster/README.md).
PLACEMENT_AND_SIZES = {
    "serve": ["proxy_location", ("http_options", "host")],
    "app": ["runtime_env"],
    "args": ["device"],
    "deployment": ["num_replicas", "autoscaling_config", "max_ongoing_requests",
                   "ray_actor_options"],
}
# ... and between serve_config.gpu.yaml and the RayService's serveConfigV2.
RAYSERVICE_SIZES = ["min_replicas", "max_replicas"]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def rayservice() -> dict:
    return load(CLUSTER / "kuberay" / "rayservice.yaml")


def serve_configs() -> dict[str, dict]:
    out = {name: load(p) for name, p in SERVE_CONFIGS.items()}
    out["rayservice"] = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    return out


def deer_app(cfg: dict) -> dict:
    (app,) = [a for a in cfg["applications"] if a["name"] == "deer"]
    return app


@pytest.fixture(scope="module")
def configs():
    return serve_configs()


# ---- Serve configs ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["router", "gpu", "local", "rayservice"])
def test_serve_config_validates_with_rays_schemas(configs, name):
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy
    from ray.serve.schema import RayActorOptionsSchema, ServeDeploySchema

    from deployments.app import AppConfig

    cfg = configs[name]
    schema = ServeDeploySchema.model_validate(cfg)
    (app_schema,) = schema.applications
    assert app_schema.import_path == "deployments.app:build_app"
    app_cfg = AppConfig.model_validate(deer_app(cfg)["args"])
    for field in ("drafter", "verifier", "router"):
        dep = getattr(app_cfg, field)
        opts = dep.options()
        RayActorOptionsSchema.model_validate(opts["ray_actor_options"])
        if "autoscaling_config" in opts:
            AutoscalingConfig.model_validate(opts["autoscaling_config"])
    for field in POOLS:  # each pool scales on its own
        scaling = AutoscalingConfig.model_validate(getattr(app_cfg, field).autoscaling_config)
        assert scaling.min_replicas >= 1 and scaling.max_replicas >= scaling.min_replicas
        assert scaling.upscale_delay_s < scaling.downscale_delay_s
    # the application-level policy resolves as the Serve controller resolves it
    policy = AutoscalingPolicy(**app_schema.autoscaling_policy)
    from ray.serve._private.autoscaling_state import _resolve_policy_callable

    resolved = _resolve_policy_callable(policy)
    assert type(resolved).__name__ == "DrafterVerifierRatioPolicy"
    assert resolved.drafter == "Drafter" and resolved.verifier == "Verifier"


def test_the_default_config_serves_the_embedded_pair_on_vllms_engine():
    """cluster/serve_config.yaml (`make serve`): Ray's schema, our AppConfig, `loop: vllm` with
    the embedded DFlash-format drafter when no drafter_path is given (vLLM runs it natively),
    a batch-size schedule that vLLM's own validator accepts."""
    from ray.serve.schema import ServeDeploySchema

    from deer_serve.assets import ASSETS_DIR
    from deer_serve.drafters import drafter_format
    from deployments.app import AppConfig

    cfg = load(DEFAULT_CONFIG)
    ServeDeploySchema.model_validate(cfg)
    app_cfg = AppConfig.model_validate(deer_app(cfg)["args"])
    assert app_cfg.service.loop == "vllm" and app_cfg.block_size == 16
    assert app_cfg.service.vllm_lookup and app_cfg.service.vllm_lookup_rows == 24
    assert app_cfg.service.vllm_compile is True and app_cfg.service.vllm_engine_args == {}
    resolved = app_cfg.resolved()
    assert Path(resolved.drafter_path) == ASSETS_DIR / "drafter-dflash"
    assert Path(resolved.target_path) == ASSETS_DIR / "target"
    assert drafter_format(resolved.drafter_path) == "dflash"
    # the two-pool config resolves to the DeerDrafter
    router = AppConfig.model_validate(deer_app(load(SERVE_CONFIGS["router"]))["args"])
    assert Path(router.resolved().drafter_path) == ASSETS_DIR / "drafter"
    schedule = app_cfg.service.vllm_spec_schedule
    assert schedule and schedule[0][0] == 1
    from vllm.v1.spec_decode.dynamic.utils import validate_and_normalize_dynamic_sd_schedule

    assert validate_and_normalize_dynamic_sd_schedule([list(e) for e in schedule])


@pytest.mark.parametrize("path", [DEFAULT_CONFIG, SERVE_CONFIGS["router"]], ids=["default", "router"])
def test_laptop_configs_run_on_2_cpus(path):
    """`make serve` (deer-serve serve) and the two-pool laptop config on a CPU-only laptop: no
    GPU, no custom resource, and the minimum replicas of the deployments the app builds fit 2
    CPUs (loop vllm builds no Drafter; ingress verifier no Router)."""
    args = deer_app(load(path))["args"]
    service = args.get("service") or {}
    fields = ["verifier"] + ([] if service.get("ingress") == "verifier" else ["router"])
    if service.get("loop", "router") != "vllm":
        fields.append("drafter")
    cpus = 0.0
    for field in fields:
        dep = args[field]
        opts = dep["ray_actor_options"]
        assert not opts.get("num_gpus") and not opts.get("resources")
        assert not opts.get("accelerator_type")
        n = dep.get("num_replicas") or dep["autoscaling_config"]["min_replicas"]
        cpus += n * opts["num_cpus"]
    assert cpus <= 2


def test_gpu_and_local_configs_pin_each_pool_to_its_nodes(configs):
    from ray.util import accelerators

    assert {accelerators.NVIDIA_L4, accelerators.NVIDIA_H100} == set(ACCELERATORS.values())
    for name in ("gpu", "rayservice"):
        args = deer_app(configs[name])["args"]
        for field, resource in POOLS.items():
            opts = args[field]["ray_actor_options"]
            assert opts["num_gpus"] == 1 and opts["resources"] == {resource: 1}
            assert opts["accelerator_type"] == ACCELERATORS[field]
        assert not args["router"]["ray_actor_options"].get("num_gpus")
    args = deer_app(configs["local"])["args"]
    for field, resource in POOLS.items():
        opts = args[field]["ray_actor_options"]
        assert opts["resources"] == {resource: 1} and not opts.get("num_gpus")


def normalized(cfg: dict) -> dict:
    """The config without the documented placement and sizes."""
    cfg = copy.deepcopy(cfg)
    for key in PLACEMENT_AND_SIZES["serve"]:
        if isinstance(key, tuple):
            cfg.get(key[0], {}).pop(key[1], None)
        else:
            cfg.pop(key, None)
    app = deer_app(cfg)
    for key in PLACEMENT_AND_SIZES["app"]:
        app.pop(key, None)
    for key in PLACEMENT_AND_SIZES["args"]:
        app["args"].pop(key, None)
    for field in ("drafter", "verifier", "router"):
        for key in PLACEMENT_AND_SIZES["deployment"]:
            app["args"][field].pop(key, None)
    return cfg


def test_all_serve_configs_are_one_application(configs):
    base = normalized(configs["router"])
    for name in ("gpu", "local", "rayservice"):
        assert normalized(configs[name]) == base, name


def test_rayservice_serve_config_is_the_gpu_config_apart_from_replica_bounds(configs):
    def strip(cfg):
        cfg = copy.deepcopy(cfg)
        for field in ("drafter", "verifier", "router"):
            scaling = deer_app(cfg)["args"][field].get("autoscaling_config") or {}
            for key in RAYSERVICE_SIZES:
                scaling.pop(key, None)
        return cfg

    assert strip(configs["rayservice"]) == strip(configs["gpu"])


# ---- node pools: the launcher and KubeRay -------------------------------------------------------
def max_replicas(cfg: dict, field: str) -> int:
    return deer_app(cfg)["args"][field]["autoscaling_config"]["max_replicas"]


def test_cluster_launcher_config(configs):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load(CLUSTER / "ray-cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(cfg)))  # as `ray up` does: AWS defaults merged
    assert cfg["provider"]["type"] == "aws" and cfg["idle_timeout_minutes"] > 0
    types = cfg["available_node_types"]
    assert set(types) == {"head", "drafter_gpu", "verifier_gpu"} and cfg["head_node_type"] == "head"
    assert not set(types["head"]["resources"]) & set(POOLS.values())
    for field, resource in POOLS.items():
        t = types[f"{field}_gpu"]
        res = t["resources"]
        assert res["GPU"] >= 1 and res[resource] == res["GPU"]     # one unit per GPU
        assert res[f"accelerator_type:{ACCELERATORS[field]}"] == 1
        other = ({"drafter", "verifier"} - {resource}).pop()
        assert other not in res
        assert 0 <= t["min_workers"] <= t["max_workers"]
        # room for every replica the GPU config may ask for
        assert t["max_workers"] * res[resource] >= max_replicas(configs["gpu"], field)
    assert cfg["max_workers"] >= sum(t.get("max_workers", 0) for t in types.values())
    assert any("pip install" in c and "deer-serve" in c for c in cfg["setup_commands"])


def test_rayservice_cluster_as_kuberays_autoscaler_sees_it(configs):
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr)

    svc = rayservice()
    assert svc["apiVersion"] == "ray.io/v1" and svc["kind"] == "RayService"
    spec = svc["spec"]["rayClusterConfig"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == __import__("ray").__version__
    ray_cr = {"metadata": {"name": "deer-serve", "namespace": "default"}, "spec": spec}
    auto = _derive_autoscaling_config_from_ray_cr(ray_cr)  # validates with Ray's schema too
    types = auto["available_node_types"]
    assert set(types) == {"headgroup", "drafter-gpu", "verifier-gpu"}
    assert not set(types["headgroup"]["resources"]) & set(POOLS.values())
    for field, resource in POOLS.items():
        t = types[f"{field}-gpu"]
        res = t["resources"]
        assert res["GPU"] == 1 and res[resource] == 1
        assert res[f"accelerator_type:{ACCELERATORS[field]}"] == 1
        assert t["max_workers"] * res[resource] >= max_replicas(configs["rayservice"], field)
        assert 1 <= t["min_workers"] <= t["max_workers"]


# ---- the local cluster --------------------------------------------------------------------------
def test_local_cluster_scripts_and_config_agree(configs):
    for script in ("up.sh", "down.sh"):
        path = CLUSTER / "local" / script
        assert path.stat().st_mode & 0o111, f"{script} is not executable"
        subprocess.run(["bash", "-n", str(path)], check=True)
    up = (CLUSTER / "local" / "up.sh").read_text()
    assert '{\\"drafter\\": $SLOTS}' in up and '{\\"verifier\\": $SLOTS}' in up
    assert "ray stop" not in (CLUSTER / "local" / "down.sh").read_text().split("\nset ")[1]
    slots, nodes = 2, 1  # up.sh's defaults: DEER_NODE_SLOTS, DEER_*_NODES
    for field in POOLS:
        assert max_replicas(configs["local"], field) <= slots * nodes


def test_deer_serve_serve_builds_the_default_config():
    """`deer-serve serve` with no flags reads cluster/serve_config.yaml and builds the app before
    Ray starts: ONE deployment, the Verifier as its own ingress (the Router's class around a
    Verifier), whose vLLM loop runs the embedded DFlash drafter with the lookup splice."""
    from deer_serve import serve_cli
    from deer_serve.assets import ASSETS_DIR

    args = serve_cli.parse_args([])
    assert serve_cli.find_config(args.config).resolve() == DEFAULT_CONFIG
    _, _, _, apps = serve_cli.prepare(args)
    (name, prefix, app), = apps
    node = app._bound_deployment
    deployments = {node.name: node}
    for arg in node.init_args:
        if hasattr(arg, "_bound_deployment"):
            deployments[arg._bound_deployment.name] = arg._bound_deployment
    assert set(deployments) == {"Verifier"}
    settings, verifier_args = node.init_args
    assert settings["ingress"] == "verifier" and settings["loop"] == "vllm"
    loop = verifier_args["vllm_loop"]
    assert Path(loop["drafter_path"]) == ASSETS_DIR / "drafter-dflash"
    assert loop["block_size"] == 16 and loop["engine_nice"] == 0 and loop["lookup"] is True
    assert loop["lookup_rows"] == 24 and loop["compile"] is True and loop["engine_kwargs"] == {}


def test_vllm_engine_args_reach_the_engine_and_unknown_ones_are_refused_before_ray(tmp_path):
    """`service.vllm_engine_args` goes to each vLLM engine of the replica over the loop's own
    arguments; a key that is not one of vLLM's engine arguments is refused when the app is
    built, before Ray starts, with the key named."""
    from deer_serve import serve_cli

    def prepare(extra: dict):
        cfg = load(DEFAULT_CONFIG)
        deer_app(cfg)["args"]["service"]["vllm_engine_args"] = extra
        path = tmp_path / "serve_config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        (_, _, app), = serve_cli.prepare(serve_cli.parse_args(["--config", str(path)]))[3]
        return app._bound_deployment.init_args[1]["vllm_loop"]

    loop = prepare({"max_num_batched_tokens": 4096, "enforce_eager": True})
    assert loop["engine_kwargs"] == {"max_num_batched_tokens": 4096, "enforce_eager": True}
    from deployments.vllm_loop import engine_args

    args = engine_args("t", "d", block_size=8, max_running=4, cpu=True, compile=True,
                       text_config={"max_position_embeddings": 2048})
    assert args["enforce_eager"] is False  # compile on: vLLM's own default
    assert engine_args("t", "d", block_size=8, max_running=4, cpu=True,
                       text_config={})["enforce_eager"] is True  # a CPU engine, no choice: eager
    with pytest.raises(serve_cli.UsageError, match="max_num_batched_tokenz"):
        prepare({"max_num_batched_tokenz": 4096})


def test_deer_serve_serve_builds_the_two_pool_config(tiny_checkpoints):
    """`deer-serve serve --config cluster/serve_config_router.yaml`: the autoscaling configs
    and the measured Drafter/Verifier classes reach Serve's options."""
    from deer_serve import serve_cli

    args = serve_cli.parse_args(["--config", str(SERVE_CONFIGS["router"]),
                                 "--target", str(tiny_checkpoints["target"]),
                                 "--drafter", str(tiny_checkpoints["drafter-tokens"])])
    _, _, _, apps = serve_cli.prepare(args)
    (name, prefix, app), = apps
    deployments = {}
    node = app._bound_deployment
    deployments[node.name] = node
    for arg in node.init_args:
        if hasattr(arg, "_bound_deployment"):
            deployments[arg._bound_deployment.name] = arg._bound_deployment
    assert set(deployments) == {"Router", "Drafter", "Verifier"}
    for name in ("Drafter", "Verifier"):
        dep = deployments[name]
        assert dep._deployment_config.autoscaling_config.max_replicas == 2
        assert hasattr(dep.func_or_class, "record_autoscaling_stats")


def test_the_default_config_without_vllm_says_what_to_serve_instead(monkeypatch):
    """A machine installed with VLLM=off has no vLLM: `deer-serve serve` refuses the default
    config before Ray starts, in one line that names the config that runs without it."""
    import importlib.util

    from deer_serve import serve_cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(serve_cli.UsageError, match="serve_config_router.yaml"):
        serve_cli.prepare(serve_cli.parse_args([]))
