#!/usr/bin/env python3
"""Generates tests/amp_baseline.h: Python's torch.amp.GradScaler run through
scripted sequences of training steps, for tests/amp_test.cpp to replay with
wick::AmpScaler and compare exactly.

    ~/.cache/wick/venv/bin/python tests/gen/amp_baseline.py > tests/amp_baseline.h

Each step of a sequence:
  1. loss = scaler.scale(0.75)                  (records the scaled loss)
  2. every parameter's grad = true_grad * scale (true grads from grad_value()
     below, multiples of 1/8, so every product is exact in float32)
  3. the step's anomalies overwrite single gradient elements with inf/-inf/NaN
  4. optionally scaler.unscale_(optimizer) explicitly
  5. scaler.step(optimizer); scaler.update() or scaler.update(new_scale)
and records the scale before the step, whether the optimizer stepped, the scale
and growth tracker after update, the parameters and the (unscaled) gradients.

Sequence "interval3": init_scale 1024, growth_interval 3, SGD with momentum,
with explicit unscale_, missing gradients, inf/-inf/NaN and update(new_scale).
Sequence "defaults": default options (init_scale 2^16, growth_interval 2000),
two overflows then 2002 clean steps, so the scale backs off twice and grows once.
"""

import math
import sys

import torch

# Shapes of the replayed model: torch.nn.Linear(3, 2).
IN_FEATURES, OUT_FEATURES = 3, 2
LOSS_VALUE = 0.75


def grad_value(step, param, index):
    """The true (unscaled) gradient of element `index` of parameter `param`
    (0 weight, 1 bias) at `step`: a multiple of 1/8 in [-0.5, 0.5].
    tests/amp_test.cpp has the same formula."""
    return float(((3 * step + 5 * index + 7 * param) % 9) - 4) / 8.0


def initial_params():
    w = torch.tensor([[0.5, -0.25, 0.125], [1.0, 0.75, -0.5]], dtype=torch.float32)
    b = torch.tensor([0.25, -0.125], dtype=torch.float32)
    return w, b


INF, NINF, NAN = math.inf, -math.inf, math.nan

# (anomalies [(param, flat index, value)], explicit unscale_, bias grad None, new_scale or 0)
INTERVAL3_STEPS = [
    ([], False, False, 0.0),
    ([], False, False, 0.0),
    ([], False, False, 0.0),                       # third clean step: grows
    ([], True, False, 0.0),
    ([(0, 1, INF)], False, False, 0.0),            # backs off
    ([], False, False, 0.0),
    ([(1, 1, NAN)], True, False, 0.0),             # NaN found by an explicit unscale_
    ([], False, True, 0.0),                        # bias has no gradient
    ([], False, False, 0.0),
    ([], False, False, 0.0),                       # grows
    ([(0, 5, NINF)], False, False, 0.0),
    ([(0, 0, NAN), (1, 0, INF)], False, False, 0.0),
    ([], False, False, 0.0),
    ([], False, False, 512.0),                     # update(512): tracker left as is
    ([], True, False, 0.0),
    ([], False, False, 0.0),                       # grows
    ([(0, 2, NAN), (0, 3, NAN)], False, True, 0.0),
    ([], False, False, 0.0),
]

DEFAULTS_STEPS = 2006
DEFAULTS_OVERFLOW = {1: (0, 4, INF), 3: (1, 0, NAN)}


def set_grads(model, step, scale, anomalies, bias_none):
    w, b = model.weight, model.bias
    w.grad = torch.tensor(
        [grad_value(step, 0, i) for i in range(w.numel())], dtype=torch.float32
    ).reshape(w.shape) * scale
    if bias_none:
        b.grad = None
    else:
        b.grad = torch.tensor(
            [grad_value(step, 1, i) for i in range(b.numel())], dtype=torch.float32
        ) * scale
    for param, index, value in anomalies:
        (w if param == 0 else b).grad.view(-1)[index] = value


def stepped_flag(scaler, optimizer):
    found = scaler._found_inf_per_device(optimizer)
    return sum(v.item() for v in found.values()) == 0


def make_model():
    model = torch.nn.Linear(IN_FEATURES, OUT_FEATURES)
    w, b = initial_params()
    with torch.no_grad():
        model.weight.copy_(w)
        model.bias.copy_(b)
    return model


def run_interval3():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.25, momentum=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_factor=2.0,
                                  backoff_factor=0.5, growth_interval=3)
    results = []
    for step, (anomalies, explicit_unscale, bias_none, new_scale) in enumerate(INTERVAL3_STEPS):
        opt.zero_grad()
        loss = scaler.scale(torch.tensor(LOSS_VALUE))
        scale_before = scaler.get_scale()
        set_grads(model, step, scale_before, anomalies, bias_none)
        w_before = model.weight.detach().clone()
        if explicit_unscale:
            scaler.unscale_(opt)
        scaler.step(opt)
        stepped = stepped_flag(scaler, opt)
        assert stepped == (not torch.equal(w_before, model.weight.detach()))
        if new_scale > 0:
            scaler.update(new_scale)
        else:
            scaler.update()
        results.append(dict(
            scale_before=scale_before,
            scaled_loss=loss.item(),
            stepped=stepped,
            scale_after=scaler.get_scale(),
            tracker_after=scaler._get_growth_tracker(),
            weight=model.weight.detach().flatten().tolist(),
            bias=model.bias.detach().flatten().tolist(),
            weight_grad=model.weight.grad.flatten().tolist(),
            bias_grad=(model.bias.grad.flatten().tolist() if model.bias.grad is not None
                       else [NAN] * OUT_FEATURES),
        ))
    return results


def run_defaults():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=2.0 ** -10)
    scaler = torch.amp.GradScaler("cpu")
    scales, trackers, stepped = [], [], []
    for step in range(DEFAULTS_STEPS):
        opt.zero_grad()
        scaler.scale(torch.tensor(LOSS_VALUE))
        anomalies = [DEFAULTS_OVERFLOW[step]] if step in DEFAULTS_OVERFLOW else []
        set_grads(model, step, scaler.get_scale(), anomalies, False)
        scaler.step(opt)
        stepped.append(stepped_flag(scaler, opt))
        scaler.update()
        scales.append(scaler.get_scale())
        trackers.append(scaler._get_growth_tracker())
    return dict(scales=scales, trackers=trackers, stepped=stepped,
                weight=model.weight.detach().flatten().tolist(),
                bias=model.bias.detach().flatten().tolist())


def f32(x):
    """A C++ float literal that is exactly x (x is a float32 value)."""
    if math.isnan(x):
        return "kNaN"
    if math.isinf(x):
        return "kInf" if x > 0 else "-kInf"
    return float(x).hex() + "f"


def farray(values):
    return "{" + ", ".join(f32(v) for v in values) + "}"


def chunked(items, per_line):
    lines = []
    for i in range(0, len(items), per_line):
        lines.append("    " + ", ".join(items[i:i + per_line]) + ",")
    return "\n".join(lines)


def main():
    out = sys.stdout
    interval3 = run_interval3()
    defaults = run_defaults()
    w, b = initial_params()

    out.write(f"""#pragma once
// Generated by tests/gen/amp_baseline.py with torch {torch.__version__}:
//   ~/.cache/wick/venv/bin/python tests/gen/amp_baseline.py > tests/amp_baseline.h
// Do not edit; rerun the script. Python's torch.amp.GradScaler("cpu") on scripted
// steps (see the script's docstring); tests/amp_test.cpp replays them.

#include <cstdint>
#include <limits>

namespace wick::amp_baseline {{

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

constexpr int kInFeatures = {IN_FEATURES};
constexpr int kOutFeatures = {OUT_FEATURES};
constexpr float kLossValue = {f32(LOSS_VALUE)};
constexpr float kInitialWeight[{w.numel()}] = {farray(w.flatten().tolist())};
constexpr float kInitialBias[{b.numel()}] = {farray(b.tolist())};

struct Anomaly {{
  int param;  // 0 weight, 1 bias
  int index;  // flat element index
  float value;
}};

struct StepSpec {{
  int num_anomalies;
  Anomaly anomalies[2];
  bool explicit_unscale;
  bool bias_grad_none;
  double new_scale;  // > 0: update(new_scale), else update()
}};

struct StepResult {{
  float scale_before;
  float scaled_loss;
  bool stepped;
  float scale_after;
  int32_t growth_tracker_after;
  float weight[{w.numel()}];
  float bias[{b.numel()}];
  float weight_grad[{w.numel()}];
  float bias_grad[{b.numel()}];  // NaN where the bias had no gradient
}};

// Sequence "interval3": init_scale 1024, growth_factor 2, backoff_factor 0.5,
// growth_interval 3; SGD(lr=0.25, momentum=0.5).
constexpr double kInterval3InitScale = 1024.0;
constexpr int64_t kInterval3GrowthInterval = 3;
constexpr double kInterval3Lr = 0.25;
constexpr double kInterval3Momentum = 0.5;
constexpr int kInterval3Steps = {len(INTERVAL3_STEPS)};

constexpr StepSpec kInterval3Spec[kInterval3Steps] = {{
""")
    for anomalies, explicit_unscale, bias_none, new_scale in INTERVAL3_STEPS:
        an = [f"{{{p}, {i}, {f32(v)}}}" for p, i, v in anomalies]
        while len(an) < 2:
            an.append("{0, 0, 0.0f}")
        out.write(f"    {{{len(anomalies)}, {{{', '.join(an)}}}, "
                  f"{'true' if explicit_unscale else 'false'}, "
                  f"{'true' if bias_none else 'false'}, {new_scale!r}}},\n")
    out.write("};\n\nconstexpr StepResult kInterval3Expected[kInterval3Steps] = {\n")
    for r in interval3:
        out.write(f"    {{{f32(r['scale_before'])}, {f32(r['scaled_loss'])}, "
                  f"{'true' if r['stepped'] else 'false'}, {f32(r['scale_after'])}, "
                  f"{r['tracker_after']},\n"
                  f"     {farray(r['weight'])},\n"
                  f"     {farray(r['bias'])},\n"
                  f"     {farray(r['weight_grad'])},\n"
                  f"     {farray(r['bias_grad'])}}},\n")
    out.write("};\n\n")

    n = DEFAULTS_STEPS
    out.write(f"""// Sequence "defaults": default options; SGD(lr=2^-10). Anomalies at the
// listed steps, every other step clean; the bias always has a gradient.
constexpr double kDefaultsLr = {f32(2.0 ** -10)[:-1]};
constexpr int kDefaultsSteps = {n};
constexpr int kDefaultsNumAnomalies = {len(DEFAULTS_OVERFLOW)};
constexpr int kDefaultsAnomalyStep[kDefaultsNumAnomalies] = {{{', '.join(str(s) for s in DEFAULTS_OVERFLOW)}}};
constexpr Anomaly kDefaultsAnomaly[kDefaultsNumAnomalies] = {{{', '.join(f'{{{p}, {i}, {f32(v)}}}' for p, i, v in DEFAULTS_OVERFLOW.values())}}};

constexpr float kDefaultsScaleAfter[kDefaultsSteps] = {{
{chunked([f32(s) for s in defaults['scales']], 8)}
}};
constexpr int32_t kDefaultsTrackerAfter[kDefaultsSteps] = {{
{chunked([str(t) for t in defaults['trackers']], 20)}
}};
constexpr bool kDefaultsStepped[kDefaultsSteps] = {{
{chunked(['1' if s else '0' for s in defaults['stepped']], 40)}
}};
constexpr float kDefaultsFinalWeight[{w.numel()}] = {farray(defaults['weight'])};
constexpr float kDefaultsFinalBias[{b.numel()}] = {farray(defaults['bias'])};

}}  // namespace wick::amp_baseline
""")


if __name__ == "__main__":
    main()
