#!/usr/bin/env bash
# Run THERE (the GPU machine, through the device tool) after bench/gpu_prepare.sh here:
#   run(command="bash bench/gpu_check.sh", carry=[".device-deps"], timeout_s=560)
# One call, kept under ~520 s by a deadline every later stage is cut to:
#  1. configures against the machine's PyTorch (CUDA) and builds only
#     wick-bench and wick-gpt first (-j16);
#  2. measures the GPT-2-small training step at once (wick-bench gpt --device
#     cuda --compile: bf16 matmul ceiling, wick eager / CUDA graph / fp32,
#     Python eager / fp32 / torch.compile; about 150 s) into gpt.jsonl, then a
#     short `wick-gpt train --device cuda --cuda-graph --tf32`, `sample` and
#     `serve --device cuda` from its checkpoint (their JSON lines appended);
#  3. builds the rest and runs every test (the CUDA cases run instead of
#     skipping), trains the CNN on the GPU, tries DDP over NCCL and Gloo with
#     two processes on the one GPU, and runs the trainer and quant benches.
# Results land in $OUT (at most 8 files): summary.txt, gpt.jsonl, ctest.log,
# fmnist.jsonl, ddp.log, bench.jsonl, nvidia-smi.txt (cmake.log / build.log
# only when those fail).
set -uo pipefail
OUT=${OUT:-/tmp/wick-gpu-out}
mkdir -p "$OUT"
start=$(date +%s)
BUDGET=${WICK_GPU_BUDGET:-520}
say() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/summary.txt"; }
# Seconds a stage may take: its own limit, cut to what is left of the budget (0: skip it).
limit() { local left=$(( BUDGET - ($(date +%s) - start) - 5 )); (( left < 10 )) && { echo 0; return; }; echo $(( $1 < left ? $1 : left )); }
run_for() { local t; t=$(limit "$1"); shift; if (( t == 0 )); then say "skipped (out of time): $*"; return 124; fi; timeout "$t" "$@"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/nvidia-smi.txt" 2>&1
PY=$(command -v python3)
TP=$($PY -c 'import torch;print(torch.utils.cmake_prefix_path)')
say "torch $($PY -c 'import torch;print(torch.__version__, torch.version.cuda)') at $TP"
DEPS=$PWD/.device-deps/usr
export LD_LIBRARY_PATH=$DEPS/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export WICK_FASHION_MNIST_DIR=$PWD/.device-deps/fashion-mnist
export WICK_PYTHON=$PY

cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TP;$DEPS" \
  -DWICK_BUILD_BENCH=ON -DWICK_BUILD_EXAMPLES=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DTORCH_CUDA_ARCH_LIST=9.0 -DWICK_PYTHON="$PY" > "$OUT/cmake.log" 2>&1 \
  || { say "configure failed"; tail -40 "$OUT/cmake.log"; exit 1; }
if ! cmake --build build-gpu -j16 --target wick-bench wick-gpt > "$OUT/build.log" 2>&1; then
  say "build failed"; grep -E "error|Error" "$OUT/build.log" | head -40; exit 1
fi
say "built wick-bench and wick-gpt"
B=build-gpu/bin

# --- the GPT measurements first ---
run_for 180 $B/wick-bench --jsonl "$OUT/gpt.jsonl" gpt --device cuda --compile --peer-time-limit 90 \
  > /dev/null 2> "$OUT/gpt.err"
say "gpt bench: $(grep '"summary"' "$OUT/gpt.jsonl" 2>/dev/null | tail -1 | cut -c1-600)"
tail -5 "$OUT/gpt.err" >> "$OUT/summary.txt"; rm -f "$OUT/gpt.err"
G=/tmp/wick-gpt-gpu
run_for 90 $B/wick-gpt train --device cuda --cuda-graph --tf32 --steps 200 --batch-size 64 --val-batches 10 \
  --no-progress --json --run-dir $G 2>&1 | tail -1 >> "$OUT/gpt.jsonl"
say "wick-gpt train --cuda-graph: $(tail -1 "$OUT/gpt.jsonl" | cut -c1-300)"
run_for 30 $B/wick-gpt sample --device cuda --run-dir $G --max-new 80 --samples 2 --json 2>&1 | tail -1 >> "$OUT/gpt.jsonl"
say "wick-gpt sample --device cuda: $(tail -1 "$OUT/gpt.jsonl" | cut -c1-200)"
run_for 40 $B/wick-gpt serve --device cuda --run-dir $G --requests 64 --clients 32 --max-new 64 --json 2>&1 | tail -1 >> "$OUT/gpt.jsonl"
say "wick-gpt serve --device cuda: $(tail -1 "$OUT/gpt.jsonl" | cut -c1-300)"

# --- everything else ---
if ! cmake --build build-gpu -j16 >> "$OUT/build.log" 2>&1; then
  say "build of the rest failed"; grep -E "error|Error" "$OUT/build.log" | head -40
fi
rm -f "$OUT/cmake.log" "$OUT/build.log"
say "built"

(cd build-gpu && run_for 150 ctest -j8 --timeout 120 --output-on-failure) > "$OUT/ctest.log" 2>&1
say "ctest: $(grep -E 'tests passed|tests failed' "$OUT/ctest.log" | tail -1)"
grep -E "Skipped|Failed|\*\*\*" "$OUT/ctest.log" | head -20 | tee -a "$OUT/summary.txt"

run_for 60 $B/wick-fmnist --device cuda --epochs 1 --no-progress --json --run-dir /tmp/fm-gpu 2>&1 | tail -1 >> "$OUT/fmnist.jsonl"
run_for 60 $B/wick-fmnist --device cuda --epochs 1 --no-progress --json --precision bf16 --run-dir /tmp/fm-gpu-bf16 2>&1 | tail -1 >> "$OUT/fmnist.jsonl"
say "fmnist on cuda: $(wc -l < "$OUT/fmnist.jsonl") runs"

TR="$PY -m torch.distributed.run --standalone --nproc_per_node=2 --no-python"
{ echo "== NCCL, 2 processes on one GPU"; run_for 60 $TR $B/wick-fmnist --ddp --device cuda --epochs 1 --no-progress --json --run-dir /tmp/fm-nccl 2>&1 | tail -5
  echo "== NCCL, world size 1"; run_for 60 $PY -m torch.distributed.run --standalone --nproc_per_node=1 --no-python $B/wick-fmnist --ddp --device cuda --epochs 1 --no-progress --json --run-dir /tmp/fm-nccl1 2>&1 | tail -3
  echo "== Gloo on CPU, 2 processes"; run_for 60 $TR $B/wick-fmnist --ddp --threads 4 --epochs 1 --no-progress --json --run-dir /tmp/fm-gloo 2>&1 | tail -3
} > "$OUT/ddp.log" 2>&1
say "ddp: $(grep -c test_accuracy "$OUT/ddp.log") of 3 runs reported"

run_for 60 $B/wick-bench --jsonl "$OUT/bench.jsonl" trainer --threads 1 --fused-adam --repeats 3 > /dev/null 2>&1
say "bench: $(tail -1 "$OUT/bench.jsonl" 2>/dev/null | cut -c1-300)"
run_for 60 $B/wick-bench --jsonl "$OUT/bench.jsonl" quant --cuda --batches 1,16,64,256,2048 --min-time 0.1 > /dev/null 2>&1
say "quant --cuda: $(tail -1 "$OUT/bench.jsonl" 2>/dev/null | cut -c1-300)"
say "done"
