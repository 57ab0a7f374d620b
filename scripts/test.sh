#!/usr/bin/env bash
# The project's test command: formatting, lints, then every test (unit, integration, CLI).
# Runs in a few minutes on 2 cores; needs only cargo (SQLite is bundled).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --release --all-targets --locked -- -D warnings
cargo test --release --locked
