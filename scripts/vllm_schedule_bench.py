"""vLLM's engine alone (no server, no Ray) on the target with the DFlash drafter, as the service's
`loop: vllm` builds it (deployments.vllm_loop.engine_args): output tok/s of a
batch of greedy requests at each `max_num_seqs` (the number of requests sharing a step) and each
number of drafts per step k, to choose `vllm_spec_schedule`.

    .venv/bin/python scripts/vllm_schedule_bench.py --seqs 1,2,4,8,16 --k none,0,2,4,8 \
        --limit 48 --tokens 128 --repeats 3 --out OUT_DIR

k "none" = no speculative decoding (vLLM's plain engine); k = 0..K = DFlash with
`num_speculative_tokens` max(K) and the dynamic schedule [[1, 1024, k]] (vLLM's dynamic
speculative decoding fixed at k); at k 0 the loop's proposer writes the drafter's context K/V
and skips its forward (deer_serve.targets.vllm_dflash_skip), k "0vllm" = vLLM's own proposer
at k 0 (the drafter's full forward, its drafts thrown away); a "+c" suffix (`4+c`, `none+c`)
runs that cell torch.compiled (vLLM's default; `service.vllm_compile`), eager otherwise. Every
(seqs, k) is its own engine in its own subprocess (one torch thread), the cells in turn, --rounds times over; each cell: one
warm-up batch of 4 prompts, then --repeats passes over the --limit HumanEval prompts, the median
pass reported (the median over rounds), and each prompt's token ids' digest (greedy: every cell
should give the same ids). Writes OUT_DIR/schedule.json and schedule.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cell(seqs: int, k: str, kmax: int, limit: int, tokens: int, repeats: int) -> dict:
    """One engine, in this process."""
    compiled = k.endswith("+c")
    k = k.removesuffix("+c")
    sys.path.insert(0, str(REPO))
    from deer_serve.targets.vllm_backend import _set_env

    _set_env("cpu")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from deer_serve.assets import default_paths
    from deer_serve.bench.stats import ids_sha1
    from deer_serve.bench.suites import load_suite
    from deployments.vllm_loop import engine_args, plain_engine_args

    if k == "0vllm":  # vLLM's own proposer at k 0
        from deer_serve.targets import vllm_dflash_skip

        vllm_dflash_skip.unpatch()

    target = str(default_paths()[0])
    drafter = str(REPO / "deer_serve" / "assets" / "drafter-dflash")
    tok = AutoTokenizer.from_pretrained(target)
    # the loop's own engine arguments, k fixed by the schedule (or no drafter at all)
    kw = engine_args(target, drafter, block_size=kmax, max_running=seqs, cpu=True,
                     spec_schedule=None if k == "none"
                     else [[1, 1024, int(k.removesuffix("vllm"))]], compile=compiled)
    if k == "none":
        kw = plain_engine_args(kw)
    llm = LLM(**kw)
    sp = SamplingParams(temperature=0.0, max_tokens=tokens)
    prompts = [TokensPrompt(prompt_token_ids=tok.encode(p.text, add_special_tokens=False))
               for p in load_suite("humaneval", limit)]
    llm.generate(prompts[:4], sp, use_tqdm=False)
    rates, outs = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / dt)
    return {"seqs": seqs, "k": k + ("+c" if compiled else ""), "tok_s": statistics.median(rates),
            "passes": rates, "ids_sha1": [ids_sha1(o.outputs[0].token_ids) for o in outs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", default="1,2,4,8,16")
    ap.add_argument("--k", default="none,0,2,4,8")
    ap.add_argument("--limit", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1,
                    help="sweeps over every cell in turn; a cell's figure is the median over "
                    "rounds (interleaved: the machine's drift hits every cell alike)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cell", help=argparse.SUPPRESS)  # "seqs,k,kmax": run one cell here
    a = ap.parse_args()
    if a.cell:
        s, k, kmax = a.cell.split(",")
        print("CELL " + json.dumps(cell(int(s), k, int(kmax), a.limit, a.tokens, a.repeats)),
              flush=True)
        return
    seqs = [int(x) for x in a.seqs.split(",")]
    ks = a.k.split(",")
    kmax = max([int(k.removesuffix("+c").removesuffix("vllm")) for k in ks
                if k.removesuffix("+c") != "none"] or [1])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_CPU_OMP_THREADS_BIND="nobind", HF_HUB_OFFLINE="1")
    rows, runs = [], {}
    for rnd, s, k in ((rnd, s, k) for rnd in range(a.rounds) for s in seqs for k in ks):
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, __file__, "--cell", f"{s},{k},{kmax}",
                            "--limit", str(a.limit), "--tokens", str(a.tokens),
                            "--repeats", str(a.repeats), "--out", a.out],
                           capture_output=True, text=True, env=env, cwd=str(REPO))
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("CELL ")), None)
        if line is None:
            raise SystemExit(f"cell seqs={s} k={k} failed:\n{r.stdout[-2000:]}"
                             f"{r.stderr[-4000:]}")
        got = json.loads(line[5:])
        runs.setdefault((s, k), []).append(got)
        print(f"round {rnd + 1} seqs {s:>3} k {k:>5}: {got['tok_s']:8.1f} tok/s "
              f"({time.monotonic() - t0:.0f} s)", flush=True)
    for got in runs.values():
        rows.append(dict(got[0], tok_s=statistics.median(g["tok_s"] for g in got),
                         rounds=[g["tok_s"] for g in got]))
    digests = {tuple(r["ids_sha1"]) for r in rows}
    (out / "schedule.json").write_text(json.dumps({
        "settings": vars(a), "kmax": kmax, "rows": rows,
        "all_ids_equal": len(digests) == 1}, indent=1))
    md = ["| requests a step | " + " | ".join(f"k {k}" for k in ks) + " |",
          "|---|" + "---|" * len(ks)]
    for s in seqs:
        by_k = {r["k"]: r["tok_s"] for r in rows if r["seqs"] == s}
        best = max(by_k, key=lambda k: by_k[k])
        md.append(f"| {s} | " + " | ".join(
            (f"**{by_k[k]:.0f}**" if k == best else f"{by_k[k]:.0f}") for k in ks) + " |")
    md.append("")
    md.append("Token ids equal in every cell: " + ("yes" if len(digests) == 1 else
                                                    f"no ({len(digests)} digests)"))
    (out / "schedule.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
