"""The body of `deer-serve bench` (deer_serve.bench.cli) below its settings: the methods to
run, every method on every prompt and repeat at one temperature, interleaved (the order rotating,
so no method always runs first), the raw sample records and the service methods' concurrency
phase, and the machine's description."""

from __future__ import annotations

import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from deer_serve.bench.methods import SERVICE_METHODS, VLLM_METHODS, Sample


def machine_info() -> dict:
    import importlib.metadata as md

    import torch

    from deer_serve.bench.stats import cpu_name

    cpu = cpu_name()

    def ver(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": gpu, "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "transformers": ver("transformers"), "ray": ver("ray"),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


# EngineMethod options of the decoding methods: run once per block size, or at the main one only
SWEPT: dict[str, dict[str, bool]] = {
    "deer": dict(lookup=True, adaptive_k=True),  # as deer-serve decodes by default (+ the gate)
    "deer-alt": dict(lookup=True, adaptive_k=True, alt=True),
    "sd-ar": dict(adaptive_k=True, ar_draft=True)}
AT_MAIN_K: dict[str, dict[str, bool]] = {
    "deer-adaptive": dict(lookup=True, adaptive_k=True),
    "deer-fixed": dict(lookup=True),
    "deer-alt-nolookup": dict(adaptive_k=True, alt=True),
    "deer-nolookup": dict(adaptive_k=True),
    "sd-ar-fixed": dict(ar_draft=True),
    "deer-pipe": dict(lookup=True, pipeline=True)}


def build_methods(s: dict, models, client, service_error: Optional[str] = None) -> list:
    from deer_serve.bench.methods import EngineMethod, HFGenerateMethod
    from deer_serve.bench.service import ServiceMethod, UnavailableMethod

    out: list[Any] = []   # EngineMethod, HFGenerateMethod, VLLMMethod, ServiceMethod, UnavailableMethod
    k0 = s["block_sizes"][0]
    for name in s["methods"]:
        if name == "ar":
            out.append(EngineMethod("ar", models, "ar"))
        elif name in SWEPT:  # one method per block size, the first named `name`
            out += [EngineMethod(name if k == k0 else f"{name}@k{k}", models, "deer", k,
                                 **SWEPT[name]) for k in s["block_sizes"]]
        elif name in AT_MAIN_K:
            out.append(EngineMethod(name, models, "deer", k0, **AT_MAIN_K[name]))
        elif name in SERVICE_METHODS:
            out.append(ServiceMethod(name, client, k0, models.eos_token_id) if client is not None
                       else UnavailableMethod(name, service_error or "no service"))
        elif name in VLLM_METHODS:
            from deer_serve.bench.methods import VLLMMethod

            try:  # vLLM missing or failing to start: report it, run the other methods
                out.append(VLLMMethod(name, models, k0))
            except Exception as e:  # noqa: BLE001
                out.append(UnavailableMethod(name, f"vLLM: {type(e).__name__}: {e}"))
        else:
            out.append(HFGenerateMethod(name, models))
    return out


def assistant_schedule(assistant) -> dict:
    """HF assisted generation's draft schedule: the assistant's own settings, else HF's defaults."""
    from transformers import GenerationConfig

    g = assistant.generation_config
    dflt = GenerationConfig._get_default_generation_params() \
        if hasattr(GenerationConfig, "_get_default_generation_params") else {}
    return {k: getattr(g, k, None) if getattr(g, k, None) is not None else dflt.get(k)
            for k in ("num_assistant_tokens", "num_assistant_tokens_schedule",
                      "assistant_confidence_threshold")}


def run_temperature(T: float, s: dict, methods: list, prompt_ids: list, names: list,
                    warnings: list, sink: Optional[list] = None) -> dict:
    """Every method on every prompt and repeat at temperature T, interleaved -> methods dict."""
    from tqdm import tqdm

    from deer_serve.bench import stats
    from deer_serve.types import SamplingParams

    n, reps = len(prompt_ids), s["repeats"]
    grids: dict[str, list[list[Optional[Sample]]]] = {
        m.name: [[None] * reps for _ in range(n)] for m in methods}
    errors: dict[str, str] = {}
    sp = lambda i, r: SamplingParams(temperature=T, max_new_tokens=s["max_new_tokens"],  # noqa: E731
                                     seed=s["seed"] + 1000 * i + r)
    warm = SamplingParams(temperature=T, max_new_tokens=min(8, s["max_new_tokens"]), seed=s["seed"])
    for m in methods:  # untimed warm-up: first-call costs (allocations, lazy imports) stay out
        try:
            m.run(prompt_ids[0], warm)
        except Exception as e:
            errors[m.name] = f"{type(e).__name__}: {e}"
    live = [m for m in methods if m.name not in errors]
    bar = tqdm(total=n * reps, desc=f"bench T={T:g}", unit="prompt", dynamic_ncols=True)
    step = 0
    for i, ids in enumerate(prompt_ids):
        for r in range(reps):
            rot = step % len(live) if live else 0
            for m in live[rot:] + live[:rot]:
                if m.name in errors:
                    continue
                try:
                    grids[m.name][i][r] = m.run(ids, sp(i, r))
                except Exception as e:  # one broken method must not sink the run
                    errors[m.name] = f"{type(e).__name__}: {e} (prompt {names[i]})"
            step += 1
            bar.update(1)
    bar.close()

    if sink is not None:  # raw samples, for re-analysis (samples.jsonl)
        for name, grid in grids.items():
            for i, per_repeat in enumerate(grid):
                for r, x in enumerate(per_repeat):
                    if x is not None:
                        sink.append(sample_record(T, name, names[i], r, x))
    ar = grids.get("ar") if "ar" not in errors else None
    out = {}
    for m in methods:
        if m.name in errors:
            out[m.name] = {"block_size": m.block_size, "error": errors[m.name]}
            warnings.append(f"T={T:g} {m.name} failed: {errors[m.name]}")
            continue
        row = stats.summarize(grids[m.name], block_size=m.block_size)
        if getattr(m, "adaptive_k", False):
            row["adaptive_k"] = True
        gate = getattr(m, "gate", None)
        if gate is not None:  # cumulative over the run: requests started with drafting off
            row["gate"] = {"gated": gate.gated, "probes": gate.probes, "state": {
                str(t): v for t, v in gate.state().items()}}
        if T == 0:
            row.update(stats.identity(grids[m.name], ar, names))
        else:
            row["identical_to_ar"] = None  # sampled: checked statistically by the tests instead
        out[m.name] = row
    stats.add_speedups(out)
    for m in methods:
        if m.name in SERVICE_METHODS and m.name not in errors:
            try:
                out[m.name].update(service_throughput(m, s, prompt_ids, sp, ar if T == 0 else None))
            except Exception as e:
                out[m.name]["throughput_error"] = f"{type(e).__name__}: {e}"
                warnings.append(f"T={T:g} {m.name} concurrency phase failed: {e}")
            # single-stream rate from the samples (summarize); null: the service sent no counters
            out[m.name].setdefault("pipeline_hit_rate", None)
    if "deer-ray-nopipe" in out and "error" not in out["deer-ray-nopipe"] \
            and out.get("deer-ray", {}).get("pipeline_hit_rate") is None:
        warnings.append(f"T={T:g}: the service reports no pipeline counters (deer.pipeline_hits/"
                        "pipeline_misses), so it does not pipeline or ignores `pipeline`: "
                        "deer-ray and deer-ray-nopipe ran the same code")
    for name, row in out.items():
        if row.get("identical_to_ar") is False:
            msg = (f"T=0 {name} is NOT identical to ar on {row['n_mismatched']} sample(s), "
                   f"e.g. {row['mismatches'][0]}")
            warnings.append(msg)
            print("\n" + "!" * 78 + f"\n!!! {msg}\n" + "!" * 78, file=sys.stderr)
    return out


def sample_record(T: float, method: str, prompt: str, repeat: int, x) -> dict:
    from deer_serve.bench.stats import ids_sha1

    return {"temperature": T, "method": method, "prompt": prompt, "repeat": repeat,
            "new_tokens": len(x.token_ids), "wall_s": round(x.wall_s, 6),
            "ids_sha1": ids_sha1(x.token_ids),
            "accept_lengths": x.accept_lengths, "cycles": x.cycles,
            "timings": {k: round(v, 6) for k, v in x.timings.items()}, **x.extra}


def service_throughput(m, s, prompt_ids, sp, ar_grid) -> dict:
    """Throughput at each concurrency: max(n_prompts, c) requests (prompts cycled), c at a time."""
    from deer_serve.bench import stats

    by_c, hits, misses, bad = {}, 0, 0, 0
    for c in s["concurrency"]:
        jobs = [(i % len(prompt_ids)) for i in range(max(len(prompt_ids), c))]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(c) as pool:
            samples = list(pool.map(lambda i: m.run(prompt_ids[i], sp(i, 0)), jobs))
        wall = time.perf_counter() - t0
        by_c[str(c)] = round(sum(len(x.token_ids) for x in samples) / wall, 3)
        hits += sum(int(x.extra.get("pipeline_hits", 0)) for x in samples)
        misses += sum(int(x.extra.get("pipeline_misses", 0)) for x in samples)
        if ar_grid is not None:
            bad += sum(stats.first_diff(x.token_ids, ar_grid[i][0].token_ids) is not None
                       for x, i in zip(samples, jobs))
    out: dict[str, Any] = {"throughput_by_concurrency": by_c}
    if ar_grid is not None:
        out["concurrent_identical_to_ar"] = bad == 0
    if hits + misses:
        out["concurrent_pipeline_hit_rate"] = round(hits / (hits + misses), 4)
    return out
