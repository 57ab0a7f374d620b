#!/usr/bin/env bash
# GPU tests, for a machine with a CUDA GPU and PyTorch (CI has none; these skip there and say so).
#   scripts/gpu-test.sh [PATH/TO/apollo-checkpoint]   (default: target/release/apollo-checkpoint,
#                                                      built first if cargo is available)
# 1. the export hook's core: handles of live tensors, opened by a second process (ctypes)
# 2. sync --handles end to end: a PyTorch process holds a Qwen3.5-shaped model in vLLM's packed
#    layout; init, diagnose, rounds of in-place changes and syncs checked byte for byte, verify,
#    a dead producer, the prototype's handles file converted, a malicious pickle refused
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/apollo-checkpoint}
if [ $# -eq 0 ] && command -v cargo >/dev/null 2>&1; then
  cargo build --release --quiet --bin apollo-checkpoint || exit 1
fi
status=0
echo "== export hook core"
python3 scripts/gpu_hook_test.py || status=1
echo "== sync --handles"
python3 scripts/gpu_sync_test.py "$bin" || status=1
[ "$status" = 0 ] && echo "GPU tests: PASS" || echo "GPU tests: FAIL"
exit "$status"
