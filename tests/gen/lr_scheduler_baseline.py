#!/usr/bin/env python3
"""Writes tests/lr_scheduler_baseline.h: the learning rates Python's
torch.optim.lr_scheduler produces, step by step, for the cases that
tests/lr_scheduler_test.cpp replays with wick's schedulers.

Run from the repository root with the project's venv:
    ~/.cache/wick/venv/bin/python tests/gen/lr_scheduler_baseline.py

- StepLR: torch.optim.lr_scheduler.StepLR itself.
- CosineWarmupLR: a LambdaLR with the documented formula (linear warm-up, then
  cosine to min_lr_ratio). SequentialLR(LinearLR, CosineAnnealingLR) is checked
  against it too where it applies (start factor > 0, one min ratio); the script
  prints the largest relative difference.
- ReduceLROnPlateau: torch.optim.lr_scheduler.ReduceLROnPlateau fed a scripted
  metric sequence.
Every case uses two parameter groups with different base lrs.
"""
import math
import os
import sys

import torch

BASE_LRS = [0.1, 0.025]


def make_optimizer():
    p1 = torch.nn.Parameter(torch.zeros(2))
    p2 = torch.nn.Parameter(torch.zeros(3))
    return torch.optim.SGD([{"params": [p1], "lr": BASE_LRS[0]},
                            {"params": [p2], "lr": BASE_LRS[1]}], lr=BASE_LRS[0])


def lrs(opt):
    return [float(g["lr"]) for g in opt.param_groups]


def trace(opt, sched, steps, step=lambda s, i: s.step()):
    """lrs after construction, then after each of `steps` step() calls."""
    out = [lrs(opt)]
    for i in range(steps):
        opt.step()
        step(sched, i)
        out.append(lrs(opt))
    return out


def cosine_factor(n, warmup, total, min_ratio, start):
    if n < warmup:
        return start + (1.0 - start) * n / warmup
    if n >= total:
        return min_ratio
    progress = (n - warmup) / (total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_cases():
    cases = []
    for name, step_size, gamma, steps in [("StepSize3Gamma05", 3, 0.5, 20),
                                         ("StepSize1Gamma09", 1, 0.9, 12),
                                         ("StepSize7Gamma01", 7, 0.1, 30)]:
        opt = make_optimizer()
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma)
        cases.append((name, dict(step_size=step_size, gamma=gamma), trace(opt, sched, steps)))
    return cases


def cosine_cases():
    cases = []
    worst = 0.0
    for name, warmup, total, min_ratio, start, steps in [
            ("Warmup5Total20", 5, 20, 0.1, 0.01, 25),
            ("NoWarmupToZero", 0, 16, 0.0, 0.0, 18),
            ("WarmupFromZero", 4, 10, 0.0, 0.0, 12),
            ("WarmupEqualsTotal", 6, 6, 0.2, 0.5, 9)]:
        opt = make_optimizer()
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda n, w=warmup, t=total, m=min_ratio, s=start: cosine_factor(n, w, t, m, s))
        ref = trace(opt, sched, steps)
        cases.append((name, dict(warmup=warmup, total=total, min_ratio=min_ratio, start=start), ref))
        # SequentialLR(LinearLR, CosineAnnealingLR): only for one group (eta_min
        # is absolute, one value for all groups), a start factor > 0 (LinearLR
        # requires it) and total > warmup.
        if start > 0 and warmup > 0 and total > warmup:
            p = torch.nn.Parameter(torch.zeros(1))
            opt1 = torch.optim.SGD([p], lr=BASE_LRS[0])
            lin = torch.optim.lr_scheduler.LinearLR(opt1, start_factor=start, end_factor=1.0,
                                                    total_iters=warmup)
            cos = torch.optim.lr_scheduler.CosineAnnealingLR(
                opt1, T_max=total - warmup, eta_min=BASE_LRS[0] * min_ratio)
            seq = torch.optim.lr_scheduler.SequentialLR(opt1, [lin, cos], milestones=[warmup])
            got = trace(opt1, seq, min(steps, total))
            for row, r in zip(got, ref):
                worst = max(worst, abs(row[0] - r[0]) / abs(r[0]))
    print(f"SequentialLR(LinearLR, CosineAnnealingLR) vs LambdaLR: max relative difference {worst:.3g}",
          file=sys.stderr)
    return cases


# A loss that improves, stalls, improves slightly (below / above threshold), stalls again.
MIN_METRICS = [1.0, 0.9, 0.8, 0.8, 0.81, 0.79, 0.7999, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7,
               0.69999, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.5, 0.6, 0.6, 0.6,
               0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]
# An accuracy that rises then plateaus (and one NaN evaluation).
MAX_METRICS = [0.1, 0.3, 0.5, 0.5, 0.5005, 0.5, 0.49, float("nan"), 0.52, 0.52, 0.52, 0.6,
               0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]


def plateau_cases():
    cases = []
    for name, metrics, kw in [
            ("MinPatience2Cooldown1", MIN_METRICS,
             dict(mode="min", factor=0.5, patience=2, threshold=1e-3, cooldown=1, min_lr=0.004, eps=1e-8)),
            ("MinPatience0", MIN_METRICS,
             dict(mode="min", factor=0.3, patience=0, threshold=1e-4, cooldown=0, min_lr=0.0, eps=1e-8)),
            ("MinLargeEps", MIN_METRICS,
             dict(mode="min", factor=0.5, patience=1, threshold=0.0, cooldown=2, min_lr=0.0, eps=0.01)),
            ("MaxPatience1", MAX_METRICS,
             dict(mode="max", factor=0.1, patience=1, threshold=1e-2, cooldown=0, min_lr=1e-4, eps=1e-8))]:
        opt = make_optimizer()
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kw)
        ref = trace(opt, sched, len(metrics), step=lambda s, i, m=metrics: s.step(m[i]))
        cases.append((name, dict(kw, metrics=metrics), ref))
    return cases


def cpp_double(x):
    if math.isnan(x):
        return "std::numeric_limits<double>::quiet_NaN()"
    return repr(float(x))


def emit_table(out, name, rows):
    out.append(f"inline const std::vector<std::vector<double>> {name} = {{")
    for row in rows:
        out.append("    {" + ", ".join(cpp_double(v) for v in row) + "},")
    out.append("};")


def main():
    out = ["// Generated by tests/gen/lr_scheduler_baseline.py with torch " + torch.__version__ + ":",
           "//   ~/.cache/wick/venv/bin/python tests/gen/lr_scheduler_baseline.py",
           "// Do not edit by hand. Each table holds the lrs of two parameter groups",
           "// (base lrs below) after construction (row 0) and after each step() (row n).",
           "#pragma once", "", "#include <cstdint>", "#include <limits>", "#include <vector>", "",
           "namespace wick::baseline {", "",
           "inline const std::vector<double> kBaseLrs = {" + ", ".join(map(repr, BASE_LRS)) + "};", ""]
    for name, p, rows in step_cases():
        out.append(f"// StepLR(step_size={p['step_size']}, gamma={p['gamma']})")
        out.append(f"constexpr int64_t kStepLR{name}StepSize = {p['step_size']};")
        out.append(f"constexpr double kStepLR{name}Gamma = {p['gamma']!r};")
        emit_table(out, f"kStepLR{name}", rows)
        out.append("")
    for name, p, rows in cosine_cases():
        out.append(f"// LambdaLR(cosine with warm-up: warmup={p['warmup']}, total={p['total']}, "
                   f"min_lr_ratio={p['min_ratio']}, warmup_start_factor={p['start']})")
        out.append(f"constexpr int64_t kCosine{name}Warmup = {p['warmup']};")
        out.append(f"constexpr int64_t kCosine{name}Total = {p['total']};")
        out.append(f"constexpr double kCosine{name}MinRatio = {p['min_ratio']!r};")
        out.append(f"constexpr double kCosine{name}Start = {p['start']!r};")
        emit_table(out, f"kCosine{name}", rows)
        out.append("")
    for name, p, rows in plateau_cases():
        out.append(f"// ReduceLROnPlateau(mode={p['mode']}, factor={p['factor']}, patience={p['patience']}, "
                   f"threshold={p['threshold']}, cooldown={p['cooldown']}, min_lr={p['min_lr']}, eps={p['eps']})")
        out.append(f"constexpr bool kPlateau{name}Maximize = {'true' if p['mode'] == 'max' else 'false'};")
        for key in ("factor", "threshold", "min_lr", "eps"):
            camel = "".join(w.capitalize() for w in key.split("_"))
            out.append(f"constexpr double kPlateau{name}{camel} = {p[key]!r};")
        for key in ("patience", "cooldown"):
            out.append(f"constexpr int64_t kPlateau{name}{key.capitalize()} = {p[key]};")
        out.append(f"inline const std::vector<double> kPlateau{name}Metrics = {{"
                   + ", ".join(cpp_double(v) for v in p["metrics"]) + "};")
        emit_table(out, f"kPlateau{name}", rows)
        out.append("")
    out.append("}  // namespace wick::baseline")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lr_scheduler_baseline.h")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
    print(f"wrote {os.path.normpath(path)}", file=sys.stderr)


if __name__ == "__main__":
    main()
