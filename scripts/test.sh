#!/usr/bin/env bash
# The project's test command: formatting, lints, then every test (unit, integration, CLI).
# Runs in a few minutes on 2 cores; needs cargo (SQLite is bundled) and python3 (the export
# hook's tests use mock vLLM modules, no torch, no vLLM, and run the built binary's diagnose).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --release --all-targets --locked -- -D warnings
cargo test --release --locked
APOLLO_BIN="${CARGO_TARGET_DIR:-target}/release/apollo-checkpoint" python3 scripts/test_vllm_export_hook.py
