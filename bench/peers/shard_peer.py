#!/usr/bin/env python3
"""Python peer of `wick-bench shard`: one rank of a sharded training run in PyTorch.

Started by wick-bench as one process per rank with torchrun's variables
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
as the C++ cases' ranks are; it also runs under `torchrun --nproc_per_node 2`.
Gloo over the environment's address, one torch thread.

The work is the C++ cases' (bench/shard_bench.cpp), what a Python user writes (7.2M parameters at the defaults):

  model   Linear(in_dim, width), then `blocks` residual blocks
          x + fc2(gelu(fc1(layer_norm(x)))) with fc1 width->hidden and fc2
          hidden->width, then Linear(width, classes); made after
          torch.manual_seed(seed), in that order, so the initial weights are
          the C++ model's bit for bit (init_loss says so);
  data    per rank a generator seeded seed+1+rank: randn(8*batch, in_dim),
          then randint(0, classes, (8*batch,)); batch i % 8 at step i;
  loss    cross_entropy;
  optim   torch.optim.Adam(lr, fused=True) (wick::FusedAdam runs the same
          fused kernel, at::_fused_adam_).

Cases (--case):
  ddp    DistributedDataParallel(model) and Adam;
  zero   DistributedDataParallel(model) and ZeroRedundancyOptimizer
         (optimizer_class=Adam, lr, fused=True): ZeRO-1 in Python;
  fsdp   FSDP2: fully_shard(block) for every block, then fully_shard(model),
         on a CPU device mesh of the world; Adam over the sharded parameters.

Each run takes --warmup untimed steps, a barrier, then --steps timed steps
(phases timed apart: forward with the loss, backward, optimizer step), then
reads its memory: the optimizer state's bytes on this rank (storage of every
state tensor, DTensors' local shards), the parameter bytes held at rest
(after the step: local shards, plus any unsharded storage FSDP still holds),
and peak RSS. Then the loss on a fixed batch (generator seed+1000, the same on
every rank) after all warmup+steps steps: check_loss, to compare with the C++
cases trained on the same data. Prints one JSON line, and writes it to
--out-dir/rank<rank>.json when given (how wick-bench reads it).
"""
import argparse
import json
import os
import resource
import sys
import time


def build_model(torch, a):
    nn = torch.nn
    F = torch.nn.functional

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(a.width)
            self.fc1 = nn.Linear(a.width, a.hidden)
            self.fc2 = nn.Linear(a.hidden, a.width)

        def forward(self, x):
            return x + self.fc2(F.gelu(self.fc1(self.norm(x))))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(a.in_dim, a.width)
            self.blocks = nn.ModuleList([Block() for _ in range(a.blocks)])
            self.out = nn.Linear(a.width, a.classes)

        def forward(self, x):
            h = self.inp(x)
            for b in self.blocks:
                h = b(h)
            return self.out(h)

    torch.manual_seed(a.seed)
    return Model()


def storage_bytes(tensors):
    """Bytes of the distinct storages under `tensors` (DTensors: their local shards)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        local = getattr(t, "_local_tensor", t)
        s = local.untyped_storage()
        key = s.data_ptr()
        if s.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += s.nbytes()
    return total


def optimizer_state_tensors(torch, opt):
    out = []
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                out.append(v)
    return out


def fsdp_unsharded_tensors(model):
    """Unsharded parameter storage FSDP2 holds now (empty at rest when it resharded)."""
    from torch.distributed.fsdp import FSDPModule

    out = []
    for m in model.modules():
        if not isinstance(m, FSDPModule):
            continue
        group = m._get_fsdp_state()._fsdp_param_group
        if group is None:
            continue
        for fp in group.fsdp_params:
            for name in ("_unsharded_param",):
                t = getattr(fp, name, None)
                if t is not None:
                    out.append(t)
            for t in getattr(fp, "all_gather_outputs", None) or []:
                out.append(t)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=["ddp", "zero", "fsdp"], required=True)
    p.add_argument("--out-dir", default="", help="also write the JSON line to OUT_DIR/rank<rank>.json")
    p.add_argument("--in-dim", type=int, default=256)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=64, help="samples per rank per step")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300, help="collective timeout, seconds")
    a = p.parse_args()

    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(a.threads)
    try:
        torch.set_num_interop_threads(a.threads)
    except RuntimeError:
        pass
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=a.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    F = torch.nn.functional

    model = build_model(torch, a)
    params_numel = sum(p.numel() for p in model.parameters())
    replica_param_bytes = storage_bytes(list(model.parameters()))

    n = 8 * a.batch
    g = torch.Generator().manual_seed(a.seed + 1 + rank)
    x = torch.randn(n, a.in_dim, generator=g)
    y = torch.randint(0, a.classes, (n,), generator=g)
    ge = torch.Generator().manual_seed(a.seed + 1000)
    x_eval = torch.randn(a.batch, a.in_dim, generator=ge)
    y_eval = torch.randint(0, a.classes, (a.batch,), generator=ge)
    with torch.no_grad():
        init_loss = F.cross_entropy(model(x_eval), y_eval).item()

    if a.case == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model)
        opt = torch.optim.Adam(train_model.parameters(), lr=a.lr, fused=True)
        local_opt = opt
    elif a.case == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model)
        opt = ZeroRedundancyOptimizer(train_model.parameters(), optimizer_class=torch.optim.Adam,
                                      lr=a.lr, fused=True)
        local_opt = opt.optim
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for b in model.blocks:
            fully_shard(b, mesh=mesh)
        fully_shard(model, mesh=mesh)
        train_model = model
        opt = torch.optim.Adam(model.parameters(), lr=a.lr, fused=True)
        local_opt = opt

    phases = {"forward": 0.0, "backward": 0.0, "step": 0.0}

    def step(i, timed):
        b = i % 8
        xb, yb = x[b * a.batch:(b + 1) * a.batch], y[b * a.batch:(b + 1) * a.batch]
        t0 = time.perf_counter()
        loss = F.cross_entropy(train_model(xb), yb)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad()
        t3 = time.perf_counter()
        if timed:
            phases["forward"] += t1 - t0
            phases["backward"] += t2 - t1
            phases["step"] += t3 - t2

    for i in range(a.warmup):
        step(i, False)
    dist.barrier()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(a.warmup, a.warmup + a.steps):
        step(i, True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

    # Memory at rest: after the step, before the next forward.
    state_bytes = storage_bytes(optimizer_state_tensors(torch, local_opt))
    shard_bytes = storage_bytes(list(model.parameters()))
    unsharded_bytes = 0
    if a.case == "fsdp":
        try:
            unsharded_bytes = storage_bytes(fsdp_unsharded_tensors(model))
        except Exception as e:  # a private attribute moved: say so, keep the rest
            unsharded_bytes = None
            print(f"shard_peer: cannot read FSDP's unsharded storage: {e!r}", file=sys.stderr)
    peak_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    with torch.no_grad():
        check_loss = F.cross_entropy(train_model(x_eval), y_eval).item()
    dist.barrier()

    line = {
        "rank": rank,
        "world_size": world,
        "backend": dist.get_backend(),
        "impl": "python",
        "case": a.case,
        "threads": torch.get_num_threads(),
        "parameters": params_numel,
        "ms_per_step": 1e3 * wall / a.steps,
        "cpu_ms_per_step": 1e3 * cpu / a.steps,
        "page_faults_per_step": faults / a.steps,
        "forward_ms_per_step": 1e3 * phases["forward"] / a.steps,
        "backward_ms_per_step": 1e3 * phases["backward"] / a.steps,
        "step_ms_per_step": 1e3 * phases["step"] / a.steps,
        "optimizer_state_bytes": state_bytes,
        # Parameters at rest: for DDP and ZeRO the replica's; for FSDP the local
        # shards (padding included) plus unsharded storage still held.
        "param_bytes_at_rest": shard_bytes + (unsharded_bytes or 0),
        "shard_bytes": shard_bytes if a.case == "fsdp" else None,
        "gathered_param_bytes": unsharded_bytes if a.case == "fsdp" else shard_bytes,
        "replica_param_bytes": replica_param_bytes,
        "peak_rss_kib": peak_rss_kib,
        "init_loss": init_loss,
        "check_loss": check_loss,
        "steps": a.steps,
        "warmup": a.warmup,
        "torch": torch.__version__,
    }
    text = json.dumps(line)
    if a.out_dir:
        with open(os.path.join(a.out_dir, f"rank{rank}.json"), "w") as f:
            f.write(text + "\n")
    print(text, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
