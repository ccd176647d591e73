"""THE decode loop: prefill, then {draft, verify, accept, commit} until a stop, then stats.

Words as in `deer_serve.types`: p is the target, q the drafter, k the block size, the anchor the
last sampled token (the target has not run it yet). One cycle:

    context x_1..x_j | anchor a | drafts y_1..y_k          (the drafter proposes y from (x, a))
    target scores [x.., a, y_1..y_k] with n_query = k+1  -> p_1..p_{k+1}  (p_1 is after a)
    accept n drafts; next = correction or bonus           -> emitted: y_1..y_n, next
    commit a, y_1..y_n to the context; next is the new anchor

Rolling back needs no call: every call carries the full ids, and both caches keep only the
prefix that matches (see `TargetBackend`). `generate` returns the `GenerationResult`;
`iter_generate` yields a `StepOutput` per target forward and RETURNS the same result (the value
of its `StopIteration`), for streaming.

Randomness: one CPU `torch.Generator`, seeded from `sampling.seed`, drives the first token, the
draft samples and the acceptance, so a seeded run repeats exactly. Sampling runs on the CPU
(the drafter hands q over on the CPU); greedy argmax runs where the logits are.
"""

from __future__ import annotations

import copy
import numbers
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Collection, Generator, Optional, Sequence, Union

import torch

from deer_serve.acceptance import accept_greedy, accept_speculative
from deer_serve.adaptive import OFF, AdaptiveK, DraftGate
from deer_serve.calls import Draft, Plan, Score, run_direct
from deer_serve.pipeliner import Pipeliner
from deer_serve.sampling import process_logits, sample
from deer_serve.types import Drafter, GenerationResult, SamplingParams, TargetBackend

MODES = ("deer", "ar")
MAX_BLOCK_SIZE = 64


@dataclass
class StepOutput:
    new_token_ids: list[int]             # tokens emitted by this forward (EOS never included)
    accepted: Optional[int]              # drafts accepted this cycle; None at prefill / AR steps
    finish_reason: Optional[str] = None  # "length" | "stop" on the last step, else None


def generate(target: TargetBackend, drafter: Optional[Drafter], prompt_ids: Sequence[int],
             sampling: SamplingParams, **kw) -> GenerationResult:
    """Run `iter_generate` to the end and return its `GenerationResult`."""
    it = iter_generate(target, drafter, prompt_ids, sampling, **kw)
    while True:
        try:
            next(it)
        except StopIteration as stop:
            return stop.value


def iter_generate(target: TargetBackend, drafter: Optional[Drafter], prompt_ids: Sequence[int],
                  sampling: SamplingParams, *, mode: str = "deer", block_size: int = 16,
                  detokenize: Optional[Callable[[list[int]], str]] = None,
                  seq_id: Optional[str] = None,
                  eos_token_id: Union[int, Collection[int], None] = None,
                  adaptive_k: bool = False, pipeline: bool = False,
                  pipeline_min_p: float = 0.0, gate: Optional[DraftGate] = None,
                  ) -> Generator[StepOutput, None, GenerationResult]:
    """Validate now (ValueError), then return the decode generator.

    mode: "deer" (draft k tokens per cycle with `drafter`) or "ar" (plain decoding of `target`).
    adaptive_k: block_size becomes the largest k; each cycle's k follows the request's own
    acceptance (`AdaptiveK`). Lossless either way: k depends only on past cycles.
    gate: with adaptive_k, the process's `DraftGate` (deer_serve.adaptive): it may start the
    request with drafting off where drafts are rarely accepted at its temperature.
    pipeline: while block b is verified, pre-draft block b+1 for the most likely outcome of b
    (`Pipeliner`); use it when the outcome is that one. Counted in `result.extra`
    (pipeline_hits / pipeline_misses / pipeline_skipped). pipeline_min_p: pre-draft only when
    the hypothesis's probability by the drafter's confidences is at least this (`Pipeliner`).
    detokenize: ids -> text; needed for `sampling.stop` and for `GenerationResult.text`.
    eos_token_id: None = `target.eos_token_id`; ignored with `sampling.ignore_eos`.
    """
    prompt = _validate(target, drafter, prompt_ids, sampling, mode, block_size)
    if sampling.stop and detokenize is None:
        raise ValueError("stop strings need a detokenize function")
    eos = eos_set(target, sampling, eos_token_id)
    seq_id = seq_id or f"gen-{uuid.uuid4().hex}"
    mode, adapt = adaptive_plan(mode, block_size, adaptive_k, gate, sampling)
    core = _decode(target, prompt, sampling, mode, int(block_size), detokenize, seq_id, eos,
                   uses_features(drafter, mode), adapt,
                   Pipeliner(drafter, pipeline_min_p) if pipeline and mode == "deer" else None)
    return run_direct(core, target, drafter if mode == "deer" else None, seq_id)


def eos_set(target, sampling: SamplingParams,
            eos_token_id: Union[int, Collection[int], None] = None) -> set[int]:
    """The token ids that end a request (none with `sampling.ignore_eos`)."""
    if eos_token_id is None:
        eos_token_id = getattr(target, "eos_token_id", None)
    if sampling.ignore_eos or eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id}


def adaptive_plan(mode: str, block_size: int, adaptive_k: bool, gate: Optional[DraftGate],
                  sampling: SamplingParams) -> tuple[str, Optional[AdaptiveK]]:
    """The request's mode and its AdaptiveK (None: a fixed block). A request the gate starts
    with drafting off runs as mode "ar": no drafter calls, and no target features fetched on
    every step for a drafter that will never read them. (Same law: it never drafts either way.)"""
    if not adaptive_k or mode != "deer":
        return mode, None
    adapt = AdaptiveK(int(block_size), gate=gate, temperature=sampling.temperature)
    return ("ar", None) if adapt.ar_left >= OFF else (mode, adapt)


def uses_features(drafter, mode: str) -> bool:
    """Whether the request's drafter reads target features (its verifies return them)."""
    return mode == "deer" and drafter.context_mode == "target-features"


def _decode(target, prompt, sampling, mode, block_size, detokenize, seq_id, eos,
            use_features: bool, adapt: Optional[AdaptiveK] = None,
            pipe: Optional[Pipeliner] = None):
    """One request's decode as a generator of calls (`deer_serve.calls`: Plan, Draft, Score,
    StepOutput), returning its GenerationResult. Its driver runs the calls: `run_direct` one
    by one, `StepEngine` batched across requests. `target` is read for its device only."""
    gen = torch.Generator()  # CPU: see the module docstring
    if sampling.seed is not None:
        gen.manual_seed(sampling.seed)
    else:
        gen.seed()
    use_drafter = mode == "deer"
    sync = _syncer(getattr(target, "device", None))
    T = {"prefill": 0.0, "draft": 0.0, "verify": 0.0}
    busy, t_mark = 0.0, time.perf_counter()  # engine time only: paused while the caller holds a step
    ctx = list(prompt)        # verified tokens before the anchor (the target has run them all)
    feats: Optional[torch.Tensor] = None  # (len(ctx), F) target features of ctx, in target-features mode
    out: list[int] = []       # emitted tokens, EOS excluded
    accept_lengths: list[int] = []
    cycles, finish = 0, None
    pending = None            # (PendingDraft, m, guess): block b+1 drafted for one outcome of b
    ready = None              # the pre-draft whose outcome came true: this cycle's draft

    def pick(res) -> list[int]:  # a ScoreResult of n_query 1 -> its token, from p alone
        if sampling.greedy:
            return res.argmax().tolist()
        p = process_logits(res.logits.cpu(), sampling.temperature, sampling.top_k, sampling.top_p)
        return sample(p, gen).tolist()

    def commit(new: list[int]) -> tuple[list[int], Optional[str]]:
        """Cut `new` at EOS, max_new_tokens and stop strings; return (kept, finish_reason)."""
        reason = None
        for i, t in enumerate(new):
            if t in eos:
                new, reason = new[:i], "stop"
                break
        room = sampling.max_new_tokens - len(out)
        if len(new) >= room:
            new, reason = new[:room], reason or "length"
        if sampling.stop and new:
            n = _stop_cut(out, new, sampling.stop, detokenize)
            if n is not None:
                new, reason = new[:n], "stop"
        out.extend(new)
        return new, reason

    try:
        # 1. Prefill: the prompt through the target; its last row gives the first token, the
        #    anchor of the first cycle. In target-features mode keep every prompt position's
        #    features: the drafter's context is all of ctx.
        t0 = time.perf_counter()
        if use_features:
            res = yield Score(list(ctx), 1, True, len(ctx))
            feats = res.hidden                                              # (len(ctx), F)
        else:
            res = yield Score(list(ctx), 1)
        anchor = pick(res)[0]
        sync()
        T["prefill"] += time.perf_counter() - t0
        new, finish = commit([anchor])
        busy += time.perf_counter() - t_mark
        yield StepOutput(new, None, finish)
        t_mark = time.perf_counter()

        while finish is None:
            # Never draft past the budget: a cycle emits at most k+1 tokens. The driver may
            # shorten the block (a batch's verify budget): a choice from past steps only.
            kmax = adapt.next_k() if adapt is not None else block_size
            k = min(kmax, sampling.max_new_tokens - len(out) - 1) if use_drafter else 0
            if k > 0:
                k = min(k, max(0, int((yield Plan(k)))))
            cycles += 1
            if k == 0:
                if ready is not None:  # (the budget ended drafting)
                    ready.cancel()
                    ready = None
                # 2a. Plain AR step: the anchor alone, its row is the next token's p.
                t0 = time.perf_counter()
                res = yield Score(ctx + [anchor], 1, use_features)
                nxt = pick(res)[0]
                sync()
                T["verify"] += time.perf_counter() - t0
                n_acc, drafts = None, []
            else:
                # 2b. Draft y_1..y_k after the anchor, in one drafter forward.
                t0 = time.perf_counter()
                if ready is not None:  # pre-drafted during the last verify, for this context
                    d, ready = ready.result(), None
                    drafts = d.tokens.tolist()[:k]
                    if not drafts:
                        raise RuntimeError("the pre-draft is empty")
                else:
                    d = yield Draft(ctx, anchor, k, sampling, gen, feats)
                    drafts = d.tokens.tolist()
                if not 1 <= len(drafts) <= k:  # a lookup drafter may propose fewer than k
                    raise RuntimeError(f"drafter returned {len(drafts)} tokens, asked for 1..{k}")
                k = len(drafts)
                if pipe is not None:
                    pending = _pre_draft(pipe, d, drafts, k, seq_id, ctx, anchor, sampling, gen,
                                         feats, adapt, block_size, sampling.max_new_tokens - len(out))
                t1 = time.perf_counter()
                T["draft"] += t1 - t0
                # 3. Verify: one target forward over anchor + drafts -> p_1..p_{k+1}.
                res = yield Score(ctx + [anchor] + drafts, k + 1, use_features)
                sync()
                t2 = time.perf_counter()
                T["verify"] += t2 - t1
                # 4. Accept (pure functions, batch of one).
                y = torch.tensor([drafts], dtype=torch.long)                    # (1, k)
                lens = torch.tensor([k], dtype=torch.long)                      # (1,)
                if sampling.greedy:
                    n, nx = accept_greedy(y, lens, res.argmax().cpu()[None])  # (1,k+1) argmax
                else:
                    p = process_logits(res.logits.cpu(), sampling.temperature,
                                       sampling.top_k, sampling.top_p)          # (k+1, V)
                    q = None if d.probs is None else d.probs.cpu()[None]        # (1, k, V)
                    n, nx = accept_speculative(y, lens, q, p[None], gen)
                n_acc, nxt = int(n), int(nx)
                accept_lengths.append(n_acc)
                if pending is not None:
                    assert pipe is not None  # pending is set only with a Pipeliner
                    pd, m, guess, p_hyp = pending
                    pending = None
                    hit = n_acc == m and nxt == guess
                    if pipe.record is not None:
                        pipe.record.append((p_hyp, hit))
                    if hit:
                        ready, pipe.hits = pd, pipe.hits + 1
                    else:
                        pd.cancel()
                        pipe.misses += 1
                if adapt is not None:
                    adapt.update(n_acc, k)
            # 5. Commit the anchor and the accepted drafts; `nxt` is the new anchor.
            if use_features:
                assert feats is not None  # set at the prefill in target-features mode
                feats = torch.cat([feats, res.hidden[: (n_acc or 0) + 1]])       # (len(ctx), F)
            ctx = ctx + [anchor] + drafts[: n_acc or 0]  # a new list: a Draft call may hold the old
            anchor = nxt
            new, finish = commit(drafts[: n_acc or 0] + [nxt])
            busy += time.perf_counter() - t_mark
            yield StepOutput(new, n_acc, finish)
            t_mark = time.perf_counter()
    finally:
        for pd in (pending[0] if pending else None, ready):
            if pd is not None:
                pd.cancel()
        if pipe is not None:
            pipe.close()

    busy += time.perf_counter() - t_mark
    text = ""
    if detokenize is not None:
        text = detokenize(out)
        if finish == "stop" and sampling.stop:
            text = text[:_first_stop(text, sampling.stop)]
    T["other"] = max(0.0, busy - sum(T.values()))
    extra = {} if pipe is None else {"pipeline_hits": pipe.hits, "pipeline_misses": pipe.misses,
                                     "pipeline_skipped": pipe.skipped}
    return GenerationResult(token_ids=out, text=text, accept_lengths=accept_lengths,
                            finish_reason=finish, elapsed_s=busy, cycles=cycles, timings=T,
                            extra=extra)


def _pre_draft(pipe: Pipeliner, d, drafts, k, seq_id, ctx, anchor, sampling, gen, feats, adapt,
               block_size, room):
    """Send the pre-draft of the next block for the hypothesis of `pipe` (None: no pre-draft).
    room: tokens the request may still emit before this cycle."""
    hyp = pipe.hypothesis(d, drafts)
    if hyp is None:
        return None
    m, guess, p_hyp = hyp
    if adapt is not None:  # the next cycle's k if the outcome is (m, guess)
        a = copy.copy(adapt)
        a.update(m, k)
        k_next = a.next_k()
    else:
        k_next = block_size
    k_next = min(k_next, room - (m + 1) - 1)
    if k_next < 1:
        return None
    if p_hyp < pipe.min_p:  # a likely miss: no forward spent on it
        pipe.skipped += 1
        return None
    sub = None
    if not sampling.greedy:  # its own stream, drawn now: seeded runs repeat
        sub = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
    # a copy: the loop extends `ctx` in place while an in-process pre-draft may still read it
    return pipe.submit(seq_id, list(ctx), anchor, k_next, sampling, sub, feats,
                       prefix=drafts[:m] + [guess]), m, guess, p_hyp


def _first_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _stop_cut(out: list[int], new: list[int], stops, detokenize) -> Optional[int]:
    """How many of `new` to keep so the output ends with the token that completes the first
    stop string (as vLLM; the text is cut before the stop string), or None when none occurs.
    The text of `out` alone is known to hold no stop string."""
    if _first_stop(detokenize(out + new), stops) is None:
        return None
    for n in range(1, len(new) + 1):
        if _first_stop(detokenize(out + new[:n]), stops) is not None:
            return n
    return len(new)


def _validate(target, drafter, prompt_ids, sampling, mode, block_size) -> list[int]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(sampling, SamplingParams):
        raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    sampling.validate()
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral) \
            or not 1 <= int(block_size) <= MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be an integer in [1, {MAX_BLOCK_SIZE}], got {block_size!r}")
    if mode == "deer" and drafter is None:
        raise ValueError("mode 'deer' needs a drafter (use mode 'ar' for plain decoding)")
    if mode == "deer" and drafter.context_mode == "target-features" \
            and not getattr(target, "feature_dim", 0):
        raise ValueError("this drafter reads target features, and the target returns none")
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("prompt must contain at least one token")
    V = getattr(target, "vocab_size", None)
    bad = [t for t in prompt if t < 0 or (V is not None and t >= V)]
    if bad:
        raise ValueError(f"prompt token ids must be in [0, {V}), got {bad[:5]}")
    return prompt


def _syncer(device) -> Callable[[], None]:
    """Timings need the device to finish its queued work (a no-op on the CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None
