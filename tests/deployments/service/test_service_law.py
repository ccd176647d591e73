"""The law of sampled output of the live service (a real Ray Serve app: Router, Drafter and
Verifier replicas, `loop: router`, the default features: lookup splice, adaptive k) through its
HTTP API, against the target's EXACT law, with a sound bound.

The app is deployed beside the session's (tests/deployments/service/ops_app.py) over its own tiny models:
a random Qwen3 target with V = 4 tokens and no EOS, and a random tiny DeerDrafter in
`target-features` mode (as the session app's), with the tests' tokenizer; prompts are token
ids. N seeded requests (`/v1/completions`, temperature 1, max_tokens 3, `seed` = s; the API
serves n = 1 only) go CONCURRENTLY from a few client threads, so the Verifier's and Drafter's
batchers join their calls into ragged forwards; the outcome is each response's `token_ids`
(x1 from the prefill; the first cycle drafts k = 1 under the budget: x2 is the accepted draft or
the correction, x3 the bonus when the draft was accepted, else a plain step).

Bound: `lawcheck.check_prefix_laws`: the joint law of (x1, x2, x3) (m = 64) and of its
prefixes, each at 1e-6 / 3, so false alarm <= 1e-6 in all. Fixed seeds, and a seeded request
never goes through the Router's DraftGate, so each sample is a function of its seed
(concurrent batching can only move the logits by float rounding, ~1e-7, against thresholds of
~0.1). At N = 2,000 requests the joint check detects TV >= ~0.17, the prefixes' ~0.11 / 0.12
(printed with -rP). No planted bug here: the
same decode path (Router session, RemoteTarget / RemoteDrafter, the deployment classes) is
checked with planted bugs in-process by tests/deployments/test_router_law.py.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

import lawcheck
from ops_app import delete, deploy
from tiny_models import make_target

pytestmark = [pytest.mark.service, pytest.mark.slow]

APP = "law"
V = 4
TEMP = 1.0
WINDOW = 3
PROMPT = [2, 3, 1, 2, 0, 3, 3, 1, 2, 2, 0, 1]
N = int(2_000 * float(os.environ.get("DEER_LAW_SCALE", "1")))
CLIENTS = 6
SEED0 = 9 * 10**6


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer):
    from deer_serve.models import make_tiny_drafter

    root = tmp_path_factory.mktemp("service-law")
    target = make_target(vocab_size=V, layers=1, hidden=16, seed=3, head_scale=15.0,
                         eos_token_id=None)
    target.save_pretrained(root / "target")
    tokenizer.save_pretrained(root / "target")
    make_tiny_drafter(target.config, context_mode="target-features", seed=4, hidden_size=16,
                      num_layers=1).save_pretrained(root / "drafter")
    return root


@pytest.fixture(scope="module")
def app(service, ckpt):
    a = deploy(service, APP, target_path=str(ckpt / "target"), drafter_path=str(ckpt / "drafter"),
               served_model_name="law-target", adaptive_k=True, block_size=4)
    try:
        yield a
    finally:
        delete(a)


@pytest.fixture(scope="module")
def exact(ckpt):
    from deer_serve.sampling import process_logits
    from deer_serve.targets.hf import HFTarget

    t = HFTarget.from_pretrained(str(ckpt / "target"), device="cpu")
    return lawcheck.sequence_law(
        lambda prefix: process_logits(t.score("x", PROMPT + list(prefix), 1).logits[-1], TEMP),
        V, WINDOW)


def complete(app, seed: int) -> dict:
    body = json.dumps({"model": "law-target", "prompt": PROMPT, "max_tokens": WINDOW,
                       "temperature": TEMP, "seed": seed}).encode()
    req = urllib.request.Request(app.http + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_sampled_law_of_the_live_service(app, exact):
    t0 = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        replies = list(pool.map(lambda s: complete(app, s), range(SEED0, SEED0 + N)))
    secs = time.perf_counter() - t0
    counts, acc = Counter(), Counter()
    for r in replies:
        ids = r["choices"][0]["token_ids"]
        assert len(ids) == WINDOW and not r["deer"]["fallback"], r
        counts[tuple(ids)] += 1
        acc.update(r["deer"]["accept_lengths"])
    # not vacuous: deer cycles ran, drafts were accepted (bonus tokens) and rejected
    assert acc[1] > 0.1 * N and acc[0] > 0.1 * N, acc
    print(f"{N} requests over HTTP in {secs:.0f} s ({CLIENTS} clients); accepted per cycle "
          f"{dict(acc)};", lawcheck.assert_prefix_laws(counts, exact))
