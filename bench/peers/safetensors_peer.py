#!/usr/bin/env python3
"""Python peer of `wick-bench safetensors`: Python's safetensors reading the
file wick wrote, timed as the C++ side times it, after the C++ side has read
the file once (so the page cache holds it for both).

Cases, each timed once per call (the C++ side alternates calls with its own):
  open    safetensors.torch.load_file(path): the dict of tensors;
  read    load_file, then every tensor summed in float64 (every byte read);
  module  model.load_state_dict(load_file(path)) into a module with one
          parameter per tensor (what loading a checkpoint into a model costs).
Prints one JSON line: open_ms, read_ms, module_ms, and check (the sum of all
sums, which equals the C++ side's when both read the same values).
"""
import argparse
import json
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--path", required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    with safe_open(args.path, framework="pt") as f:
        names = list(f.keys())
        shapes = {n: f.get_slice(n).get_shape() for n in names}
    model = torch.nn.Module()
    for n in names:
        model.register_parameter(n, torch.nn.Parameter(torch.zeros(shapes[n])))

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return (time.perf_counter() - t0) * 1e3, out

    open_ms, tensors = timed(lambda: load_file(args.path))
    del tensors

    def read():
        tensors = load_file(args.path)
        return sum(t.sum(dtype=torch.float64).item() for t in tensors.values())

    read_ms, check = timed(read)
    with torch.no_grad():
        module_ms, _ = timed(lambda: model.load_state_dict(load_file(args.path)))
    print(json.dumps({"open_ms": open_ms, "read_ms": read_ms, "module_ms": module_ms,
                      "check": check, "tensors": len(names)}))


if __name__ == "__main__":
    main()
