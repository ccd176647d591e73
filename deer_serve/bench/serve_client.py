"""The client of `deer-serve bench-serve` (deer_serve.bench.servers): /v1/completions requests
(streamed, or whole replies with --no-stream) through the `openai` package, one concurrency level at a time, and
vLLM's own benchmark client (`vllm.benchmarks.serve`)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence


@dataclass
class RequestRecord:
    prompt_id: str
    tokens: int = 0                       # token ids received in the stream
    usage_tokens: Optional[int] = None    # the server's usage.completion_tokens
    ttft_s: Optional[float] = None        # request sent -> first chunk with a token (streamed)
    latency_s: Optional[float] = None     # request sent -> last chunk
    finish_reason: Optional[str] = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    error: Optional[str] = None
    mean_accepted: Optional[float] = None  # deer-serve's tau for this request (deer mode)

    @property
    def tpot_s(self) -> Optional[float]:
        if self.ttft_s is None or self.latency_s is None or self.tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.tokens - 1)


async def one_request(client, model: str, prompt_id: str, prompt: str, max_tokens: int,
                      body: dict, stream: bool = True) -> RequestRecord:
    rec = RequestRecord(prompt_id)
    t0 = time.perf_counter()
    if not stream:
        return await _one_reply(client, model, prompt, max_tokens, body, rec, t0)
    try:
        chunks = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body=body)
        async for chunk in chunks:
            now = time.perf_counter()
            for ch in chunk.choices:
                ids = getattr(ch, "token_ids", None)
                if ids is None and ch.text:  # a server without token ids: exactness is lost
                    rec.error = "no token_ids in the stream"
                ids = list(ids or [])
                if ids and rec.ttft_s is None:
                    rec.ttft_s = now - t0
                if ids:
                    rec.latency_s = now - t0
                rec.token_ids += ids
                rec.text += ch.text or ""
                rec.finish_reason = ch.finish_reason or rec.finish_reason
            if chunk.usage is not None:
                rec.usage_tokens = chunk.usage.completion_tokens
            deer = (chunk.model_extra or {}).get("deer")
            if isinstance(deer, dict) and deer.get("accept_lengths"):
                rec.mean_accepted = deer.get("mean_accepted")
        rec.tokens = len(rec.token_ids)
        if rec.usage_tokens is not None and rec.usage_tokens != rec.tokens:
            rec.error = rec.error or (f"{rec.tokens} token ids streamed, usage says "
                                      f"{rec.usage_tokens}")
    except Exception as e:  # a failed request is counted, not fatal
        rec.error = f"{type(e).__name__}: {e}"
        rec.tokens = len(rec.token_ids)
    return rec


async def _one_reply(client, model: str, prompt: str, max_tokens: int, body: dict,
                     rec: RequestRecord, t0: float) -> RequestRecord:
    """A non-streamed request: the whole completion in one reply (no TTFT / TPOT)."""
    try:
        r = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                            temperature=0.0, stream=False, extra_body=body)
        rec.latency_s = time.perf_counter() - t0
        ch = r.choices[0]
        ids = getattr(ch, "token_ids", None)
        if ids is None:
            rec.error = "no token_ids in the reply"
        rec.token_ids, rec.text, rec.finish_reason = list(ids or []), ch.text or "", ch.finish_reason
        rec.tokens = len(rec.token_ids)
        rec.usage_tokens = r.usage.completion_tokens if r.usage is not None else None
        deer = (r.model_extra or {}).get("deer")
        if isinstance(deer, dict) and deer.get("accept_lengths"):
            rec.mean_accepted = deer.get("mean_accepted")
        if rec.usage_tokens is not None and rec.usage_tokens != rec.tokens:
            rec.error = rec.error or (f"{rec.tokens} token ids returned, usage says "
                                      f"{rec.usage_tokens}")
    except Exception as e:  # a failed request is counted, not fatal
        rec.error = f"{type(e).__name__}: {e}"
    return rec


async def run_level_async(base_url: str, model: str, prompts: Sequence[tuple[str, str]],
                          concurrency: int, max_tokens: int, body: dict,
                          timeout_s: float = 600.0, stream: bool = True,
                          ) -> tuple[list[RequestRecord], float]:
    """Every prompt once, `concurrency` requests in flight (a worker pool over the prompt list,
    in order); (records in prompt order, wall seconds of the level). stream: False sends
    non-streamed requests."""
    from openai import AsyncOpenAI

    # the client's default pool (1000 connections, 100 kept alive) covers any level here
    client = AsyncOpenAI(base_url=base_url.rstrip("/") + "/v1", api_key="none", max_retries=0,
                         timeout=timeout_s)
    records: list[Optional[RequestRecord]] = [None] * len(prompts)
    next_i = 0

    async def worker():
        nonlocal next_i
        while next_i < len(prompts):
            i = next_i
            next_i += 1
            pid, text = prompts[i]
            records[i] = await one_request(client, model, pid, text, max_tokens, body, stream)

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
        wall = time.perf_counter() - t0
    finally:
        await client.close()
    return [r for r in records if r is not None], wall


def run_level(*args, **kw) -> tuple[list[RequestRecord], float]:
    return asyncio.run(run_level_async(*args, **kw))


# ---- vLLM's own benchmark client ----------------------------------------------------------------

def vllm_bench_serve(base_url: str, model: str, tokenizer: str, concurrency: int, *,
                     num_prompts: int, input_len: int = 64, output_len: int = 128,
                     seed: int = 0) -> dict:
    """`vllm.benchmarks.serve` (vLLM's `vllm bench serve`) against a running server: random
    dataset, ignore_eos, temperature 0, at one max-concurrency; its main numbers."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args([
        "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
        "--model", model, "--tokenizer", tokenizer, "--dataset-name", "random",
        "--random-input-len", str(input_len), "--random-output-len", str(output_len),
        "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
        "--ignore-eos", "--temperature", "0", "--seed", str(seed), "--disable-tqdm",
        "--ready-check-timeout-sec", "60"])
    res = main(args)
    keep = ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
            "request_throughput", "output_throughput", "total_token_throughput",
            "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms")
    out = {k: res.get(k) for k in keep}
    out.update({"max_concurrency": concurrency, "num_prompts": num_prompts,
                "input_len": input_len, "output_len": output_len})
    return out


