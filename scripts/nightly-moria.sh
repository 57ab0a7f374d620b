#!/usr/bin/env bash
# Nightly copy of a model to its backup host ("moria"):
#   1. export-delta: the changes since the last export, as one immutable delta file in the outbox
#   2. rsync the outbox to the backup host (only finished files; deltas pruned locally go away)
#   3. apply-delta there over ssh (verified, journaled; already-applied deltas are no-ops)
#   4. prune the deltas the backup host has now applied
# Every step is safe to repeat, so after any failure just run it again. Exits non-zero on failure.
#
# Options (or the environment variables in brackets):
#   --model-dir DIR      the model on this host                       [APOLLO_MODEL_DIR]
#   --outbox DIR         where deltas are written on this host        [APOLLO_OUTBOX]
#   --host HOST          the backup host                              [APOLLO_REMOTE_HOST, default moria]
#   --remote-dir DIR     the replica directory on the backup host     [APOLLO_REMOTE_DIR]
#   --remote-inbox DIR   where deltas land there [APOLLO_REMOTE_INBOX, default <remote-dir>.inbox]
#   --ssh CMD            ssh command with its options                 [APOLLO_SSH, default ssh]
#   --rsync CMD          rsync command                                [APOLLO_RSYNC, default rsync]
#   --bin PATH           apollo-checkpoint here                       [APOLLO_BIN]
#   --remote-bin PATH    apollo-checkpoint on the backup host         [APOLLO_REMOTE_BIN]
#   --bootstrap full|GEN the very first run only: ship whole files (`full`), or the generation
#                        at which the model files were copied to the replica  [APOLLO_BOOTSTRAP]
#   --key-file FILE      authenticate deltas: a MAC by this key (64 hex digits, chmod 600) goes
#                        with each delta                              [APOLLO_KEY_FILE]
#   --remote-key-file FILE  the same key on the backup host, which then refuses any delta
#                        without a valid MAC                          [APOLLO_REMOTE_KEY_FILE]
#   --dry-run            print what would run; change nothing
set -euo pipefail

MODEL_DIR=${APOLLO_MODEL_DIR:-}
OUTBOX=${APOLLO_OUTBOX:-}
REMOTE_HOST=${APOLLO_REMOTE_HOST:-moria}
REMOTE_DIR=${APOLLO_REMOTE_DIR:-}
REMOTE_INBOX=${APOLLO_REMOTE_INBOX:-}
SSH=${APOLLO_SSH:-ssh}
RSYNC=${APOLLO_RSYNC:-rsync}
BIN=${APOLLO_BIN:-apollo-checkpoint}
REMOTE_BIN=${APOLLO_REMOTE_BIN:-apollo-checkpoint}
BOOTSTRAP=${APOLLO_BOOTSTRAP:-}
KEY_FILE=${APOLLO_KEY_FILE:-}
REMOTE_KEY_FILE=${APOLLO_REMOTE_KEY_FILE:-}
DRY_RUN=0

die() { echo "nightly-moria: $*" >&2; exit 1; }
usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --model-dir) MODEL_DIR=${2:?}; shift 2 ;;
    --outbox) OUTBOX=${2:?}; shift 2 ;;
    --host) REMOTE_HOST=${2:?}; shift 2 ;;
    --remote-dir) REMOTE_DIR=${2:?}; shift 2 ;;
    --remote-inbox) REMOTE_INBOX=${2:?}; shift 2 ;;
    --ssh) SSH=${2:?}; shift 2 ;;
    --rsync) RSYNC=${2:?}; shift 2 ;;
    --bin) BIN=${2:?}; shift 2 ;;
    --remote-bin) REMOTE_BIN=${2:?}; shift 2 ;;
    --bootstrap) BOOTSTRAP=${2:?}; shift 2 ;;
    --key-file) KEY_FILE=${2:?}; shift 2 ;;
    --remote-key-file) REMOTE_KEY_FILE=${2:?}; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[ -n "$MODEL_DIR" ] || die "--model-dir (or APOLLO_MODEL_DIR) is required"
[ -n "$OUTBOX" ] || die "--outbox (or APOLLO_OUTBOX) is required"
[ -n "$REMOTE_DIR" ] || die "--remote-dir (or APOLLO_REMOTE_DIR) is required"
REMOTE_INBOX=${REMOTE_INBOX:-$REMOTE_DIR.inbox}

say() { echo "nightly-moria: $*" >&2; }
show() { printf '+'; printf ' %q' "$@"; printf '\n'; } >&2
run() { show "$@"; if [ "$DRY_RUN" = 0 ]; then "$@"; fi; }
# Splits a command string such as "ssh -p 2222 -o BatchMode=yes" into words.
read -r -a SSH_CMD <<<"$SSH"
read -r -a RSYNC_CMD <<<"$RSYNC"

# 1. Export. The first export ever needs to know where the replica starts.
export_args=(export-delta --model-dir "$MODEL_DIR" --out "$OUTBOX")
[ -z "$KEY_FILE" ] || export_args+=(--key-file "$KEY_FILE")
[ -z "$KEY_FILE" ] || [ -n "$REMOTE_KEY_FILE" ] || die "--key-file needs --remote-key-file (the same key on $REMOTE_HOST), or the MACs are never checked"
if ! "$BIN" status --model-dir "$MODEL_DIR" --json | grep -q '"exported_through":[0-9]'; then
  case "$BOOTSTRAP" in
    full) export_args+=(--full) ;;
    ''|*[!0-9]*) die "nothing was exported yet: pass --bootstrap full (the replica starts empty) or --bootstrap GEN (the generation at which you copied the model files there)" ;;
    *) export_args+=(--since "$BOOTSTRAP") ;;
  esac
fi
run "$BIN" "${export_args[@]}"

# 2. Ship the outbox: finished files only (temporaries start with a dot); --delete drops the
#    deltas pruned here after the backup host applied them.
run "${SSH_CMD[@]}" "$REMOTE_HOST" "mkdir -p $(printf '%q' "$REMOTE_INBOX")"
run "${RSYNC_CMD[@]}" -a --delete --exclude '.*' -e "$SSH" "$OUTBOX/" "$REMOTE_HOST:$REMOTE_INBOX/"

# 3. Apply there. With no delta left in the inbox, just report the replica's generation.
apply_args=("$REMOTE_BIN" apply-delta --replica-dir "$REMOTE_DIR" --json)
[ -z "$REMOTE_KEY_FILE" ] || apply_args+=(--key-file "$REMOTE_KEY_FILE")
apply=$(printf '%q ' "${apply_args[@]}")
status=$(printf '%q ' "$REMOTE_BIN" status --model-dir "$REMOTE_DIR" --json)
remote="cd $(printf '%q' "$REMOTE_INBOX") && set -- *.apd && if [ -e \"\$1\" ]; then $apply \"\$@\"; else $status; fi"
if [ "$DRY_RUN" = 1 ]; then
  show "${SSH_CMD[@]}" "$REMOTE_HOST" "$remote"
  say "dry run: nothing was changed"
  exit 0
fi
show "${SSH_CMD[@]}" "$REMOTE_HOST" "$remote"
out=$("${SSH_CMD[@]}" "$REMOTE_HOST" "$remote") || die "apply-delta on $REMOTE_HOST failed; the replica is at its old generation or recovers on the next run"
generation=$(printf '%s' "$out" | grep -o '"generation":[0-9]*' | head -n 1 | cut -d: -f2)
[ -n "$generation" ] || die "could not read the replica's generation from: $out"

# 4. Prune what the backup host has applied.
run "$BIN" export-delta --model-dir "$MODEL_DIR" --out "$OUTBOX" --prune-through "$generation"
say "the replica on $REMOTE_HOST is at generation $generation"
