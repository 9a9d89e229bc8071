"""Python's PyTorch as the reference of wick's tests, computed at test time
on the machine that runs them (tests/python_reference.h), so that values
whose bits depend on the CPU's or GPU's kernels are compared on those kernels.

    python reference.py <case> in.json out.json

Each case reads the test's inputs (device, initial weights, data, options)
from in.json, runs the same steps with PyTorch's own classes
(torch.amp.GradScaler, torch.autocast, torch.optim.Adam(fused=True)) on that
device ("cuda" is cuda:0, or "cpu"), and writes what the test compares to
out.json. Numbers are written with Python's repr, which
round-trips every double exactly.
"""

import json
import sys

import torch
import torch.nn.functional as F

DEV = torch.device("cpu")  # set from the input in main


def tensor(values, shape, dtype=torch.float32):
    return torch.tensor(values, dtype=torch.float64).view(shape).to(DEV, dtype)


def num(x):
    """A float for JSON: non-finite ones as the strings "inf", "-inf", "nan"."""
    return x if x == x and abs(x) != float("inf") else str(x)


def flat(t):
    return t.detach().to("cpu", torch.float64).flatten().tolist()


def mlp(inp):
    """Linear(i, h) -> Tanh -> Linear(h, o), weights from the test."""
    sizes = inp["sizes"]
    model = torch.nn.Sequential(
        torch.nn.Linear(sizes[0], sizes[1]), torch.nn.Tanh(), torch.nn.Linear(sizes[1], sizes[2])
    ).to(DEV)
    with torch.no_grad():
        for p, (values, shape) in zip(model.parameters(), zip(inp["params"], inp["param_shapes"])):
            p.copy_(tensor(values, shape))
    return model


def batches(inp):
    x = tensor(inp["x"], inp["x_shape"])
    y = tensor(inp["y"], inp["y_shape"])
    b = inp["batch_size"]
    return [(x[i : i + b], y[i : i + b]) for i in range(0, x.shape[0], b)]


def trainer_amp(inp):
    """fp16 autocast + GradScaler (or bf16 autocast, no scaler) with SGD, as wick's Trainer runs it."""
    model = mlp(inp)
    opt = torch.optim.SGD(model.parameters(), lr=inp["lr"], momentum=inp["momentum"], foreach=False)
    dtype = torch.float16 if inp["precision"] == "fp16" else torch.bfloat16
    s = inp.get("scaler", {})
    scaler = torch.amp.GradScaler(
        DEV.type,
        init_scale=s.get("init_scale", 65536.0),
        growth_factor=s.get("growth_factor", 2.0),
        backoff_factor=s.get("backoff_factor", 0.5),
        growth_interval=s.get("growth_interval", 2000),
        enabled=dtype == torch.float16,
    )
    factors = [float(f) for f in inp["loss_factors"]]
    scales, skipped, losses = [], [], []
    for step, (xb, yb) in enumerate(batches(inp)):
        opt.zero_grad()
        with torch.autocast(DEV.type, dtype=dtype):
            out = model(xb)
            loss = F.mse_loss(out, yb) * factors[step]
        before = scaler.get_scale() if scaler.is_enabled() else 1.0
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        after = scaler.get_scale() if scaler.is_enabled() else 1.0
        scales.append(after)
        skipped.append(after < before)
        losses.append(num(loss.item()))
    return {
        "scales": scales,
        "skipped": skipped,
        "losses": losses,
        "out_dtype": str(out.dtype),
        "params": [flat(p) for p in model.parameters()],
    }


def fused_adam_optimizer(params, o, lr):
    """Adam, or AdamW for decoupled weight decay, fused, with wick's FusedAdamOptions `o`."""
    cls = torch.optim.AdamW if o["decoupled_weight_decay"] else torch.optim.Adam
    return cls(
        params,
        lr=lr,
        betas=tuple(o["betas"]),
        eps=o["eps"],
        weight_decay=o["weight_decay"],
        amsgrad=o["amsgrad"],
        maximize=o["maximize"],
        fused=True,
    )


def fused_adam(inp):
    """Adam / AdamW(fused=True) on the test's parameters and gradients, step by step."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    params = [
        tensor(v, shape, dtypes[dt]).requires_grad_()
        for v, shape, dt in zip(inp["params"], inp["param_shapes"], inp["param_dtypes"])
    ]
    o = inp["options"]
    lr = o["lr"][0]
    if o["tensor_lr"]:
        lr = torch.tensor(lr, dtype=torch.float32, device=DEV)
    opt = fused_adam_optimizer(params, o, lr)
    for step, grads in enumerate(inp["grads"]):
        for group in opt.param_groups:
            if o["tensor_lr"]:
                group["lr"].fill_(o["lr"][step])
            else:
                group["lr"] = o["lr"][step]
        for p, g, shape in zip(params, grads, inp["param_shapes"]):
            p.grad = tensor(g, shape, p.dtype)
        opt.step()
    state = [opt.state[p] for p in params]
    return {
        "params": [flat(p) for p in params],
        "exp_avg": [flat(s["exp_avg"]) for s in state],
        "exp_avg_sq": [flat(s["exp_avg_sq"]) for s in state],
        "max_exp_avg_sq": [flat(s["max_exp_avg_sq"]) for s in state] if o["amsgrad"] else [],
        "step": [float(s["step"]) for s in state],
    }


def mlp_fused_adam(inp):
    """Linear(5, 7) -> Tanh -> Linear(7, 3), MSE on one batch, Adam / AdamW(fused=True)."""
    x = tensor(inp["x"], inp["x_shape"])
    y = tensor(inp["y"], inp["y_shape"])
    results = []
    for o in inp["cases"]:
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(DEV)
        with torch.no_grad():
            for p, values in zip(model.parameters(), inp["params"]):
                p.copy_(tensor(values, p.shape))
        opt = fused_adam_optimizer(model.parameters(), o, o["lr"])
        for _ in range(inp["steps"]):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
        results.append([flat(p) for p in model.parameters()])
    return {"params": results}


def int8_rows(inp):
    """int8_row_case for each of inp["cases"]."""
    return {"results": [int8_row_case(c) for c in inp["cases"]]}


def int8_row_case(inp):
    """wick's per-row dynamic int8 Linear (src/int8_rows.h), written out in
    float32 torch ops: each input row gets its own scale and zero point, the
    product is exact integer arithmetic, and each output is
    float(acc - zp * colsum) * (scale_row * scale_weight) + bias, one rounding
    per operation (torch's elementwise ops are IEEE float32, as wick's kernels are)."""
    x = tensor(inp["x"], inp["x_shape"])
    w = tensor(inp["weight"], inp["weight_shape"], torch.int64)  # int8 values
    sw = tensor(inp["weight_scale"], [-1])
    b = tensor(inp["bias"], [-1]) if inp.get("bias") is not None else None
    qmax = float(inp["qmax"])
    lo = x.amin(1).clamp(max=0.0)
    hi = x.amax(1).clamp(min=0.0)
    scale = (hi - lo) / torch.tensor(qmax, dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    scale = torch.where((scale >= tiny) & (scale <= torch.finfo(torch.float32).max), scale,
                        torch.ones_like(scale))
    zp = torch.round(-lo / scale).clamp(0.0, qmax)
    inv = 1.0 / scale
    q = (torch.round(x * inv[:, None]) + zp[:, None]).clamp(0.0, qmax)
    acc = (q.to(torch.int64) - zp.to(torch.int64)[:, None]) @ w.t()  # exact
    s = scale[:, None] * sw[None, :]
    y = acc.to(torch.int32).to(torch.float32) * s
    y = y + (b[None, :] if b is not None else 0.0)
    return {"y": flat(y), "codes": flat(q), "zero_point": flat(zp), "scale": flat(scale)}


CASES = {"trainer_amp": trainer_amp, "fused_adam": fused_adam, "mlp_fused_adam": mlp_fused_adam,
         "int8_rows": int8_rows}

if __name__ == "__main__":
    case, src, dst = sys.argv[1:4]
    with open(src) as f:
        inp = json.load(f)
    DEV = torch.device(inp.get("device", "cuda"))
    if DEV.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("reference.py: torch " + torch.__version__ + " sees no CUDA device")
        DEV = torch.device("cuda", 0)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    else:
        torch.set_num_threads(1)  # as the C++ tests run
    result = CASES[case](inp)
    result["torch"] = torch.__version__
    result["device"] = torch.cuda.get_device_name(DEV) if DEV.type == "cuda" else "cpu"
    with open(dst, "w") as f:
        json.dump(result, f)
