"""The one validation path behind HTTP and gRPC (deployments.schemas.parse_request)."""

from __future__ import annotations

import pytest

pytest.importorskip("pydantic")

from deployments.app import Limits  # noqa: E402
from deployments.schemas import RequestError, parse_request  # noqa: E402

LIMITS = Limits(max_tokens=100)


def parse(data, kind="completions"):
    return parse_request(data, kind=kind, served_model="m", limits=LIMITS)


def status_of(data, kind="completions") -> int:
    with pytest.raises(RequestError) as e:
        parse(data, kind)
    body = e.value.body()
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    return e.value.status


def test_defaults_are_greedy_and_null_means_unset():
    r = parse({"prompt": "x", "temperature": None, "seed": None, "max_tokens": None})
    s = r.sampling_params()
    assert s.temperature == 0.0 and s.max_new_tokens == 64 and s.seed is None and s.top_p == 1.0
    assert r.mode == "deer" and r.block_size is None and r.stops == ()


def test_values_pass_through():
    r = parse({"prompt": [5, 6], "max_tokens": 7, "temperature": 1, "top_p": 0.5, "top_k": 3,
               "seed": 0, "stop": "\n", "block_size": 8, "mode": "ar", "model": "m",
               "stream": True, "unknown_openai_field": {"x": 1}})
    s = r.sampling_params()
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.stop) == \
        (7, 1.0, 0.5, 3, 0, ("\n",))
    assert r.block_size == 8 and r.mode == "ar" and r.stream
    assert parse({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
                 "chat").messages[0].text == "hi"
    assert parse({"prompt": "x", "max_tokens": 5, "max_completion_tokens": 9}).new_tokens == 9


@pytest.mark.parametrize("data,status", [
    ([1, 2], 400), ("prompt", 400),                                  # not an object
    ({"prompt": "x", "max_tokens": "5"}, 422),                       # wrong types
    ({"prompt": "x", "max_tokens": 1.5}, 422),
    ({"prompt": "x", "max_tokens": True}, 422),
    ({"prompt": "x", "temperature": "0"}, 422),
    ({"prompt": {"a": 1}}, 422),
    ({"prompt": "x", "stop": 3}, 422),
    ({}, 422),                                                       # missing prompt
    ({"prompt": "x", "max_tokens": 0}, 400),                         # values out of range
    ({"prompt": "x", "max_tokens": 101}, 400),
    ({"prompt": "x", "temperature": -0.1}, 400),
    ({"prompt": "x", "top_p": 0}, 400),
    ({"prompt": "x", "top_p": 1.5}, 400),
    ({"prompt": "x", "top_k": -1}, 400),
    ({"prompt": "x", "block_size": 0}, 400),
    ({"prompt": "x", "block_size": 65}, 400),
    ({"prompt": "x", "seed": -1}, 400),
    ({"prompt": "x", "stop": ["a"] * 5}, 400),
    ({"prompt": "x", "stop": [""]}, 400),
    ({"prompt": "x", "mode": "fast"}, 400),
    ({"prompt": "x", "n": 2}, 400),
    ({"prompt": []}, 400),
    ({"prompt": "x", "model": "gpt-4"}, 404),
    ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, 400),
])
def test_completion_errors(data, status):
    assert status_of(data) == status


def test_nan_and_inf_are_bad_values():
    assert status_of({"prompt": "x", "temperature": float("nan")}) == 400
    assert status_of({"prompt": "x", "top_p": float("inf")}) == 400


def test_chat_errors():
    assert status_of({"messages": "hi"}, "chat") == 422
    assert status_of({"messages": []}, "chat") == 400
    assert status_of({"messages": [{"role": "robot", "content": "x"}]}, "chat") == 400
    assert status_of({"prompt": "x"}, "chat") == 422


def test_grpc_fields_use_the_same_path():
    from deer_serve.protos import deer_pb2
    from deployments.grpc_ingress import proto_fields

    msg = deer_pb2.GenerateRequest(prompt="x", seed=0, temperature=0.0, stop=["a", "b"])
    data = proto_fields(msg)
    assert data == {"prompt": "x", "seed": 0, "temperature": 0.0, "stop": ["a", "b"]}
    r = parse(data, "grpc")
    assert r.seed == 0 and r.stops == ("a", "b") and r.max_tokens == 64
    assert status_of(proto_fields(deer_pb2.GenerateRequest()), "grpc") == 400
    assert status_of(proto_fields(deer_pb2.GenerateRequest(prompt="x", max_tokens=-3)),
                     "grpc") == 400


@pytest.mark.parametrize("field,value,left", [("transport", "direct", "channel"),
                                              ("loop", "verifier", "colocated")])
def test_a_removed_topology_fails_validation_and_says_so(field, value, left):
    """`transport: direct` and `loop: verifier` were removed (issue 20): a config that still
    names one is refused by the app's config, with the reason and what to use."""
    from pydantic import ValidationError

    from deployments.app import AppConfig, ServiceOptions

    with pytest.raises(ValidationError, match=f"{field} '{value}' was removed.*'{left}'"):
        AppConfig.model_validate({"service": {field: value}})
    with pytest.raises(ValidationError, match="Input should be"):  # other values: pydantic's own
        ServiceOptions.model_validate({field: "nope"})
    assert getattr(ServiceOptions.model_validate({field: left}), field) == left


def test_the_removed_greedy_argmax_switch_is_refused_with_the_reason():
    from pydantic import ValidationError

    from deployments.app import AppConfig

    with pytest.raises(ValidationError, match="greedy_argmax was removed.*argmax tokens"):
        AppConfig.model_validate({"service": {"greedy_argmax": False}})
    assert AppConfig().adaptive_k is True  # the default decode: adaptive k with the DraftGate


def test_engine_verify_budget_takes_auto_a_count_or_null():
    from pydantic import ValidationError

    from deployments.app import ServiceOptions

    assert ServiceOptions().engine_verify_budget == "auto"  # by the target's device
    for v in (12, None, "auto"):
        assert ServiceOptions.model_validate({"engine_verify_budget": v}).engine_verify_budget == v
    for bad in (0, -3, "fast"):
        with pytest.raises(ValidationError):
            ServiceOptions.model_validate({"engine_verify_budget": bad})


def test_vllm_plain_until_needs_a_larger_plain_from():
    from pydantic import ValidationError

    from deployments.app import ServiceOptions

    ok = ServiceOptions.model_validate({"vllm_plain_from": 8, "vllm_plain_until": 4})
    assert (ok.vllm_plain_from, ok.vllm_plain_until) == (8, 4)
    for bad in ({"vllm_plain_until": 4}, {"vllm_plain_from": 4, "vllm_plain_until": 4},
                {"vllm_plain_from": 4, "vllm_plain_until": -1}):
        with pytest.raises(ValidationError, match="plain_until"):
            ServiceOptions.model_validate(bad)
