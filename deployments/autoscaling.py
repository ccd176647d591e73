"""Application-level autoscaling: keep the Drafter:Verifier replica ratio in line with the
measured draft and verify work and the queues in front of each.

Why Serve's per-deployment rule is not enough here. Every decode loop (one per request, owned
by the Router) alternates draft -> verify -> draft ..., so the in-flight requests are split
between the two deployments, and a request waiting at one is absent from the other. When the
verifiers saturate, requests pile up in front of them and the drafters' queue empties: Serve's
queue rule (`ongoing / target_ongoing_requests`) then scales the drafters *down*, exactly when
the extra verifiers about to be added will need them, and the two pools oscillate.

The policy (`ratio_policy`, pure arithmetic, unit-tested in tests/cluster):

    own_x   = max(ongoing_x / target_x,  work_x / target_utilization)
    share_x = work_x / (work_d + work_v)          # measured: seconds busy per second
    split_x = (ongoing_d + ongoing_v) * share_x / target_x
    cap_x   = max_other * work_x / work_other     # what the other pool's max can feed
    desired_x = max(own_x, min(split_x, cap_x))

`work_x` is the sum over replicas of the busy fraction (time with a call in progress / wall
time) that each replica reports (`record_autoscaling_stats`, added by `measured`). In the closed
decode loop both pools complete calls at the same rate lambda, so work_d / work_v =
lambda*t_draft / lambda*t_verify = t_draft / t_verify whichever pool is the bottleneck: the
in-flight requests are re-split by the measured service times, not by where they happen to
wait. The coupling only ever adds replicas (never fewer than Serve's own rule) and never more
than the other pool's `max_replicas` could keep busy; with no measurements yet (no calls in the
look-back window, or one pool idle) each pool falls back to Serve's rule alone, so load that
reaches only one pool scales only that pool. Serve's wrapper then applies min/max replicas,
upscaling/downscaling factors and the upscale/downscale delays per deployment.

Wiring (Serve 2.60): the application's `autoscaling_policy` in a Serve config file
(`serve deploy` / `serve run CONFIG` / KubeRay serveConfigV2):

    applications:
      - name: deer
        autoscaling_policy:
          policy_function: deployments.autoscaling:DrafterVerifierRatioPolicy
          policy_kwargs: {target_utilization: 0.8}

Every deployment the policy decides for needs an `autoscaling_config` (its bounds and delays
are applied). Serve's Python `serve.run(app)` (what `deer-serve serve` calls) has no
application-level policy parameter in 2.60, so there each pool scales by its own
`autoscaling_config` alone.

This module imports only the standard library at module level: Serve pickles it by value into
the controller, which must not need torch.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

BUSY = "deer_busy_fraction"      # per replica: share of wall time with a call in progress
CALLS = "deer_calls_per_s"       # per replica: completed calls per second


# ---- the arithmetic ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolLoad:
    """What the policy knows about one pool (deployment) in the look-back window."""

    replicas: int                  # running replicas
    ongoing: float                 # requests running + queued (Serve's total_num_requests)
    target_ongoing: float          # autoscaling_config.target_ongoing_requests
    max_replicas: int              # capacity-adjusted max_replicas
    work: Optional[float] = None   # sum of replica busy fractions; None = not measured
    calls_per_s: Optional[float] = None


@dataclass(frozen=True)
class RatioDecision:
    drafter: float                 # desired replicas (Serve rounds up and bounds them)
    verifier: float
    coupled: bool                  # the measured ratio was used
    ratio: Optional[float]         # work_d / work_v = drafter replicas per verifier replica
    draft_s: Optional[float]       # mean service seconds per call, when measured
    verify_s: Optional[float]

    def state(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def own_replicas(p: PoolLoad, target_utilization: float) -> float:
    """Serve's queue rule, raised to keep measured utilization at or below the target."""
    queue = p.ongoing / p.target_ongoing if p.target_ongoing > 0 else 0.0
    busy = (p.work or 0.0) / target_utilization
    return max(queue, busy)


def service_s(p: PoolLoad) -> Optional[float]:
    if p.work is None or not p.calls_per_s:
        return None
    return p.work / p.calls_per_s


def ratio_policy(drafter: PoolLoad, verifier: PoolLoad,
                 target_utilization: float = 0.8) -> RatioDecision:
    """Desired Drafter and Verifier replicas (floats; see the module docstring)."""
    if not 0 < target_utilization <= 1:
        raise ValueError("target_utilization must be in (0, 1]")
    own_d = own_replicas(drafter, target_utilization)
    own_v = own_replicas(verifier, target_utilization)
    wd, wv = drafter.work or 0.0, verifier.work or 0.0
    timing = dict(draft_s=service_s(drafter), verify_s=service_s(verifier))
    if wd <= 0 or wv <= 0:  # one pool idle or unmeasured: no ratio to keep
        return RatioDecision(own_d, own_v, coupled=False, ratio=None, **timing)
    in_flight = drafter.ongoing + verifier.ongoing
    share_d = wd / (wd + wv)
    split_d = in_flight * share_d / drafter.target_ongoing
    split_v = in_flight * (1.0 - share_d) / verifier.target_ongoing
    cap_d = verifier.max_replicas * wd / wv
    cap_v = drafter.max_replicas * wv / wd
    return RatioDecision(max(own_d, min(split_d, cap_d)), max(own_v, min(split_v, cap_v)),
                         coupled=True, ratio=wd / wv, **timing)


# ---- Serve's application-level policy ------------------------------------------------------------
def pool_load(ctx: Any) -> PoolLoad:
    """A PoolLoad from Serve's AutoscalingContext (custom metrics from `measured`)."""
    cfg = ctx.config
    target = cfg.get_target_ongoing_requests() if hasattr(cfg, "get_target_ongoing_requests") \
        else cfg.target_ongoing_requests
    work = calls = None
    metrics = ctx.aggregated_metrics or {}
    busy = metrics.get(BUSY) or {}
    if busy:
        work = float(sum(max(0.0, min(1.0, v)) for v in busy.values()))
        calls = float(sum(max(0.0, v) for v in (metrics.get(CALLS) or {}).values()))
    return PoolLoad(replicas=ctx.current_num_replicas, ongoing=float(ctx.total_num_requests),
                    target_ongoing=float(target),
                    max_replicas=int(ctx.capacity_adjusted_max_replicas),
                    work=work, calls_per_s=calls)


def default_replicas(ctx: Any) -> float:
    """Serve's own rule (`replica_queue_length_autoscaling_policy`) for other deployments."""
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas
    cfg = ctx.config
    target = cfg.get_target_ongoing_requests() if hasattr(cfg, "get_target_ongoing_requests") \
        else cfg.target_ongoing_requests
    return ctx.total_num_requests / target


class PoolPolicy:
    """Serve deployment-level autoscaling policy (`autoscaling_config.policy`) for one pool:
    Serve's queue rule raised by the pool's measured busy fraction (`own_replicas`). With
    `transport: channel` a request's draft and verify calls reach the replica over its socket,
    not through Serve, so Serve's ongoing-request count sees only their `channel()` calls; the
    busy fraction (`measured`, timed in the replica) sees them all. `build_app` gives it to the
    Drafter and Verifier pools that autoscale under that transport; an application-level
    policy (DrafterVerifierRatioPolicy) takes precedence where one is configured."""

    def __init__(self, target_utilization: float = 0.8):
        if not 0 < target_utilization <= 1:
            raise ValueError("target_utilization must be in (0, 1]")
        self.target_utilization = target_utilization

    def __call__(self, ctx: Any) -> tuple[float, dict]:
        if ctx.current_num_replicas == 0:
            return ctx.target_num_replicas, {}
        return own_replicas(pool_load(ctx), self.target_utilization), {}


POOL_POLICY = {"policy_function": "deployments.autoscaling:PoolPolicy",
               "policy_kwargs": {"target_utilization": 0.8}}


class DrafterVerifierRatioPolicy:
    """Serve application-level autoscaling policy (`policy_function` of the application's
    `autoscaling_policy`). Serve instantiates it once with `policy_kwargs` and calls it with
    {DeploymentID: AutoscalingContext} of the deployments that have an autoscaling_config;
    it returns ({DeploymentID: desired replicas}, {DeploymentID: state})."""

    def __init__(self, drafter: str = "Drafter", verifier: str = "Verifier",
                 target_utilization: float = 0.8):
        if not 0 < target_utilization <= 1:
            raise ValueError("target_utilization must be in (0, 1]")
        self.drafter, self.verifier = drafter, verifier
        self.target_utilization = target_utilization

    def __call__(self, contexts: dict) -> tuple[dict, dict]:
        by_name = {getattr(dep_id, "name", None) or ctx.deployment_name: dep_id
                   for dep_id, ctx in contexts.items()}
        decisions: dict = {}
        state: dict = {}
        for dep_id, ctx in contexts.items():
            decisions[dep_id] = default_replicas(ctx)
            state[dep_id] = {}
        d_id, v_id = by_name.get(self.drafter), by_name.get(self.verifier)
        if d_id is not None and v_id is not None:
            d_ctx, v_ctx = contexts[d_id], contexts[v_id]
            if d_ctx.current_num_replicas > 0 and v_ctx.current_num_replicas > 0:
                dec = ratio_policy(pool_load(d_ctx), pool_load(v_ctx), self.target_utilization)
                decisions[d_id], decisions[v_id] = dec.drafter, dec.verifier
                state[d_id] = {"ratio_policy": dec.state()}
                state[v_id] = {"ratio_policy": dec.state()}
        return decisions, state


# ---- the replicas' measurements ------------------------------------------------------------------
class BusyMeter:
    """Busy time (some call in progress) and completed calls; `sample()` gives the rates since
    the previous sample. Correct for serialized and for batching replicas alike: it measures
    the time the replica had work, not the sum of call durations."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight = 0
        self._busy_since: Optional[float] = None
        self._busy_total = 0.0
        self._calls = 0
        now = clock()
        self._last = (now, 0.0, 0)

    def enter(self) -> None:
        with self._lock:
            if self._in_flight == 0:
                self._busy_since = self._clock()
            self._in_flight += 1

    def exit(self) -> None:
        with self._lock:
            self._in_flight -= 1
            self._calls += 1
            if self._in_flight == 0 and self._busy_since is not None:
                self._busy_total += self._clock() - self._busy_since
                self._busy_since = None

    def sample(self) -> dict[str, float]:
        with self._lock:
            now = self._clock()
            busy = self._busy_total
            if self._busy_since is not None:
                busy += now - self._busy_since
            t0, b0, c0 = self._last
            self._last = (now, busy, self._calls)
            dt = now - t0
            if dt <= 0:
                return {BUSY: 0.0, CALLS: 0.0}
            return {BUSY: min(1.0, (busy - b0) / dt), CALLS: (self._calls - c0) / dt}


def measured(cls: type, *methods: str) -> type:
    """A subclass of the plain deployment class `cls` whose `methods` are timed by a BusyMeter
    and that reports it to Serve (`record_autoscaling_stats`: {deer_busy_fraction,
    deer_calls_per_s}). Everything else is `cls`'s own."""
    import functools
    import inspect

    def timed(name: str):
        inner = getattr(cls, name)
        if inspect.iscoroutinefunction(inner):
            @functools.wraps(inner)
            async def amethod(self, *args, **kwargs):
                meter = self._deer_meter()
                meter.enter()
                try:
                    return await inner(self, *args, **kwargs)
                finally:
                    meter.exit()
            return amethod

        @functools.wraps(inner)
        def method(self, *args, **kwargs):
            meter = self._deer_meter()
            meter.enter()
            try:
                return inner(self, *args, **kwargs)
            finally:
                meter.exit()
        return method

    def _deer_meter(self) -> BusyMeter:
        meter = self.__dict__.get("_deer_busy_meter")
        if meter is None:
            meter = self.__dict__.setdefault("_deer_busy_meter", BusyMeter())
        return meter

    def record_autoscaling_stats(self) -> dict[str, float]:
        return self._deer_meter().sample()

    ns = {name: timed(name) for name in methods}
    # a qualname that does not resolve: cloudpickle ships this class by value (a by-reference
    # pickle would name `cls` itself and the replicas would run it unmeasured)
    ns.update(_deer_meter=_deer_meter, record_autoscaling_stats=record_autoscaling_stats,
              __doc__=cls.__doc__, __module__=__name__,
              __qualname__=f"measured.<locals>.{cls.__name__}")
    return type(cls.__name__, (cls,), ns)
