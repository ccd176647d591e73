"""The methods `deer-serve bench` compares: one class per way of generating, one `Sample` each.

  ar               deer_serve engine, mode "ar" (plain decoding of the HFTarget)
  deer             deer_serve engine, mode "deer", as `deer-serve generate` decodes by default:
                   adaptive k (the block size is the largest k) with the method's own
                   `DraftGate`, and the DeerDrafterBackend's block with prompt lookup spliced in
                   after its confident head (`LookupDrafter`); one per block size
  deer-fixed       deer with a fixed block size (no adaptive k, no gate); main k
  deer-adaptive    deer at the main k (the name scripts know; adaptive k is now the default)
  deer-nolookup    deer without the lookup splice (the drafter's block alone); main k
  deer-alt         `deer` with a second drafter (`--alt-drafter`, either format): two drafters
                   side by side in one run; one per block size
  deer-alt-nolookup  that drafter's block alone; main k
  deer-pipe        deer-fixed with pipelining (engine `pipeline`: the next block is pre-drafted
                   in a thread while the target verifies); main k
  sd-ar            deer_serve engine, mode "deer", with the AR draft model as the drafter
                   (`ARDrafterBackend`: k tokens one by one, its own KV cache rolled back like
                   the DEER drafter's; no lookup), adaptive k and a gate as deer has them; one
                   per block size
  sd-ar-fixed      sd-ar with a fixed block size; main k
  hf-ar            Hugging Face `model.generate` with its own cache (the reference for the HF peers)
  hf-assisted      `generate(assistant_model=<AR draft model>)` (HF assisted generation)
  pld              `generate(prompt_lookup_num_tokens=10)` (prompt-lookup decoding)
  vllm             plain vLLM decoding of the same target (`VLLMTarget.generate`, mode "ar")
  deer-vllm        vLLM verifies DEER drafts: its rejection sampler; a DFlash-format drafter runs
                   in vLLM's native DFlash proposer (tau from vLLM's counters), a DeerDrafter
                   in `DeerProposer` (the custom-class proposer, deer_serve.targets.vllm_proposer);
                   main k
  deer-ray         DEER through the Ray Serve app (HTTP), pipelining as the service has it
  deer-ray-nopipe  the same with pipelining switched off per request
  deer-ray-engine  the same models as a second app with `service.loop: engine` (one step
                   engine per Verifier replica batches every request; no pipelining)

Every method gets the same prompt ids, max_new_tokens, sampling and EOS id, and returns the new
token ids cut before the first EOS (HF `generate` includes EOS and may pad: both are cut here),
so `ar` and every greedy method can be compared token for token.

For the HF methods the number of target forwards and the tokens each forward emitted are read
with a forward pre-hook on the target: before forward i the target's cache holds v_i = cur_len - 1
positions (assisted decoding crops it to that), so forward i emitted v_{i+1} - v_i tokens, i.e.
accepted = emitted - 1. Time inside target forwards is "verify", inside the assistant's forwards
"draft", the rest "other".
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from deer_serve.types import SamplingParams

ENGINE_METHODS = ("ar", "deer", "deer-fixed", "deer-nolookup", "deer-adaptive", "deer-pipe", "deer-alt",
                  "deer-alt-nolookup", "sd-ar", "sd-ar-fixed")
AR_DRAFT_METHODS = ("hf-assisted", "sd-ar", "sd-ar-fixed")  # those that need --ar-draft
HF_METHODS = ("hf-ar", "hf-assisted", "pld")
SERVICE_METHODS = ("deer-ray", "deer-ray-nopipe", "deer-ray-engine")
VLLM_METHODS = ("vllm", "deer-vllm")
ALL_METHODS = ENGINE_METHODS + HF_METHODS + SERVICE_METHODS + VLLM_METHODS
PLD_TOKENS = 10  # prompt_lookup_num_tokens, as in FINDINGS.md


@dataclass
class Sample:
    """One generation of one prompt by one method."""

    token_ids: list[int]                          # new tokens, cut before the first EOS
    wall_s: float                                 # measured by the bench around the call
    accept_lengths: Optional[list[int]] = None    # accepted drafts per cycle; None: no drafting
    timings: dict = field(default_factory=dict)   # seconds: prefill / draft / verify / other
    cycles: int = 0                               # target forwards after the prefill
    target_forwards: Optional[int] = None         # all target forwards (prefill included)
    extra: dict = field(default_factory=dict)     # e.g. pipeline hits / misses of the service


def cut_at_eos(ids: Sequence[int], eos: Optional[int]) -> list[int]:
    ids = [int(t) for t in ids]
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return ids


class Models:
    """The models every method shares, loaded once: target (HF model + HFTarget), tokenizer,
    and lazily the DEER drafter and the AR draft model."""

    def __init__(self, target_path: str, drafter_path: Optional[str], ar_draft_path: Optional[str],
                 alt_drafter_path: Optional[str] = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.target_path, self.drafter_path, self.ar_draft_path = target_path, drafter_path, ar_draft_path
        self.alt_drafter_path = alt_drafter_path
        self._alt_drafter = None
        self._targets: dict = {}
        self.tokenizer = AutoTokenizer.from_pretrained(target_path)
        self.model = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
        self._drafter = None
        self._ar_draft = None
        self._ar_drafter = None
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_token_id = int(eos[0] if isinstance(eos, (list, tuple)) else eos) \
            if eos is not None else None

    @property
    def drafter(self):
        if self._drafter is None:
            if not self.drafter_path:
                raise ValueError("method deer needs --drafter")
            from deer_serve.drafters import load_drafter

            self._drafter = load_drafter(self.drafter_path, self.target_path, device="cpu")
        return self._drafter

    @property
    def alt_drafter(self):
        if self._alt_drafter is None:
            if not self.alt_drafter_path:
                raise ValueError("method deer-alt needs --alt-drafter")
            from deer_serve.drafters import load_drafter

            self._alt_drafter = load_drafter(self.alt_drafter_path, self.target_path, device="cpu")
        return self._alt_drafter

    def target_for(self, drafter):
        """An HFTarget over the shared model that returns the features `drafter` reads (one per
        set of layers; None: no features)."""
        from deer_serve.targets.hf import HFTarget

        layers = tuple(drafter.feature_layers) \
            if drafter is not None and drafter.context_mode == "target-features" else None
        if layers not in self._targets:
            self._targets[layers] = HFTarget(self.model, feature_layers=layers,
                                             eos_token_id=self.eos_token_id)
        return self._targets[layers]

    @property
    def hf_target(self):
        """The HFTarget; its feature layers follow the drafter's when there is one."""
        return self.target_for(self.drafter if self.drafter_path else None)

    @property
    def ar_draft(self):
        if self._ar_draft is None:
            if not self.ar_draft_path:
                raise ValueError(f"methods {', '.join(AR_DRAFT_METHODS)} need --ar-draft")
            from transformers import AutoModelForCausalLM

            self._ar_draft = AutoModelForCausalLM.from_pretrained(
                self.ar_draft_path, dtype=torch.float32).eval()
        return self._ar_draft

    @property
    def ar_drafter(self):
        """The AR draft model as the engine's drafter (`ARDrafterBackend`, sd-ar), over the
        same weights as hf-assisted's assistant."""
        if self._ar_drafter is None:
            from deer_serve.drafters.ar import ARDrafterBackend

            self._ar_drafter = ARDrafterBackend(self.ar_draft)
        return self._ar_drafter

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


class EngineMethod:
    """`ar`, `deer*` or `sd-ar*`: the deer_serve decode loop in this process."""

    def __init__(self, name: str, models: Models, mode: str, block_size: Optional[int] = None,
                 lookup: bool = False, adaptive_k: bool = False, pipeline: bool = False,
                 alt: bool = False, ar_draft: bool = False):
        """alt: draft with the second drafter (`Models.alt_drafter`); ar_draft: with the AR
        draft model (`Models.ar_drafter`, sd-ar)."""
        self.name, self.models, self.mode, self.adaptive_k = name, models, mode, adaptive_k
        self.gate = None
        if adaptive_k and mode == "deer":
            from deer_serve.adaptive import DraftGate

            # learns across this method's requests, as a server's does for unseeded requests
            # (the bench seeds every sampled run only to repeat its own numbers)
            self.gate = DraftGate()
        self.pipeline = pipeline
        self.block_size = block_size if mode == "deer" else None
        self.drafter = None
        if mode == "deer":
            self.drafter = models.ar_drafter if ar_draft else \
                (models.alt_drafter if alt else models.drafter)
        self.target = models.target_for(self.drafter) if self.drafter is not None else models.hf_target
        if lookup:
            from deer_serve.drafters.lookup import LookupDrafter

            self.drafter = LookupDrafter(self.drafter, vocab_size=self.target.vocab_size)

    def run(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> Sample:
        from deer_serve.engine import generate

        d = self.drafter
        before = [getattr(d, a, 0) for a in ("hits", "calls", "spliced", "drafted")]
        fwd0 = getattr(d, "forwards", None)  # ARDrafterBackend: draft-model forwards
        t0 = time.perf_counter()
        r = generate(self.target, self.drafter, prompt_ids, sampling, mode=self.mode,
                     block_size=self.block_size or 1, eos_token_id=self.models.eos_token_id,
                     seq_id=f"bench-{uuid.uuid4().hex}", adaptive_k=self.adaptive_k,
                     gate=self.gate,
                     pipeline=self.pipeline)
        wall = time.perf_counter() - t0
        extra = {}
        if hasattr(d, "hits"):  # LookupDrafter: cycles / draft tokens that came from lookup
            now = [getattr(d, a, 0) for a in ("hits", "calls", "spliced", "drafted")]
            extra = {f"lookup_{a}": n - b for a, n, b in
                     zip(("hits", "calls", "tokens", "drafted"), now, before)}
        if fwd0 is not None:
            extra["draft_forwards"] = int(getattr(d, "forwards", 0)) - fwd0
        extra.update(r.extra)  # pipeline_hits / pipeline_misses
        return Sample(token_ids=list(r.token_ids), wall_s=wall,
                      accept_lengths=list(r.accept_lengths) if self.mode == "deer" else None,
                      timings=dict(r.timings), cycles=r.cycles, target_forwards=r.cycles + 1,
                      extra=extra)


class _ForwardProbe:
    """Forward hooks that count a module's calls, their time and the cache length before each."""

    def __init__(self, module: torch.nn.Module, record_cache: bool):
        self.module, self.record_cache = module, record_cache
        self.cache_lens: list[int] = []
        self.durations: list[float] = []  # seconds of each forward
        self._t0 = 0.0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self):
        self._handles = [
            self.module.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.module.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()

    def _pre(self, module, args, kwargs):
        if self.record_cache:
            pkv = kwargs.get("past_key_values")
            self.cache_lens.append(int(pkv.get_seq_length()) if pkv is not None else 0)
        self._t0 = time.perf_counter()

    def _post(self, module, args, output):
        self.durations.append(time.perf_counter() - self._t0)


class HFGenerateMethod:
    """`hf-ar`, `hf-assisted`, `pld`: Hugging Face `generate` on the same target model."""

    def __init__(self, name: str, models: Models):
        if name not in HF_METHODS:
            raise ValueError(name)
        self.name, self.models, self.block_size = name, models, None
        self.assistant = models.ar_draft if name == "hf-assisted" else None

    def _config(self, sampling: SamplingParams):
        from transformers import GenerationConfig

        eos = self.models.eos_token_id
        kw: dict[str, Any] = dict(max_new_tokens=sampling.max_new_tokens, min_new_tokens=0,
                                  num_beams=1, eos_token_id=eos, pad_token_id=eos,
                                  do_sample=not sampling.greedy)
        if not sampling.greedy:
            kw.update(temperature=sampling.temperature, top_p=sampling.top_p,
                      top_k=sampling.top_k)  # top_k 0 = off in HF too (its default would be 50)
        if self.name == "pld":
            kw["prompt_lookup_num_tokens"] = PLD_TOKENS
        return GenerationConfig(**kw)

    @torch.inference_mode()
    def run(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> Sample:
        model = self.models.model
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long)                    # (1, P)
        kw = {"generation_config": self._config(sampling), "attention_mask": torch.ones_like(ids)}
        if self.assistant is not None:
            kw["assistant_model"] = self.assistant
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        P = ids.shape[1]
        probe = _ForwardProbe(model, record_cache=True)
        draft_probe = _ForwardProbe(self.assistant, False) if self.assistant is not None else None
        with probe:
            if draft_probe is not None:
                draft_probe.__enter__()
            try:
                t0 = time.perf_counter()
                out = model.generate(ids, **kw)                                      # (1, P+n)
                wall = time.perf_counter() - t0
            finally:
                if draft_probe is not None:
                    draft_probe.__exit__(None, None, None)
        gen = out[0, P:].tolist()
        # Emitted per forward from the cache lengths (see the module docstring); the first
        # forward starts at v_0 = P - 1 (no cache yet), the end is the full generated length.
        v = [max(c, P - 1) for c in probe.cache_lens] + [P + len(gen) - 1]
        emitted = [b - a for a, b in zip(v, v[1:])]
        accept = None
        if self.name != "hf-ar":
            accept = [max(0, e - 1) for e in emitted]
        # As in the engine, the first target forward counts as the prefill, not as a cycle.
        draft_s = sum(draft_probe.durations) if draft_probe is not None else 0.0
        n_fwd = len(probe.durations)
        fwd = probe.durations
        timings = {"prefill": fwd[0] if fwd else 0.0, "draft": draft_s, "verify": sum(fwd[1:]),
                   "other": max(0.0, wall - sum(fwd) - draft_s)}
        return Sample(token_ids=cut_at_eos(gen, self.models.eos_token_id), wall_s=wall,
                      accept_lengths=accept, timings=timings, cycles=max(0, n_fwd - 1),
                      target_forwards=n_fwd)


class VLLMMethod:
    """`vllm` (plain vLLM decoding) or `deer-vllm` (vLLM verifies DEER drafts), one engine each.

    The engine starts at construction (not timed). Timings: "draft" = time in the proposer
    (drafter forward + the target features it computes), "verify" = the rest of vLLM's loop.
    cycles / target_forwards: for deer-vllm the proposer's cycles; for vllm one per token."""

    def __init__(self, name: str, models: Models, block_size: int):
        if name not in VLLM_METHODS:
            raise ValueError(name)
        from deer_serve.targets.vllm_backend import VLLMTarget

        self.name, self.models = name, models
        self.mode = "deer" if name == "deer-vllm" else "ar"
        self.block_size = block_size if self.mode == "deer" else None
        self.target = VLLMTarget(models.target_path, drafter_path=models.drafter_path)
        self.target.engine(block_size if self.mode == "deer" else 0)

    def run(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> Sample:
        t0 = time.perf_counter()
        r = self.target.generate(prompt_ids, sampling, mode=self.mode,
                                 block_size=self.block_size or 1)
        wall = time.perf_counter() - t0
        ids = cut_at_eos(r.token_ids, self.models.eos_token_id)
        acc = list(r.accept_lengths) if self.mode == "deer" else None
        cycles = len(acc) if acc is not None else max(0, len(ids) - 1)
        if "vllm_drafts" in r.extra:  # vLLM's native DFlash: its counters, no per-cycle lengths
            acc, cycles = None, int(r.extra["vllm_drafts"])
        return Sample(token_ids=ids, wall_s=wall, accept_lengths=acc, timings=dict(r.timings),
                      cycles=cycles, target_forwards=cycles + 1, extra=dict(r.extra))
