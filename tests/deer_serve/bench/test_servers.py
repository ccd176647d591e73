"""`deer-serve bench-serve` (deer_serve.bench.servers): its pure parts on recorded numbers, and
the real client against real servers (`deer-serve serve`, and vLLM's OpenAI server where vLLM is
installed), each a subprocess on the embedded target, checked against in-process AR decoding."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

import pytest

from deer_serve.bench import serve_client as C
from deer_serve.bench import serve_report as R
from deer_serve.bench import server_process as P
from deer_serve.bench import servers as S


# ---- specs and commands -------------------------------------------------------------------------

def test_parse_server_kinds_and_options(tmp_path):
    s = P.parse_server("deer-ar")
    assert (s.kind, s.options, s.body()) == ("deer-ar", {}, {"mode": "ar"})
    assert P.parse_server("deer").body() == {"mode": "deer"}
    assert P.parse_server("vllm").body() == {"return_token_ids": True}
    s = P.parse_server("deer:loop=engine:block_size=8:body.pipeline=false")
    assert s.name == "deer:loop=engine:block_size=8:body.pipeline=false"
    assert s.body() == {"mode": "deer", "pipeline": False}
    args = P.deer_config(s)["applications"][0]["args"]
    assert args["service"]["loop"] == "engine" and args["block_size"] == 8
    assert "pipeline" not in args
    # the other app args of the default config are kept
    assert args["limits"]["max_tokens"] == 2048
    cfg = tmp_path / "c.yaml"
    cfg.write_text("applications:\n  - name: deer\n    args: {block_size: 4}\n")
    args = P.deer_config(P.parse_server(f"deer:config={cfg}:service.transport=object-store"))
    assert args["applications"][0]["args"] == {"block_size": 4,
                                               "service": {"transport": "object-store"}}
    # deer-ar on the vllm loop: mode ar runs on the replica's plain engine
    vllm_cfg = tmp_path / "v.yaml"
    vllm_cfg.write_text("applications:\n  - name: deer\n    args: {service: {loop: vllm}}\n")

    def service(spec):
        return P.deer_config(P.parse_server(spec))["applications"][0]["args"]["service"]

    assert service(f"deer-ar:config={vllm_cfg}") == {"loop": "vllm", "vllm_plain_engine": True}
    assert service(f"deer:config={vllm_cfg}") == {"loop": "vllm"}
    assert service(f"deer-ar:config={vllm_cfg}:service.vllm_plain_engine=false") == {
        "loop": "vllm", "vllm_plain_engine": False}  # what the spec says stands
    assert service(f"deer-ar:config={vllm_cfg}:loop=router") == {"loop": "router"}
    for bad in ("sglang", "deer:loop", "deer:config=/no/such.yaml", f"vllm:config={cfg}"):
        with pytest.raises(P.UsageError):
            P.parse_server(bad)


def test_vllm_command():
    cmd = P.vllm_command(P.parse_server("vllm-ngram:max_num_seqs=16:enable_prefix_caching=true"),
                         "/m/target", 8123, cpu=True)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    i = cmd.index("--speculative-config")
    assert json.loads(cmd[i + 1]) == P.NGRAM_CONFIG
    assert cmd[cmd.index("--max-num-seqs") + 1] == "16"
    assert "--enable-prefix-caching" in cmd and "--dtype" in cmd
    assert cmd[cmd.index("--served-model-name") + 1] == "target"
    assert "--speculative-config" not in P.vllm_command(P.parse_server("vllm"), "/m/t", 1,
                                                        cpu=False)
    # vLLM's own default, compiled, as deer-serve's shipped config (`vllm_compile`); eager on ask
    assert "--enforce-eager" not in cmd
    assert "--enforce-eager" in P.vllm_command(P.parse_server("vllm:enforce_eager=true"), "/m/t",
                                               1, cpu=True)


# ---- aggregation on recorded numbers ------------------------------------------------------------

def rec(pid, ids, ttft, lat, error=None):
    return C.RequestRecord(prompt_id=pid, tokens=len(ids), usage_tokens=len(ids), ttft_s=ttft,
                           latency_s=lat, token_ids=list(ids), error=error)


def test_percentile_interpolates():
    assert R.percentile([], 50) is None
    assert R.percentile([3.0], 90) == 3.0
    assert R.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert R.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)


def test_summarize_level():
    recs = [rec("a", range(5), 0.1, 0.5),     # tpot (0.5 - 0.1) / 4 = 0.1
            rec("b", range(3), 0.2, 0.4),     # 0.1
            rec("c", range(9), 0.3, 1.1),     # 0.1
            rec("d", [1], 0.05, 0.05),        # one token: no tpot
            rec("e", range(7), None, None, error="HTTP 500")]
    s = R.summarize_level(recs, wall_s=2.0)
    assert (s["requests"], s["ok"], s["errors"], s["tokens"]) == (5, 4, 1, 18)
    assert s["tokens_per_s"] == 9.0                       # failed requests' tokens not counted
    assert s["ttft_ms_p50"] == pytest.approx(150.0)       # of 50, 100, 200, 300 ms
    assert s["ttft_ms_p90"] == pytest.approx(270.0)
    assert s["tpot_ms_p50"] == pytest.approx(100.0) and s["tpot_ms_p90"] == pytest.approx(100.0)
    assert s["latency_ms_p50"] == pytest.approx(450.0)
    assert recs[3].tpot_s is None and recs[0].tpot_s == pytest.approx(0.1)


def test_identity_report_and_plot(tmp_path):
    def level(records, wall):
        return {"summary": R.summarize_level(records, wall),
                "records": [asdict(r) | {"tpot_s": r.tpot_s} for r in records]}

    results = {
        "machine": "m", "command": "deer-serve bench-serve ...", "warnings": [],
        "settings": {"suite": "humaneval", "n_prompts": 2, "max_tokens": 4, "threads": 1,
                     "warmup": 0, "reference": "vllm"},
        "servers": {
            "vllm": {"levels": {"1": level([rec("p0", [1, 2, 3, 4], .1, .4),
                                            rec("p1", [5, 6], .1, .2)], 1.0),
                                "4": level([rec("p0", [1, 2, 3, 4], .1, .4),
                                            rec("p1", [5, 6], .1, .2)], 0.5)}},
            "deer": {"levels": {"1": level([rec("p0", [1, 2, 9, 4], .1, .4),
                                            rec("p1", [5, 6], .1, .2)], 0.8)},
                     "vllm_bench": {"1": {"output_throughput": 123.4, "completed": 16,
                                          "failed": 0, "total_output_tokens": 2048,
                                          "median_ttft_ms": 20.0, "median_tpot_ms": 7.5}}},
            "broken": {"levels": {}, "error": "RuntimeError: exited with 2"}}}
    R.add_identity(results)
    ident = results["servers"]["deer"]["levels"]["1"]["identity"]
    assert (ident["identical"], ident["compared"]) == (1, 2)
    assert ident["mismatches"][0] == {"prompt_id": "p0", "first_diff": 2, "tokens": 4,
                                           "reference_tokens": 4, "got": [9, 4],
                                           "reference": [3, 4]}
    assert results["servers"]["vllm"]["levels"]["4"]["identity"]["identical"] == 2
    R.write_report(results, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| vllm | 4 | 12.0 | 100.0 / 100.0 |" in md
    assert "| deer | 1 | 7.5 |" in md and "| 1/2 |" in md
    assert "| deer | 1 | 123.4 | 16 (0) | 2048 | 20.0 | 7.50 |" in md
    assert "deer c=1 p0: first differing token at 2" in md
    assert "| broken | - | failed: RuntimeError: exited with 2" in md
    assert json.loads((tmp_path / "results.json").read_text())["servers"]["vllm"]["levels"]
    assert (tmp_path / "servers.png").stat().st_size > 1000


# ---- real servers -------------------------------------------------------------------------------

def ar_reference(prompts, max_tokens):
    """In-process greedy AR decoding of the embedded target: the token ids every server owes."""
    from transformers import AutoTokenizer

    from deer_serve.assets import default_paths
    from deer_serve.engine import generate
    from deer_serve.targets.hf import HFTarget
    from deer_serve.types import SamplingParams

    path = str(default_paths()[0])
    tok = AutoTokenizer.from_pretrained(path)
    target = HFTarget.from_pretrained(path, device="cpu")
    sp = SamplingParams(temperature=0.0, max_new_tokens=max_tokens)
    return {pid: generate(target, None, tok.encode(text, add_special_tokens=False), sp,
                          mode="ar").token_ids for pid, text in prompts}


def run_server(spec, tmp_path, max_tokens=8, port_taken=False):
    """port_taken: another process listens on the port the server picked first (as when one
    of Ray's processes takes it between the pick and the bind); the server must come up on
    another port, its first try stopped."""
    import socket

    from deer_serve.assets import default_paths
    from deer_serve.bench.suites import load_suite

    prompts = [(p.id, p.text) for p in load_suite("humaneval", 2)]
    server = P.Server(P.parse_server(spec), target=str(default_paths()[0]), drafter=None,
                      log_dir=tmp_path, threads=1)
    first_port, holder = server.port, None
    if port_taken:
        holder = socket.socket()
        holder.bind(("127.0.0.1", first_port))
        holder.listen()
    try:
        server.start_ready(600)
    except BaseException:
        server.stop()
        raise
    finally:
        if holder is not None:
            holder.close()
    sid = server.proc.pid
    try:
        assert server.model == "target"
        assert (server.port != first_port) == port_taken, (server.port, first_port)
        levels = {(c, stream): C.run_level(server.url, server.model, prompts, c, max_tokens,
                                           server.spec.body(), 300, stream)
                  for c, stream in ((1, True), (2, True), (2, False))}  # --no-stream: False
    finally:
        server.stop()
    assert P.session_pids(sid) == [], "the server left processes behind"
    ref = ar_reference(prompts, max_tokens)
    for (c, stream), (recs, wall) in levels.items():
        assert [r.prompt_id for r in recs] == [p for p, _ in prompts]
        for r in recs:
            assert r.error is None, r.error
            assert r.tokens == len(r.token_ids) == r.usage_tokens == max_tokens, r
            assert r.finish_reason == "length"
            if stream:
                assert 0 < r.ttft_s <= r.latency_s <= wall
            else:  # a whole reply: no first-token time
                assert r.ttft_s is None and 0 < r.latency_s <= wall
            assert r.token_ids == ref[r.prompt_id], (c, r.prompt_id)
            assert r.text
        s = R.summarize_level(recs, wall)
        assert s["tokens"] == 2 * max_tokens and s["tokens_per_s"] > 0
    return levels


@pytest.mark.service
@pytest.mark.slow
def test_client_against_deer_serve(tmp_path):
    levels = run_server("deer", tmp_path, port_taken=True)
    # deer mode: drafts were verified (deer-serve reports tau on the last chunk)
    assert all(r.mean_accepted is not None for recs, _ in levels.values() for r in recs)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DEER_SKIP_VLLM") == "1", reason="DEER_SKIP_VLLM=1")
def test_client_against_vllm_server(tmp_path):
    """vLLM is installed by `make install` (tests/deer_serve/vllm/conftest.py): missing, this fails."""
    run_server("vllm", tmp_path)


def test_merge_keeps_servers_not_rerun(tmp_path):
    """--merge: an earlier run's servers stay (with their identity reference) when others are
    rerun; other prompts or settings are refused."""
    recs = [rec("p0", [1, 2], .1, .2), rec("p1", [3], .1, .1)]
    old = {"machine": "m0", "command": "first", "prompt_ids": ["p0", "p1"], "warnings": [],
           "settings": {"suite": "s", "n_prompts": 2, "max_tokens": 2, "temperature": 0.0,
                        "threads": 1, "warmup": 0, "reference": "vllm"},
           "servers": {"vllm": {"levels": {"1": {
               "summary": R.summarize_level(recs, 1.0),
               "records": [asdict(r) | {"tpot_s": r.tpot_s} for r in recs]}}}}}
    (tmp_path / "results.json").write_text(json.dumps(old))
    prompts = [("p0", "a"), ("p1", "b")]
    kw = dict(target="t", drafter=None, concurrency=[1], max_tokens=2, suite="s", warmup=0,
              progress=lambda s: None)
    res = S.run([], prompts, tmp_path, merge=True, command="second", **kw)
    assert list(res["servers"]) == ["vllm"]
    assert res["servers"]["vllm"]["levels"]["1"]["identity"]["identical"] == 2
    assert res["merged_from"][0]["command"] == "first"
    assert "Kept from an earlier run (vllm; m0): `first`" in (tmp_path / "report.md").read_text()
    with pytest.raises(P.UsageError):
        S.run([], prompts[:1], tmp_path, merge=True, **kw)


def test_rounds_alternate_and_pool_to_the_median(tmp_path):
    """--rounds: the list reversed every other round; per server and level the median of the
    rounds' tok/s (not their mean), percentiles and identity over every round's requests, CPU
    and wall summed, a round's error kept; the report's rounds table gives each round's rate and
    its ratio to the reference's in the same round."""
    assert S.round_order(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert S.round_order(["a", "b", "c"], 1) == ["c", "b", "a"]
    assert S.round_order(["a", "b", "c"], 2) == ["a", "b", "c"]

    def run(wall, ids0=(1, 2, 3, 4), ttft=.1, cpu=1.0, error=None):
        recs = [rec("p0", ids0, ttft, .4), rec("p1", [5, 6, 7, 8], ttft, .4)]
        for r in recs:
            r.text = "x"
        sm = R.summarize_level(recs, wall) | {"cpu_s": {"VLLM::EngineCore": cpu}}
        out = {"kind": "deer", "command": f"cmd {wall}", "ready_s": wall,
               "levels": {"1": {"summary": sm,
                                "records": [asdict(r) | {"tpot_s": r.tpot_s} for r in recs]}}}
        return out | ({"error": error} if error else {})

    # 8 tokens a round: 10, 40 and 20 tok/s (median 20, mean 23.3); round 2 differs on p0
    deer = S.pool_rounds([run(0.8, ttft=.1), run(0.2, ids0=(1, 2, 9, 4), ttft=.3, cpu=2.0,
                                                 error="RuntimeError: late"), run(0.4, ttft=.2)])
    lvl = deer["levels"]["1"]
    assert deer["rounds"] == 3 and deer["command"] == "cmd 0.8"  # round 1's fields
    assert deer["error"] == "round 2: RuntimeError: late"
    assert lvl["summary"]["tokens_per_s"] == 20.0
    assert lvl["summary"]["tokens_per_s_rounds"] == [10.0, 40.0, 20.0]
    assert lvl["summary"]["tokens"] == 24 and lvl["summary"]["wall_s"] == pytest.approx(1.4)
    assert lvl["summary"]["ttft_ms_p50"] == pytest.approx(200.0)  # over all 6 requests
    assert lvl["summary"]["cpu_s"] == {"VLLM::EngineCore": 4.0}
    assert [r["round"] for r in lvl["records"]] == [1, 1, 2, 2, 3, 3]
    assert [r["text"] for r in lvl["records"]] == ["x", "x", "", "", "", ""]
    # a round without the level (its server failed to start): no rate, the others' median
    short = S.pool_rounds([run(0.8), {"kind": "deer", "levels": {}, "error": "E"}, run(0.2)])
    assert short["levels"]["1"]["summary"]["tokens_per_s_rounds"] == [10.0, None, 40.0]
    assert short["levels"]["1"]["summary"]["tokens_per_s"] == 25.0

    vllm = S.pool_rounds([run(0.4), run(0.4), run(0.4)])
    results = {"machine": "m", "command": "c", "warnings": [],
               "settings": {"suite": "s", "n_prompts": 2, "max_tokens": 4, "threads": 1,
                            "warmup": 0, "reference": "vllm", "rounds": 3},
               "servers": {"vllm": vllm, "deer": deer}}
    R.add_identity(results)
    ident = results["servers"]["deer"]["levels"]["1"]["identity"]
    assert (ident["identical"], ident["compared"]) == (5, 6)  # round 2's p0 is caught
    R.write_report(results, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "## Rounds" in md
    assert "| deer | 1 | 10.0 / 40.0 / 20.0 | 20.0 | 0.50x / 2.00x / 1.00x |" in md
    assert "| deer | 1 | 20.0 |" in md  # the main table: the median


def test_cpu_by_process(tmp_path):
    """The per-process CPU accounting of a level: /proc snapshots of real processes, their
    difference by name, and the report's table (CPU s per 1000 tokens, cores)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read(); "
                              "sum(i * i for i in range(3_000_000))"], stdin=subprocess.PIPE)
    try:
        # python -c ...: named by its arguments, once /proc shows the new program (wait for it)
        deadline = time.monotonic() + 60
        while not (before := P.cpu_seconds([child.pid]))[child.pid][0].startswith("-c"):
            assert time.monotonic() < deadline, before
            time.sleep(0.01)
        child.stdin.write(b"go")
        child.stdin.close()
        # the child's work is done when it exits; read it just before (a zombie keeps /proc)
        while P.cpu_seconds([child.pid])[child.pid][1] <= before[child.pid][1] and \
                child.poll() is None:
            pass
        after = P.cpu_seconds([child.pid])
    finally:
        if child.poll() is None and not child.stdin.closed:
            child.kill()  # a failed check above: do not wait on a child still reading stdin
        child.wait(60)
    used = P.cpu_by_name(before, after)
    assert list(used) == [after[child.pid][0]] and used[after[child.pid][0]] > 0
    assert P.cpu_by_name(after, after) == {}  # nothing used between equal snapshots
    results = {"servers": {
        "a": {"levels": {"1": {"summary": {"tokens": 100, "wall_s": 1.0, "cpu_s": {"x": 0.5}}},
                         "16": {"summary": {"tokens": 2000, "wall_s": 2.0,
                                            "cpu_s": {"engine": 3.0, "client": 1.0}}}}},
        "b": {"levels": {}}}}
    table = R.cpu_table(results)
    assert "| a | 16 | 2.00 | 2.00 | engine 1.50, client 0.50 |" in table and "| b |" not in table
