"""`loop: vllm` with a plain engine (`service.vllm_plain_engine` / `vllm_plain_from`): each
Verifier replica holds a second vLLM engine, the target without a drafter; every `mode: ar`
segment decodes there, a segment that arrives while `plain_from` segments (or more) run in the
replica, and a sampled one whose temperature the replica's DraftGate has closed. With
`vllm_ngram_from`, a third engine (vLLM's ngram speculation) takes the segments that arrive
while that many run.

In-process (no Ray): a `VLLMLoop` (the embedded target, the shipped DFlash drafter, two or
three vLLM engines), driven through `decode` as the Verifier drives it. Which engine a segment
takes is decided when its generator starts, from the open segments and the gate; the tests hold
segments open by not reading them on, or run them one after another, so the routing does not
depend on timing.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
N = 40  # new tokens per request
PROMPTS = [json.loads(line)["prompt"] for line in
           (HERE / "code_prompts.jsonl").read_text().splitlines()]


def test_segments_over_the_thresholds_and_mode_ar_decode_on_the_plain_and_ngram_engines(
        monkeypatch):
    """A and B start on the DEER engine; C arrives while they run (2 open segments, ngram_from
    2) and takes the ngram engine; E arrives while 3 are open (plain_from 3) and takes the plain
    engine; D (`mode: ar`) runs alone and takes the plain engine by its mode (each result names
    the engine that ran it; the ngram engine is vLLM's ngram speculation). Every segment's ids
    are plain greedy decoding's (in-process HFTarget); A, B (DFlash drafts) and C (ngram
    drafts) carry vLLM's speculative-decoding metrics, E and D none; the loop counts 2 plain
    segments and 1 ngram segment. Power: a loop that ignores plain_from, ngram_from (or the
    mode) sends E, C (or D) to another engine, and then the engine names, the metrics and the
    loop's counts say so.
    Also `engine_nice` (`service.vllm_engine_nice`): every thread of both engines' processes
    runs at the niceness asked (2 above this process's: raising needs no privilege), this
    process at its own. And `engine_threads` (`service.vllm_engine_threads`): the engines'
    forwards run on 1 torch thread while this process has 2 (and OMP_NUM_THREADS 3), which it
    keeps; power: without it the engines inherit this process's 2. The ngram engine's numba
    pool has one thread (`vllm_backend._set_env`; numba's default is one per CPU)."""
    import torch

    from transformers import AutoTokenizer

    from deer_serve.assets import ASSETS_DIR
    from deer_serve.engine import generate
    from deer_serve.targets.hf import HFTarget
    from deer_serve.types import SamplingParams
    from deployments.session import DecodeSpec
    from deployments.vllm_loop import VLLMLoop

    target, drafter = str(ASSETS_DIR / "target"), str(ASSETS_DIR / "drafter-dflash")
    tok = AutoTokenizer.from_pretrained(target)
    prompts = [tok.encode(p, add_special_tokens=False) for p in PROMPTS[:2]]
    hf = HFTarget.from_pretrained(target, device="cpu")
    want = [generate(hf, None, p, SamplingParams(max_new_tokens=N, ignore_eos=True),
                     mode="ar").token_ids for p in prompts]

    def spec(prompt: int, mode: str, seq: str) -> DecodeSpec:
        return DecodeSpec(token_ids=np.array(prompts[prompt], dtype=np.int32), emitted=0,
                          sampling=SamplingParams(max_new_tokens=N, ignore_eos=True), mode=mode,
                          block_size=8, seq_id=seq, adaptive_k=False, pipeline=False,
                          lookup=False, drafter_timeout_s=60.0)

    async def rest(gen, first: list) -> tuple[list[int], object]:
        ids, result = [], None
        batch = first
        while True:
            for kind, x in batch:
                if kind == "step":
                    ids += x.new_token_ids
                elif kind == "done":
                    result = x
            if result is not None:
                return ids, result
            batch = await gen.__anext__()

    own_nice = os.getpriority(os.PRIO_PROCESS, 0)
    nice = min(19, own_nice + 2)

    def engine_threads_nice() -> dict:
        import psutil

        return {(c.pid, t.id): os.getpriority(os.PRIO_PROCESS, t.id)
                for c in psutil.Process().children(recursive=True)
                if c.name().startswith("VLLM::") for t in c.threads()}

    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # engine_threads=1 must win in the engines
    own_threads = torch.get_num_threads()
    torch.set_num_threads(2)

    async def main():
        loop = VLLMLoop(target, drafter, block_size=8, max_running=4, device="cpu",
                        plain_from=3, ngram_from=2, engine_nice=nice, engine_threads=1)
        try:
            niceness = engine_threads_nice()
            assert len({pid for pid, _ in niceness}) == 3, niceness  # the three engine cores
            assert set(niceness.values()) == {nice}, niceness
            assert os.getpriority(os.PRIO_PROCESS, 0) == own_nice
            threads = [await e.collective_rpc("deer_torch_threads")
                       for e in (loop.engine, loop.plain, loop.ngram)]
            assert threads == [[1], [1], [1]], threads
            methods = [e.vllm_config.speculative_config
                       for e in (loop.engine, loop.plain, loop.ngram)]
            assert [m and m.method for m in methods] == ["dflash", None, "ngram"], methods
            # numba's pool of one thread (its idle workers spin; vLLM's ngram kernel uses one)
            assert await loop.ngram.collective_rpc("deer_numba_threads") == [1]
            assert os.environ["OMP_NUM_THREADS"] == "3" and torch.get_num_threads() == 2
            gens = {}
            firsts = {}
            for name, prompt in (("a", 0), ("b", 1), ("c", 0), ("e", 1)):
                gens[name] = loop.decode(spec(prompt, "deer", name))
                firsts[name] = await gens[name].__anext__()  # open: counted as running
            assert loop.stats.running == 4 and loop.stats.plain == 1 and loop.stats.ngram == 1
            out = {n: await rest(gens[n], firsts[n]) for n in gens}
            d = loop.decode(spec(1, "ar", "d"))
            out["d"] = await rest(d, await d.__anext__())
            return out, loop.stats
        finally:
            loop.shutdown()

    try:
        out, stats = asyncio.run(main())
    finally:
        torch.set_num_threads(own_threads)
    assert stats.plain == 2 and stats.ngram == 1 and stats.running == 0 and stats.finished == 5
    for name, prompt in (("a", 0), ("b", 1), ("c", 0), ("d", 1), ("e", 1)):
        ids, result = out[name]
        assert ids == list(want[prompt]) == result.token_ids, name
        assert result.finish_reason == "length"
    for name in "abc":  # DEER and ngram engines: vLLM's per-request speculative-decoding metrics
        assert out[name][1].extra["vllm_spec"]["num_spec_steps"] > 0, out[name][1].extra
    engines = {n: out[n][1].extra["vllm_engine"] for n in out}
    assert engines == {"a": "deer", "b": "deer", "c": "ngram", "d": "plain", "e": "plain"}, engines
    for name in "de":  # the plain engine: no drafts
        assert "vllm_spec" not in out[name][1].extra, out[name][1].extra


def test_the_gate_sends_sampled_segments_where_drafts_do_not_pay_to_the_plain_engine():
    """`plain_engine=True` (the default config's `service.vllm_plain_engine`), no threshold: a
    sampled unseeded segment drafts while the replica's DraftGate is open at its temperature and
    teaches it vLLM's exact per-step accepted counts (one observation per verify step); once the
    gate is closed at that temperature (acceptance planted low here, so the test does not hang
    on what the model accepts), 7 of every 8 such segments decode on the plain engine and the
    8th drafts (a probe); a seeded segment at that temperature, a greedy one and `mode: ar` go
    where they always go (DEER engine, DEER engine, plain engine), and the greedy ids are plain
    AR's. Power: a loop that never asks the gate sends no segment to the plain engine by it
    (`gated` 0); one that gates seeded segments sends the seeded one there (no spec metrics)."""
    from transformers import AutoTokenizer

    from deer_serve.assets import ASSETS_DIR
    from deer_serve.engine import generate
    from deer_serve.targets.hf import HFTarget
    from deer_serve.types import SamplingParams
    from deployments.session import DecodeSpec
    from deployments.vllm_loop import VLLMLoop

    target, drafter = str(ASSETS_DIR / "target"), str(ASSETS_DIR / "drafter-dflash")
    tok = AutoTokenizer.from_pretrained(target)
    prompt = tok.encode(PROMPTS[0], add_special_tokens=False)
    want = generate(HFTarget.from_pretrained(target, device="cpu"), None, prompt,
                    SamplingParams(max_new_tokens=N, ignore_eos=True), mode="ar").token_ids
    T = 1.0

    def spec(mode="deer", temperature=T, seed=None) -> DecodeSpec:
        return DecodeSpec(token_ids=np.array(prompt, dtype=np.int32), emitted=0,
                          sampling=SamplingParams(max_new_tokens=N, ignore_eos=True,
                                                  temperature=temperature, seed=seed),
                          mode=mode, block_size=8, seq_id="s", adaptive_k=False,
                          pipeline=False, lookup=False, drafter_timeout_s=60.0)

    async def run(loop, s) -> tuple[list[int], object]:
        ids, result = [], None
        async for batch in loop.decode(s):
            for kind, x in batch:
                if kind == "step":
                    ids += x.new_token_ids
                elif kind == "done":
                    result = x
        return ids, result

    def drafted(result) -> bool:
        return "vllm_spec" in result.extra

    async def main():
        loop = VLLMLoop(target, drafter, block_size=8, max_running=4, device="cpu",
                        plain_engine=True)
        try:
            assert loop.plain is not None and loop.plain_from is None
            # the gate is open (nothing seen): the segment drafts, and its steps teach the gate
            _, first = await run(loop, spec())
            assert drafted(first) and loop.stats.plain == 0
            steps = first.extra["vllm_spec"]["num_spec_steps"]
            assert steps > 0
            assert loop.gate.state()[T]["cycles"] == steps
            for _ in range(300):  # drafts at T rarely accepted: the gate closes there
                loop.gate.observe(T, 0)
            assert loop.gate.state()[T]["open"] is False
            routed = [drafted((await run(loop, spec()))[1]) for _ in range(8)]
            assert routed == [False] * 7 + [True], routed  # 7 plain, the 8th a probe
            assert loop.stats.gated == 7 and loop.stats.plain == 7
            seeded = (await run(loop, spec(seed=3)))[1]
            greedy = await run(loop, spec(temperature=0.0))
            ar = await run(loop, spec(mode="ar", temperature=0.0))
            return seeded, greedy, ar, loop.stats
        finally:
            loop.shutdown()

    seeded, greedy, ar, stats = asyncio.run(main())
    assert drafted(seeded), "a seeded segment must not go through the gate"
    assert drafted(greedy[1]) and greedy[0] == list(want)
    assert not drafted(ar[1]) and ar[0] == list(want)
    assert stats.gated == 7 and stats.plain == 8 and stats.running == 0


def test_segments_move_between_the_engines_with_the_replicas_load():
    """`plain_until` (`service.vllm_plain_until`) with `plain_from`: the replica decodes by its
    load. A (greedy, long) starts alone on the DEER engine; two `mode: ar` segments X and Y
    (plain engine) and a seeded sampled segment S (DEER engine) open beside it, 4 open >=
    plain_from 3: at its next output A moves to the plain engine (its tokens so far become the
    plain engine's prompt). X and Y are cancelled and S read to its end: 1 open <= plain_until
    1, and at its next output A moves back to the DEER engine (`plain_hold_s` 0: at once; the
    hold is `test_the_load_switch_turns_back_only_after_its_hold`'s). S, seeded, never moves (2 open,
    between the thresholds, keeps the replica plain: a loop that moved seeded segments would
    move it). A's ids over its three legs are plain greedy decoding's (in-process HFTarget).
    The reads are ordered so that A, 600 tokens long, is still decoding at each of its reads.
    Power: a move that drops the last token before it, or repeats it, changes A's ids; a loop
    that never moves ends A on the DEER engine in one leg (`vllm_legs` absent)."""
    from transformers import AutoTokenizer

    from deer_serve.assets import ASSETS_DIR
    from deer_serve.engine import generate
    from deer_serve.targets.hf import HFTarget
    from deer_serve.types import SamplingParams
    from deployments.session import DecodeSpec
    from deployments.vllm_loop import VLLMLoop

    long = 600
    target, drafter = str(ASSETS_DIR / "target"), str(ASSETS_DIR / "drafter-dflash")
    tok = AutoTokenizer.from_pretrained(target)
    prompts = [tok.encode(p, add_special_tokens=False) for p in PROMPTS[:2]]
    want = generate(HFTarget.from_pretrained(target, device="cpu"), None, prompts[0],
                    SamplingParams(max_new_tokens=long, ignore_eos=True), mode="ar").token_ids

    def spec(prompt: int, n: int, mode: str = "deer", temperature: float = 0.0,
             seed=None) -> DecodeSpec:
        return DecodeSpec(token_ids=np.array(prompts[prompt], dtype=np.int32), emitted=0,
                          sampling=SamplingParams(max_new_tokens=n, ignore_eos=True,
                                                  temperature=temperature, seed=seed),
                          mode=mode, block_size=8, seq_id=f"s{prompt}", adaptive_k=False,
                          pipeline=False, lookup=False, drafter_timeout_s=60.0)

    def take(batch: list, ids: list) -> object:
        result = None
        for kind, x in batch:
            if kind == "step":
                ids += x.new_token_ids
            elif kind == "done":
                result = x
        return result

    async def main():
        loop = VLLMLoop(target, drafter, block_size=8, max_running=4, device="cpu",
                        plain_from=3, plain_until=1, plain_hold_s=0.0)
        try:
            a_ids: list[int] = []
            a = loop.decode(spec(0, long))
            assert take(await a.__anext__(), a_ids) is None  # A's prefill: 1 open, DEER
            x, y = loop.decode(spec(1, 200, mode="ar")), loop.decode(spec(1, 200, mode="ar"))
            await x.__anext__()
            await y.__anext__()
            s_ids: list[int] = []
            s = loop.decode(spec(1, 40, temperature=1.0, seed=3))
            assert take(await s.__anext__(), s_ids) is None
            assert loop.stats.running == 4 and loop.stats.plain == 2 and loop.stats.moves == 0
            assert take(await a.__anext__(), a_ids) is None  # 4 open: A moves to plain
            assert take(await a.__anext__(), a_ids) is None  # its plain leg's first output
            assert loop.stats.moves == 1 and loop.state()["plain_by_load"] is True
            await x.aclose()
            await y.aclose()
            s_result = None
            while s_result is None:
                s_result = take(await s.__anext__(), s_ids)
            await s.aclose()
            assert loop.stats.running == 1 and loop.stats.aborted == 2
            a_result = None
            while a_result is None:  # 1 open: A moves back to the DEER engine
                a_result = take(await a.__anext__(), a_ids)
            await a.aclose()
            return a_ids, a_result, s_ids, s_result, loop.stats
        finally:
            loop.shutdown()

    a_ids, a_result, s_ids, s_result, stats = asyncio.run(main())
    assert a_ids == list(want) == a_result.token_ids
    assert a_result.extra["vllm_engine"] == "deer" and a_result.extra["vllm_legs"] == 3, \
        a_result.extra
    assert stats.moves == 2 and stats.finished == 2 and stats.running == 0
    assert s_result.extra["vllm_engine"] == "deer" and "vllm_legs" not in s_result.extra
    assert "vllm_spec" in s_result.extra and len(s_ids) == 40


def test_the_load_switch_turns_back_only_after_its_hold():
    """`LoadSwitch` (`plain_from` 8, `plain_until` 4, hold 1 s, a clock the test sets): plain at
    8 open segments; a drop to 0 while successors are on the way (a batch of requests that end
    at one step) keeps it plain when the count is back above 4 before the hold is out; between
    the thresholds it stays as it was; 4 or fewer for the whole hold turn it back, and the hold
    starts again after each rise. Power: a switch without the hold (or without hysteresis) turns
    back at the drop."""
    from deployments.vllm_loop import LoadSwitch

    now = [0.0]
    sw = LoadSwitch(8, 4, hold_s=1.0, clock=lambda: now[0])
    assert [sw.plain(n) for n in (1, 5, 7)] == [False] * 3  # below plain_from: DEER
    assert sw.plain(8) is True
    seen = []
    for n in (7, 3, 0, 1):  # the batch ends together, 0.1 s apart
        now[0] += 0.1
        seen.append(sw.plain(n))
    now[0] += 0.5
    seen.append(sw.plain(6))  # successors back, still inside the hold
    assert seen == [True] * 5, seen
    now[0] += 0.1
    assert sw.plain(3) is True  # low again: the hold starts over
    now[0] += 0.9
    assert sw.plain(2) is True  # 0.9 s of the hold
    now[0] += 0.2
    assert sw.plain(2) is False  # 1.1 s at 4 or fewer: back to DEER
    assert sw.plain(7) is False  # between the thresholds: stays DEER
