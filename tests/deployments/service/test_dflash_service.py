"""A DFlash-format drafter through the Ray Serve app: the Drafter replica loads the DFlash
checkpoint plus the target's embeddings and head only, the Verifier returns the target layers
the drafter names, and greedy completions (HTTP and gRPC) equal in-process plain AR."""

from __future__ import annotations

import grpc
import pytest

from deer_serve.protos import deer_pb2, deer_pb2_grpc

from ops_app import delete, deploy, plain_ar

pytestmark = pytest.mark.service

PROMPTS = ["def add(a, b):\n", "class Point:"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def app(service, tiny_checkpoints):
    a = deploy(service, "dflash", drafter_path=str(tiny_checkpoints["drafter-dflash"]),
               block_size=6)
    yield a
    delete(a)


def test_dflash_drafter_replica_meta(app):
    from deer_serve.drafters import drafter_feature_layers

    meta = app.handle("Drafter").meta.remote().result(timeout_s=120)
    assert meta["format"] == "dflash" and meta["context_mode"] == "target-features"
    layers = drafter_feature_layers(app.config["drafter_path"])
    assert meta["feature_layers"] == layers == [1, 2]  # target layers 0 and 1, +1 (embeddings)


def test_dflash_completions_equal_plain_ar(app, service):
    openai = pytest.importorskip("openai")
    ref = plain_ar(service.target_path, PROMPTS, MAX_TOKENS)
    client = openai.OpenAI(base_url=app.http + "/v1", api_key="unused", max_retries=0, timeout=120)
    for p in PROMPTS:
        r = client.completions.create(model=app.model, prompt=p, max_tokens=MAX_TOKENS,
                                      temperature=0)
        assert r.choices[0].text == ref[p].text
        deer = r.model_extra["deer"]
        assert deer["fallback"] is False and deer["cycles"] >= 1
        assert all(0 <= a <= 6 for a in deer["accept_lengths"])
    with grpc.insecure_channel(service.grpc) as ch:
        stub = deer_pb2_grpc.DeerServiceStub(ch)
        got = stub.Generate(deer_pb2.GenerateRequest(prompt=PROMPTS[0], max_tokens=MAX_TOKENS),
                            metadata=app.metadata, timeout=120)
        assert got.text == ref[PROMPTS[0]].text
