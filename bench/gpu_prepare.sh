#!/usr/bin/env bash
# Run HERE (the CPU build machine) before a device check: lays the Debian
# build dependencies (../shared/device/pack-deps) and the Fashion-MNIST files
# into .device-deps/ (git-ignored), which the device tool's `carry` takes along.
set -euo pipefail
top=$(git rev-parse --show-toplevel)
cd "$top"
../shared/device/pack-deps
mkdir -p .device-deps/fashion-mnist
cp /usr/share/datasets/fashion-mnist/*.gz .device-deps/fashion-mnist/
du -sh .device-deps
