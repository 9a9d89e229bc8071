#!/usr/bin/env bash
# docs/sharding.md's launches, small: wick-fmnist --ddp --shard full on two
# "nodes" of this machine (two torchrun agents, --nnodes=2, one rank each, a
# rendezvous on 127.0.0.1), checkpointing; then --resume latest on one rank
# (standalone) and on three, with zero2. Every run must end where it was
# told to, from where the last one stopped. 57 600 training images make
# 450, 900 and 300 batches of 64 per rank on 2, 1 and 3 ranks, so that each
# resume's place in the epoch is a batch boundary on the new world size
# (step 20 on 2 ranks is batch 20 of 450, batch 40 of 900 on 1 rank; 14
# steps later, at step 34, batch 54 of 900 is batch 18 of 300 on 3). The
# 2-node run and the 3-rank one checkpoint asynchronously (--async-checkpoint:
# each rank writes its shards in the background, rank 0 commits them).
#   shard_launch_test.sh WICK_FMNIST PYTHON SCRATCH_DIR
set -euo pipefail
fmnist=$1 python=$2 dir=$3
rm -rf "$dir" && mkdir -p "$dir"
common=(--model mlp --epochs -1 --threads 1 --no-progress --json --val-size 2400
        --checkpoint-every 10 --run-dir "$dir/run")
port=$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
torchrun=("$python" -m torch.distributed.run)

fail() { echo "shard_launch_test: $*"; for f in "$dir"/*.log; do echo "== $f"; tail -20 "$f"; done; exit 1; }
steps_of() { grep -o '"steps":[0-9]*' "$1" | tail -1 | cut -d: -f2; }

# 1. Two agents, one per "node": both must be up for the rendezvous.
for node in 0 1; do
  OMP_NUM_THREADS=1 "${torchrun[@]}" --nnodes=2 --node_rank=$node --nproc_per_node=1 \
    --master_addr=127.0.0.1 --master_port="$port" --no-python \
    "$fmnist" --ddp --shard full --async-checkpoint --max-steps 20 "${common[@]}" \
    >"$dir/node$node.log" 2>&1 &
  pids[$node]=$!
done
for node in 0 1; do wait "${pids[$node]}" || fail "node $node failed"; done
[ "$(steps_of "$dir/node0.log")" = 20 ] || fail "the 2-node run did not end at step 20"
grep -q '"world_size":2' "$dir/node0.log" || fail "the 2-node run was not 2 ranks"
ls "$dir/run/checkpoints/step-00000020/shard-00001-of-00002.bin" >/dev/null \
  || fail "no shard of rank 1 in the 2-node run's checkpoint"

# 2. On one rank, from the 2-rank checkpoint.
OMP_NUM_THREADS=1 "${torchrun[@]}" --standalone --nproc_per_node=1 --no-python \
  "$fmnist" --ddp --shard full --max-steps 34 --resume latest "${common[@]}" >"$dir/one.log" 2>&1 \
  || fail "the 1-rank resume failed"
[ "$(steps_of "$dir/one.log")" = 34 ] || fail "the 1-rank resume did not end at step 34"

# 3. On three ranks, zero2, from the 1-rank checkpoint.
OMP_NUM_THREADS=1 "${torchrun[@]}" --standalone --nproc_per_node=3 --no-python \
  "$fmnist" --ddp --shard zero2 --async-checkpoint --max-steps 40 --resume latest "${common[@]}" \
  >"$dir/three.log" 2>&1 \
  || fail "the 3-rank resume failed"
[ "$(steps_of "$dir/three.log")" = 40 ] || fail "the 3-rank resume did not end at step 40"
grep -q '"world_size":3' "$dir/three.log" || fail "the 3-rank resume was not 3 ranks"
ls "$dir/run/checkpoints/step-00000040/shard-00002-of-00003.bin" >/dev/null \
  || fail "no shard of rank 2 in the 3-rank run's last (asynchronous) checkpoint"
echo "shard_launch_test: passed"
