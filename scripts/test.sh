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
# The systemd units (scripts/systemd/), their paths pointed at this build: systemd-analyze verify,
# and any complaint it prints (it only warns about a misspelled setting) fails the test.
units=$(mktemp -d)
bin_path="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/release/apollo-checkpoint"
for f in scripts/systemd/*.service scripts/systemd/*.timer; do
  sed -e "s#/usr/local/bin/apollo-checkpoint#$bin_path#" \
      -e "s#/usr/local/lib/apollo-checkpoint/nightly-moria.sh#$PWD/scripts/nightly-moria.sh#" \
      "$f" >"$units/$(basename "$f")"
done
complaints=$(systemd-analyze verify --man=no "$units"/* 2>&1) || { echo "$complaints" >&2; exit 1; }
if [ -n "$complaints" ]; then echo "systemd-analyze verify: $complaints" >&2; exit 1; fi
rm -rf "$units"
echo "systemd units: OK (systemd-analyze verify)"

# The demo, as a user runs it with another target directory and its output in a log: it must
# find the binaries there and write no escape codes into the log.
# (The other directory is a link to this one, so nothing is built again; ./target is moved
# aside meanwhile, so the demo cannot find the binaries there by accident.)
demo_dir=$(mktemp -d)
demo_log="$demo_dir/demo.log"
built="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)"
ln -s "$built" "$demo_dir/target"
trap '[ -d target.demo-aside ] && mv target.demo-aside target' EXIT
[ -z "${CARGO_TARGET_DIR:-}" ] && mv target target.demo-aside && built="$PWD/target.demo-aside" && ln -sfn "$built" "$demo_dir/target"
status=0
CARGO_TARGET_DIR="$demo_dir/target" scripts/demo.sh $((8 << 20)) >"$demo_log" 2>&1 || status=$?
[ -d target.demo-aside ] && mv target.demo-aside target
if [ "$status" -ne 0 ]; then cat "$demo_log" >&2; echo "scripts/demo.sh failed" >&2; exit 1; fi
if grep -q $'\033' "$demo_log"; then echo "scripts/demo.sh wrote escape codes into a log" >&2; exit 1; fi
grep -q "identical" "$demo_log"
rm -rf "$demo_dir"
echo "scripts/demo.sh: OK (CARGO_TARGET_DIR, no escape codes in a log)"
