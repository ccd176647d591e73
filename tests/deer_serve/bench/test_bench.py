"""`deer-serve bench` end to end on tiny random models, plus its pure parts (stats, suites).

The end-to-end test runs the real command in a subprocess (as scripts do) on a 2-prompt JSONL
suite with ar, deer (two block sizes), deer-pipe, hf-assisted and pld at temperatures 0 and 0.6, and checks
the three kinds of output and the results.json contract.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tiny_models import REPO, make_target

from deer_serve.bench.methods import Sample
from deer_serve.bench import stats
from deer_serve.bench.suites import jsonl_prompts, load_suite, stdlib_val_prompts

CONTRACT = ("tokens_per_s", "speedup_vs_ar", "mean_accepted", "max_accepted", "accept_hist",
            "wall_s", "identical_to_ar")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, tiny_checkpoints, tokenizer):
    root = tmp_path_factory.mktemp("bench")
    # A sharper tiny target (head_scale) keeps argmax far from ties, so the exactness check
    # tests the methods, not float rounding between one-token and many-token forwards.
    target = make_target(vocab_size=len(tokenizer), seed=0, head_scale=40.0)
    target.save_pretrained(root / "target")
    tokenizer.save_pretrained(root / "target")
    from deer_serve.models import make_tiny_drafter

    make_tiny_drafter(target.config, context_mode="target-features", seed=1).save_pretrained(
        root / "drafter")
    ar_draft = make_target(vocab_size=len(tokenizer), layers=1, seed=2, head_scale=40.0)
    ar_draft.save_pretrained(root / "ar-draft")
    tokenizer.save_pretrained(root / "ar-draft")
    suite = root / "suite.jsonl"
    suite.write_text(json.dumps({"prompt": "def add(a, b):\n    return"}) + "\n"
                     + json.dumps({"prompt": "for i in range(10):\n    print(i)\n"}) + "\n")
    out = root / "out"
    cmd = [sys.executable, "-m", "deer_serve", "bench", "--suite", str(suite), "--limit", "2",
           "--methods", "ar,deer,deer-pipe,hf-assisted,pld", "--temperature", "0,0.6",
           "--block-size", "4,2", "--max-new-tokens", "12", "--repeats", "2", "--out", str(out),
           "--target", str(root / "target"), "--drafter", str(root / "drafter"),
           "--ar-draft", str(root / "ar-draft"), "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_outputs_exist(bench_run):
    out, proc = bench_run
    for name in ("results.json", "report.md", "samples.jsonl", "speedup.png", "accept_hist.png",
                 "tau_vs_block_size.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "| method |" in report and "deer-serve bench" in report and "Machine:" in report
    assert "total" in proc.stdout


def test_results_contract(bench_run):
    out, _ = bench_run
    r = json.loads((out / "results.json").read_text())
    for key in ("machine", "suite", "n_prompts", "settings", "methods", "runs"):
        assert key in r, key
    assert r["n_prompts"] == 2 and r["complete"] is True
    for key in ("cpu", "cores", "python", "torch", "transformers"):
        assert key in r["machine"]
    assert [run["temperature"] for run in r["runs"]] == [0.0, 0.6]
    assert r["methods"] == r["runs"][0]["methods"]  # top level = the first temperature
    for run in r["runs"]:
        methods = run["methods"]
        assert set(methods) == {"ar", "deer", "deer@k2", "deer-pipe", "hf-assisted", "pld"}
        # pipelining reports its pre-drafts: hits + misses > 0, so a rate in [0, 1]
        assert 0.0 <= methods["deer-pipe"]["pipeline_hit_rate"] <= 1.0
        assert methods["deer"].get("pipeline_hit_rate") is None
        for name, m in methods.items():
            assert "error" not in m, (name, m.get("error"))
            for key in CONTRACT:
                assert key in m, (name, key)
            assert m["tokens_per_s"] > 0 and m["wall_s"] > 0
        assert methods["ar"]["speedup_vs_ar"] == pytest.approx(1.0)
        assert methods["deer"]["block_size"] == 4 and methods["deer@k2"]["block_size"] == 2
        assert len(methods["deer"]["accept_hist"]) == 5
        assert sum(methods["deer"]["accept_hist"]) > 0
        assert methods["deer"]["max_accepted"] <= 4
        assert set(methods["deer"]["ms_per_cycle"]) >= {"draft", "verify", "other"}


def test_greedy_methods_identical_to_ar(bench_run):
    out, proc = bench_run
    r = json.loads((out / "results.json").read_text())
    for name, m in r["runs"][0]["methods"].items():
        assert m["identical_to_ar"] is True, (name, m.get("mismatches"))
    assert all(m["identical_to_ar"] is None for m in r["runs"][1]["methods"].values())
    assert "NOT identical" not in proc.stderr


def test_usage_errors_exit_2(tmp_path, capsys):
    from deer_serve.bench.cli import main

    for bad in (["--methods", "ar,nope"], ["--block-size", "0"], ["--temperature", "x"],
                ["--suite", str(tmp_path / "missing.jsonl")]):
        assert main(["--out", str(tmp_path / "o"), *bad]) == 2, bad
        assert "deer-serve bench: error:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written for a bad command


# ---- pure parts -------------------------------------------------------------------------------
def _s(ids, wall=1.0, acc=None, cycles=0):
    return Sample(token_ids=ids, wall_s=wall, accept_lengths=acc, cycles=cycles,
                  target_forwards=cycles + 1, timings={"draft": 0.01 * cycles,
                                                       "verify": 0.02 * cycles, "other": 0.0})


def test_stats_summary_and_identity():
    grid = [[_s([1, 2, 3], 1.0, [2, 0], 2), _s([1, 2, 3], 0.5, [2, 0], 2)],
            [_s([4, 5], 1.0, [4], 1), _s([4, 5], 1.0, [4], 1)]]
    m = stats.summarize(grid, block_size=4)
    assert m["new_tokens"] == 10 and m["wall_s"] == pytest.approx(3.5)
    assert m["tokens_per_s"] == pytest.approx(10 / 3.5, rel=1e-3)
    assert m["tokens_per_s_by_repeat"] == [pytest.approx(2.5), pytest.approx(10 / 3, rel=1e-3)]
    assert m["tokens_per_s_median"] == pytest.approx((3 + 2) / (0.75 + 1.0), rel=1e-3)  # per prompt
    assert m["tokens_per_s_best"] == pytest.approx((3 + 2) / (0.5 + 1.0), rel=1e-3)
    assert m["accept_hist"] == [2, 0, 2, 0, 2] and m["max_accepted"] == 4
    assert m["mean_accepted"] == pytest.approx(2.0)
    assert m["ms_per_cycle"]["verify"] == pytest.approx(20.0)
    assert m["tokens_per_target_forward"] == pytest.approx(10 / 10)
    ar = [[_s([1, 2, 3]), _s([1, 2, 3])], [_s([4, 6]), _s([4, 5])]]
    ident = stats.identity(grid, ar, ["p0", "p1"])
    assert ident["identical_to_ar"] is False and ident["n_mismatched"] == 1
    assert ident["mismatches"][0] == {"prompt": "p1", "repeat": 0, "first_diff_at": 1,
                                      "len": 2, "ar_len": 2}
    methods = {"ar": {"tokens_per_s_median": 2.0, "tokens_per_s": 2.0},
               "deer": {"tokens_per_s_median": 5.0, "tokens_per_s": 4.0}}
    stats.add_speedups(methods)
    assert methods["deer"]["speedup_vs_ar"] == 2.5 and methods["deer"]["speedup_vs_ar_total"] == 2.0
    assert methods["deer"]["speedup_vs_ar_best"] is None  # no tokens_per_s_best given
    assert stats.first_diff([1, 2], [1, 2, 3]) == 2 and stats.first_diff([1], [1]) is None


def test_suites(tmp_path, monkeypatch):
    f = tmp_path / "s.jsonl"
    f.write_text('{"prompt": "a"}\n\n{"prompt": "b", "id": "x"}\n')
    assert [(p.id, p.text) for p in jsonl_prompts(f)] == [("s/0", "a"), ("x", "b")]
    assert [p.text for p in load_suite(str(f), limit=1)] == ["a"]
    f.write_text('{"text": "a"}\n')
    with pytest.raises(ValueError):
        jsonl_prompts(f)

    # stdlib-val on two stand-in validation files (walking the real stdlib takes ~30 s here)
    import deer_serve.training.corpus as corpus

    root = tmp_path / "lib"
    root.mkdir()
    body = "".join(f"x{i} = {i}\n" for i in range(60))
    (root / "a.py").write_text(body + "def f(x):\n    return x\n" + body + "    async def g(self) -> int:\n")
    (root / "b.py").write_text("def too_early():\n    pass\n" + body + "def h():\n")
    monkeypatch.setattr(corpus, "stdlib_root", lambda: root)
    monkeypatch.setattr(corpus, "list_files", lambda split: sorted(root.glob("*.py")))
    got = stdlib_val_prompts()
    assert [p.id for p in got] == ["a.py:61", "b.py:63", "a.py:123"]  # round-robin over files
    assert all(p.text.count("\n") == 48 for p in got)
    assert got[0].text.endswith("def f(x):\n") and got[2].text.endswith("async def g(self) -> int:\n")
    assert [p.text for p in got] == [p.text for p in stdlib_val_prompts()]  # deterministic
