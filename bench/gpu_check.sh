#!/usr/bin/env bash
# Run THERE (the GPU machine, through the device tool) after bench/gpu_prepare.sh here:
#   run(command="bash bench/gpu_check.sh", carry=[".device-deps"], timeout_s=560)
# One call: builds wick against the machine's PyTorch (CUDA), runs every test
# (the CUDA cases run instead of skipping), trains the CNN on the GPU, tries
# DDP over NCCL and Gloo with two processes on the one GPU, and measures.
# Results land in $OUT (at most 8 files): ctest.log, fmnist.jsonl, ddp.log,
# bench.jsonl, nvidia-smi.txt, summary.txt.
set -uo pipefail
OUT=${OUT:-/tmp/wick-gpu-out}
mkdir -p "$OUT"
start=$(date +%s)
say() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/summary.txt"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/nvidia-smi.txt" 2>&1
PY=$(command -v python3)
TP=$($PY -c 'import torch;print(torch.utils.cmake_prefix_path)')
say "torch $($PY -c 'import torch;print(torch.__version__, torch.version.cuda)') at $TP"
DEPS=$PWD/.device-deps/usr
export LD_LIBRARY_PATH=$DEPS/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export WICK_FASHION_MNIST_DIR=$PWD/.device-deps/fashion-mnist
export WICK_PYTHON=$PY

cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TP;$DEPS" \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DTORCH_CUDA_ARCH_LIST=9.0 -DWICK_PYTHON="$PY" > "$OUT/cmake.log" 2>&1 \
  || { say "configure failed"; tail -40 "$OUT/cmake.log"; exit 1; }
if ! cmake --build build-gpu -j16 > "$OUT/build.log" 2>&1; then
  say "build failed"; grep -E "error|Error" "$OUT/build.log" | head -40; exit 1
fi
rm -f "$OUT/cmake.log" "$OUT/build.log"
say "built"

(cd build-gpu && timeout 240 ctest -j8 --timeout 200 --output-on-failure) > "$OUT/ctest.log" 2>&1
say "ctest: $(grep -E 'tests passed|tests failed' "$OUT/ctest.log" | tail -1)"
grep -E "Skipped|Failed|\*\*\*" "$OUT/ctest.log" | head -20 | tee -a "$OUT/summary.txt"

B=build-gpu/bin
timeout 120 $B/wick-fmnist --device cuda --epochs 1 --no-progress --json --run-dir /tmp/fm-gpu 2>&1 | tail -1 >> "$OUT/fmnist.jsonl"
timeout 120 $B/wick-fmnist --device cuda --epochs 1 --no-progress --json --precision bf16 --run-dir /tmp/fm-gpu-bf16 2>&1 | tail -1 >> "$OUT/fmnist.jsonl"
say "fmnist on cuda: $(wc -l < "$OUT/fmnist.jsonl") runs"

TR="$PY -m torch.distributed.run --standalone --nproc_per_node=2 --no-python"
{ echo "== NCCL, 2 processes on one GPU"; timeout 120 $TR $B/wick-fmnist --ddp --device cuda --epochs 1 --no-progress --json --run-dir /tmp/fm-nccl 2>&1 | tail -5
  echo "== NCCL, world size 1"; timeout 120 $PY -m torch.distributed.run --standalone --nproc_per_node=1 --no-python $B/wick-fmnist --ddp --device cuda --epochs 1 --no-progress --json --run-dir /tmp/fm-nccl1 2>&1 | tail -3
  echo "== Gloo on CPU, 2 processes"; timeout 120 $TR $B/wick-fmnist --ddp --threads 4 --epochs 1 --no-progress --json --run-dir /tmp/fm-gloo 2>&1 | tail -3
} > "$OUT/ddp.log" 2>&1
say "ddp: $(grep -c test_accuracy "$OUT/ddp.log") of 3 runs reported"

timeout 100 $B/wick-bench --jsonl "$OUT/bench.jsonl" trainer --threads 1 --fused-adam --repeats 3 > /dev/null 2>&1
say "bench: $(tail -1 "$OUT/bench.jsonl" 2>/dev/null | cut -c1-300)"
timeout 90 $B/wick-bench --jsonl "$OUT/bench.jsonl" quant --cuda --batches 1,16,64,256,2048 --min-time 0.1 > /dev/null 2>&1
say "quant --cuda: $(tail -1 "$OUT/bench.jsonl" 2>/dev/null | cut -c1-300)"
say "done"
