"""Throughput of the step engine on the embedded models (deer_serve/assets), one torch thread.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/step_engine_bench.py N MODE KV [--budget B]
        [--tokens T] [--profile K]

N concurrent HumanEval prompts (greedy, T new tokens each, adaptive k, lookup), MODE ar|deer,
KV slots|per-sequence (the target's KV: `SlotTarget` or `HFTarget`'s per-sequence caches).
Prints tokens, seconds, tok/s and steps; --profile K: the K top functions by own time of the
steps (cProfile over `while eng.step()`).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deer_serve.bench.methods import Models  # noqa: E402
from deer_serve.bench.suites import load_suite  # noqa: E402
from deer_serve.step_engine import StepEngine  # noqa: E402
from deer_serve.types import SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("n", type=int)
    ap.add_argument("mode", choices=["ar", "deer"])
    ap.add_argument("kv", choices=["slots", "per-sequence"])
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--profile", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    assets = Path(__file__).resolve().parents[1] / "deer_serve" / "assets"
    m = Models(str(assets / "target"), str(assets / "drafter"), None)
    drafter = m.drafter
    target = m.target_for(drafter)
    prompts = [m.encode(p.text) for p in load_suite("humaneval", max(a.n, 1))]
    eng = StepEngine(target, drafter, max_running=a.n, verify_budget=a.budget, start=False,
                     kv=a.kv)
    sp = SamplingParams(max_new_tokens=a.tokens)
    reqs = [eng.submit(p, sp, mode=a.mode, block_size=16, adaptive_k=True, lookup=True)
            for p in prompts[:a.n]]
    prof = cProfile.Profile() if a.profile else None
    t0 = time.perf_counter()
    if prof is not None:
        prof.enable()
    while eng.step():
        pass
    if prof is not None:
        prof.disable()
    dt = time.perf_counter() - t0
    toks = sum(len(s.new_token_ids) for r in reqs for s in r.poll())
    print(f"n={a.n} mode={a.mode} kv={a.kv} budget={a.budget}: {toks} tokens {dt:.2f}s "
          f"{toks / dt:.1f} tok/s steps {eng.stats.steps} rows {eng.stats.rows}")
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(a.profile)


if __name__ == "__main__":
    main()
