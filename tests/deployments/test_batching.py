"""Ragged batching in the replicas: concurrent calls share one forward and get their own rows.

The batches are made deterministic by holding the replica's lock while the callers queue: the
first caller leads a batch that waits on the lock, the rest pile up, and the next batch must
carry them all.
"""

import threading
import time

import numpy as np
import pytest

from tiny_models import make_target  # noqa: F401  (one torch thread)

from deer_serve.types import SamplingParams
from deployments.batching import CombiningBatcher
from deployments.drafter import Drafter
from deployments.verifier import Verifier


DEADLINE_S = 120.0  # how long a test waits for a condition before it fails (never a window)


def wait_for(cond, what: str, timeout: float = DEADLINE_S) -> None:
    """Return as soon as cond() holds; fail after `timeout` seconds."""
    t_end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < t_end, f"timed out waiting for {what}"
        time.sleep(0.002)


def _wait_queue(batcher, n):
    wait_for(lambda: len(batcher._queue) >= n, f"{n} queued callers (have {len(batcher._queue)})")


def _run_threads(fns):
    out, errs = [None] * len(fns), [None] * len(fns)

    def go(i):
        try:
            out[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001
            errs[i] = e
    ts = [threading.Thread(target=go, args=(i,)) for i in range(len(fns))]
    return ts, out, errs


def _join(ts):
    for t in ts:
        t.join(DEADLINE_S)
        assert not t.is_alive(), "a caller never returned"


def test_batcher_collects_waiting_callers_and_isolates_errors():
    gate = threading.Event()
    seen = []

    def run(items):
        seen.append(list(items))
        assert gate.wait(DEADLINE_S)
        return [ValueError(f"bad {x}") if x % 5 == 4 else x * 10 for x in items]

    b = CombiningBatcher(run, max_batch_size=4)
    ts, out, errs = _run_threads([lambda i=i: b.submit(i) for i in range(10)])
    ts[0].start()
    wait_for(lambda: bool(seen), "the first batch")
    for t in ts[1:]:
        t.start()
    _wait_queue(b, 9)
    gate.set()
    _join(ts)
    assert seen[0] == [0] and all(len(s) <= 4 for s in seen)
    assert sorted(x for s in seen for x in s) == list(range(10))       # every item ran once
    assert [len(s) for s in seen[1:]] == [4, 4, 1]                    # full batches under load
    for i in range(10):
        if i % 5 == 4:
            assert isinstance(errs[i], ValueError) and str(errs[i]) == f"bad {i}"
        else:
            assert errs[i] is None and out[i] == i * 10
    st = b.stats()
    assert st["batches"] == 4 and st["items"] == 10 and st["max_batch"] == 4


def test_batcher_failure_reaches_every_caller_of_that_batch_only():
    calls = []

    def run(items):
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return list(items)

    b = CombiningBatcher(run)
    with pytest.raises(RuntimeError, match="boom"):
        b.submit(1)
    assert b.submit(2) == 2          # the batcher is not wedged by the failure


@pytest.fixture(scope="module")
def feature_layers(tiny_checkpoints):
    from deployments.app import AppConfig, check_models

    cfg = AppConfig(target_path=str(tiny_checkpoints["target"]),
                    drafter_path=str(tiny_checkpoints["drafter-target-features"])).resolved()
    return check_models(cfg)


def test_verifier_batches_concurrent_calls_with_each_rows_own_result(tiny_checkpoints, feature_layers):
    path = str(tiny_checkpoints["target"])
    batched = Verifier(path, device="cpu", feature_layers=feature_layers)
    alone = Verifier(path, device="cpu", feature_layers=feature_layers, batching=False)
    rng = np.random.default_rng(0)
    calls = [(f"s{i}", rng.integers(2, 200, 6 + 5 * i).astype(np.int32), 1 + i % 3, i % 2 == 0)
             for i in range(6)]
    with batched._lock:                          # the first batch waits: the others queue up
        ts, out, errs = _run_threads([lambda c=c: batched.score(c[0], c[1], c[2], c[3]) for c in calls])
        for t in ts:
            t.start()
        _wait_queue(batched._batcher, 5)
    _join(ts)
    assert errs == [None] * 6
    assert batched.batch_stats()["max_batch"] == 5
    for (sid, ids, nq, rh), got in zip(calls, out):
        ref = alone.score(sid, ids, nq, rh)
        assert got.logits.shape == ref.logits.shape == (nq, ref.logits.shape[1])
        np.testing.assert_allclose(got.logits, ref.logits, atol=1e-4, rtol=1e-4)
        assert (got.logits.argmax(-1) == ref.logits.argmax(-1)).all()
        assert (got.hidden is None) == (not rh)
        if rh:
            np.testing.assert_allclose(got.hidden.astype(np.float32), ref.hidden.astype(np.float32), atol=2e-3)
    assert alone.batch_stats() == {"batching": False}


def test_drafter_batches_by_block_size_and_a_row_missing_features_fails_alone(tiny_checkpoints):
    path = str(tiny_checkpoints["drafter-target-features"])
    batched, alone = Drafter(path, device="cpu"), Drafter(path, device="cpu", batching=False)
    F = batched.backend.model.config.target_feature_dim
    rng = np.random.default_rng(1)
    g = SamplingParams()
    calls = []
    for i in range(6):
        n = 5 + 3 * i
        calls.append((f"d{i}", rng.integers(2, 200, n).astype(np.int32), 7, [4, 8][i % 2],
                      rng.standard_normal((n, F)).astype(np.float16), 0))
    # a cold sequence that sends only its last rows: this replica must ask for the rest
    calls.append(("cold", rng.integers(2, 200, 9).astype(np.int32), 7, 4,
                  rng.standard_normal((2, F)).astype(np.float16), 7))
    with batched._lock:
        ts, out, errs = _run_threads([lambda c=c: batched.draft(c[0], c[1], c[2], c[3], g, None, c[4], c[5])
                                      for c in calls])
        for t in ts:
            t.start()
        _wait_queue(batched._batcher, len(calls) - 1)
    _join(ts)
    assert errs == [None] * len(calls)
    assert batched.batch_stats()["max_batch"] == len(calls) - 1
    for c, got in zip(calls, out):
        ref = alone.draft(c[0], c[1], c[2], c[3], g, None, c[4], c[5])
        if c[0] == "cold":
            assert got.need_rows_from == 0 and got.tokens is None and ref.need_rows_from == 0
        else:
            assert got.need_rows_from is None and got.tokens.shape == (c[3],)
            assert np.array_equal(got.tokens, ref.tokens)


def test_batcher_reports_each_callers_wait_and_run():
    """A caller that arrives while a batch runs waits for it ("wait"), then its own batch runs
    ("run"); the first caller waits for nothing. Checked against instants the test reads on the
    same clock around the events (no fixed window): each reported interval must lie between
    them."""
    clock = time.perf_counter
    gate, entered = threading.Event(), threading.Event()
    t = {}

    def run(items):
        name = items[0]
        t[f"{name}_in"] = clock()
        if name == "slow":
            entered.set()
            assert gate.wait(DEADLINE_S)
        time.sleep(0.02)
        t[f"{name}_out"] = clock()
        return list(items)

    b = CombiningBatcher(run, max_batch_size=4)
    timings = [{}, {}]

    def first():
        t["first_call"] = clock()
        r = b.submit("slow", timings[0])
        t["first_back"] = clock()
        return r

    def second():
        t["second_call"] = clock()
        r = b.submit("fast", timings[1])
        t["second_back"] = clock()
        return r

    ts, out, errs = _run_threads([first, second])
    ts[0].start()
    wait_for(entered.is_set, "the first batch to start")
    ts[1].start()
    _wait_queue(b, 1)                              # the second caller is queued behind it
    t["queued_seen"] = clock()
    # hold the first batch until the second caller has been queued longer than the first
    # caller took to reach its batch function, so that its wait is the longer one
    lead = t["slow_in"] - t["first_call"]
    wait_for(lambda: clock() - t["queued_seen"] > 2 * lead + 0.01, "the hold")
    t["gate"] = clock()
    gate.set()
    _join(ts)
    assert errs == [None, None] and out == ["slow", "fast"]
    w0, r0, w1, r1 = timings[0]["wait"], timings[0]["run"], timings[1]["wait"], timings[1]["run"]
    # the first caller led its batch at once: its wait is only the way to its batch function
    assert 0 <= w0 <= t["slow_in"] - t["first_call"]
    # its run covers the batch function, held until the gate, and nothing after it returned
    assert t["slow_out"] - t["slow_in"] <= r0 <= t["first_back"] - t["first_call"] - w0
    assert r0 >= t["gate"] - t["slow_in"]
    # the second caller waited from before it was seen queued until the first batch ended
    assert w1 >= t["slow_out"] - t["queued_seen"] > t["gate"] - t["queued_seen"] > 2 * lead
    assert w1 > w0
    # its own run: its batch function, not the time it spent queued
    assert t["fast_out"] - t["fast_in"] <= r1 <= t["second_back"] - t["slow_out"]
    assert r1 >= 0.02                              # the batch function sleeps 20 ms


def test_split_timings_keeps_the_loops_total():
    from deployments.session import split_timings

    t = {"prefill": 0.5, "draft": 1.0, "verify": 2.0, "other": 0.1}
    s = split_timings(t, (0.2, 0.7), [(0.1, 0.8), None, (0.1, 0.6)])
    assert s["draft"] == pytest.approx(0.7) and s["verify"] == pytest.approx(1.4)
    assert s["waiting"] == pytest.approx(0.4) and s["transport"] == pytest.approx(0.5)
    assert s["prefill"] == 0.5 and s["other"] == 0.1
    # a pipelined draft overlapped the verify: the loop waited 0.3 s for 0.9 s of replica time
    o = split_timings(t | {"draft": 0.3}, (0.3, 0.6), [])
    assert o["draft"] == pytest.approx(0.2) and o["waiting"] == pytest.approx(0.1)
    assert o["transport"] == 0 and o["verify"] == 2.0
    for x in (s, o):
        keys = ("draft", "verify", "waiting", "transport")
        assert sum(x[k] for k in keys) == pytest.approx(
            sum(t[k] for k in ("draft", "verify")) - (0.7 if x is o else 0))
