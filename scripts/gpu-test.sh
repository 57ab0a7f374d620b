#!/usr/bin/env bash
# GPU tests, for a machine with a CUDA GPU and PyTorch (CI has none; these skip there and say so).
#   scripts/gpu-test.sh [PATH/TO/apollo-checkpoint [PATH/TO/gpu_hash_check]]
#       (default: target/release/apollo-checkpoint and its examples/gpu_hash_check, built first
#        if cargo is available)
# 1. the export hook's core: handles of live tensors, opened by a second process (ctypes)
# 2. sync --handles end to end: a PyTorch process holds a Qwen3.5-shaped model in vLLM's packed
#    layout; init, diagnose, rounds of in-place changes and syncs checked byte for byte, verify,
#    a dead producer, the prototype's handles file converted, a malicious pickle refused
# 3. GPU hashing: block hashes and captures on the GPU equal the host's for every block size;
#    syncs with --hash-on gpu; a tensor rewritten without pause makes a sync exit 75
# 4. naming schemes (text-only files with vLLM's VL names, VL files, a fused vision qkv), FusedMoE
#    experts, two pipeline stages (a missing one refused), memory CUDA IPC cannot share refused
# 5. tensor parallel: one producer per GPU holds its rank's shards; sync from both manifests
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/apollo-checkpoint}
checker=${2:-$(dirname "$bin")/examples/gpu_hash_check}
if [ $# -eq 0 ] && command -v cargo >/dev/null 2>&1; then
  cargo build --release --quiet --bin apollo-checkpoint --example gpu_hash_check || exit 1
fi
failed=0
skipped=0
run() {
  python3 "$@"
  case $? in
    0) ;;
    77) skipped=$((skipped + 1)) ;;
    *) failed=$((failed + 1)) ;;
  esac
}
echo "== export hook core"
run scripts/gpu_hook_test.py
echo "== sync --handles"
run scripts/gpu_sync_test.py "$bin"
echo "== hashing and capture on the GPU (kernels against the host; a tensor that never holds still)"
run scripts/gpu_hash_test.py "$bin" "$checker"
echo "== sync --handles: naming schemes, experts, pipeline stages"
run scripts/gpu_names_test.py "$bin"
echo "== sync --handles, TP=1/2/4/8 and PP=2 x TP=2, one producer per rank, ranks round-robin over the GPUs"
run scripts/gpu_tp_test.py "$bin"
if [ "$failed" -gt 0 ]; then echo "GPU tests: FAIL"; exit 1; fi
if [ "$skipped" -gt 0 ]; then echo "GPU tests: PASS, $skipped script(s) SKIPPED (no PyTorch, or too few GPUs here: see above)"; exit 0; fi
echo "GPU tests: PASS"
