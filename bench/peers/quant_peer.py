#!/usr/bin/env python3
"""Python peer of `wick-bench quant`: fp32 and torch.ao's quantize_dynamic.

The models are built as the C++ side builds them, so the weights are the same:
torch.manual_seed(seed) then the layers in order (an MLP of four 1024->1024
Linear layers with ReLU between; one Linear 1024->1024; one Linear 1024->4096).
Inputs are randn(batch, 1024) from a generator seeded seed+1.

The int8 model is what a Python user gets: quantize_dynamic(model,
{nn.Linear}, dtype=torch.qint8) with the default quantized engine of this
build (printed as "engine"). Each case is timed as the C++ side times it:
calls repeated until --min-time seconds have passed, after --warmup calls,
under torch.inference_mode(); the figure is milliseconds per call.

Prints one JSON line per (model, batch): fp32_ms, int8_ms and check_fp32 (the
sum of the fp32 output, which equals the C++ side's when the weights agree).

--serve: stays running and measures one case per request, a JSON line
{"model", "batch", "threads", "order", "warmup", "min_time"} on stdin
("order": "fp32_first" or "int8_first"; warmup and min_time override the
flags), answering with that line; `wick-bench quant` alternates slices of a
case between itself and the peer. Ends at EOF.
"""
import argparse
import json
import sys
import time
import warnings


def build(torch, name, seed):
    torch.manual_seed(seed)
    nn = torch.nn
    if name == "mlp":
        layers = []
        for i in range(4):
            layers.append(nn.Linear(1024, 1024))
            if i < 3:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)
    if name == "linear_1024x1024":
        return nn.Sequential(nn.Linear(1024, 1024))
    if name == "linear_1024x4096":
        return nn.Sequential(nn.Linear(1024, 4096))
    raise SystemExit(f"quant_peer.py: unknown model {name}")


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


def measure(torch, model, qmodel, name, batch, threads, a, int8_first=False, warmup=None, min_time=None):
    warmup = a.warmup if warmup is None else warmup
    min_time = a.min_time if min_time is None else min_time
    g = torch.Generator().manual_seed(a.seed + 1)
    x = torch.randn(batch, 1024, generator=g)
    with torch.inference_mode():
        check = float(model(x).double().sum())
        if int8_first:
            int8 = per_call_ms(lambda: qmodel(x), warmup, min_time)
            fp32 = per_call_ms(lambda: model(x), warmup, min_time)
        else:
            fp32 = per_call_ms(lambda: model(x), warmup, min_time)
            int8 = per_call_ms(lambda: qmodel(x), warmup, min_time)
    return {"model": name, "batch": batch, "threads": threads, "fp32_ms": fp32, "int8_ms": int8,
            "engine": torch.backends.quantized.engine, "check_fp32": check, "torch": torch.__version__}


def models_of(torch, name, seed, cache):
    if name not in cache:
        model = build(torch, name, seed).eval()
        qmodel = torch.ao.quantization.quantize_dynamic(build(torch, name, seed).eval(), {torch.nn.Linear},
                                                        dtype=torch.qint8)
        cache[name] = (model, qmodel)
    return cache[name]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--serve", action="store_true", help="measure the cases asked on stdin")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", default="mlp,linear_1024x1024,linear_1024x4096")
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--min-time", type=float, default=0.2)
    a = p.parse_args()

    import torch

    warnings.filterwarnings("ignore")  # torch.ao's deprecation notice
    cache = {}
    if a.serve:
        for line in sys.stdin:
            if not line.strip():
                continue
            r = json.loads(line)
            torch.set_num_threads(int(r["threads"]))
            model, qmodel = models_of(torch, r["model"], a.seed, cache)
            print(json.dumps(measure(torch, model, qmodel, r["model"], int(r["batch"]), int(r["threads"]), a,
                                     r.get("order") == "int8_first", r.get("warmup"), r.get("min_time"))),
                  flush=True)
        return 0
    torch.set_num_threads(a.threads)
    for name in a.models.split(","):
        model, qmodel = models_of(torch, name, a.seed, cache)
        for batch in [int(b) for b in a.batches.split(",")]:
            print(json.dumps(measure(torch, model, qmodel, name, batch, a.threads, a)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
