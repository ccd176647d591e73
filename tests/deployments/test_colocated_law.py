"""The law of sampled output through the colocated decode loop (`loop: colocated`), in-process,
checked against the target's EXACT law; each check shows its power by rejecting a bug planted
in the real code path. The Router's loop has the same check (tests/deployments/test_router_law.py)
and so has the step engine's (tests/deer_serve/test_step_engine.py); this one covers what only
the colocated loop runs.

The path is the service's, without Ray: `Router.prepare` / `Router.complete` with `loop:
colocated` (admission, the session in the Router's event loop, `deployments.session.arun_session`),
whose segment is `clients.aremote_segment`: one streaming `decode` call to the real `Verifier`,
here through `StreamingHandle` (Serve's streaming-call shape: an async iterator over what the
async generator method yields, with `.cancel()`). In the Verifier:
`Verifier.decode` / `_decode` (the loop in a thread of its own, its events sent on in batches),
`_segment` (a `RemoteDrafter` over `LocalHandle` to the replica's own `Drafter`, the
`LookupDrafter` splice, `_LocalTarget` over the replica's batched `score`, the replica's
`DraftGate`) and `_events`. The default features are on: the lookup splice
(`ServiceOptions.lookup`) and adaptive k (`adaptive_k=True`, block_size 4 the largest). The
drafter is a random tiny DeerDrafter in `target-features` mode, so feature rows travel too.

Target, prompt, temperature and window as test_router_law's (a tiny random Qwen3 with V = 4
tokens and no EOS, TEMP = 0.8, WINDOW = 4 tokens per request: x1 from the prefill, x2, x3
accepted drafts or a correction, x4 a bonus or a later cycle's); exact law = prod p(x_i |
prompt, x_<i) from the target's own logits (`lawcheck.sequence_law`), m = 256 outcomes.

The check (`lawcheck.check_prefix_laws`): the joint law of (x1..x4) and the laws of its
prefixes, each at false alarm 1e-6 / 4, so <= 1e-6 in all (fixed seeds: never flaky); at
N = 6,000 requests the joint check detects TV >= 0.12 from the target's law and the prefix
checks 0.063 / 0.071 / 0.095 on theirs (printed with -rP).

Planted bugs (monkeypatched into the code this path calls):
  - the correction drawn from p instead of norm(max(0, p - q)) (`engine.accept_speculative`,
    called by the Verifier's `run_segment` -> `iter_generate`), on N requests: its TV on
    x1..x3 there is about 0.13 (the check detects 0.095);
  - the Verifier's segment decoding with a fixed seed instead of the request's (the name
    `run_segment` in `deployments.verifier`, which only the colocated loop calls): every
    request then has the same outcome.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

pytest.importorskip("pydantic")
pytest.importorskip("fastapi")

import lawcheck  # noqa: E402
import test_router_law as rl  # noqa: E402
from test_router_law import ckpt, exact  # noqa: E402,F401  (its models and exact law)

import deployments.verifier as verifier_mod  # noqa: E402
from deer_serve.drafters.lookup import LookupDrafter  # noqa: E402
from deployments.drafter import Drafter  # noqa: E402
from deployments.router import Router, RouterSettings  # noqa: E402
from deployments.verifier import Verifier  # noqa: E402

pytestmark = pytest.mark.slow

V, TEMP, WINDOW, PROMPT = rl.V, rl.TEMP, rl.WINDOW, rl.PROMPT
SCALE = float(os.environ.get("DEER_LAW_SCALE", "1"))
N = int(6_000 * SCALE)        # requests of the correct check
SEED0 = 9 * 10**6


class _Stream:
    """Serve's streaming response over an async generator method's generator: `async for`
    runs it in the caller's event loop up to its next item (as the Router reads it);
    `cancel()` closes it."""

    def __init__(self, agen):
        self.agen = agen

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.agen.__anext__()

    def cancel(self) -> None:
        asyncio.get_running_loop().create_task(self.agen.aclose())


class _StreamMethod:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs) -> _Stream:
        return _Stream(self.fn(*args, **kwargs))


class _StreamingCalls:
    def __init__(self, obj):
        self.obj = obj

    def __getattr__(self, name: str) -> _StreamMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return _StreamMethod(getattr(self.obj, name))


class StreamingHandle(rl.Handle):
    """test_router_law's handle (calls as futures of a thread pool, awaitable), whose
    `options(stream=True)` gives Serve's streaming-call shape (`aremote_segment`'s call)."""

    def options(self, **kw):
        return _StreamingCalls(self.obj) if kw.get("stream") else self


@pytest.fixture(scope="module")
def colocated(ckpt):
    """(Router with `loop: colocated`, its Verifier, the Router's Drafter), built as
    `deployments.app.build_app` builds them for that loop."""
    from deployments.app import AppConfig, check_models

    cfg = AppConfig(target_path=str(ckpt / "target"), drafter_path=str(ckpt / "drafter"),
                    device="cpu", service={"loop": "colocated"}).resolved()
    drafter_args = dict(drafter_path=cfg.drafter_path, target_path=cfg.target_path,
                        device=cfg.device, max_sequences=cfg.max_sequences,
                        use_cache=cfg.drafter_prefix_cache, batching=cfg.batching,
                        max_batch_size=cfg.max_batch_size)
    verifier = Verifier(cfg.target_path, device="cpu", feature_layers=check_models(cfg),
                        max_sequences=cfg.max_sequences, batching=cfg.batching,
                        max_batch_size=cfg.max_batch_size, tokenizer_path=cfg.tokenizer_path,
                        colocated_drafter=drafter_args)
    drafter = Drafter(**drafter_args)  # the Router's drafter handle (meta only in this loop)
    pool = ThreadPoolExecutor(4, thread_name_prefix="law-handle")
    settings = RouterSettings(served_model_name="target", tokenizer_path=cfg.tokenizer_path,
                              block_size=4, adaptive_k=True, transport="object-store",
                              loop="colocated", max_pending_requests=10**9)
    r = Router(StreamingHandle(drafter, pool), StreamingHandle(verifier, pool),
               settings.model_dump())
    assert r.settings.lookup and r.settings.loop == "colocated"  # the defaults under test
    yield r, verifier, drafter
    pool.shutdown()


def count_calls(monkeypatch, cls, name: str) -> Counter:
    """Counts the calls of `cls.name` per instance (the real method runs)."""
    calls, real = Counter(), getattr(cls, name)

    def counting(self, *a, **kw):
        calls[id(self)] += 1
        return real(self, *a, **kw)

    monkeypatch.setattr(cls, name, counting)
    return calls


# ---- planted bugs -------------------------------------------------------------------------

def plant_segment_seed_fixed(monkeypatch):
    """The Verifier's segment decodes with a fixed seed instead of the request's."""
    real = verifier_mod.run_segment

    def buggy(target, drafter, spec, **kw):
        fixed = replace(spec, sampling=replace(spec.sampling, seed=12345))
        return real(target, drafter, fixed, **kw)

    monkeypatch.setattr(verifier_mod, "run_segment", buggy)


# ---- the checks ---------------------------------------------------------------------------

def test_law_through_the_colocated_loop(monkeypatch, colocated, exact):
    router, verifier, drafter = colocated
    drafts = count_calls(monkeypatch, Drafter, "draft")
    spliced = Counter()
    real = LookupDrafter._splice

    def counting(self, seq, d):  # the real splice; counts the blocks it changed
        r = real(self, seq, d)
        spliced[r is not d] += 1
        return r

    monkeypatch.setattr(LookupDrafter, "_splice", counting)
    counts, acc, secs = rl.sample_router(router, N, SEED0)
    cycles = sum(acc.values())
    # the colocated loop ran: the Verifier's own drafter drafted, the Router's never did
    assert drafts[id(verifier.local_drafter)] > 0 and drafts[id(drafter)] == 0, drafts
    # not vacuous: cycles end in corrections and in accepted blocks (bonus tokens), and the
    # lookup splice put tokens in some blocks
    assert 0.15 * cycles < acc[0] and acc[2] > 0.05 * N, acc
    assert spliced[True] > 0.05 * sum(spliced.values()), spliced
    c = lawcheck.assert_prefix_laws(counts, exact)
    print(f"{N} requests in {secs:.0f} s; accepted per cycle {dict(acc)}; blocks spliced "
          f"{spliced[True]} of {sum(spliced.values())};", c)


# (plant, requests): the correction bug on the correct check's N (its TV on x1..x3 there is
# about 0.13, the check detects 0.095); a fixed seed puts every request on one outcome (TV on
# x1 alone about 0.47 at 300 requests, the check detects 0.28 there)
PLANTS = {"correction-from-p": (rl.plant_correction_from_p, N),
          "segment-seed-fixed": (plant_segment_seed_fixed, int(300 * SCALE))}


@pytest.mark.parametrize("name", list(PLANTS))
def test_colocated_law_check_catches_planted_bug(name, monkeypatch, colocated, exact):
    plant, n = PLANTS[name]
    plant(monkeypatch)
    counts, _, secs = rl.sample_router(colocated[0], n, SEED0)
    print(f"{n} requests in {secs:.0f} s;", lawcheck.assert_prefix_rejects(counts, exact))
