#!/usr/bin/env bash
# wick-fmnist's run directories (ctest wick_fmnist_run_dirs): without --run-dir
# each fresh run gets its own runs/fmnist/version_N and --serve loads the
# checkpoint that run wrote, even after another model's run (the MLP's
# checkpoint at a later step sits in version_0); a fresh run into a directory
# holding checkpoints is refused; --resume latest continues the newest run.
#   run_dir_test.sh <wick-fmnist> <scratch dir>
set -euo pipefail
bin=$1
work=$2
rm -rf "$work"
mkdir -p "$work"
cd "$work"
common=(--epochs -1 --val-size 1000 --schedule constant --threads 1 --no-progress --json)
fail() { echo "run_dir_test: $*"; exit 1; }

"$bin" --model mlp --max-steps 4 "${common[@]}" >mlp.log 2>&1 || { cat mlp.log; fail "the MLP run failed"; }
grep -q '"run_dir":"runs/fmnist/version_0"' mlp.log || { cat mlp.log; fail "the MLP run did not use version_0"; }
[ -d runs/fmnist/version_0/checkpoints/step-00000004 ] || fail "no step-00000004 in version_0"

# The case: the CNN's last step (2) is older than the MLP's (4).
"$bin" --model cnn --max-steps 2 --serve 2 "${common[@]}" >cnn.log 2>&1 || { cat cnn.log; fail "the CNN run with --serve failed"; }
grep -q '"run_dir":"runs/fmnist/version_1"' cnn.log || { cat cnn.log; fail "the CNN run did not use version_1"; }
grep -q '"serve_test_accuracy":0\.[0-9]' cnn.log || { cat cnn.log; fail "the CNN run served nothing"; }

if "$bin" --model cnn --max-steps 2 --run-dir runs/fmnist/version_0 "${common[@]}" >refused.log 2>&1; then
  cat refused.log; fail "a fresh run into version_0 (holding the MLP's checkpoints) was not refused"
fi
grep -q "already holds another run's checkpoints (newest runs/fmnist/version_0/checkpoints/step-00000004)" refused.log \
  || { cat refused.log; fail "the refusal does not name the checkpoint"; }

"$bin" --model cnn --max-steps 3 --resume latest "${common[@]}" >resume.log 2>&1 || { cat resume.log; fail "--resume latest failed"; }
grep -q '"run_dir":"runs/fmnist/version_1".*"steps":3' resume.log || { cat resume.log; fail "--resume latest did not continue version_1"; }
echo "run_dir_test: passed"
