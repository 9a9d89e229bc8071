#!/usr/bin/env python3
"""Python peer of `wick-bench trainer`: the same training loop in PyTorch.

What a Python user writes: an nn.Sequential MLP 784-512-256-10 (ReLU),
torch.optim.Adam(lr=1e-3) with its defaults, cross-entropy, batches sliced in
order from a preallocated random dataset of steps*batch samples. The model is
initialized after torch.manual_seed(seed) and the data drawn from a generator
seeded seed+1 (randn, then randint), exactly as the C++ cases do.

Each run builds a fresh model and optimizer, takes --warmup untimed steps, then
times --steps steps. Prints one JSON line for the case: the median over runs,
every run's figure, wall and process-CPU milliseconds per step.

--compile wraps the model in torch.compile (the optimizer stays eager, as
usual); when compiling fails on this machine the line carries "error" instead
of figures and the exit status stays 0. --adam-fused (not the default a user
gets) passes fused=True to Adam, to see what the optimizer costs.
--adam-libtorch updates with the operations of LibTorch's torch::optim::Adam
(mul_/add_ where Python's Adam uses lerp_), to check that the C++ cases do the
same work: its check_loss equals theirs bit for bit.
"""
import argparse
import datetime
import json
import math
import resource
import statistics
import sys
import time
import traceback


def make_model(torch, seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(784, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )


def make_data(torch, samples, seed):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(samples, 784, generator=g)
    y = torch.randint(0, 10, (samples,), generator=g)
    return x, y


class LibTorchOrderAdam:
    """Adam with the operations, in the order, of LibTorch's torch::optim::Adam."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8):
        self.params = list(params)
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.state = [None] * len(self.params)
        self.step_count = 0

    def step(self):
        import torch

        self.step_count += 1
        bc1 = 1 - self.beta1 ** self.step_count
        bc2 = 1 - self.beta2 ** self.step_count
        with torch.no_grad():
            for i, p in enumerate(self.params):
                if p.grad is None:
                    continue
                if self.state[i] is None:
                    self.state[i] = (torch.zeros_like(p), torch.zeros_like(p))
                exp_avg, exp_avg_sq = self.state[i]
                g = p.grad
                exp_avg.mul_(self.beta1).add_(g, alpha=1 - self.beta1)
                exp_avg_sq.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
                denom = (exp_avg_sq.sqrt() / math.sqrt(bc2)).add_(self.eps)
                p.addcdiv_(exp_avg, denom, value=-self.lr / bc1)

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def one_run(torch, args, x, y):
    model = make_model(torch, args.seed)
    train_model = torch.compile(model) if args.compile else model
    if args.adam_fused:
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=True)
    elif args.adam_libtorch:
        optimizer = LibTorchOrderAdam(model.parameters(), lr=args.lr)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    b = args.batch
    n_batches = x.shape[0] // b

    def step(i):
        xb = x[i * b:(i + 1) * b]
        yb = y[i * b:(i + 1) * b]
        loss = torch.nn.functional.cross_entropy(train_model(xb), yb)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    t0 = time.perf_counter()
    for i in range(args.warmup):
        step(i % n_batches)
    warmup_s = time.perf_counter() - t0

    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(args.steps):
        step(i % n_batches)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

    with torch.no_grad():  # the trained model's loss on the first batch
        check = torch.nn.functional.cross_entropy(model(x[:b]), y[:b]).item()
    return 1e3 * wall / args.steps, 1e3 * cpu / args.steps, faults / args.steps, warmup_s, check


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    adam = p.add_mutually_exclusive_group()
    adam.add_argument("--adam-fused", action="store_true", help="Adam(fused=True) (not the default)")
    adam.add_argument("--adam-libtorch", action="store_true",
                      help="Adam with LibTorch's operations (to check the C++ cases' numbers)")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(args.threads)
    except RuntimeError:
        pass  # only possible once, before inter-op work; the loop does not use that pool

    case = "python_compile" if args.compile else "python_eager"
    if args.adam_fused:
        case += "_fused_adam"
    elif args.adam_libtorch:
        case += "_libtorch_adam"
    line = {
        "bench": "trainer",
        "case": case,
        "ms_per_step": None,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "adam": "fused" if args.adam_fused else "libtorch" if args.adam_libtorch else "default",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "date": datetime.date.today().isoformat(),
    }
    x, y = make_data(torch, args.steps * args.batch, args.seed)

    ms, cpu_ms, faults, warmups = [], [], [], []
    check = None
    for _ in range(args.repeats):
        try:
            wall_ms, c_ms, f, warmup_s, check = one_run(torch, args, x, y)
        except Exception as e:  # torch.compile needs a working C++ toolchain
            text = "".join(traceback.format_exception_only(type(e), e)).strip()
            line["error"] = text[-2000:]
            break
        ms.append(wall_ms)
        cpu_ms.append(c_ms)
        faults.append(f)
        warmups.append(warmup_s)

    if ms:
        line["ms_per_step"] = statistics.median(ms)
        line["cpu_ms_per_step"] = statistics.median(cpu_ms)
        line["page_faults_per_step"] = statistics.median(faults)
        line["check_loss"] = check
        if args.compile:
            line["compile_s"] = warmups[0]  # the first run's warmup holds the compilation
    line["repeats"] = len(ms)
    line["runs_ms_per_step"] = ms
    line["runs_cpu_ms_per_step"] = cpu_ms
    line["runs_page_faults_per_step"] = faults
    line["warmup_s"] = warmups
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
