#!/usr/bin/env python3
"""Python peer of `wick-bench export`: exports the models, then times them in Python.

    export_peer.py export --out DIR --models mlp,cnn --threads 1,2 --seed 0
    export_peer.py time --out DIR --models mlp,cnn --threads 1 --batches 1,64 ...

The models are wick-fmnist's (--model mlp: 784-512-256-10; --model cnn:
conv32-conv64-fc128-fc10) on [N, 1, 28, 28] images, built after
torch.manual_seed(seed).

`export` writes, per model, DIR/<model>.pt (torch.jit.script: the weights the
C++ side copies into its own torch::nn module) and per model and thread count
DIR/<model>_t<T>.pt2 (torch.export with a dynamic batch dimension, then
torch._inductor.aoti_compile_and_package for the CPU, with T intra-op threads:
AOTInductor bakes the count into its kernels), plus DIR/manifest.json saying
what was exported, so a second run with the same arguments reuses the files.

`time` loads DIR/<model>.pt's weights into the eager model and DIR/<model>_t<T>.pt2
with torch._inductor.aoti_load_package, and times both as the C++ side times
its cases: calls repeated until --min-time seconds have passed, after --warmup
calls, under torch.inference_mode(); the figure is milliseconds per call.
Inputs are randn(batch, 1, 28, 28) from a generator seeded seed+1. Prints one
JSON line per (model, batch): eager_ms, aoti_ms, check (the sum of the eager
output, which the C++ side compares with its own).
"""
import argparse
import json
import os
import sys
import time


def build(torch, name):
    nn = torch.nn
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
            nn.Linear(256, 10),
        )
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
        )
    raise SystemExit(f"export_peer.py: unknown model {name} (mlp, cnn)")


def per_call_ms(fn, warmup, min_time):
    for _ in range(warmup):
        fn()
    calls = 0
    start = time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return 1e3 * elapsed / calls


def export(torch, a):
    os.makedirs(a.out, exist_ok=True)
    manifest_path = os.path.join(a.out, "manifest.json")
    want = {"models": a.models, "threads": a.threads, "seed": a.seed, "torch": torch.__version__}
    try:
        with open(manifest_path) as f:
            have = json.load(f)
    except (OSError, ValueError):
        have = None
    if have == want:
        print(json.dumps({"exported": False, "reused": True, **want}), flush=True)
        return
    start = time.perf_counter()
    for name in a.models.split(","):
        torch.manual_seed(a.seed)
        model = build(torch, name).eval()
        torch.jit.script(model).save(os.path.join(a.out, f"{name}.pt"))
        batch = torch.export.Dim("batch", min=1, max=65536)
        example = torch.randn(4, 1, 28, 28)
        for threads in [int(t) for t in a.threads.split(",")]:
            torch.set_num_threads(threads)
            with torch.no_grad():
                ep = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
                torch._inductor.aoti_compile_and_package(
                    ep, package_path=os.path.join(a.out, f"{name}_t{threads}.pt2")
                )
    with open(manifest_path, "w") as f:
        json.dump(want, f)
    print(json.dumps({"exported": True, "export_s": time.perf_counter() - start, **want}), flush=True)


def timing(torch, a):
    torch.set_num_threads(int(a.threads))
    for name in a.models.split(","):
        model = build(torch, name).eval()
        model.load_state_dict(torch.jit.load(os.path.join(a.out, f"{name}.pt")).state_dict())
        aoti = torch._inductor.aoti_load_package(os.path.join(a.out, f"{name}_t{a.threads}.pt2"))
        for batch in [int(b) for b in a.batches.split(",")]:
            g = torch.Generator().manual_seed(a.seed + 1)
            x = torch.randn(batch, 1, 28, 28, generator=g)
            with torch.inference_mode():
                check = float(model(x).double().sum())
                eager = per_call_ms(lambda: model(x), a.warmup, a.min_time)
                compiled = per_call_ms(lambda: aoti(x), a.warmup, a.min_time)
            print(json.dumps({"model": name, "batch": batch, "threads": int(a.threads),
                              "eager_ms": eager, "aoti_ms": compiled, "check": check,
                              "torch": torch.__version__}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["export", "time"])
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--threads", default="1", help="export: a list; time: one count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batches", default="1,64")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--min-time", type=float, default=0.2)
    a = p.parse_args()

    import torch

    if a.mode == "export":
        export(torch, a)
    else:
        timing(torch, a)


if __name__ == "__main__":
    sys.exit(main())
