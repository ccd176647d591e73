"""The drafter:verifier ratio policy (deployments.autoscaling): its arithmetic, its Serve adapter
run through Serve's own application-level wrapper (bounds, delays), the replicas' busy meter,
and the `measured` deployment classes. No Ray cluster."""

from __future__ import annotations

import math
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployments.autoscaling import (BUSY, CALLS, BusyMeter, DrafterVerifierRatioPolicy,
                                     PoolLoad, measured, own_replicas, ratio_policy)


def pool(replicas=1, ongoing=0.0, target=2.0, max_replicas=4, work=None, calls=None):
    return PoolLoad(replicas=replicas, ongoing=ongoing, target_ongoing=target,
                    max_replicas=max_replicas, work=work, calls_per_s=calls)


# ---- arithmetic -----------------------------------------------------------------------------------
def test_unmeasured_pools_follow_serves_queue_rule():
    d = ratio_policy(pool(ongoing=6), pool(ongoing=3))
    assert not d.coupled and d.ratio is None
    assert d.drafter == 3.0 and d.verifier == 1.5          # ongoing / target_ongoing_requests


def test_utilization_raises_the_queue_rule():
    # 2 replicas 90% busy with a short queue: 1.8 / 0.8 = 2.25 replicas keep them at 80%
    assert own_replicas(pool(replicas=2, ongoing=1, work=1.8), 0.8) == pytest.approx(2.25)
    assert own_replicas(pool(replicas=2, ongoing=9, work=1.8), 0.8) == pytest.approx(4.5)


def test_steady_state_ratio_equals_measured_work_ratio():
    # draft 3x slower than verify, nothing queued beyond the in-service calls
    d = ratio_policy(pool(ongoing=6, work=3.0, calls=30), pool(ongoing=2, work=1.0, calls=30))
    assert d.coupled and d.ratio == pytest.approx(3.0)
    assert d.drafter / d.verifier == pytest.approx(3.0)
    assert d.draft_s == pytest.approx(0.1) and d.verify_s == pytest.approx(1 / 30)


def test_verifier_bottleneck_keeps_the_drafters_serve_would_remove():
    """Closed loop, equal service times: 20 requests wait at the saturated verifiers, the 3
    drafters see 1. Serve's rule alone: 0.5 drafters. The policy keeps the drafters the
    verifiers' growth will need (the in-flight requests split 1:1 by work), capped by what the
    verifiers' max (4) can feed at this ratio."""
    drafter = pool(replicas=3, ongoing=1, work=2.0, calls=20)
    verifier = pool(replicas=2, ongoing=20, work=2.0, calls=20)
    assert own_replicas(drafter, 0.8) == pytest.approx(2.5)
    d = ratio_policy(drafter, verifier, target_utilization=0.8)
    assert d.coupled and d.ratio == pytest.approx(1.0)
    assert d.verifier == pytest.approx(10.0)               # own queue rule: 20 / 2
    assert d.drafter == pytest.approx(4.0)                 # min(split 21*0.5/2, cap 4*1.0)
    bigger = ratio_policy(drafter, pool(replicas=2, ongoing=20, work=2.0, max_replicas=16))
    assert bigger.drafter == pytest.approx(21 * 0.5 / 2)   # uncapped split


def test_drafter_bottleneck_scales_verifiers_by_their_share():
    # drafts take 4x the verify time; drafters saturated, 30 requests waiting for drafts
    d = ratio_policy(pool(replicas=2, ongoing=30, work=2.0),
                     pool(replicas=1, ongoing=0.5, work=0.5, max_replicas=8), 0.8)
    assert d.drafter == pytest.approx(15.0)                # 30 / 2
    # verifier: own 0.625; split (30.5 * 0.2) / 2 = 3.05; cap 4 (drafter max) * 0.25 = 1.0
    assert d.verifier == pytest.approx(1.0)


def test_load_on_one_pool_scales_only_that_pool():
    d = ratio_policy(pool(ongoing=8, work=1.0), pool(ongoing=0, work=0.0))
    assert not d.coupled and d.drafter == pytest.approx(4.0) and d.verifier == 0.0
    v = ratio_policy(pool(ongoing=0, work=None), pool(ongoing=8, work=1.0))
    assert not v.coupled and v.drafter == 0.0 and v.verifier == pytest.approx(4.0)


def test_idle_pools_want_nothing():
    d = ratio_policy(pool(), pool())
    assert d.drafter == 0.0 and d.verifier == 0.0          # Serve's wrapper applies min_replicas


def test_bad_utilization():
    with pytest.raises(ValueError):
        ratio_policy(pool(), pool(), target_utilization=0)
    with pytest.raises(ValueError):
        DrafterVerifierRatioPolicy(target_utilization=1.5)


loads = st.builds(pool, replicas=st.integers(1, 8), ongoing=st.floats(0, 200),
                  target=st.floats(0.5, 16), max_replicas=st.integers(1, 16),
                  work=st.one_of(st.none(), st.floats(0, 16)), calls=st.floats(0, 500))


@settings(max_examples=300, deadline=None)
@given(loads, loads, st.floats(0.1, 1.0))
def test_coupling_only_adds_and_never_beyond_the_other_pools_reach(d_load, v_load, u):
    d = ratio_policy(d_load, v_load, u)
    own_d, own_v = own_replicas(d_load, u), own_replicas(v_load, u)
    assert d.drafter >= own_d and d.verifier >= own_v
    if d.coupled:
        cap_d = v_load.max_replicas * d_load.work / v_load.work
        cap_v = d_load.max_replicas * v_load.work / d_load.work
        assert d.drafter <= max(own_d, cap_d) * (1 + 1e-9)
        assert d.verifier <= max(own_v, cap_v) * (1 + 1e-9)
    else:
        assert (d.drafter, d.verifier) == (own_d, own_v)
    assert all(math.isfinite(x) for x in (d.drafter, d.verifier))


# ---- the Serve adapter, through Serve's own application-level wrapper ---------------------------
def serve_ctx(name, *, replicas, ongoing, work=None, calls=None, target=2.0, min_r=1, max_r=4,
              target_replicas=None, upscale_delay_s=0.0, downscale_delay_s=0.0, state=None):
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    dep = DeploymentID(name=name, app_name="deer")
    running = [ReplicaID(unique_id=f"{name}-{i}", deployment_id=dep) for i in range(replicas)]
    metrics = {}
    if work is not None:
        metrics[BUSY] = {r: work / replicas for r in running}
        metrics[CALLS] = {r: (calls or 0.0) / replicas for r in running}
    cfg = AutoscalingConfig(min_replicas=min_r, max_replicas=max_r,
                            target_ongoing_requests=target, upscale_delay_s=upscale_delay_s,
                            downscale_delay_s=downscale_delay_s)
    return dep, AutoscalingContext(
        deployment_id=dep, deployment_name=name, app_name="deer", current_num_replicas=replicas,
        target_num_replicas=replicas if target_replicas is None else target_replicas,
        running_replicas=running, total_num_requests=float(ongoing), total_queued_requests=0.0,
        aggregated_metrics=metrics, raw_metrics={}, capacity_adjusted_min_replicas=min_r,
        capacity_adjusted_max_replicas=max_r, policy_state=state or {}, last_scale_up_time=None,
        last_scale_down_time=None, current_time=0.0, config=cfg)


def wrapped_policy(**kwargs):
    """Exactly what the Serve controller runs: the policy resolved from its config
    (cloudpickled by value, instantiated with policy_kwargs) inside Serve's wrapper."""
    from ray.serve._private.autoscaling_state import _resolve_policy_callable
    from ray.serve.autoscaling_policy import _apply_app_level_autoscaling_config
    from ray.serve.config import AutoscalingPolicy

    policy = AutoscalingPolicy(
        policy_function="deployments.autoscaling:DrafterVerifierRatioPolicy",
        policy_kwargs=kwargs)
    raw = pickle.loads(pickle.dumps(policy))  # travels to the controller
    return _apply_app_level_autoscaling_config(_resolve_policy_callable(raw))


def test_serve_wrapper_applies_ratio_bounds_and_leaves_the_router_to_serves_rule():
    policy = wrapped_policy(target_utilization=0.8)
    d_id, d_ctx = serve_ctx("Drafter", replicas=3, ongoing=1, work=2.0, calls=20, max_r=4)
    v_id, v_ctx = serve_ctx("Verifier", replicas=2, ongoing=20, work=2.0, calls=20, max_r=4)
    r_id, r_ctx = serve_ctx("Router", replicas=1, ongoing=6, target=2.0, max_r=2)
    decisions, state = policy({d_id: d_ctx, v_id: v_ctx, r_id: r_ctx})
    assert decisions[v_id] == 10                # Serve clips to max_replicas later (apply_bounds)
    assert decisions[d_id] == 4                 # kept (Serve's own rule would say 1)
    assert decisions[r_id] == 3                 # 6 / 2: Serve's queue rule
    assert state[d_id]["ratio_policy"]["ratio"] == pytest.approx(1.0)


def test_serve_wrapper_holds_the_downscale_delay():
    policy = wrapped_policy()
    d_id, d_ctx = serve_ctx("Drafter", replicas=3, ongoing=0, downscale_delay_s=30)
    v_id, v_ctx = serve_ctx("Verifier", replicas=1, ongoing=0, downscale_delay_s=30)
    decisions, _ = policy({d_id: d_ctx, v_id: v_ctx})
    assert decisions[d_id] == 3                 # wants 1, waits 30 s first


def test_pool_policy_scales_on_work_serve_does_not_see():
    """`transport: channel`: the calls come over sockets, so Serve counts no ongoing requests;
    the deployment-level PoolPolicy (through Serve's deployment wrapper: delays, factors)
    scales by the measured busy fraction, and by the queue when that is the larger."""
    from ray.serve._private.autoscaling_state import _resolve_policy_callable
    from ray.serve.autoscaling_policy import _apply_autoscaling_config
    from ray.serve.config import AutoscalingPolicy

    from deployments.autoscaling import POOL_POLICY

    raw = pickle.loads(pickle.dumps(AutoscalingPolicy(**POOL_POLICY)))
    policy = _apply_autoscaling_config(_resolve_policy_callable(raw))
    _, busy = serve_ctx("Drafter", replicas=2, ongoing=0, work=1.9, calls=50, max_r=4)
    assert policy(busy)[0] == 3                   # 1.9 / 0.8 = 2.4 -> 3; Serve's rule: 0 -> 1
    _, idle = serve_ctx("Drafter", replicas=2, ongoing=0, work=0.0, calls=0)
    assert policy(idle)[0] == 1
    _, queued = serve_ctx("Verifier", replicas=1, ongoing=7, work=0.5, calls=5, max_r=8)
    assert policy(queued)[0] == 4                 # 7 / 2 -> 4


def test_channel_pools_get_the_pool_policy_unless_they_name_one():
    from deployments.app import DeploymentConfig, pool_options

    auto = DeploymentConfig(autoscaling_config={"min_replicas": 1, "max_replicas": 3})
    assert pool_options(auto, "channel")["autoscaling_config"]["policy"]["policy_function"] \
        == "deployments.autoscaling:PoolPolicy"
    assert "policy" not in pool_options(auto, "object-store")["autoscaling_config"]
    own = DeploymentConfig(autoscaling_config={"max_replicas": 3, "policy": {
        "policy_function": "x:y"}})
    assert pool_options(own, "channel")["autoscaling_config"]["policy"] == {"policy_function": "x:y"}
    assert "autoscaling_config" not in pool_options(DeploymentConfig(num_replicas=2), "channel")


def test_policy_without_a_drafter_is_serves_rule():
    policy = DrafterVerifierRatioPolicy()
    v_id, v_ctx = serve_ctx("Verifier", replicas=2, ongoing=9)
    decisions, _ = policy({v_id: v_ctx})
    assert decisions[v_id] == pytest.approx(4.5)


# ---- measurements ----------------------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_busy_meter_counts_overlapping_calls_once():
    clock = FakeClock()
    m = BusyMeter(clock)
    m.enter()
    clock.t += 1.0
    m.enter()                                   # a second call while the first runs
    clock.t += 1.0
    m.exit()
    clock.t += 1.0
    m.exit()
    clock.t += 1.0                              # idle
    s = m.sample()
    assert s[BUSY] == pytest.approx(3 / 4) and s[CALLS] == pytest.approx(2 / 4)
    m.enter()
    clock.t += 2.0                              # in progress at the sample: counted so far
    s = m.sample()
    assert s[BUSY] == pytest.approx(1.0) and s[CALLS] == 0.0
    clock.t += 2.0
    m.exit()
    assert m.sample()[BUSY] == pytest.approx(1.0)


class Plain:
    """A plain deployment class."""

    def __init__(self, x):
        self.x = x

    def work(self, y):
        return self.x + y

    async def awork(self, y):
        return self.x * y

    def other(self):
        return "other"


def test_measured_class_reports_and_ships_by_value():
    import asyncio

    from ray import cloudpickle

    cls = measured(Plain, "work", "awork")
    assert issubclass(cls, Plain) and cls.__name__ == "Plain" and cls is not Plain
    obj = cls(2)
    assert obj.work(3) == 5 and asyncio.run(obj.awork(3)) == 6 and obj.other() == "other"
    stats = obj.record_autoscaling_stats()
    assert set(stats) == {BUSY, CALLS} and stats[CALLS] > 0
    assert all(isinstance(v, float) for v in stats.values())
    # Serve cloudpickles the deployment class: it must arrive measured, not as `Plain`
    again = cloudpickle.loads(cloudpickle.dumps(cls))
    assert again is not Plain and hasattr(again, "record_autoscaling_stats")
    assert again(1).work(1) == 2
