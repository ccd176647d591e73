"""Probe a drafter on HumanEval's prompts: tau of the diffusion block alone (T=0, k=16, 128 new
tokens), acceptance by the context length at each cycle, and, as an experiment, a sliding
attention window on the drafter's draft pass (the block and each context position see only the
last W positions; training never used one).

    python docs/d2a-experiments/probe_humaneval.py LIMIT WINDOWS [DRAFTER_DIR]
    python docs/d2a-experiments/probe_humaneval.py 40 none,192,128 runs/tiny-code/drafter-v4/final

One JSON line per window: tau, cycles, and by_pos64 {64*b: [mean accepted, cycles]} for
cycles whose verified context had 64*b .. 64*b+63 tokens (the last bucket is 384 and more).
"""
import json
import statistics
import sys
from collections import defaultdict

import torch

import deer_serve.models.modeling_deer as md
from deer_serve.assets import default_paths
from deer_serve.bench.methods import Models
from deer_serve.bench.suites import load_suite
from deer_serve.engine import generate
from deer_serve.types import SamplingParams

WINDOW = {"w": None}
_plain = md.DeerDrafter.draft_logits


@torch.inference_mode()
def _windowed(self, cache, new_ids, new_features, anchor, k, prefix=()):
    """DeerDrafter.draft_logits with the window: a context query at position p sees keys
    >= p - W, the block's queries keys >= anchor position - W."""
    W = WINDOW["w"]
    if W is None:
        return _plain(self, cache, new_ids, new_features, anchor, k, prefix)
    P = cache.length
    src = new_ids if self.config.context_mode == "tokens" else new_features
    n = 0 if src is None else int(src.shape[0])
    j = len(prefix)
    blk_ids = torch.full((1 + j + k,), self.config.mask_token_id, dtype=torch.long)
    blk_ids[0] = anchor
    if j:
        blk_ids[1:1 + j] = torch.tensor([int(t) for t in prefix], dtype=torch.long)
    x = self.embed_tokens(blk_ids)[None]
    if n:
        ctx = self.embed_context(None if new_ids is None else new_ids[None],
                                 None if new_features is None else new_features[None])
        x = torch.cat([ctx, x], 1)
    T = n + 1 + j + k
    if P + T > cache.capacity:
        self._grow(cache, max(2 * cache.capacity, P + T + 256))
    pos = torch.arange(P, P + T)
    mask = torch.ones(T, P + T, dtype=torch.bool)
    if n:
        mask[:n, P:] = torch.ones(n, T, dtype=torch.bool).tril()
    ref = pos.clone()
    ref[n:] = P + n
    mask &= torch.arange(P + T)[None, :] >= (ref[:, None] - W)
    cos, sin = self.rotary.get(pos[None], x.dtype)
    for layer, kv in zip(self.layers, cache.kv):
        x = layer(x, cos, sin, mask[None, None], kv, P)
    cache.length = P + n
    return self.logits(x[0, n + 1 + j:]).float()


md.DeerDrafter.draft_logits = _windowed


def main():
    torch.set_num_threads(2)
    limit = int(sys.argv[1])
    windows = [None if w == "none" else int(w) for w in sys.argv[2].split(",")]
    target_dir, drafter_dir = default_paths()
    models = Models(str(target_dir), sys.argv[3] if len(sys.argv) > 3 else str(drafter_dir), None)
    prompts = load_suite("humaneval", limit)
    sp = SamplingParams(temperature=0.0, max_new_tokens=128)
    for W in windows:
        WINDOW["w"] = W
        acc, by_pos = [], defaultdict(list)
        for p in prompts:
            ids = models.encode(p.text)
            r = generate(models.hf_target, models.drafter, ids, sp, mode="deer", block_size=16,
                         eos_token_id=models.eos_token_id)
            L = len(ids)
            for a in r.accept_lengths:
                by_pos[min(L // 64, 6)].append(a)
                L += a + 1
            acc += r.accept_lengths
        print(json.dumps({"window": W, "tau": round(statistics.mean(acc), 3), "cycles": len(acc),
                          "by_pos64": {b * 64: [round(statistics.mean(v), 2), len(v)]
                                       for b, v in sorted(by_pos.items())}}), flush=True)


if __name__ == "__main__":
    main()
