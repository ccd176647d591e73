"""The `loop: vllm` replica's DEER engine with and without the lookup splice (`service.vllm_lookup`,
deer_serve/targets/vllm_dflash_lookup.py), in-process (no server, no Ray): two `VLLMLoop`s as
the default config builds them (block 8, schedule [[1, 4, 8], [5, 1024, 4]], stream interval 8,
no plain engine), each level's HumanEval prompts served by C concurrent clients on one and then
the other (the order alternating by round), greedy, 128 tokens.

    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 .venv/bin/python scripts/vllm_lookup_bench.py \
        --concurrency 1,4,16 --limit 96 --rounds 2

`--grow R` compares the splice at block 8 with the splice whose blocks grow past the step's k
(block 16, `lookup_rows` R: the default config's `vllm_lookup_rows`) instead.

Prints per level and round: output tok/s, tau (vLLM's exact accepted drafts per verify step),
whether every request's ids were the same on both, and the ratio; then each engine's splice
counters.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--limit", type=int, default=96)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--grow", type=int, default=0,
                    help="lookup_rows R: the splice (block 8) against grown blocks (block 16)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from deer_serve.targets.vllm_backend import _set_env

    _set_env("cpu")
    from transformers import AutoTokenizer

    from deer_serve.assets import ASSETS_DIR
    from deer_serve.bench.suites import load_suite
    from deer_serve.types import SamplingParams
    from deployments.session import DecodeSpec
    from deployments.vllm_loop import VLLMLoop

    target, drafter = str(ASSETS_DIR / "target"), str(ASSETS_DIR / "drafter-dflash")
    tok = AutoTokenizer.from_pretrained(target)
    prompts = [tok.encode(p.text, add_special_tokens=False)
               for p in load_suite("humaneval", args.limit)]
    levels = [int(c) for c in args.concurrency.split(",")]

    def spec(i: int) -> DecodeSpec:
        return DecodeSpec(token_ids=np.array(prompts[i], dtype=np.int32), emitted=0,
                          sampling=SamplingParams(max_new_tokens=args.tokens), mode="deer",
                          block_size=8, seq_id=f"p{i}", adaptive_k=False, pipeline=False,
                          lookup=False, drafter_timeout_s=60.0)

    a_name, b_name = ("lookup", "grown") if args.grow else ("drafter", "lookup")

    async def level(loop, c: int):
        queue = list(range(len(prompts)))
        out: dict[int, list[int]] = {}
        steps0, acc0 = loop.stats.spec_steps, loop.stats.spec_accepted

        async def client():
            while queue:
                i = queue.pop(0)
                ids: list[int] = []
                async for batch in loop.decode(spec(i)):
                    ids += [t for kind, x in batch if kind == "step" for t in x.new_token_ids]
                out[i] = ids

        t0 = time.perf_counter()
        await asyncio.gather(*[client() for _ in range(c)])
        dt = time.perf_counter() - t0
        steps = loop.stats.spec_steps - steps0
        tau = (loop.stats.spec_accepted - acc0) / max(1, steps)
        return sum(len(v) for v in out.values()) / dt, tau, out

    async def run():
        kw = dict(max_running=16, device="cpu",
                  spec_schedule=[[1, 4, 8], [5, 1024, 4]], stream_interval=8)
        if args.grow:
            loops = {"lookup": VLLMLoop(target, drafter, block_size=8, lookup=True, **kw),
                     "grown": VLLMLoop(target, drafter, block_size=16, lookup=True,
                                       lookup_rows=args.grow, **kw)}
        else:
            loops = {"drafter": VLLMLoop(target, drafter, block_size=8, **kw),
                     "lookup": VLLMLoop(target, drafter, block_size=8, lookup=True, **kw)}
        try:
            for lp in loops.values():
                await level(lp, 4)  # warm-up
            for r in range(args.rounds):
                for c in levels:
                    res = {}
                    names = list(loops) if r % 2 == 0 else list(loops)[::-1]
                    for name in names:
                        res[name] = await level(loops[name], c)
                        print(f"round {r + 1} c={c:2d} {name:8s} {res[name][0]:7.1f} tok/s "
                              f"tau {res[name][1]:.2f}", flush=True)
                    a, b = res[a_name][2], res[b_name][2]
                    same = sum(a[i] == b[i] for i in a)
                    print(f"   identical ids {same}/{len(a)}; {b_name} / {a_name} "
                          f"{res[b_name][0] / res[a_name][0]:.3f}", flush=True)
            for name, lp in loops.items():
                print(name, await lp.engine.collective_rpc("deer_lookup_stats"), flush=True)
        finally:
            for lp in loops.values():
                lp.shutdown()

    asyncio.run(run())


if __name__ == "__main__":
    main()
