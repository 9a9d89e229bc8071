#!/usr/bin/env bash
# Run HERE (the CPU build machine) before a device check: lays the Debian
# build dependencies (../shared/device/pack-deps) and the Fashion-MNIST files
# into .device-deps/ (git-ignored), which the device tool's `carry` takes along.
#
# With a built tree (BUILD_DIR, default build; scripts/test builds it) it also
# packs that tree's programs and test lists (no objects) into
# .device-deps/prebuilt.tar.gz: the torch wheel here is the device's own
# (2.11.0+cu130), so bench/gpu_check.sh runs them there against the device's
# LibTorch instead of spending device minutes on a build, and builds only if
# they do not start. WICK_GPU_PREBUILT=0: pack no programs. (Not packed: the
# ThreadSanitizer build of the batcher's tests, CPU-only and checked by CI.)
set -euo pipefail
top=$(git rev-parse --show-toplevel)
cd "$top"
../shared/device/pack-deps
mkdir -p .device-deps/fashion-mnist
cp /usr/share/datasets/fashion-mnist/*.gz .device-deps/fashion-mnist/

BUILD_DIR=$(realpath -m "${BUILD_DIR:-$top/build}")
if [ "${WICK_GPU_PREBUILT:-1}" = 1 ] && [ -f "$BUILD_DIR/build.ninja" ]; then
  cmake --build "$BUILD_DIR" -j "$(nproc)" > /dev/null
  torch_here=$("${WICK_VENV:-$HOME/.cache/wick/venv}/bin/python" -c 'import torch; print(torch.__version__)')
  # Paths compiled into the tests (the source tree, the build tree) must exist
  # there too: gpu_check.sh links them to its own copy.
  printf 'src=%s\nbuild=%s\ntorch=%s\ncommit=%s\n' "$top" "$BUILD_DIR" "$torch_here" \
    "$(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo +changes)" > .device-deps/prebuilt.env
  tar -C "$BUILD_DIR" -czf .device-deps/prebuilt.tar.gz \
    --exclude='*.o' --exclude='*.a' --exclude='*.gch' --exclude='*.pch' --exclude='*.ninja' \
    --exclude='.ninja_*' --exclude='CMakeFiles' --exclude='./install' --exclude='./consumer' \
    --exclude='./Testing' --exclude='./smoke' --exclude='*.log' --exclude='./tests/batcher_tsan_test' .
  echo "gpu_prepare: packed $(du -h .device-deps/prebuilt.tar.gz | cut -f1) of programs built against torch $torch_here"
fi
du -sh .device-deps
