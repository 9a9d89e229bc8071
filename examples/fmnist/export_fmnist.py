"""Train a Fashion-MNIST model in Python and export it for wick-fmnist --serve-model.

    python examples/fmnist/export_fmnist.py --out runs/exported [--model mlp|cnn] [--epochs 1]
    wick-fmnist --serve-model runs/exported/fmnist_mlp.pt2 --serve 64 --json

Writes <out>/fmnist_<model>.pt2 (torch.export with a dynamic batch dimension,
then torch._inductor.aoti_compile_and_package, for the CPU) and
<out>/fmnist_<model>.pt (torch.jit.script). Both take [N, 1, 28, 28] float
images normalized as wick-fmnist does, (x / 255 - 0.2860) / 0.3530, and return
[N, 10] logits. The architectures are wick-fmnist's --model mlp and cnn.

AOTInductor bakes the intra-op thread count of the export into its kernels
(`#pragma omp parallel num_threads(N)`): --threads sets it (default 1, as
wick-fmnist serves with one thread per batcher worker).
"""

import argparse
import gzip
import os

import numpy as np
import torch

MEAN, STD = 0.2860, 0.3530


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(root, prefix):
    x = read_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"))
    y = read_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"))
    x = (torch.from_numpy(x.copy()).float().div_(255.0).sub_(MEAN).div_(STD)).unsqueeze(1)
    return x, torch.from_numpy(y.astype(np.int64))


def make_model(name):
    nn = torch.nn
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
            nn.Linear(256, 10),
        )
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def export(model, out_stem, threads, aoti=True):
    """TorchScript and (with `aoti`) AOTInductor files of `model` (in eval mode) at out_stem.{pt,pt2}."""
    model.eval()
    torch.jit.script(model).save(out_stem + ".pt")
    if not aoti:
        return
    batch = torch.export.Dim("batch", min=1, max=65536)
    example = torch.randn(4, 1, 28, 28)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            ep = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
            torch._inductor.aoti_compile_and_package(ep, package_path=out_stem + ".pt2")
    finally:
        torch.set_num_threads(before)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads baked into the .pt2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=-1, help="stop training after N steps (-1: no limit)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    x, y = load(args.data_dir, "train")
    xt, yt = load(args.data_dir, "t10k")
    model = make_model(args.model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = 0
    for _ in range(args.epochs):
        model.train()
        perm = torch.randperm(x.shape[0])
        for i in range(0, x.shape[0], 128):
            if steps == args.max_steps:
                break
            steps += 1
            idx = perm[i : i + 128]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    stem = os.path.join(args.out, f"fmnist_{args.model}")
    export(model, stem, args.threads)
    print(f"{args.model}: test accuracy {acc:.4f} (Python eager); wrote {stem}.pt2 and {stem}.pt")


if __name__ == "__main__":
    main()
