"""`DeerProposer`: DEER drafts for vLLM's own speculative decoding loop.

vLLM 0.32 loads it with
    speculative_config={"method": "custom_class",
                        "model": "deer_serve.targets.vllm_proposer.DeerProposer",
                        "num_speculative_tokens": k}
instantiates it in the process that runs the model (`DeerProposer(vllm_config)`), calls
`load_model(target_model)` once, and after every target step
`propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=...)`, which
returns, per row of the batch, the draft tokens vLLM verifies in the next step with its
rejection sampler (`vllm/v1/worker/gpu_model_runner.py`, `propose_draft_token_ids`).

What vLLM gives a custom proposer (read from vLLM 0.32's source, not assumed): the tokens each
row sampled in the last step, and each row's token ids (`token_ids_cpu[i, :num_tokens_no_spec[i]]`
= prompt + output so far; its last token is the new anchor). It gives NO request ids, NO sampling
parameters and NO target hidden states (the hidden states go only to vLLM's built-in EAGLE /
DFlash / MTP proposers). So:

* Target features. The embedded drafter is in `target-features` mode (it reads the target's
  hidden states of layers [2, 4]). This proposer computes them itself with a Hugging Face copy of
  the target (`HFTarget`, per-row KV cache extended only by the newly accepted tokens): exact
  features, at the price of a second target forward over the accepted tokens each cycle (on a
  tiny target that is about as costly as vLLM's verify forward; it is counted in every timing).
  A `tokens`-mode drafter needs none of this.
* Draft distribution. Drafts are the drafter's argmax (y_i = argmax q_i) at every temperature,
  because vLLM's custom-proposer path passes no draft probabilities to the rejection sampler
  (`_draft_probs` is only filled by model-based proposers with `take_last_draft_probs`): with
  `draft_probs=None` vLLM's rejection sampler uses the one-hot q = delta(y) (accept y with
  probability p(y); on rejection sample from p with y removed, renormalised). A deterministic
  argmax draft IS drawn from delta(y), so the distribution the sampler sees is exactly the one
  the draft came from, and the output is the target's distribution (docs/vllm.md has the proof;
  tests/deer_serve/vllm checks it). Against one-hot verification the argmax is also the draft with the
  highest acceptance probability p(y), if q ranks like p.
* Request identity. Rows are keyed by their batch index, and every cache (drafter prefix KV,
  feature model KV) is matched by token-id prefix, as everywhere in deer-serve: when a row holds
  another request, the prefixes differ and the caches recompute. Correctness never depends on it.

Configuration (environment, so it reaches vLLM's worker process whatever way it was started):
  DEER_VLLM_DRAFTER        a DeerDrafter directory (default: the embedded drafter), or
                           `NAME:SPEC`, a drafter from the `deer_serve.drafter_sources` entry
                           point NAME (`deer_serve.plugins`): deer-serve's own is
                           `serve:APP/DEPLOYMENT`, the remote Drafter deployment of a running
                           Ray Serve app (e.g. `serve:default/Drafter`;
                           `deployments.vllm_remote`, so this module never imports Ray)
  DEER_VLLM_DRAFTER_TIMEOUT_S  remote draft timeout (default 30)
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from pathlib import Path
from typing import Any, Sequence

import torch

ENV_DRAFTER = "DEER_VLLM_DRAFTER"
ENV_TIMEOUT = "DEER_VLLM_DRAFTER_TIMEOUT_S"
CLASS_PATH = "deer_serve.targets.vllm_proposer.DeerProposer"

# Per-row acceptance log of the proposers in this process, for stats (accept_lengths of a
# batch-of-one generate): row -> accepted drafts per cycle. The engine in this process appends,
# `VLLMTarget.generate` reads and clears.
_LOG_LOCK = threading.Lock()
ACCEPT_LOG: dict[int, list[int]] = {}
DRAFT_TIME_S = [0.0]  # seconds spent in propose() (drafting + target features), all rows


def take_accept_log() -> tuple[dict[int, list[int]], float]:
    with _LOG_LOCK:
        log, t = {r: list(v) for r, v in ACCEPT_LOG.items()}, DRAFT_TIME_S[0]
        ACCEPT_LOG.clear()
        DRAFT_TIME_S[0] = 0.0
    return log, t


class DeerProposer:
    """vLLM custom proposer: DeerDrafter drafts (in-process or the remote Drafter deployment)."""

    def __init__(self, vllm_config: Any):
        from deer_serve.targets import vllm_fixes

        vllm_fixes.patch()  # in vLLM's worker process too, whoever started the engine
        spec = vllm_config.speculative_config
        self.k = int(spec.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self.target_path = str(vllm_config.model_config.model)
        self.source = os.environ.get(ENV_DRAFTER) or ""
        self.timeout_s = float(os.environ.get(ENV_TIMEOUT, "30"))
        dev = str(getattr(getattr(vllm_config, "device_config", None), "device", "cpu") or "cpu")
        self.device = "cuda" if dev.startswith("cuda") else "cpu"
        self.drafter: Any = None      # a DeerDrafterBackend, or a source plugin's drafter
        self.features: Any = None     # HFTarget giving target features, target-features mode
        self.context_mode = "tokens"
        self._prefix = f"vllm-{uuid.uuid4().hex[:8]}-row"
        self._proposed: dict[int, int] = {}  # row -> drafts proposed in the last step
        self._feats: dict[int, tuple[list[int], torch.Tensor]] = {}  # row -> (ids, (n, F))

    # ---- vLLM hooks --------------------------------------------------------------------------
    def load_model(self, *args, **kwargs) -> None:
        """vLLM passes the target nn.Module; DEER needs only its checkpoint (for features)."""
        from deer_serve.targets.hf import HFTarget

        if _SOURCE.match(self.source) and not Path(self.source).exists():
            self.drafter = _plugin_drafter(self.source, self.timeout_s)
            self.context_mode = self.drafter.context_mode
            layers = self.drafter.feature_layers
        else:
            from deer_serve.drafters.deer import DeerDrafterBackend

            path = self.source or str(_embedded_drafter())
            self.drafter = DeerDrafterBackend.from_pretrained(path, device=self.device,
                                                              max_sequences=1024)
            self.context_mode = self.drafter.context_mode
            layers = self.drafter.feature_layers
        if self.context_mode == "target-features":
            self.features = HFTarget.from_pretrained(self.target_path, device=self.device,
                                                     feature_layers=layers, max_sequences=1024)

    def propose(self, sampled_token_ids: Sequence[Sequence[int]], num_tokens_no_spec,
                token_ids_cpu, slot_mappings=None, **kwargs) -> list[list[int]]:
        import time

        t0 = time.perf_counter()
        out: list[list[int]] = [[] for _ in sampled_token_ids]
        rows: list[int] = []
        ctxs: list[list[int]] = []    # each row's verified tokens but the last
        anchors: list[int] = []       # each row's last verified token
        for i, sampled in enumerate(sampled_token_ids):
            n_prev = self._proposed.pop(i, 0)
            if not sampled:  # a prefill chunk that sampled nothing: no drafts this step
                continue
            if n_prev:
                with _LOG_LOCK:
                    ACCEPT_LOG.setdefault(i, []).append(len(sampled) - 1)
            n = int(num_tokens_no_spec[i])
            k = min(self.k, self.max_model_len - n - 1)
            if k < 1 or n < 2:
                continue
            ids = [int(t) for t in token_ids_cpu[i, :n]]
            ctx, anchor = ids[:-1], ids[-1]
            rows.append(i)
            ctxs.append(ctx)
            anchors.append(anchor)
        hiddens = self._context_features(rows, ctxs) if self.features is not None and rows \
            else [None] * len(rows)
        if rows:
            k = min(self.k, *(self.max_model_len - len(c) - 2 for c in ctxs))
            for i, toks in zip(rows, self._draft(rows, ctxs, anchors, hiddens, k)):
                out[i] = toks
                self._proposed[i] = len(toks)
        with _LOG_LOCK:
            DRAFT_TIME_S[0] += time.perf_counter() - t0
        return out

    # ---- helpers ------------------------------------------------------------------------------
    def _draft(self, rows, ctxs, anchors, hiddens, k: int) -> list[list[int]]:
        from deer_serve.types import SamplingParams

        greedy = SamplingParams(temperature=0.0, max_new_tokens=k + 1)  # argmax: see module doc
        sids = [f"{self._prefix}{i}" for i in rows]
        if hasattr(self.drafter, "draft_batch"):  # in-process: all rows in ONE drafter forward
            res = self.drafter.draft_batch(sids, ctxs, anchors, k, [greedy] * len(rows),
                                           None, hiddens)
        else:
            res = [self.drafter.draft(s, c, a, k, greedy, None, h)
                   for s, c, a, h in zip(sids, ctxs, anchors, hiddens)]
        return [[int(t) for t in r.tokens.tolist()] for r in res]

    def _context_features(self, rows: list[int], ctxs: list[list[int]]) -> list[torch.Tensor]:
        """(len(ctx), F) target features of each row's context, extended incrementally per row
        (only the positions a row's cache lacks run, all rows in ONE ragged forward)."""
        from deer_serve.targets.hf import common_prefix_len

        out: list = [None] * len(rows)
        todo, starts = [], []
        for j, (row, ctx) in enumerate(zip(rows, ctxs)):
            old_ids, old = self._feats.get(row, ([], None))
            c = common_prefix_len(old_ids, ctx) if old is not None else 0
            if old is not None and c >= len(ctx):
                out[j] = old[: len(ctx)]
            else:
                todo.append(j)
                starts.append(c)
        if todo:
            res = self.features.score_batch(
                [f"{self._prefix}{rows[j]}" for j in todo], [ctxs[j] for j in todo],
                [1] * len(todo), return_hidden=True,
                n_hidden=[len(ctxs[j]) - c for j, c in zip(todo, starts)])
            for j, c, r in zip(todo, starts, res):
                old = self._feats.get(rows[j], ([], None))[1]
                feats = r.hidden if c == 0 or old is None else torch.cat([old[:c], r.hidden])  # (len, F)
                self._feats[rows[j]] = (list(ctxs[j]), feats)
                out[j] = feats
        return out


def _embedded_drafter():
    from deer_serve.assets import default_paths

    return default_paths()[1]


_SOURCE = re.compile(r"^[A-Za-z][\w.-]*:")  # NAME:SPEC (a directory of that name wins)


def _plugin_drafter(source: str, timeout_s: float):
    """`NAME:SPEC` -> the drafter the `deer_serve.drafter_sources` entry point NAME makes of
    (SPEC, timeout_s); `serve` is `deployments.vllm_remote.remote_drafter`."""
    from deer_serve import plugins

    name, _, spec = source.partition(":")
    try:
        make = plugins.load(plugins.DRAFTER_SOURCES, name)
    except plugins.PluginMissing as e:
        raise ValueError(f"{ENV_DRAFTER}={source!r}: {e}") from e
    return make(spec, timeout_s)
