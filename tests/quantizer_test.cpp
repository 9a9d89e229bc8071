// wick::quantize_dynamic and QuantizedLinear against an independent float64
// emulation of dynamic int8 quantization (symmetric int8 weights, asymmetric
// uint8 activations chosen per row, or per batch as ATen's
// ChooseQuantizationParams does), against Python computing the per-row
// arithmetic in float32 bit for bit, against fp32 within the quantization
// error; a row's answer independent of its batch mates, batch size, engine
// and threads; module replacement in every container, checkpoints and errors.
#include <wick/checkpoint.h>
#include <wick/profiler.h>
#include <wick/quantizer.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <map>
#include <string>
#include <thread>

#include "python_reference.h"
#include "support.h"

namespace {

using wick::testing::SeededTest;

class QuantizerTest : public SeededTest {};

// ---------------------------------------------------------------- reference

struct ActQuant {
  double scale;
  int64_t zero_point;
};

// ATen's quant_utils::ChooseQuantizationParams for uint8 [0, qmax], written
// out in float64: the range includes 0, the zero point comes from whichever
// end has the smaller error, rounded to nearest and clamped.
ActQuant choose_act_qparams(double lo, double hi, int64_t qmax) {
  lo = std::min(lo, 0.0);
  hi = std::max(hi, 0.0);
  double scale = static_cast<float>((hi - lo) / qmax);
  if (scale == 0.0) scale = 0.1;
  const double zp_from_min = 0 - lo / scale;
  const double zp_from_max = qmax - hi / scale;
  const double err_min = 0 - std::abs(lo / scale);
  const double err_max = qmax - std::abs(hi / scale);
  const double zp = err_min < err_max ? zp_from_min : zp_from_max;
  const auto nudged =
      static_cast<int64_t>(std::clamp(std::nearbyint(zp), 0.0, static_cast<double>(qmax)));
  return {scale, nudged};
}

struct Emulated {
  torch::Tensor y;        // float64 result of the integer arithmetic
  double one_flip_bound;  // what one activation rounded the other way changes in an output
};

// One row's parameters as wick's per-row kernels choose them (src/int8_rows.h),
// in float32 like them: the row's range widened to include 0 onto [0, qmax].
ActQuant choose_row_qparams(float lo, float hi, int64_t qmax) {
  lo = std::min(lo, 0.0f);
  hi = std::max(hi, 0.0f);
  float scale = (hi - lo) / static_cast<float>(qmax);
  if (!(scale >= std::numeric_limits<float>::min())) scale = 1.0f;
  const float zp = std::clamp(std::nearbyint(-lo / scale), 0.0f, static_cast<float>(qmax));
  return {scale, static_cast<int64_t>(zp)};
}

// y = sx * s_w[row] * sum_k (qx - zp) * qw + b, with qw = clamp(round(w / s_w), -128, 127)
// and s_w = amax / 127.5 (torch.ao's symmetric observers); sx and zp per input
// row (per_row_act) or one pair for the whole batch.
Emulated emulate_int8(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b,
                      bool per_channel, int64_t act_qmax, bool per_row_act = true) {
  auto wd = w.to(torch::kDouble);
  auto amax = per_channel ? wd.abs().amax(1) : wd.abs().max().reshape({1});
  auto sw = (amax.to(torch::kFloat) / 127.5f)
                .clamp_min(std::numeric_limits<float>::epsilon())
                .to(torch::kDouble);
  auto qw = (per_channel ? wd / sw.unsqueeze(1) : wd / sw)
                .to(torch::kFloat)
                .round()
                .clamp(-128, 127)
                .to(torch::kDouble);
  auto x2 = x.reshape({-1, x.size(-1)}).to(torch::kFloat);
  const int64_t rows = x2.size(0);
  auto sx = torch::empty({rows, 1}, torch::kDouble);
  auto zp = torch::empty({rows, 1}, torch::kDouble);
  for (int64_t i = 0; i < rows; ++i) {
    ActQuant q =
        per_row_act
            ? choose_row_qparams(x2[i].min().item<float>(), x2[i].max().item<float>(), act_qmax)
            : choose_act_qparams(x2.min().item<double>(), x2.max().item<double>(), act_qmax);
    sx[i][0] = q.scale;
    zp[i][0] = static_cast<double>(q.zero_point);
  }
  auto qx = (x2.to(torch::kDouble) / sx).round().add(zp).clamp(0, act_qmax);
  auto acc = torch::matmul(qx - zp, qw.t());
  auto y = acc * sx * (per_channel ? sw.unsqueeze(0) : sw);
  if (b.defined()) y = y + b.to(torch::kDouble);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w.size(0);
  return {y.reshape(shape), sx.max().item<double>() * sw.max().item<double>() * 128.0};
}

// The input range a batch of `rows` rows gets.
template <typename Layer>
int64_t qmax(const Layer& q, int64_t rows) {
  return q->activation_qmax(rows);
}

torch::nn::Linear make_linear(int64_t in, int64_t out, bool bias = true) {
  return torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(bias));
}

torch::Tensor run(torch::nn::Module& m, const torch::Tensor& x) {
  c10::InferenceMode guard;
  if (auto* seq = dynamic_cast<torch::nn::SequentialImpl*>(&m)) return seq->forward(x);
  TORCH_INTERNAL_ASSERT(false);
}

// ---------------------------------------------------------------- the layer

TEST_F(QuantizerTest, MatchesFloat64EmulationOnEveryEngine) {
  auto lin = make_linear(96, 40);
  auto x = torch::randn({7, 96}) * 2 + 0.5;
  x[3] *= 0.01;  // a row of small values: its own scale per row, the batch's otherwise
  auto fp32 = lin->forward(x).detach();
  ASSERT_FALSE(wick::available_quant_engines().empty());
  for (bool per_row : {true, false}) {
    for (auto engine : wick::available_quant_engines()) {
      SCOPED_TRACE(std::string(wick::to_string(engine)) + (per_row ? " per row" : " per batch"));
      if (engine == wick::QuantEngine::kQnnpack) continue;  // per-tensor only below
      wick::QuantizedLinear q(*lin, torch::kInt8,
                              wick::QuantizeOptions().engine(engine).per_row_activations(per_row));
      // 7-bit inputs where the engine's kernels could saturate (no VNNI).
      auto ref = emulate_int8(x, lin->weight.detach(), lin->bias.detach(), /*per_channel=*/true,
                              q->activation_qmax(7), per_row);
      torch::Tensor y;
      {
        c10::InferenceMode guard;
        y = q(x);
      }
      // Equal to the integer arithmetic up to a couple of activations rounded
      // the other way, and far closer to it than to fp32.
      WICK_EXPECT_CLOSE(y, ref.y, 0.0, 2 * ref.one_flip_bound);
      EXPECT_LT((y - ref.y.to(torch::kFloat)).abs().max().item<double>(),
                0.2 * (fp32 - ref.y.to(torch::kFloat)).abs().max().item<double>());
    }
  }
}

TEST_F(QuantizerTest, ActivationRangeIsNamedPerEngine) {
  for (auto engine : wick::available_quant_engines()) {
    const auto qmax = wick::int8_activation_qmax(engine);
    EXPECT_TRUE(qmax == 255 || qmax == 127) << wick::to_string(engine) << ": " << qmax;
  }
  // quantizer_test_without_vnni caps both libraries at AVX2.
  const char* onednn_cap = std::getenv("ONEDNN_MAX_CPU_ISA");
  if (onednn_cap != nullptr && std::string(onednn_cap) == "AVX2") {
    EXPECT_EQ(wick::int8_activation_qmax(wick::QuantEngine::kOnednn), 127);
  }
  const char* fbgemm_cap = std::getenv("FBGEMM_ENABLE_INSTRUCTIONS");
  if (fbgemm_cap != nullptr && std::string(fbgemm_cap) == "AVX2") {
    EXPECT_EQ(wick::int8_activation_qmax(wick::QuantEngine::kFbgemm), 127);
  }
  EXPECT_EQ(wick::int8_activation_qmax(wick::QuantEngine::kQnnpack), 255);
  EXPECT_THROWS_WITH(wick::int8_activation_qmax(wick::QuantEngine::kAuto),
                     "int8_activation_qmax: name an engine");
}

TEST_F(QuantizerTest, PerTensorMatchesEmulation) {
  auto lin = make_linear(64, 24);
  auto x = torch::rand({5, 64}) * 3;  // all positive: zero point 0
  for (auto engine : wick::available_quant_engines()) {
    SCOPED_TRACE(wick::to_string(engine));
    auto ref = emulate_int8(x, lin->weight.detach(), lin->bias.detach(), /*per_channel=*/false,
                            wick::int8_activation_qmax(engine), /*per_row_act=*/false);
    wick::QuantizedLinear q(
        *lin, torch::kInt8,
        wick::QuantizeOptions().per_channel(false).engine(engine).per_row_activations(false));
    EXPECT_EQ(q->scale.numel(), 1);
    c10::InferenceMode guard;
    WICK_EXPECT_CLOSE(q(x), ref.y, 0.0, 2 * ref.one_flip_bound);
  }
}

TEST_F(QuantizerTest, CloseToFp32WithinTheQuantizationError) {
  auto lin = make_linear(256, 128);
  auto x = torch::randn({32, 256});
  wick::QuantizedLinear q(*lin);
  c10::InferenceMode guard;
  auto y = q(x);
  auto fp32 = lin->forward(x);
  // Each product carries at most half a step of each operand; summed over 256
  // inputs with random signs the error is a few steps, far below the outputs' spread.
  auto rel = (y - fp32).norm() / fp32.norm();
  EXPECT_LT(rel.item<double>(), 0.02);
  EXPECT_GT(rel.item<double>(), 0.0);  // it did quantize
}

// Autotune (kAuto, per row): a class's first 16 batches alternate between
// FBGEMM and oneDNN (8 each, the same bits), then the class keeps one engine;
// another thread count is another class.
TEST_F(QuantizerTest, AutotuneAlternatesTheFirstBatchesThenKeepsOneEngine) {
  auto lin = make_linear(256, 256);
  wick::QuantizedLinear q(*lin);
  if (!q->autotunes()) GTEST_SKIP() << "autotune needs both FBGEMM and oneDNN";
  auto x = torch::randn({8, 256});
  c10::InferenceMode guard;
  // at::_int_mm runs oneDNN's batches; FBGEMM's go through no ATen op.
  const auto int_mm_calls = [&](int calls, torch::Tensor* first) {
    wick::Profiler profiler;
    {
      auto scope = profiler.scope();
      for (int i = 0; i < calls; ++i) {
        auto y = q(x);
        if (!first->defined()) *first = y;
        EXPECT_TRUE(torch::equal(y, *first)) << "batch " << i;
      }
    }
    int64_t n = 0;
    const auto table = profiler.key_averages();
    for (const auto& r : table.rows()) {
      if (r.name.rfind("aten::_int_mm", 0) == 0) n = std::max(n, r.count);
    }
    return n;
  };
  torch::Tensor first;
  const wick::QuantEngine rule = q->engine_for(8);
  EXPECT_EQ(int_mm_calls(15, &first), 7);  // fbgemm, onednn, fbgemm, ...
  EXPECT_EQ(q->engine_for(8), rule);       // not decided before the 16th
  EXPECT_EQ(int_mm_calls(1, &first), 1);
  const wick::QuantEngine kept = q->engine_for(8);
  EXPECT_EQ(int_mm_calls(6, &first), kept == wick::QuantEngine::kOnednn ? 6 : 0);
  EXPECT_EQ(q->engine_for(5), kept);  // 5-8 rows: one class
  torch::set_num_threads(2);
  EXPECT_EQ(int_mm_calls(2, &first), 1);  // two threads: a class of its own, timed afresh
  torch::set_num_threads(1);
}

TEST_F(QuantizerTest, AutoEngineSwitchesByRowsAndAgrees) {
  auto lin = make_linear(256, 256);  // 64 Ki weights: large enough for oneDNN
  const auto engines = wick::available_quant_engines();
  auto has = [&](wick::QuantEngine e) {
    return std::find(engines.begin(), engines.end(), e) != engines.end();
  };
  for (bool per_row : {true, false}) {
    SCOPED_TRACE(per_row ? "per row" : "per batch");
    wick::QuantizedLinear q(
        *lin, torch::kInt8,
        wick::QuantizeOptions().onednn_min_rows(8).per_row_activations(per_row));
    if (has(wick::QuantEngine::kFbgemm) && has(wick::QuantEngine::kOnednn)) {
      EXPECT_EQ(q->engine_for(7), wick::QuantEngine::kFbgemm);
      // oneDNN from onednn_min_rows on where the CPU has AMX; FBGEMM throughout otherwise.
      EXPECT_EQ(q->engine_for(8),
                wick::cpu_has_amx_int8() ? wick::QuantEngine::kOnednn : wick::QuantEngine::kFbgemm);
      wick::QuantizedLinear small(
          *make_linear(128, 64), torch::kInt8,
          wick::QuantizeOptions().onednn_min_rows(8).per_row_activations(per_row));
      EXPECT_EQ(small->engine_for(1000),
                wick::QuantEngine::kFbgemm);  // too small a layer for oneDNN's overhead
    }
    for (int64_t rows : {1, 3, 8, 40}) {
      auto x = torch::randn({rows, 256});
      auto ref = emulate_int8(x, lin->weight.detach(), lin->bias.detach(), true,
                              q->activation_qmax(rows), per_row);
      c10::InferenceMode guard;
      WICK_EXPECT_CLOSE(q(x), ref.y, 0.0, 2 * ref.one_flip_bound);
    }
  }
}

// ---------------------------------------------------------------- per-row activations

// The int8 weights, their scales and the bias of `q`, and `x`, for tests/py/reference.py.
nlohmann::json int8_rows_input(const wick::QuantizedLinear& q, const torch::Tensor& x) {
  nlohmann::json in;
  in["x"] = wick::testing::to_json(x);
  in["x_shape"] = x.sizes().vec();
  in["weight"] = wick::testing::to_json(q->weight);
  in["weight_shape"] = q->weight.sizes().vec();
  in["weight_scale"] = wick::testing::to_json(q->scale);
  in["bias"] = q->bias.defined() ? wick::testing::to_json(q->bias) : nlohmann::json();
  in["qmax"] = q->activation_qmax(x.size(0));
  return in;
}

// Python's float32 torch ops computing the documented per-row arithmetic give
// the same bits as every engine: rows of mixed ranges (all positive, all
// negative, tiny, all zero), sizes that leave vector tails, both weight
// granularities, with and without bias.
TEST_F(QuantizerTest, PerRowMatchesPythonBitForBit) {
  auto x = torch::randn({9, 301}) * 3 + 0.25;
  x[1] = x[1].abs();   // ReLU-like: zero point 0
  x[2] = -x[2].abs();  // all negative: zero point qmax
  x[3] *= 1e-6;        // tiny
  x[4].zero_();        // nothing: scale 1
  x[5][7] = 1e4;       // one outlier owns its row's range only
  std::vector<std::string> names;
  std::vector<torch::Tensor> outputs;
  nlohmann::json cases = nlohmann::json::array();
  for (bool per_channel : {true, false}) {
    for (bool with_bias : {true, false}) {
      auto lin = make_linear(301, 131, with_bias);
      for (auto engine : {wick::QuantEngine::kFbgemm, wick::QuantEngine::kOnednn}) {
        const auto engines = wick::available_quant_engines();
        if (std::find(engines.begin(), engines.end(), engine) == engines.end()) continue;
        wick::QuantizedLinear q(*lin, torch::kInt8,
                                wick::QuantizeOptions().engine(engine).per_channel(per_channel));
        c10::InferenceMode guard;
        outputs.push_back(q(x));
        names.push_back(std::string(wick::to_string(engine)) +
                        (per_channel ? " per channel" : " per tensor") +
                        (with_bias ? " bias" : " no bias"));
        cases.push_back(int8_rows_input(q, x));
      }
    }
  }
  ASSERT_GE(outputs.size(), 4u);
  const auto ref = wick::testing::python_reference("reference.py", "int8_rows",
                                                   {{"device", "cpu"}, {"cases", cases}});
  for (size_t i = 0; i < outputs.size(); ++i) {
    SCOPED_TRACE(names[i]);
    auto expected = torch::tensor(ref["results"][i]["y"].get<std::vector<double>>(), torch::kDouble)
                        .to(torch::kFloat)
                        .view({9, 131});
    EXPECT_TRUE(torch::equal(outputs[i], expected))
        << "max difference " << (outputs[i] - expected).abs().max().item<double>();
  }
}

// What makes serving deterministic: a row's output is the same bits alone,
// among any batch mates (far larger or smaller values), at any position, in
// batches of any size, on either engine, with one thread or two.
TEST_F(QuantizerTest, PerRowAnswerDoesNotDependOnBatchMatesSizeEngineOrThreads) {
  auto lin = make_linear(512, 256);  // large enough for oneDNN under kAuto with AMX
  auto probe = torch::randn({1, 512});
  const auto engines = wick::available_quant_engines();
  std::vector<wick::QuantizeOptions> variants;
  for (auto e : {wick::QuantEngine::kFbgemm, wick::QuantEngine::kOnednn}) {
    if (std::find(engines.begin(), engines.end(), e) != engines.end())
      variants.push_back(wick::QuantizeOptions().engine(e));
  }
  variants.push_back(wick::QuantizeOptions().onednn_min_rows(4));  // kAuto switching by rows
  ASSERT_GE(variants.size(), 2u);
  torch::Tensor alone;
  {
    wick::QuantizedLinear q(*lin, torch::kInt8, variants[0]);
    c10::InferenceMode guard;
    alone = q(probe);
  }
  // 300 rows: more than one row block on one thread.
  const std::vector<int64_t> sizes{1, 2, 7, 16, 33, 64, 200, 300};
  const std::vector<double> mates_scales{1e-3, 1.0, 1e3};
  int64_t cases = 0;
  for (int threads : {1, 2}) {
    torch::set_num_threads(threads);
    for (const auto& options : variants) {
      wick::QuantizedLinear q(*lin, torch::kInt8, options);
      for (int64_t size : sizes) {
        for (double mates_scale : mates_scales) {
          auto batch = torch::randn({size, 512}) * mates_scale;
          const int64_t at = (size * 5) / 7;  // first, middle or last depending on the size
          batch[at] = probe[0];
          c10::InferenceMode guard;
          auto y = q(batch);
          ++cases;
          EXPECT_TRUE(torch::equal(y[at], alone[0]))
              << wick::to_string(options.engine()) << " threads " << threads << " batch " << size
              << " mates x" << mates_scale << ": max difference "
              << (y[at] - alone[0]).abs().max().item<double>();
        }
      }
    }
  }
  torch::set_num_threads(1);
  EXPECT_EQ(cases, static_cast<int64_t>(2 * variants.size() * sizes.size() * mates_scales.size()));
  // Per batch the same probe's answer moves with its mates (what per row fixes).
  wick::QuantizedLinear per_batch(*lin, torch::kInt8,
                                  wick::QuantizeOptions().per_row_activations(false));
  c10::InferenceMode guard;
  auto mates = torch::randn({15, 512}) * 1e3;
  EXPECT_FALSE(torch::equal(per_batch(torch::cat({probe, mates}))[0], per_batch(probe)[0]));
}

TEST_F(QuantizerTest, HandlesBatchedShapesVectorsAndEmptyBatches) {
  auto lin = make_linear(32, 16);
  wick::QuantizedLinear q(*lin);
  c10::InferenceMode guard;
  auto x3 = torch::randn({2, 3, 32});
  auto ref = emulate_int8(x3, lin->weight.detach(), lin->bias.detach(), true, qmax(q, 6));
  auto y3 = q(x3);
  EXPECT_EQ(y3.sizes(), (std::vector<int64_t>{2, 3, 16}));
  WICK_EXPECT_CLOSE(y3, ref.y, 0.0, 2 * ref.one_flip_bound);
  auto v = torch::randn({32});
  auto refv =
      emulate_int8(v.unsqueeze(0), lin->weight.detach(), lin->bias.detach(), true, qmax(q, 1));
  WICK_EXPECT_CLOSE(q(v), refv.y.squeeze(0), 0.0, 2 * refv.one_flip_bound);
  EXPECT_EQ(q(torch::randn({0, 32})).sizes(), (std::vector<int64_t>{0, 16}));
  auto strided = torch::randn({32, 4}).t();  // non-contiguous input
  auto refs = emulate_int8(strided.contiguous(), lin->weight.detach(), lin->bias.detach(), true,
                           qmax(q, 4));
  WICK_EXPECT_CLOSE(q(strided), refs.y, 0.0, 2 * refs.one_flip_bound);
}

TEST_F(QuantizerTest, WithoutBias) {
  auto lin = make_linear(48, 8, /*bias=*/false);
  wick::QuantizedLinear q(*lin);
  EXPECT_FALSE(q->bias.defined());
  auto x = torch::randn({4, 48});
  auto ref = emulate_int8(x, lin->weight.detach(), torch::Tensor(), true, qmax(q, 4));
  c10::InferenceMode guard;
  WICK_EXPECT_CLOSE(q(x), ref.y, 0.0, 2 * ref.one_flip_bound);
}

TEST_F(QuantizerTest, Fp16WeightsMatchHalfRoundedWeights) {
  auto lin = make_linear(64, 32);
  wick::QuantizedLinear q(*lin, torch::kFloat16);
  EXPECT_EQ(q->weight.scalar_type(), torch::kHalf);
  auto x = torch::randn({6, 64});
  // FBGEMM's fp16 GEMM: fp16 weights, fp32 activations and accumulation.
  auto ref =
      torch::linear(x.to(torch::kDouble), lin->weight.detach().to(torch::kHalf).to(torch::kDouble),
                    lin->bias.detach().to(torch::kDouble));
  c10::InferenceMode guard;
  WICK_EXPECT_CLOSE(q(x), ref, 1e-4, 1e-4);
}

TEST_F(QuantizerTest, ConcurrentForwardsGiveTheSingleThreadedResult) {
  auto lin = make_linear(64, 64);
  wick::QuantizedLinear q(*lin);
  std::vector<torch::Tensor> xs, expected;
  for (int i = 0; i < 8; ++i) {
    xs.push_back(torch::randn({1 + 5 * i, 64}));
    c10::InferenceMode guard;
    expected.push_back(q(xs.back()));
  }
  wick::QuantizedLinear fresh(*lin);  // packs inside the threads
  std::atomic<int> mismatches{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      c10::InferenceMode guard;
      for (int rep = 0; rep < 20; ++rep) {
        for (size_t i = 0; i < xs.size(); ++i) {
          if (!torch::equal(fresh(xs[i]), expected[i])) ++mismatches;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(mismatches.load(), 0);
}

// ---------------------------------------------------------------- replacement

struct Block : torch::nn::Module {
  Block() {
    fc1 = register_module("fc1", torch::nn::Linear(16, 32));
    act = register_module("act", torch::nn::ReLU());
    fc2 = register_module("fc2", torch::nn::Linear(32, 8));
  }
  torch::Tensor forward(torch::Tensor x) { return fc2(act(fc1(x))); }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
  torch::nn::ReLU act{nullptr};
};

// Reference for a two-layer block: each layer emulated on its own input.
torch::Tensor emulate_block(const torch::Tensor& x, const torch::Tensor& w1,
                            const torch::Tensor& b1, const torch::Tensor& w2,
                            const torch::Tensor& b2, int64_t act_qmax, double* bound) {
  auto h = emulate_int8(x, w1, b1, true, act_qmax);
  auto h_relu = h.y.clamp_min(0).to(torch::kFloat);
  auto y = emulate_int8(h_relu, w2, b2, true, act_qmax);
  *bound = 4 * (h.one_flip_bound * w2.abs().sum(1).max().item<double>() + y.one_flip_bound);
  return y.y;
}

TEST_F(QuantizerTest, ReplacesLinearInSequentialAndItsForwardRunsInt8) {
  auto model =
      torch::nn::Sequential(torch::nn::Linear(16, 32), torch::nn::ReLU(), torch::nn::Linear(32, 8));
  auto w1 = model->ptr<torch::nn::LinearImpl>(0)->weight.detach().clone();
  auto b1 = model->ptr<torch::nn::LinearImpl>(0)->bias.detach().clone();
  auto w2 = model->ptr<torch::nn::LinearImpl>(2)->weight.detach().clone();
  auto b2 = model->ptr<torch::nn::LinearImpl>(2)->bias.detach().clone();
  auto x = torch::randn({5, 16});
  auto fp32 = run(*model, x);

  auto report = wick::quantize_dynamic(*model);
  ASSERT_EQ(report.layers.size(), 2u);
  EXPECT_EQ(report.layers[0].name, "0");
  EXPECT_EQ(report.layers[1].name, "2");
  EXPECT_NE(model->ptr<wick::QuantizedLinearImpl>(0), nullptr);
  EXPECT_NE(std::dynamic_pointer_cast<wick::QuantizedLinearImpl>(model->named_children()["2"]),
            nullptr);

  double bound = 0;
  auto ref =
      emulate_block(x, w1, b1, w2, b2, qmax(model->ptr<wick::QuantizedLinearImpl>(0), 5), &bound);
  auto y = run(*model, x);
  WICK_EXPECT_CLOSE(y, ref, 0.0, bound);
  EXPECT_FALSE(torch::allclose(y, fp32, 0, 1e-6));

  // The Sequential's forward calls the module the tree holds: change its bias, see it.
  {
    torch::NoGradGuard g;
    model->ptr<wick::QuantizedLinearImpl>(2)->bias.add_(100);
  }
  EXPECT_TRUE(torch::allclose(run(*model, x), y + 100, 0, 1e-3));
}

TEST_F(QuantizerTest, ReplacesMembersOfCustomModules) {
  auto block = std::make_shared<Block>();
  auto w1 = block->fc1->weight.detach().clone(), b1 = block->fc1->bias.detach().clone();
  auto w2 = block->fc2->weight.detach().clone(), b2 = block->fc2->bias.detach().clone();
  auto x = torch::randn({3, 16});
  auto report = wick::quantize_dynamic(*block);
  ASSERT_EQ(report.layers.size(), 2u);
  EXPECT_EQ(report.layers[0].name, "fc1");

  // The tree holds the quantized layers; parameters() has no float weights left.
  auto children = block->named_children();
  auto q1 = std::dynamic_pointer_cast<wick::QuantizedLinearImpl>(children["fc1"]);
  ASSERT_NE(q1, nullptr);
  EXPECT_TRUE(block->parameters().empty());
  EXPECT_EQ(block->named_buffers().size(), 6u);  // weight, scale, bias x 2

  // The members still name the old objects; their forward runs the int8 layers.
  double bound = 0;
  auto ref = emulate_block(x, w1, b1, w2, b2, qmax(q1, 3), &bound);
  torch::Tensor y;
  {
    c10::InferenceMode g;
    y = block->forward(x);
  }
  WICK_EXPECT_CLOSE(y, ref, 0.0, bound);
  {
    torch::NoGradGuard g;
    q1->bias.fill_(0);
    q1->weight.fill_(0);  // fc1 now outputs 0, so the block outputs fc2's bias
  }
  torch::NoGradGuard g;
  WICK_EXPECT_CLOSE(block->forward(x), b2.to(torch::kDouble).unsqueeze(0).expand({3, 8}), 0, 1e-6);
  // Outside linear(), the old weight fails; most operations say why.
  EXPECT_THROWS_WITH(block->fc1->weight.sum(), "replaced this torch::nn::Linear");
}

// What docs/quantization.md says LibTorch does: LinearImpl::forward calls
// torch::nn::functional::linear, which is inline code; with the redirected
// member's bias undefined it computes x.matmul(weight.t()), so the redirect
// answers t() and matmul() on the old weight; aten::linear is never called.
TEST_F(QuantizerTest, RedirectedMemberForwardGoesThroughTAndMatmul) {
  auto block = std::make_shared<Block>();
  // One engine throughout: autotune's first runs alternate engines, whose ops differ.
  wick::quantize_dynamic(*block, {typeid(torch::nn::LinearImpl)}, torch::kInt8,
                         wick::QuantizeOptions().autotune(false));
  auto q1 = std::dynamic_pointer_cast<wick::QuantizedLinearImpl>(block->named_children()["fc1"]);
  ASSERT_NE(q1, nullptr);
  EXPECT_FALSE(block->fc1->bias.defined());
  auto x = torch::randn({3, 16});
  torch::NoGradGuard no_grad;
  const auto ops = [](const std::function<torch::Tensor()>& f) {
    wick::Profiler profiler;
    torch::Tensor y;
    {
      auto guard = profiler.scope();
      y = f();
    }
    std::map<std::string, int64_t> counts;
    const auto table = profiler.key_averages();
    for (const auto& r : table.rows()) counts[r.name] = r.count;
    return std::make_pair(counts, y);
  };
  // Reference: the replacement called directly (after a first call, which
  // packs the weights).
  (void)q1->forward(x);
  auto [direct, y_direct] = ops([&] { return q1->forward(x); });
  auto [member, y_member] = ops([&] { return block->fc1->forward(x); });
  EXPECT_TRUE(torch::equal(y_member, y_direct));
  EXPECT_EQ(member["aten::matmul"], direct["aten::matmul"] + 1);
  EXPECT_EQ(member["aten::t"], direct["aten::t"] + 1);
  EXPECT_EQ(member["aten::linear"], 0);
  EXPECT_EQ(member["aten::addmm"], direct["aten::addmm"]);
}

struct Containers : torch::nn::Module {
  Containers() {
    list = register_module("list",
                           torch::nn::ModuleList(torch::nn::Linear(8, 8), torch::nn::Linear(8, 8)));
    dict = register_module(
        "dict", torch::nn::ModuleDict(torch::OrderedDict<std::string, std::shared_ptr<Module>>(
                    {{"head", torch::nn::Linear(8, 4).ptr()}})));
    nested = register_module("nested",
                             torch::nn::ModuleList(torch::nn::Sequential(torch::nn::Linear(4, 4))));
  }
  torch::Tensor forward(torch::Tensor x) {
    for (const auto& m : *list)
      x = m->as<wick::QuantizedLinearImpl>() ? m->as<wick::QuantizedLinearImpl>()->forward(x)
                                             : m->as<torch::nn::LinearImpl>()->forward(x);
    auto head = dict["head"];
    x = head->as<wick::QuantizedLinearImpl>() ? head->as<wick::QuantizedLinearImpl>()->forward(x)
                                              : head->as<torch::nn::LinearImpl>()->forward(x);
    return nested[0]->as<torch::nn::SequentialImpl>()->forward(x);
  }
  torch::nn::ModuleList list{nullptr};
  torch::nn::ModuleDict dict{nullptr};
  torch::nn::ModuleList nested{nullptr};
};

TEST_F(QuantizerTest, ReplacesInModuleListModuleDictAndNestedSequential) {
  auto m = std::make_shared<Containers>();
  auto report = wick::quantize_dynamic(*m);
  std::vector<std::string> names;
  for (const auto& l : report.layers) names.push_back(l.name);
  EXPECT_EQ(names, (std::vector<std::string>{"list.0", "list.1", "dict.head", "nested.0.0"}));
  // The containers' own lists hold the new modules, not only their registrations.
  for (const auto& entry : *m->list) EXPECT_NE(entry->as<wick::QuantizedLinearImpl>(), nullptr);
  EXPECT_NE(m->dict["head"]->as<wick::QuantizedLinearImpl>(), nullptr);
  EXPECT_NE(m->dict->values()[0]->as<wick::QuantizedLinearImpl>(), nullptr);
  auto inner = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(m->nested[0]);
  ASSERT_NE(inner, nullptr);
  EXPECT_NE(inner->ptr<wick::QuantizedLinearImpl>(0), nullptr);
  for (const auto& item : m->named_modules())
    EXPECT_EQ(item.value()->as<torch::nn::LinearImpl>(), nullptr) << item.key();
  c10::InferenceMode g;
  EXPECT_EQ(m->forward(torch::randn({2, 8})).sizes(), (std::vector<int64_t>{2, 4}));
}

TEST_F(QuantizerTest, SharedLinearIsQuantizedOnce) {
  auto shared = torch::nn::Linear(8, 8);
  auto model = torch::nn::Sequential(shared, torch::nn::ReLU(), shared);
  auto report = wick::quantize_dynamic(*model);
  EXPECT_EQ(report.layers.size(), 1u);
  EXPECT_EQ(model->ptr(0), model->ptr(2));
}

TEST_F(QuantizerTest, ReportsSizesBeforeAndAfter) {
  auto model = torch::nn::Sequential(torch::nn::Linear(256, 512), torch::nn::ReLU(),
                                     torch::nn::Linear(512, 10), torch::nn::BatchNorm1d(10));
  const int64_t linear_fp32 = (256 * 512 + 512 + 512 * 10 + 10) * 4;
  const int64_t bn = 10 * 4 * 4 + 8;  // weight, bias, running mean, var; num_batches_tracked int64
  EXPECT_EQ(wick::module_state_bytes(*model), linear_fp32 + bn);
  auto report = wick::quantize_dynamic(*model);
  EXPECT_EQ(report.linear_bytes_before, linear_fp32);
  // int8 weights + one float scale per row + float bias.
  const int64_t linear_int8 = 256 * 512 + 512 * 4 + 512 * 4 + 512 * 10 + 10 * 4 + 10 * 4;
  EXPECT_EQ(report.linear_bytes_after, linear_int8);
  EXPECT_EQ(report.model_bytes_before, linear_fp32 + bn);
  EXPECT_EQ(report.model_bytes_after, linear_int8 + bn);
  EXPECT_LE(static_cast<double>(report.linear_bytes_after) / report.linear_bytes_before, 0.30);
  const std::string table = report.format();
  EXPECT_NE(table.find("256->512"), std::string::npos) << table;
  EXPECT_NE(table.find("2 Linear layers"), std::string::npos) << table;
}

// ---------------------------------------------------------------- save / load

TEST_F(QuantizerTest, CheckpointRoundTripGivesIdenticalOutputs) {
  wick::testing::TempDir dir;
  auto make = [] {
    return torch::nn::Sequential(torch::nn::Linear(32, 64), torch::nn::ReLU(),
                                 torch::nn::Linear(64, 10));
  };
  auto model = make();
  wick::quantize_dynamic(*model);
  auto x = torch::randn({9, 32});
  auto y = run(*model, x);
  wick::Checkpoint ckpt;
  ckpt.put_module("model", *model);
  ckpt.save((dir.path() / "ckpt").string());

  auto other = make();  // different random weights
  wick::quantize_dynamic(*other);
  EXPECT_FALSE(torch::equal(run(*other, x), y));  // packs from its own weights first
  wick::Checkpoint::load((dir.path() / "ckpt").string()).restore_module("model", *other);
  EXPECT_TRUE(
      wick::testing::tensors_equal(run(*other, x), y));  // the packed copies follow the new state

  // torch::save / torch::load of the module work as well.
  auto third = make();
  wick::quantize_dynamic(*third);
  torch::save(model, (dir.path() / "model.pt").string());
  torch::load(third, (dir.path() / "model.pt").string());
  EXPECT_TRUE(wick::testing::tensors_equal(run(*third, x), y));
}

TEST_F(QuantizerTest, CloneIsIndependent) {
  auto model = torch::nn::Sequential(torch::nn::Linear(16, 16));
  wick::quantize_dynamic(*model);
  auto copy = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(model->clone());
  auto x = torch::randn({3, 16});
  auto y = run(*model, x);
  EXPECT_TRUE(torch::equal(run(*copy, x), y));
  {
    torch::NoGradGuard g;
    copy->ptr<wick::QuantizedLinearImpl>(0)->bias.add_(1);
  }
  EXPECT_TRUE(torch::equal(run(*model, x), y));
  EXPECT_TRUE(torch::allclose(run(*copy, x), y + 1, 0, 1e-5));
}

// ---------------------------------------------------------------- errors

TEST_F(QuantizerTest, RefusesBadRequestsAndLeavesTheModelAsItWas) {
  auto model = torch::nn::Sequential(torch::nn::Linear(8, 4));
  EXPECT_THROWS_WITH(wick::quantize_dynamic(*model, {typeid(torch::nn::Conv2dImpl)}),
                     "torch::nn::Conv2dImpl is not supported");
  EXPECT_THROWS_WITH(wick::quantize_dynamic(*model, {}), "empty");
  EXPECT_THROWS_WITH(
      wick::quantize_dynamic(*model, {typeid(torch::nn::Linear)}, torch::kFloat8_e4m3fn),
      "on CPU the weight dtype must be torch::kInt8 or torch::kFloat16");
  EXPECT_THROWS_WITH(wick::quantize_dynamic(*model, {typeid(torch::nn::Linear)}, torch::kFloat64),
                     "torch::kInt8 or torch::kFloat16");
  EXPECT_THROWS_WITH(wick::quantize_dynamic(*model, {typeid(torch::nn::Linear)}, torch::kInt8,
                                            wick::QuantizeOptions().onednn_min_rows(0)),
                     "onednn_min_rows must be >= 1, got 0");
  const auto engines = wick::available_quant_engines();
  if (std::find(engines.begin(), engines.end(), wick::QuantEngine::kQnnpack) != engines.end()) {
    EXPECT_THROWS_WITH(
        wick::quantize_dynamic(*model, {typeid(torch::nn::Linear)}, torch::kInt8,
                               wick::QuantizeOptions().engine(wick::QuantEngine::kQnnpack)),
        "QNNPACK has only per-batch kernels, so set per_row_activations(false)");
  }
  EXPECT_NE(model->ptr<torch::nn::LinearImpl>(0), nullptr);  // untouched

  auto lin = torch::nn::Linear(8, 4);
  EXPECT_THROWS_WITH(wick::quantize_dynamic(*lin), "is itself a torch::nn::Linear");

  wick::quantize_dynamic(*model);
  EXPECT_THROWS_WITH(wick::quantize_dynamic(*model), "'0' is already a wick::QuantizedLinear");

  auto q = model->ptr<wick::QuantizedLinearImpl>(0);
  c10::InferenceMode g;
  EXPECT_THROWS_WITH(q->forward(torch::randn({2, 5})), "last dimension must be 8");
  EXPECT_THROWS_WITH(q->forward(torch::randn({2, 8}, torch::kDouble)), "must be float32");
}

// ---------------------------------------------------------------- CUDA

TEST_F(QuantizerTest, CudaWeightOnlyInt8AndFp8CloseToBf16) {
  if (!wick::testing::cuda_available()) GTEST_SKIP() << "no CUDA device";
  for (auto dtype : {torch::kInt8, torch::kFloat8_e4m3fn}) {
    SCOPED_TRACE(c10::toString(dtype));
    auto model = torch::nn::Sequential(torch::nn::Linear(256, 512), torch::nn::ReLU(),
                                       torch::nn::Linear(512, 128));
    model->to(torch::kCUDA, torch::kBFloat16);
    auto x = torch::randn({64, 256}, torch::TensorOptions(torch::kCUDA).dtype(torch::kBFloat16));
    auto ref = run(*model, x).to(torch::kFloat);
    auto report = wick::quantize_dynamic(*model, {typeid(torch::nn::Linear)}, dtype);
    // Against bf16 weights: int8 halves them; fp8 too.
    EXPECT_LE(static_cast<double>(report.linear_bytes_after) / report.linear_bytes_before, 0.52);
    auto y = run(*model, x).to(torch::kFloat);
    EXPECT_EQ(y.scalar_type(), torch::kFloat);
    EXPECT_LT(((y - ref).norm() / ref.norm()).item<double>(), dtype == torch::kInt8 ? 0.03 : 0.08);
  }
}

}  // namespace

namespace {

// The example of docs/quantization.md, as it is printed there.
TEST_F(QuantizerTest, DocsExample) {
  wick::testing::TempDir dir;
  const std::string path = (dir.path() / "int8").string();
  auto make_model = [] {
    return torch::nn::Sequential(torch::nn::Linear(64, 256), torch::nn::ReLU(),
                                 torch::nn::Linear(256, 10));
  };
  auto model = make_model();
  // ... train it ...
  model->eval();
  auto x = torch::randn({32, 64});
  torch::Tensor fp32_logits = model->forward(x).detach();

  wick::QuantizeReport report = wick::quantize_dynamic(*model);  // in place: both Linear layers
  std::cout << report.format();

  torch::Tensor int8_logits;
  {
    c10::InferenceMode guard;
    int8_logits = model->forward(x);
  }

  // Save as usual; to load, quantize a fresh model the same way first.
  wick::Checkpoint ckpt;
  ckpt.put_module("model", *model);
  ckpt.save(path);

  auto served = make_model();
  wick::quantize_dynamic(*served);
  wick::Checkpoint::load(path).restore_module("model", *served);

  c10::InferenceMode guard;
  EXPECT_TRUE(torch::equal(served->forward(x), int8_logits));
  EXPECT_LT(((int8_logits - fp32_logits).norm() / fp32_logits.norm()).item<double>(), 0.02);
  EXPECT_EQ(report.layers.size(), 2u);
}

}  // namespace
