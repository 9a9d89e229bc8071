#!/usr/bin/env bash
# wick-fmnist --async-checkpoint (ctest wick_fmnist_async_checkpoint): a run
# checkpointing every step in the background, stopped after 4 steps and
# resumed from its newest checkpoint to step 6, ends with the parameters of an
# uninterrupted 6-step run whose checkpoints were synchronous; pruning kept
# the newest two (after the last write).
#   async_checkpoint_test.sh <wick-fmnist> <scratch dir>
set -euo pipefail
bin=$1
work=$2
rm -rf "$work"
mkdir -p "$work"
cd "$work"
common=(--model mlp --epochs -1 --val-size 1000 --schedule constant --threads 1 --no-progress --json
        --checkpoint-every 1)
fail() { echo "async_checkpoint_test: $*"; exit 1; }
sha() { sed -n 's/.*"params_sha256":"\([0-9a-f]*\)".*/\1/p' "$1"; }

"$bin" --max-steps 6 --run-dir straight "${common[@]}" >straight.log 2>&1 \
  || { cat straight.log; fail "the synchronous run failed"; }
grep -q '"async_checkpoint":false' straight.log || { cat straight.log; fail "the synchronous run says it was async"; }

"$bin" --max-steps 4 --run-dir split --async-checkpoint "${common[@]}" >first.log 2>&1 \
  || { cat first.log; fail "the first asynchronous run failed"; }
grep -q '"async_checkpoint":true' first.log || { cat first.log; fail "no \"async_checkpoint\":true"; }
grep -q '"checkpoints_written":4' first.log || { cat first.log; fail "not 4 checkpoints written"; }
grep -q 'checkpoints: 4 written in the background' first.log || { cat first.log; fail "no summary line"; }
[ "$(ls split/checkpoints)" = "$(printf 'step-00000003\nstep-00000004')" ] \
  || { ls -a split/checkpoints; fail "keep_last_k 2 did not leave step 3 and 4"; }

"$bin" --max-steps 6 --run-dir split --async-checkpoint --resume latest "${common[@]}" >resume.log 2>&1 \
  || { cat resume.log; fail "the resumed asynchronous run failed"; }
grep -q '"steps":6' resume.log || { cat resume.log; fail "the resumed run did not reach step 6"; }
[ -n "$(sha straight.log)" ] || { cat straight.log; fail "no params_sha256"; }
[ "$(sha resume.log)" = "$(sha straight.log)" ] \
  || fail "resumed parameters $(sha resume.log) differ from the uninterrupted run's $(sha straight.log)"
echo "async_checkpoint_test: passed"
