#!/usr/bin/env bash
# Run THERE (the GPU machine, through the device tool) after bench/gpu_prepare.sh here:
#   run(command="bash bench/gpu_check.sh", carry=[".device-deps"], timeout_s=...)
# The training checks of issue 15 in one call, kept under WICK_GPU_BUDGET
# seconds (default 470) by a deadline every stage is cut to:
#  1. unpack the programs bench/gpu_prepare.sh built here (same torch wheel)
#     and run them against the machine's LibTorch; if they do not start,
#     configure against the machine's PyTorch and build everything (-j16);
#  2. the whole ctest suite with the GPU visible (the CUDA cases run instead of
#     skipping; tests/cuda_training_test.cpp compares with the machine's Python);
#  3. wick-fmnist --device cuda for 2 epochs in fp32, bf16 and fp16;
#  4. NCCL under torchrun: world size 1 trains; two ranks on the one GPU must
#     fail with wick's plain-words message (both as cuda:LOCAL_RANK and as
#     cuda:0 twice); Gloo on the CPU with two ranks trains; full sharding on
#     NCCL trains and its checkpoint resumes under zero2.
# WICK_GPU_TESTS=<ctest -R regex> runs only those tests (a rerun after fixes);
# WICK_GPU_STAGES picks stages, default "build ctest fmnist ddp"; two more:
# gpt (wick-bench gpt --device cuda --compile, then wick-gpt train / sample /
# serve on the GPU; issue 17) and bench (wick-bench trainer, quant --cuda, and quant on the host CPU).
# Results in $OUT (at most 8 files): summary.txt, ctest.log, ctest.xml (JUnit),
# fmnist.jsonl, ddp.log, nvidia-smi.txt, gpt.jsonl or bench.jsonl (those
# stages), build.log (only when the build fails).
set -uo pipefail
OUT=${OUT:-/tmp/wick-gpu-out}
mkdir -p "$OUT"
start=$(date +%s)
BUDGET=${WICK_GPU_BUDGET:-470}
STAGES=" ${WICK_GPU_STAGES:-build ctest fmnist ddp} "
say() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/summary.txt"; }
# Seconds a stage may take: its own limit, cut to what is left of the budget (0: skip it).
limit() { local left=$(( BUDGET - ($(date +%s) - start) - 5 )); (( left < 10 )) && { echo 0; return; }; echo $(( $1 < left ? $1 : left )); }
run_for() { local t; t=$(limit "$1"); shift; if (( t == 0 )); then say "skipped (out of time): $*"; return 124; fi; timeout "$t" "$@"; }
stage() { [[ "$STAGES" == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv > "$OUT/nvidia-smi.txt" 2>&1
nvidia-smi | head -4 | tail -2 >> "$OUT/nvidia-smi.txt" 2>&1   # the CUDA version the driver supports
PY=$(command -v python3)
TP=$($PY -c 'import torch;print(torch.utils.cmake_prefix_path)')
say "torch $($PY -c 'import torch;print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))') at $TP; $(nproc) CPUs"
DEPS=$PWD/.device-deps/usr
TORCH_LIB=$($PY -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH=$DEPS/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export WICK_FASHION_MNIST_DIR=$PWD/.device-deps/fashion-mnist
export WICK_PYTHON=$PY
export WICK_TEST_SOURCE_DIR=$PWD/tests
BUILD=$PWD/build-gpu

# The programs gpu_prepare.sh packed, run against this machine's LibTorch
# (the same wheel): no device minutes spent building, unless they do not start.
use_prebuilt() {
  [ "${WICK_GPU_PREBUILT:-1}" = 1 ] && [ -f .device-deps/prebuilt.tar.gz ] || return 1
  local src build torch commit
  eval "$(cat .device-deps/prebuilt.env)"
  [ "$torch" = "$($PY -c 'import torch; print(torch.__version__)')" ] || { say "prebuilt: torch $torch there, not this one's"; return 1; }
  if [ "$src" != "$PWD" ]; then
    [ -e "$src" ] && { say "prebuilt: $src exists and is not this tree"; return 1; }
    mkdir -p "$(dirname "$src")" && ln -s "$PWD" "$src"
  fi
  mkdir -p "$build" && tar -C "$build" -xzf .device-deps/prebuilt.tar.gz || return 1
  export LD_LIBRARY_PATH=$TORCH_LIB:$LD_LIBRARY_PATH
  if ldd "$build/tests/cuda_training_test" "$build/bin/wick-fmnist" | grep -q "not found"; then
    say "prebuilt: missing libraries: $(ldd "$build/tests/cuda_training_test" | grep 'not found' | tr '\n' ' ')"; return 1
  fi
  "$build/tests/cuda_training_test" --gtest_filter='CudaTrainingTest.*' --gtest_list_tests > /dev/null || return 1
  BUILD=$build
  say "prebuilt: programs of $commit built at $build"
}

if stage build && ! use_prebuilt; then
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TP;$DEPS" \
    -DWICK_BUILD_BENCH=ON -DWICK_BUILD_EXAMPLES=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DTORCH_CUDA_ARCH_LIST=9.0 -DWICK_PYTHON="$PY" > "$OUT/build.log" 2>&1 \
    || { say "configure failed"; tail -40 "$OUT/build.log"; exit 1; }
  if [ -n "${WICK_GPU_TESTS:-}" ]; then
    # Only the test binaries whose names the regex's words give (a rerun), and wick-fmnist.
    targets=$(echo "$WICK_GPU_TESTS" | grep -oE '[a-z_]+_test' | sort -u | tr '\n' ' ')
    build_cmd=(cmake --build build-gpu -j16 --target $targets wick-fmnist)
  else
    build_cmd=(cmake --build build-gpu -j16)
  fi
  if ! run_for 300 "${build_cmd[@]}" >> "$OUT/build.log" 2>&1; then
    say "build failed"; grep -E "error|Error" "$OUT/build.log" | head -40; exit 1
  fi
  rm -f "$OUT/build.log"
  say "built"
fi
B=$BUILD/bin

if stage ctest; then
  # The batcher's ThreadSanitizer run is CPU-only (CI runs it) and needs libtsan.
  regex=(-E '^batcher_tsan$')
  [ -n "${WICK_GPU_TESTS:-}" ] && regex+=(-R "$WICK_GPU_TESTS")
  export WICK_SLOW_TESTS=0
  (cd "$BUILD" && run_for 200 ctest -j12 --timeout 150 --output-on-failure \
     --output-junit "$OUT/ctest.xml" "${regex[@]}") > "$OUT/ctest.log" 2>&1
  say "ctest: $(grep -E 'tests passed|tests failed' "$OUT/ctest.log" | tail -1)"
  grep -E "\*\*\*Failed|\*\*\*Timeout|\*\*\*Exception|Not Run" "$OUT/ctest.log" | head -30 | tee -a "$OUT/summary.txt"
  say "skipped: $(grep -c '(Skipped)' "$OUT/ctest.log")"
  grep '(Skipped)' "$OUT/ctest.log" | head -30 >> "$OUT/summary.txt"
  grep -h "\[ info     \]" "$BUILD/Testing/Temporary/LastTest.log" 2>/dev/null | sort -u | tee -a "$OUT/summary.txt"
fi

# wick-fmnist refuses a fresh run into a directory holding checkpoints
# (examples/fmnist/run_dir.h): a second pass on the same machine starts clean.
rm -rf /tmp/fm-gpu-* /tmp/fm-nccl* /tmp/fm-gloo

if stage fmnist; then
  for p in fp32 bf16 fp16; do
    run_for 90 $B/wick-fmnist --device cuda --epochs 2 --precision $p --no-progress --json \
      --run-dir /tmp/fm-gpu-$p 2>&1 | tail -1 >> "$OUT/fmnist.jsonl"
    say "fmnist cuda $p: $(tail -1 "$OUT/fmnist.jsonl" | cut -c1-400)"
  done
fi

if stage ddp; then
  TR="$PY -m torch.distributed.run --standalone --no-python"
  { echo "== NCCL, world size 1"
    run_for 90 $TR --nproc_per_node=1 $B/wick-fmnist --ddp --device cuda --epochs 1 --no-progress --json --run-dir /tmp/fm-nccl1 2>&1 | tail -4
    echo "== NCCL, 2 ranks, --device cuda (cuda:LOCAL_RANK; one GPU)"
    run_for 60 $TR --nproc_per_node=2 $B/wick-fmnist --ddp --device cuda --epochs 1 --no-progress --json --run-dir /tmp/fm-nccl2 2>&1 | grep -v "^W\|^\*\*\*\*" | tail -12
    echo "== NCCL, 2 ranks, both --device cuda:0"
    run_for 60 $TR --nproc_per_node=2 $B/wick-fmnist --ddp --device cuda:0 --epochs 1 --no-progress --json --run-dir /tmp/fm-nccl0 2>&1 | grep -v "^W\|^\*\*\*\*" | tail -12
    echo "== Gloo on the CPU, 2 ranks"
    run_for 90 $TR --nproc_per_node=2 $B/wick-fmnist --ddp --threads 4 --epochs 1 --no-progress --json --run-dir /tmp/fm-gloo 2>&1 | tail -3
    echo "== NCCL, world size 1, full sharding (docs/sharding.md), then resumed with zero2"
    rm -rf /tmp/fm-shard
    run_for 60 $TR --nproc_per_node=1 $B/wick-fmnist --ddp --shard full --device cuda --epochs -1 --max-steps 200 \
      --checkpoint-every 100 --no-progress --json --run-dir /tmp/fm-shard 2>&1 | tail -2
    run_for 60 $TR --nproc_per_node=1 $B/wick-fmnist --ddp --shard zero2 --device cuda --epochs -1 --max-steps 300 \
      --resume latest --no-progress --json --run-dir /tmp/fm-shard 2>&1 | tail -2
  } > "$OUT/ddp.log" 2>&1
  say "ddp: $(grep -c test_accuracy "$OUT/ddp.log") runs reported accuracy (4 expected); NCCL shared-GPU messages:"
  grep -E "one GPU|same GPU|Duplicate GPU|GPUs are visible|visible" "$OUT/ddp.log" | head -6 | cut -c1-400 | tee -a "$OUT/summary.txt"
fi

if stage gpt; then
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
fi

if stage bench; then
  run_for 60 $B/wick-bench --jsonl "$OUT/bench.jsonl" trainer --threads 1 --fused-adam --repeats 3 > /dev/null 2>&1
  say "bench: $(tail -1 "$OUT/bench.jsonl" 2>/dev/null | cut -c1-300)"
  run_for 60 $B/wick-bench --jsonl "$OUT/bench.jsonl" quant --cuda --batches 1,16,64,256,2048 --min-time 0.1 > /dev/null 2>&1
  say "quant --cuda: $(tail -1 "$OUT/bench.jsonl" 2>/dev/null | cut -c1-300)"
  # The host's CPU (often an AMD EPYC beside NVIDIA GPUs): issue 20's int8
  # goals against Python on a CPU without AMX, which our build machines lack.
  run_for 100 $B/wick-bench --jsonl "$OUT/bench.jsonl" quant --batches 1,16,64,256 --repeats 2 > /dev/null 2>&1
  say "quant (host CPU $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)): $(tail -1 "$OUT/bench.jsonl" 2>/dev/null | cut -c1-400)"
fi
say "done"
