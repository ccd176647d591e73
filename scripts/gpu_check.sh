#!/usr/bin/env bash
# `make gpu-check`: on a machine with a CUDA GPU, install what the GPU path needs (`make install`,
# whose VLLM=auto picks the `vllm` extra where nvidia-smi lists a GPU), run the tests marked
# `gpu` (tests/gpu: the embedded pair in bf16, the Serve app with two replicas on one GPU, the
# vLLM backend) and a short ar / deer bench, and print the figures. Without a GPU it says
# "no CUDA GPU here: gpu-check skipped" and exits 0.
#
# Exit status: 0 = no GPU (skipped) or everything passed; 1 = install, tests or bench failed,
# or nvidia-smi lists a GPU that this environment's torch cannot use.
# Settings (environment): GPU_CHECK_TEST_TIMEOUT_S (330), GPU_CHECK_BENCH_TIMEOUT_S (120),
# GPU_CHECK_OUT (bench-out/gpu-check), VLLM (auto), MAKE (make).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=.venv/bin
OUT=${GPU_CHECK_OUT:-bench-out/gpu-check}
TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT_S:-330}
BENCH_TIMEOUT=${GPU_CHECK_BENCH_TIMEOUT_S:-120}
T0=$SECONDS

skip() {
  echo "no CUDA GPU here: gpu-check skipped ($1)"
  exit 0
}
say() { echo "gpu-check: $* [$((SECONDS - T0)) s]"; }

# 1. a GPU? (before installing anything: on a laptop this is the whole run)
command -v nvidia-smi >/dev/null 2>&1 || skip "no nvidia-smi"
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
[ "${GPUS:-0}" -gt 0 ] || skip "nvidia-smi lists no GPU"
say "$(nvidia-smi -L | head -1)${GPUS:+ ($GPUS GPU(s))}"

# 2. install (a no-op when .venv is up to date)
"${MAKE:-make}" --no-print-directory install VLLM="${VLLM:-auto}" || { say "make install failed"; exit 1; }
if ! "$BIN/python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "nvidia-smi lists a GPU but torch $("$BIN/python" -c 'import torch; print(torch.__version__)') \
in .venv cannot use it (a CPU build of torch, or a driver / CUDA mismatch): reinstall torch with \
CUDA (rm -rf .venv && make install on this machine without /opt/wheels)"
  exit 1
fi
"$BIN/python" - <<'EOF'
import importlib.util, torch
vllm = "vllm " + __import__("vllm").__version__ if importlib.util.find_spec("vllm") else "no vllm"
print(f"gpu-check: torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.get_device_name(0)}, {vllm}")
EOF
say "installed"

# 3. the GPU tests
status=0
timeout --signal=INT --kill-after=30 "$TEST_TIMEOUT" \
  "$BIN/python" -m pytest -q -m gpu tests/gpu -rs --durations=5 -p no:cacheprovider
rc=$?
if [ $rc -ne 0 ]; then status=1; say "GPU tests FAILED (exit $rc)"; else say "GPU tests passed"; fi

# 4. a short bench: ar vs deer on 10 HumanEval prompts (the deer sweep's first k is the main one)
METHODS=ar,deer
"$BIN/deer-serve" bench --help 2>/dev/null | grep -q 'sd-ar' && METHODS=ar,deer,sd-ar
rm -rf "$OUT"
timeout --signal=INT --kill-after=30 "$BENCH_TIMEOUT" \
  "$BIN/deer-serve" bench --suite humaneval --limit 10 --methods "$METHODS" --temperature 0 \
    --max-new-tokens 64 --repeats 1 --out "$OUT"
rc=$?
if [ $rc -ne 0 ] || [ ! -f "$OUT/report.md" ]; then
  status=1; say "bench FAILED (exit $rc)"
else
  echo
  # the figures: the temperature-0 table of report.md
  sed -n '/^## Temperature 0/,/^Cost per cycle/p' "$OUT/report.md" | sed '$d'
  say "bench done: $OUT/report.md, results.json"
fi

[ $status -eq 0 ] && say "PASSED" || say "FAILED"
exit $status
