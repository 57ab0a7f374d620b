#!/usr/bin/env bash
# Demo of the main job on a synthetic Qwen3.5-shaped model in a temp dir: index it, let a
# "training step" change the live weights, sync, then show status and verify.
# Usage: scripts/demo.sh [SIZE_BYTES]   (default 256 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-$((256 << 20))}
cargo build --release --quiet --bin apollo-checkpoint --example synth
target=${CARGO_TARGET_DIR:-target}
bin=$target/release/apollo-checkpoint
synth=$target/release/examples/synth
work=$(mktemp -d -t apollo-demo-XXXXXX)
trap 'rm -rf "$work"' EXIT
# Bold commands on a terminal only (a log gets no escape codes), and never with NO_COLOR set.
if [ -t 1 ] && [ -z "${NO_COLOR:-}" ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold='' plain=''; fi
step() { printf '\n%s$ %s%s\n' "$bold" "$*" "$plain"; "$@"; }

echo "Synthetic model in $work/model; the live weights in $work/live."
$synth generate "$work/model" "$size" $((64 << 20)) 1
cp -r "$work/model" "$work/live"
step $bin init --model-dir "$work/model"
echo; echo "A training step changes one bf16 element in 0.5% of the 4 KiB blocks of the live weights:"
$synth mutate "$work/live" sparse 7
step $bin sync --model-dir "$work/model" --from "$work/live"
step $bin sync --model-dir "$work/model" --from "$work/live" --json
echo; echo "A dense step changes 1% of all bf16 elements:"
$synth mutate "$work/live" dense 8
step $bin sync --model-dir "$work/model" --from "$work/live"
step $bin status --model-dir "$work/model"
step $bin verify --model-dir "$work/model"
echo; echo "The model files now equal the live weights byte for byte:"
for f in "$work"/live/*.safetensors; do cmp "$f" "$work/model/$(basename "$f")" && echo "  $(basename "$f"): identical"; done
