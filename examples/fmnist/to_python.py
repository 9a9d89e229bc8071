"""wick-fmnist's weights in Python, and back to wick as an exported model
(docs/interop.md):

    wick-fmnist --model cnn --export-safetensors cnn.safetensors --json
    python examples/fmnist/to_python.py --model cnn --safetensors cnn.safetensors \
        --export-pt2 cnn.pt2 --export-torchscript cnn.ts
    wick-fmnist --serve-model cnn.pt2 --serve 64 --json

Loads the safetensors file that wick wrote into the same architecture built
with torch.nn (the keys are the C++ module's named_parameters() names, which
nn.Sequential spells the same way), evaluates it on the Fashion-MNIST test set
with wick's normalization, and exports it for wick to serve: an AOTInductor
package (torch.export with a dynamic batch dimension, then
torch._inductor.aoti_compile_and_package) and/or a TorchScript file. Prints
one JSON line: the test accuracy in Python, and the exported models' accuracy
when run here.
"""

import argparse
import gzip
import json
import os
import sys

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

# wick::FashionMNIST's normalization: (x / 255 - kMean) / kStd, in float32.
MEAN, STD = 0.2860, 0.3530


def make_model(name):
    nn = torch.nn
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256),
                             nn.ReLU(), nn.Linear(256, 10))
    if name == "cnn":
        return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))
    raise SystemExit(f"--model must be mlp or cnn, got {name}")


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndims = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndims)]
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndims).copy()).view(dims)


def test_set(data_dir):
    images = read_idx(os.path.join(data_dir, "t10k-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(data_dir, "t10k-labels-idx1-ubyte.gz")).long()
    x = images.to(torch.float32).div_(255.0).sub_(MEAN).div_(STD).unsqueeze(1)
    return x, labels


@torch.no_grad()
def accuracy(run, x, y, batch=1000):
    correct = 0
    for i in range(0, x.shape[0], batch):
        correct += (run(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    return correct / x.shape[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cnn", choices=["mlp", "cnn"])
    p.add_argument("--safetensors", required=True, help="weights written by wick-fmnist")
    p.add_argument("--data-dir", default=os.environ.get("WICK_FASHION_MNIST_DIR",
                                                        "/usr/share/datasets/fashion-mnist"))
    p.add_argument("--export-pt2", help="write an AOTInductor package here")
    p.add_argument("--export-torchscript", help="write a TorchScript file here")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    model = make_model(args.model).eval()
    state = load_file(args.safetensors)
    model.load_state_dict(state, strict=True)  # every name and shape must match
    with safe_open(args.safetensors, framework="pt") as f:
        metadata = f.metadata() or {}
    x, y = test_set(args.data_dir)
    out = {"model": args.model, "python_test_accuracy": accuracy(model, x, y),
           "wick_test_accuracy": float(metadata["test_accuracy"]) if "test_accuracy" in metadata else None}

    if args.export_torchscript:
        scripted = torch.jit.script(model)
        scripted.save(args.export_torchscript)
        out["torchscript_path"] = args.export_torchscript
        out["torchscript_test_accuracy"] = accuracy(torch.jit.load(args.export_torchscript), x, y)
    if args.export_pt2:
        batch = torch.export.Dim("batch", min=1, max=4096)
        exported = torch.export.export(model, (x[:2],), dynamic_shapes=({0: batch},))
        path = torch._inductor.aoti_compile_and_package(exported, package_path=args.export_pt2)
        out["pt2_path"] = path
        compiled = torch._inductor.aoti_load_package(path)
        out["pt2_test_accuracy"] = accuracy(compiled, x, y)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
