"""`deer-serve load`: N concurrent streaming clients against a running service for T seconds.

    deer-serve load --url http://127.0.0.1:8000 --concurrency 32 --duration 60

Each client loops: POST /v1/completions with `stream: true`, read the server-sent events to
`[DONE]`, start the next request. Requests still running at the deadline are finished and
counted (the run takes a little longer than T). Prints one JSON object: throughput (tokens/s
and requests/s over the whole run), latency and time-to-first-token percentiles, tokens per
request, and errors by kind (HTTP status, error events, timeouts, connection errors).

A measuring tool, not a test: it asserts nothing. Needs httpx (installed with the `bench` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from typing import Optional, Sequence

PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\n\ndef list_files(path):\n",
    "class Stack:\n    def __init__(self):\n",
    "def parse_args(argv):\n    parser = argparse.ArgumentParser(",
    "for i in range(10):\n",
    "def read_json(path):\n    with open(path) as f:\n",
    "def is_prime(n: int) -> bool:\n",
    "    def __repr__(self):\n        return",
]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="deer-serve load", description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL")
    ap.add_argument("--concurrency", "-c", type=int, default=32, help="concurrent streams")
    ap.add_argument("--duration", "-t", type=float, default=60.0, help="seconds of new requests")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--mode", choices=("deer", "ar"), default="deer")
    ap.add_argument("--model", default=None, help="the `model` field (default: omitted)")
    ap.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    ap.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    ap.add_argument("--prompts", default=None, help="JSONL file of {\"prompt\": ...} (default: "
                                                    "built-in code prompts)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    return ap.parse_args(argv)


def percentiles(xs: list[float], ps=(50, 90, 99)) -> dict:
    if not xs:
        return {f"p{p}": None for p in ps}
    s = sorted(xs)
    # nearest-rank percentile: the smallest value with at least p% of the samples at or below
    return {f"p{p}": round(s[min(len(s) - 1, max(0, -(-p * len(s) // 100) - 1))], 4)
            for p in ps} | {"mean": round(sum(s) / len(s), 4), "max": round(s[-1], 4)}


async def one_request(client, url: str, body: dict, headers: dict, timeout: float) -> dict:
    """One streamed completion: {ok, error, latency_s, ttft_s, tokens}."""
    t0 = time.perf_counter()
    ttft, tokens, error = None, 0, None
    try:
        async with client.stream("POST", url, json=body, headers=headers,
                                 timeout=timeout) as r:
            if r.status_code != 200:
                await r.aread()
                return {"ok": False, "error": f"http_{r.status_code}",
                        "latency_s": time.perf_counter() - t0}
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = f"event_{chunk['error'].get('code') or chunk['error'].get('type')}"
                    continue
                for ch in chunk.get("choices", []):
                    n = len(ch.get("token_ids") or [])
                    if n and ttft is None:
                        ttft = time.perf_counter() - t0
                    tokens += n
            if not done and error is None:
                error = "truncated_stream"
    except Exception as e:  # timeouts, refused or dropped connections
        error = type(e).__name__
    return {"ok": error is None, "error": error, "latency_s": time.perf_counter() - t0,
            "ttft_s": ttft, "tokens": tokens}


async def run(args: argparse.Namespace) -> dict:
    import httpx

    prompts = PROMPTS
    if args.prompts:
        with open(args.prompts) as f:
            prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    url = args.url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    results: list[dict] = []
    limits = httpx.Limits(max_connections=args.concurrency + 4,
                          max_keepalive_connections=args.concurrency + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        t_start = time.perf_counter()
        deadline = t_start + args.duration

        async def worker(w: int):
            i = w
            while time.perf_counter() < deadline:
                body = {"prompt": prompts[i % len(prompts)], "max_tokens": args.max_tokens,
                        "temperature": args.temperature, "stream": True, "mode": args.mode}
                if args.model:
                    body["model"] = args.model
                results.append(await one_request(client, url, body, headers, args.timeout))
                i += args.concurrency

        await asyncio.gather(*(worker(w) for w in range(args.concurrency)))
        wall = time.perf_counter() - t_start
    ok = [r for r in results if r["ok"]]
    tokens = sum(r.get("tokens", 0) for r in results)
    return {
        "url": args.url, "concurrency": args.concurrency, "duration_s": args.duration,
        "wall_s": round(wall, 2), "max_tokens": args.max_tokens, "mode": args.mode,
        "temperature": args.temperature,
        "requests": len(results), "requests_ok": len(ok), "errors": len(results) - len(ok),
        "error_kinds": dict(Counter(r["error"] for r in results if not r["ok"])),
        "tokens": tokens, "throughput_tokens_per_s": round(tokens / wall, 2),
        "requests_per_s": round(len(ok) / wall, 3),
        "latency_s": percentiles([r["latency_s"] for r in ok]),
        "ttft_s": percentiles([r["ttft_s"] for r in ok if r.get("ttft_s") is not None]),
        "tokens_per_request": percentiles([float(r["tokens"]) for r in ok]),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    out = asyncio.run(run(args))
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
