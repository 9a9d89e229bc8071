#!/usr/bin/env bash
# The round trip of docs/interop.md, small: wick-fmnist trains the MLP a few
# steps and writes safetensors; to_python.py loads them into torch.nn and
# exports TorchScript; wick-fmnist serves that file through the batcher. The
# test accuracy must be the same at every hop (the same float32 kernels run
# the same model on the same images, in batches of 1000 offline).
#   round_trip_test.sh <wick-fmnist> <python> <work dir>
set -euo pipefail
fmnist=$1 python=$2 dir=$3
here=$(cd "$(dirname "$0")" && pwd)
rm -rf "$dir" && mkdir -p "$dir"
"$fmnist" --model mlp --epochs -1 --max-steps 60 --val-size 1000 --threads 1 --no-progress \
  --run-dir "$dir/run" --export-safetensors "$dir/mlp.safetensors" --json | tail -1 >"$dir/wick.json"
"$python" "$here/to_python.py" --model mlp --safetensors "$dir/mlp.safetensors" \
  --export "$dir/mlp" --no-pt2 >"$dir/python.json"
"$fmnist" --serve-model "$dir/mlp.pt" --serve 8 --threads 1 --json | tail -1 >"$dir/served.json"
"$python" - "$dir" <<'PY'
import json, sys
d = sys.argv[1]
wick, py, served = (json.load(open(f"{d}/{n}.json")) for n in ("wick", "python", "served"))
hops = {"wick": wick["test_accuracy"], "wick (file metadata)": py["wick_test_accuracy"],
        "python": py["python_test_accuracy"], "torchscript in python": py["torchscript_test_accuracy"],
        "torchscript offline in wick": served["offline_test_accuracy"],
        "torchscript served by wick": served["serve_test_accuracy"]}
print(json.dumps(hops))
first = hops["wick"]
# The metadata holds wick's figure as text (std::to_string: 6 decimals).
bad = {k: v for k, v in hops.items() if abs(v - first) > 5e-7}
if bad:
    sys.exit(f"round_trip_test: accuracy differs from wick's {first}: {bad}")
print("round_trip_test: passed")
PY
