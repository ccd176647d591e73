"""`deer-serve train drafter` interrupted and run again with the same flags resumes from its
checkpoint: the step after the checkpoint's, the same state (weights, AdamW moments, step count,
the batches of each step), and it ends with the same weights, bit for bit, as a run of the same
seed that was never interrupted.

The run is interrupted by an exception raised from the (N+2)th step's loss, after the
checkpoint at step N (the command checkpoints every 100 steps and at the end) and after one
more step that the checkpoint does not hold: that step is trained again on resume.
"""

from __future__ import annotations

import json

import pytest
import torch

from any_targets import make_gpt2, write_prompts

from deer_serve.cli import run as cli_run

pytestmark = pytest.mark.slow

TINY = ["--prompt-len", "12", "--gen-len", "16", "--block-size", "8", "--batch-size", "2",
        "--block-tokens", "18", "--eval-blocks", "8", "--teacher-batch-size", "8", "--threads", "1"]
STEPS = ["--stage1-steps", "4", "--stage2-steps", "104"]  # 108 steps: checkpoints at 100, 108
TOTAL, CKPT = 108, 100


class Interrupted(Exception):
    pass


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def strip(recs: list[dict]) -> list[dict]:
    """The records without their wall-clock field."""
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in recs]


def final_weights(out) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


def assert_same_state(a: dict, b: dict) -> None:
    """Two torch state dicts (nested: the optimizer's) are equal, bit for bit."""
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            assert_same_state(x, y)
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y), k
        elif isinstance(x, list) and x and isinstance(x[0], dict):
            assert len(x) == len(y)
            for u, v in zip(x, y):
                assert_same_state(u, v)
        else:
            assert x == y, k


def test_an_interrupted_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path, monkeypatch,
                                                                         capsys):
    from deer_serve.training.d2a import D2ARun

    target, prompts = make_gpt2(tmp_path / "gpt2"), write_prompts(tmp_path / "prompts.jsonl")

    def args(out):
        return ["train", "drafter", "--target", str(target), "--prompts", str(prompts),
                "--out", str(out), *TINY, *STEPS]

    # the run that is never interrupted
    assert cli_run(args(tmp_path / "a")) == 0, capsys.readouterr().err[-3000:]
    a_recs = records(tmp_path / "a")
    assert [r["step"] for r in a_recs] == list(range(1, TOTAL + 1))
    a_ckpt = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    assert a_ckpt["step"] == TOTAL

    # the same run, stopped by an error in step CKPT + 2 (0-based index CKPT + 1)
    loss = D2ARun.loss
    seen: list[int] = []
    interrupt = [True]

    def failing(self, step):
        seen.append(step)
        if step == CKPT + 1 and interrupt[0]:
            interrupt[0] = False
            raise Interrupted(f"stopped at step index {step}")
        return loss(self, step)

    monkeypatch.setattr(D2ARun, "loss", failing)
    out = tmp_path / "b"
    with pytest.raises(Interrupted):
        cli_run(args(out))
    stopped = torch.load(out / "ckpt.pt", weights_only=False)
    assert stopped["step"] == CKPT                       # the last checkpoint before the error
    assert [r["step"] for r in records(out)] == list(range(1, CKPT + 2))  # one step past it
    assert not (out / "final").exists()
    # what the checkpoint holds is what the uninterrupted run had after CKPT steps: the same
    # losses on the way (same batches, same updates) and the optimizer's step count
    assert strip(records(out)) == strip(a_recs[:CKPT + 1])
    opt_steps = {int(s["step"]) for s in stopped["opt"]["state"].values()}
    assert opt_steps == {CKPT}

    # the same command again: it resumes at step CKPT + 1
    seen.clear()
    assert cli_run(args(out)) == 0, capsys.readouterr().err[-3000:]
    assert seen == list(range(CKPT, TOTAL))              # steps CKPT+1 .. TOTAL, each once
    b_recs = records(out)
    assert [r["step"] for r in b_recs] == list(range(1, TOTAL + 1))  # no step logged twice
    assert strip(b_recs) == strip(a_recs)
    b_ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert b_ckpt["step"] == TOTAL
    assert_same_state(b_ckpt["model"], a_ckpt["model"])
    assert_same_state(b_ckpt["opt"], a_ckpt["opt"])
    wa, wb = final_weights(tmp_path / "a"), final_weights(out)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # and the checkpoint it resumed from is not the end state (training did move on)
    assert any(not torch.equal(stopped["model"][k], a_ckpt["model"][k]) for k in a_ckpt["model"])
    a_final = json.loads((tmp_path / "a" / "final" / "metrics.json").read_text())
    b_final = json.loads((out / "final" / "metrics.json").read_text())
    assert b_final["final"] == a_final["final"]          # the same held-out acceptance
