"""`deer-serve generate`: the DESIGN.md section 4 contract, on tiny random checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from deer_serve import cli

from tiny_models import REPO


def gen_args(ckpt, mode="deer", drafter="drafter-tokens", *extra):
    return ["generate", "--target", str(ckpt["target"]), "--drafter", str(ckpt[drafter]),
            "--mode", mode, "--max-new-tokens", "24", "--ignore-eos", "--device", "cpu", *extra]


def run_json(capsys, args) -> list[dict]:
    assert cli.run(args) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.fixture
def prompts_file(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text(json.dumps({"prompt": "def add(a, b):"}) + "\n\n"
                 + json.dumps({"prompt": "import os\nimport"}) + "\n")
    return p


def test_generate_json_subprocess_deer_equals_ar(tiny_checkpoints, prompts_file, capsys):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "deer_serve",
         *gen_args(tiny_checkpoints, "deer", "drafter-target-features", "--block-size", "8",
                   "--prompts", str(prompts_file), "--json")],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    deer = [json.loads(line) for line in proc.stdout.splitlines()]
    ar = run_json(capsys, gen_args(tiny_checkpoints, "ar", "drafter-tokens",
                                   "--prompts", str(prompts_file), "--json"))
    assert len(deer) == len(ar) == 2
    for d, a in zip(deer, ar):
        assert {"text", "token_ids", "accept_lengths", "elapsed_s", "finish_reason",
                "mean_accepted"} <= set(d)
        assert d["token_ids"] == a["token_ids"] and d["text"] == a["text"]
        assert len(d["token_ids"]) == 24 and d["finish_reason"] == "length"
        assert a["accept_lengths"] == [] and all(0 <= n <= 8 for n in d["accept_lengths"])
        assert d["elapsed_s"] > 0


def test_generate_human_output_and_stop(tiny_checkpoints, capsys):
    args = gen_args(tiny_checkpoints, "deer", "drafter-tokens", "def add(a, b):")
    assert cli.run(args) == 0
    out = capsys.readouterr()
    text = out.out[:-1]  # print adds a newline
    assert "[deer] 24 tokens" in out.err and "finish: length" in out.err
    if len(text) > 4:
        stop = text[2:4]
        rows = run_json(capsys, args + ["--stop", stop, "--json"])
        assert rows[0]["finish_reason"] == "stop" and rows[0]["text"] == text[:text.find(stop)]


@pytest.mark.parametrize("extra, message", [
    (["--block-size", "0"], "--block-size must be in [1, 64]"),
    (["--block-size", "65"], "--block-size must be in [1, 64]"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--top-k", "-1"], "top_k must be >= 0"),
    (["--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
])
def test_bad_parameters_exit_2(tiny_checkpoints, capsys, extra, message):
    assert cli.run(gen_args(tiny_checkpoints, "deer", "drafter-tokens", "hi", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_inputs_exit_2(tiny_checkpoints, tmp_path, capsys, monkeypatch):
    def expect(args, message):
        assert cli.run(args) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err

    expect(gen_args(tiny_checkpoints), "give a PROMPT or --prompts")
    expect(gen_args(tiny_checkpoints, "deer", "drafter-tokens", "--prompts", str(tmp_path / "no")),
           "cannot read --prompts")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "x"}\n')
    expect(gen_args(tiny_checkpoints, "deer", "drafter-tokens", "--prompts", str(bad)),
           'bad.jsonl:2: expected {"prompt": "..."}')
    expect(["generate", "hi", "--target", str(tmp_path)], "no checkpoint there")
    # no flags and no embedded default: say so
    monkeypatch.setattr("deer_serve.assets.default_paths",
                        lambda: (tmp_path / "target", tmp_path / "drafter"))
    expect(["generate", "hi"], "the embedded default target is missing")
    # argparse's own errors exit 2 as well
    with pytest.raises(SystemExit) as e:
        cli.run(["generate", "hi", "--mode", "beam"])
    assert e.value.code == 2
    capsys.readouterr()


def test_vllm_backend_missing_is_a_clear_error(tiny_checkpoints, capsys):
    try:
        import deer_serve.targets.vllm_backend  # noqa: F401
        pytest.skip("the vllm backend is installed")
    except ImportError:
        pass
    assert cli.run(gen_args(tiny_checkpoints, "ar", "drafter-tokens", "hi",
                            "--target-backend", "vllm")) == 2
    assert "--target-backend vllm is not available" in capsys.readouterr().err


def test_delegated_subcommands(monkeypatch, capsys):
    monkeypatch.setitem(cli.DELEGATED, "serve", ("deer_serve.no_such_module", "x", "serve"))
    assert cli.run(["serve", "--config", "x.yaml"]) == 2
    assert "deer-serve serve: not available" in capsys.readouterr().err
    seen = {}

    def fake_main(argv):
        seen["argv"] = argv
        return 0

    fake = type(sys)("fake_cli")
    fake.main = fake_main
    monkeypatch.setitem(sys.modules, "fake_cli", fake)
    monkeypatch.setitem(cli.DELEGATED, "bench", ("fake_cli", "x", None))
    assert cli.run(["bench", "--suite", "humaneval", "--limit", "2"]) == 0
    assert seen["argv"] == ["--suite", "humaneval", "--limit", "2"]
