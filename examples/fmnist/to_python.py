"""wick-fmnist's weights in Python, and back to wick as an exported model
(docs/interop.md):

    wick-fmnist --model cnn --export-safetensors cnn.safetensors --json
    python examples/fmnist/to_python.py --model cnn --safetensors cnn.safetensors --export cnn
    wick-fmnist --serve-model cnn.pt2 --serve 64 --json     # or cnn.pt (TorchScript)

Loads the safetensors file that wick wrote into the same architecture built
with torch.nn (export_fmnist.py's; the keys are the C++ module's
named_parameters() names, which nn.Sequential spells the same way), evaluates
it on the Fashion-MNIST test set with wick's normalization, and exports it as
export_fmnist.py does: STEM.pt (TorchScript) and STEM.pt2 (AOTInductor, a
dynamic batch dimension; --no-pt2 skips its C++ compile). Prints one JSON
line: the test accuracy in Python, the accuracy wick recorded in the file's
metadata, and the exported models' accuracy when run here.
"""

import argparse
import json
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from export_fmnist import export, load, make_model


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
    p.add_argument("--export", metavar="STEM", help="write STEM.pt and STEM.pt2")
    p.add_argument("--no-pt2", action="store_true", help="TorchScript only")
    p.add_argument("--threads", type=int, default=1, help="torch threads (baked into the .pt2)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model = make_model(args.model).eval()
    model.load_state_dict(load_file(args.safetensors), strict=True)  # every name and shape
    with safe_open(args.safetensors, framework="pt") as f:
        metadata = f.metadata() or {}
    x, y = load(args.data_dir, "t10k")
    out = {"model": args.model, "python_test_accuracy": accuracy(model, x, y),
           "wick_test_accuracy": float(metadata["test_accuracy"]) if "test_accuracy" in metadata else None}
    if args.export:
        export(model, args.export, args.threads, aoti=not args.no_pt2)
        out["torchscript_path"] = args.export + ".pt"
        out["torchscript_test_accuracy"] = accuracy(torch.jit.load(args.export + ".pt"), x, y)
        if not args.no_pt2:
            out["pt2_path"] = args.export + ".pt2"
            compiled = torch._inductor.aoti_load_package(args.export + ".pt2")
            out["pt2_test_accuracy"] = accuracy(compiled, x, y)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
