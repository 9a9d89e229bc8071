#include <wick/quantizer.h>

#include "format.h"
#include "int8_rows.h"
#include "linear_swap.h"

#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cpu/Utils.h>
#include <ATen/native/quantized/PackedParams.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <initializer_list>
#include <map>
#include <mutex>

namespace wick {
namespace {

using PackedPtr = c10::intrusive_ptr<LinearPackedParamsBase>;

at::QEngine to_qengine(QuantEngine engine) {
  switch (engine) {
    case QuantEngine::kFbgemm:
      return at::QEngine::FBGEMM;
    case QuantEngine::kOnednn:
      return at::QEngine::ONEDNN;
    case QuantEngine::kQnnpack:
      return at::QEngine::QNNPACK;
    case QuantEngine::kAuto:
      break;
  }
  TORCH_INTERNAL_ASSERT(false, "QuantEngine::kAuto has no LibTorch engine");
}

bool engine_available(QuantEngine engine) {
  const auto& engines = at::Context::supportedQEngines();
  return std::find(engines.begin(), engines.end(), to_qengine(engine)) != engines.end();
}

// The prepack ops read the process-wide quantization engine; this lock keeps
// two packings from fighting over it. The packed objects themselves carry
// their engine, so the forward calls need neither the lock nor the setting.
std::mutex& engine_mutex() {
  static std::mutex m;
  return m;
}

PackedPtr prepack(QuantEngine engine, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, bool fp16) {
  static auto int8_op = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("quantized::linear_prepack", "")
                            .typed<PackedPtr(at::Tensor, std::optional<at::Tensor>)>();
  static auto fp16_op = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("quantized::linear_prepack_fp16", "")
                            .typed<PackedPtr(at::Tensor, std::optional<at::Tensor>)>();
  std::lock_guard<std::mutex> lock(engine_mutex());
  auto& ctx = at::globalContext();
  const at::QEngine before = ctx.qEngine();
  ctx.setQEngine(to_qengine(engine));
  try {
    PackedPtr packed = fp16 ? fp16_op.call(weight, bias) : int8_op.call(weight, bias);
    ctx.setQEngine(before);
    return packed;
  } catch (...) {
    ctx.setQEngine(before);
    throw;
  }
}

// The largest |w| per row (or overall), as the symmetric qint8 scale of
// torch.ao's MinMaxObserver / PerChannelMinMaxObserver: amax / 127.5, at least
// float32's epsilon.
at::Tensor symmetric_scale(const at::Tensor& w, bool per_channel) {
  at::Tensor amax = per_channel ? w.abs().amax(1) : w.abs().max().reshape({1});
  return (amax.to(torch::kFloat) / 127.5f).clamp_min(std::numeric_limits<float>::epsilon());
}

std::string dtype_name(torch::Dtype dtype) {
  switch (dtype) {
    case torch::kInt8:
      return "int8";
    case torch::kFloat16:
      return "float16";
    case torch::kFloat8_e4m3fn:
      return "float8_e4m3fn";
    default:
      return std::string(c10::toString(dtype));
  }
}

int64_t bytes_of(const at::Tensor& t) {
  return t.defined() ? t.numel() * static_cast<int64_t>(t.element_size()) : 0;
}

}  // namespace

const char* to_string(QuantEngine engine) {
  switch (engine) {
    case QuantEngine::kAuto:
      return "auto";
    case QuantEngine::kFbgemm:
      return "fbgemm";
    case QuantEngine::kOnednn:
      return "onednn";
    case QuantEngine::kQnnpack:
      return "qnnpack";
  }
  return "?";
}

std::vector<QuantEngine> available_quant_engines() {
  std::vector<QuantEngine> out;
  for (auto e : {QuantEngine::kFbgemm, QuantEngine::kOnednn, QuantEngine::kQnnpack}) {
    if (engine_available(e)) out.push_back(e);
  }
  return out;
}

namespace {

// Whether cpuinfo reports the CPU feature `name` ("avx512_vnni", "avx_vnni", ...).
bool cpu_capability(const char* name) {
  static const auto caps = at::cpu::get_cpu_capabilities();
  const auto it = caps.find(name);
  return it != caps.end() && it->second.isBool() && it->second.toBool();
}

// Whether the library's instruction-set variable (`var`) caps it at one of
// `without_vnni` (the library reads it once, at its first use, as this does).
bool capped_below_vnni(const char* var, std::initializer_list<const char*> without_vnni) {
  const char* value = std::getenv(var);
  if (value == nullptr) return false;
  std::string isa(value);
  std::transform(isa.begin(), isa.end(), isa.begin(),
                 [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
  return std::any_of(without_vnni.begin(), without_vnni.end(),
                     [&](const char* name) { return isa == name; });
}

// Whether FBGEMM's int8 kernels are its AVX-512 VNNI ones here: the CPU has
// them and FBGEMM_ENABLE_INSTRUCTIONS does not pick AVX2 or plain AVX-512.
bool fbgemm_uses_vnni() {
  static const bool uses =
      at::cpu::is_avx512_vnni_supported() &&
      !capped_below_vnni("FBGEMM_ENABLE_INSTRUCTIONS", {"AVX2", "AVX512", "AVX512_256"});
  return uses;
}

// Whether oneDNN may use VNNI here: the CPU has it (AVX-512 or AVX VNNI) and
// ONEDNN_MAX_CPU_ISA (or its older name DNNL_MAX_CPU_ISA) does not cap oneDNN below it.
bool onednn_uses_vnni() {
  static const bool uses = [] {
    const std::initializer_list<const char*> below = {"SSE41", "AVX", "AVX2", "AVX512_CORE"};
    const bool capped = std::getenv("ONEDNN_MAX_CPU_ISA") != nullptr
                            ? capped_below_vnni("ONEDNN_MAX_CPU_ISA", below)
                            : capped_below_vnni("DNNL_MAX_CPU_ISA", below);
    return !capped && (cpu_capability("avx512_vnni") || cpu_capability("avx_vnni"));
  }();
  return uses;
}

}  // namespace

bool cpu_has_amx_int8() {
  static const bool has = cpu_capability("amx_int8");
  return has;
}

int64_t int8_activation_qmax(QuantEngine engine) {
  switch (engine) {
    case QuantEngine::kFbgemm:
      return fbgemm_uses_vnni() ? 255 : 127;
    case QuantEngine::kOnednn:
      return onednn_uses_vnni() ? 255 : 127;
    case QuantEngine::kQnnpack:
      return 255;  // accumulates in int32
    case QuantEngine::kAuto:
      break;
  }
  TORCH_CHECK(false,
              "int8_activation_qmax: name an engine (QuantizedLinear::engine_for(rows) says "
              "which one a batch runs on), not auto");
}

// ---------------------------------------------------------- QuantizedLinear

// What the per-row path needs beside the int8 weight: the weight packed for
// its engine, and per output j the sum of row j of the int8 weight (the zero
// point's correction), its scale and its bias, as plain arrays.
struct QuantizedLinearImpl::RowWeights {
  std::unique_ptr<detail::FbgemmInt8Weight> fbgemm;  // kFbgemm
  at::Tensor weight_t;                               // kOnednn: int8 [in, out] for at::_int_mm
  std::vector<int32_t> colsum;
  std::vector<float> wscale;
  std::vector<float> bias;  // empty without bias
};

struct QuantizedLinearImpl::Packed {
  std::mutex mutex;
  // What the packed copies were made from: the buffers' identity and version.
  const void* weight_ptr = nullptr;
  const void* scale_ptr = nullptr;
  const void* bias_ptr = nullptr;
  int64_t versions[3] = {-1, -1, -1};
  PackedPtr by_engine[3];                        // per batch: fbgemm, onednn, qnnpack
  std::shared_ptr<const RowWeights> by_rows[2];  // per row: fbgemm, onednn
  // Autotune's choices: (rows rounded up to a power of two, intra-op threads) -> engine.
  std::map<std::pair<int64_t, int>, QuantEngine> tuned;
  // Classes still being timed: each engine's runs so far and best time.
  struct Trial {
    int runs[2] = {0, 0};  // fbgemm, onednn
    double best[2] = {std::numeric_limits<double>::infinity(),
                      std::numeric_limits<double>::infinity()};
  };
  std::map<std::pair<int64_t, int>, Trial> trials;
};

namespace {

constexpr int64_t kOnednnMinWeights = 64 * 1024;

int engine_slot(QuantEngine e) {
  switch (e) {
    case QuantEngine::kFbgemm:
      return 0;
    case QuantEngine::kOnednn:
      return 1;
    case QuantEngine::kQnnpack:
      return 2;
    case QuantEngine::kAuto:
      break;
  }
  TORCH_INTERNAL_ASSERT(false);
}

// The engines a per-row layer runs on, by engine_slot (Packed::by_rows, Packed::Trial).
constexpr QuantEngine kRowEngines[2] = {QuantEngine::kFbgemm, QuantEngine::kOnednn};

int64_t version_of(const at::Tensor& t) {
  // Inference tensors keep no version counter; they cannot be changed in place
  // outside InferenceMode either, so their identity is enough.
  if (!t.defined() || t.is_inference()) return 0;
  return static_cast<int64_t>(t._version());
}

void check_dtype_device(torch::Dtype dtype, const torch::Device& device) {
  if (device.is_cpu()) {
    TORCH_CHECK(
        dtype == torch::kInt8 || dtype == torch::kFloat16,
        "QuantizedLinear: on CPU the weight dtype must be torch::kInt8 or torch::kFloat16, got ",
        dtype_name(dtype));
  } else {
    TORCH_CHECK(device.is_cuda(), "QuantizedLinear: weights must be on CPU or CUDA, got ", device);
    TORCH_CHECK(dtype == torch::kInt8 || dtype == torch::kFloat8_e4m3fn,
                "QuantizedLinear: on CUDA the weight dtype must be torch::kInt8 (weight-only) or "
                "torch::kFloat8_e4m3fn, got ",
                dtype_name(dtype));
  }
}

void check_options(const QuantizeOptions& options) {
  TORCH_CHECK(options.onednn_min_rows() >= 1, "QuantizeOptions: onednn_min_rows must be >= 1, got ",
              options.onednn_min_rows());
  if (options.engine() != QuantEngine::kAuto) {
    TORCH_CHECK(engine_available(options.engine()), "QuantizeOptions: engine '",
                to_string(options.engine()), "' is not built into this LibTorch");
  }
  if (options.per_row_activations()) {
    TORCH_CHECK(options.engine() != QuantEngine::kQnnpack,
                "QuantizeOptions: per_row_activations runs on FBGEMM or oneDNN; QNNPACK has only "
                "per-batch kernels, so set per_row_activations(false) to use it");
    TORCH_CHECK(options.engine() != QuantEngine::kFbgemm || detail::fbgemm_int32_gemm_available(),
                "QuantizeOptions: per_row_activations on engine 'fbgemm' needs FBGEMM's int32 "
                "GEMM, which this LibTorch or CPU lacks");
  }
}

// Scratch of the per-row path, kept per thread so a served model does not
// allocate (and fault in) its integer buffers on every batch.
struct RowScratch {
  std::vector<uint8_t> codes;
  std::vector<float> scale;
  std::vector<int32_t> zero_point;
};

RowScratch& row_scratch() {
  thread_local RowScratch scratch;
  return scratch;
}

template <class T>
T* sized(std::vector<T>& v, int64_t n) {
  if (v.size() < static_cast<size_t>(n)) v.resize(static_cast<size_t>(n));
  return v.data();
}

}  // namespace

QuantizedLinearImpl::QuantizedLinearImpl(int64_t in_features, int64_t out_features, bool with_bias,
                                         torch::Dtype dtype, QuantizeOptions options,
                                         torch::Device device)
    : in_features_(in_features),
      out_features_(out_features),
      with_bias_(with_bias),
      dtype_(dtype),
      options_(options),
      device_(device) {
  TORCH_CHECK(in_features > 0 && out_features > 0, "QuantizedLinear: features must be > 0, got in ",
              in_features, ", out ", out_features);
  check_dtype_device(dtype, device);
  check_options(options);
  if (dtype == torch::kFloat8_e4m3fn) {
    TORCH_CHECK(
        in_features % 16 == 0 && out_features % 16 == 0,
        "QuantizedLinear: fp8 (at::_scaled_mm) needs in and out features that are multiples of 16, "
        "got in ",
        in_features, ", out ", out_features);
  }
  reset();
}

QuantizedLinearImpl::QuantizedLinearImpl(const torch::nn::LinearImpl& linear, torch::Dtype dtype,
                                         QuantizeOptions options)
    : QuantizedLinearImpl(linear.options.in_features(), linear.options.out_features(),
                          linear.options.bias(), dtype, options, linear.weight.device()) {
  torch::NoGradGuard no_grad;
  const at::Tensor w = linear.weight.detach();
  TORCH_CHECK(w.is_floating_point(),
              "QuantizedLinear: the Linear's weight must be floating point, got ",
              dtype_name(w.scalar_type()));
  const at::Tensor wf = w.to(torch::kFloat);
  if (dtype == torch::kFloat16) {
    weight.copy_(wf.to(torch::kHalf));
  } else if (dtype == torch::kInt8) {
    at::Tensor s = symmetric_scale(wf, options.per_channel());
    at::Tensor q = options.per_channel() ? (wf / s.unsqueeze(1)).round() : (wf / s).round();
    weight.copy_(q.clamp(-128, 127).to(torch::kInt8));
    scale.copy_(s);
  } else {  // float8_e4m3fn: per-row scale to the format's largest finite value, 448
    at::Tensor amax = wf.abs().amax(1).clamp_min(1e-12);
    at::Tensor s = amax / 448.0f;
    weight.copy_((wf / s.unsqueeze(1)).clamp(-448.0f, 448.0f).to(torch::kFloat8_e4m3fn));
    scale.copy_(s);
  }
  if (with_bias_) bias.copy_(linear.bias.detach().to(torch::kFloat));
}

QuantizedLinearImpl::PackedCache::PackedCache() : packed_(std::make_shared<Packed>()) {}

QuantizedLinearImpl::PackedCache::PackedCache(const PackedCache& /*other*/) : PackedCache() {}

QuantizedLinearImpl::PackedCache& QuantizedLinearImpl::PackedCache::operator=(
    const PackedCache& other) {
  if (this != &other) packed_ = std::make_shared<Packed>();
  return *this;
}

void QuantizedLinearImpl::reset() {
  packed_ = PackedCache();
  auto on = torch::TensorOptions().device(device_);
  weight = register_buffer(
      "weight", torch::zeros({out_features_, in_features_}, on.dtype(torch::kFloat)).to(dtype_));
  // fp16 weights need no scale; int8 has one per row or one in all; fp8 one per row.
  int64_t scales = out_features_;
  if (dtype_ == torch::kFloat16) scales = 0;
  if (dtype_ == torch::kInt8 && !options_.per_channel()) scales = 1;
  scale = register_buffer("scale", torch::ones({scales}, on.dtype(torch::kFloat)));
  if (with_bias_) {
    bias = register_buffer("bias", torch::zeros({out_features_}, on.dtype(torch::kFloat)));
  } else {
    bias = at::Tensor();
  }
}

void QuantizedLinearImpl::pretty_print(std::ostream& stream) const {
  stream << "wick::QuantizedLinear(in_features=" << in_features_
         << ", out_features=" << out_features_ << ", bias=" << (with_bias_ ? "true" : "false")
         << ", dtype=" << dtype_name(dtype_);
  if (dtype_ == torch::kInt8) stream << (options_.per_channel() ? ", per_channel" : ", per_tensor");
  if (dtype_ == torch::kInt8 && device_.is_cpu())
    stream << (options_.per_row_activations() ? ", activations per row"
                                              : ", activations per batch");
  if (device_.is_cpu()) stream << ", engine=" << to_string(options_.engine());
  stream << ")";
}

torch::Tensor QuantizedLinearImpl::dequantized_weight() const {
  torch::NoGradGuard no_grad;
  if (dtype_ == torch::kFloat16) return weight.to(torch::kFloat);
  at::Tensor s = scale.numel() == 1 ? scale : scale.unsqueeze(1);
  return weight.to(torch::kFloat) * s;
}

int64_t QuantizedLinearImpl::state_bytes() const {
  return bytes_of(weight) + bytes_of(scale) + bytes_of(bias);
}

torch::Tensor QuantizedLinearImpl::forward(const torch::Tensor& input) {
  TORCH_CHECK(input.defined(), "QuantizedLinear: input is undefined");
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == in_features_,
              "QuantizedLinear: input's last dimension must be ", in_features_, ", got shape ",
              input.sizes());
  TORCH_CHECK(input.device() == weight.device(), "QuantizedLinear: input is on ", input.device(),
              " but the weights are on ", weight.device());
  return weight.is_cuda() ? forward_cuda(input) : forward_cpu(input);
}

namespace {

// Autotune times a class's first kTuneRuns batches, the engines alternating;
// spread over real batches, a burst of noise on the machine cannot decide
// alone (timing 4 runs of each engine back to back on the first batch picked
// the slower engine in some runs of `wick-bench quant` on a busy machine).
constexpr int kTuneRuns = 16;
// The other engine must beat the fixed rule's by this much to replace it.
constexpr double kTuneMargin = 0.03;

// The class of a batch of `rows` rows for autotune: rows rounded up to a power of two.
int64_t row_class(int64_t rows) {
  int64_t c = 1;
  while (c < rows) c *= 2;
  return c;
}

}  // namespace

bool QuantizedLinearImpl::autotunes() const {
  return options_.autotune() && options_.engine() == QuantEngine::kAuto &&
         options_.per_row_activations() && dtype_ == torch::kInt8 && device_.is_cpu() &&
         detail::fbgemm_int32_gemm_available() && engine_available(QuantEngine::kOnednn);
}

QuantEngine QuantizedLinearImpl::engine_for(int64_t rows) const {
  if (autotunes()) {
    std::lock_guard<std::mutex> lock(packed_->mutex);
    auto it = packed_->tuned.find({row_class(rows), at::get_num_threads()});
    if (it != packed_->tuned.end()) return it->second;
  }
  return fixed_engine_for(rows);
}

QuantEngine QuantizedLinearImpl::fixed_engine_for(int64_t rows) const {
  if (dtype_ == torch::kFloat16)
    return QuantEngine::kFbgemm;  // LibTorch's fp16 dynamic linear is FBGEMM's
  if (options_.engine() != QuantEngine::kAuto) return options_.engine();
  const bool per_row = options_.per_row_activations();
  const bool fb =
      per_row ? detail::fbgemm_int32_gemm_available() : engine_available(QuantEngine::kFbgemm);
  const bool dnn = engine_available(QuantEngine::kOnednn);
  // oneDNN is faster from about 16 rows where it has AMX tiles (measured on
  // Sapphire Rapids); without AMX, FBGEMM is at least as fast on every shape
  // measured (AMD EPYC, AVX-512 VNNI). Its fixed cost per call (about 8 us on
  // one core) outweighs its speed on small layers and small batches.
  const bool large = cpu_has_amx_int8() && rows >= options_.onednn_min_rows() &&
                     in_features_ * out_features_ >= kOnednnMinWeights;
  if (fb) return dnn && large ? QuantEngine::kOnednn : QuantEngine::kFbgemm;
  // No FBGEMM: oneDNN; per row also without it, as at::_int_mm has loops of
  // its own (exact, slow); per batch QNNPACK is the last resort.
  return dnn || per_row ? QuantEngine::kOnednn : QuantEngine::kQnnpack;
}

int64_t QuantizedLinearImpl::activation_qmax(int64_t rows) const {
  if (!options_.per_row_activations()) return int8_activation_qmax(engine_for(rows));
  // One range for every batch size: the least of the engines the layer can run.
  if (options_.engine() != QuantEngine::kAuto) return int8_activation_qmax(options_.engine());
  if (autotunes()) {
    return std::min(int8_activation_qmax(QuantEngine::kFbgemm),
                    int8_activation_qmax(QuantEngine::kOnednn));
  }
  const QuantEngine small = fixed_engine_for(1);
  const QuantEngine big = fixed_engine_for(std::numeric_limits<int32_t>::max());
  return std::min(int8_activation_qmax(small), int8_activation_qmax(big));
}

torch::Tensor QuantizedLinearImpl::forward_cpu(const torch::Tensor& input) {
  TORCH_CHECK(input.scalar_type() == torch::kFloat,
              "QuantizedLinear: input must be float32 on CPU, got ",
              dtype_name(input.scalar_type()));
  const int64_t rows = input.numel() / in_features_;
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = out_features_;
  if (rows == 0) return torch::zeros(out_shape, input.options());

  const bool fp16 = dtype_ == torch::kFloat16;
  const bool per_row = !fp16 && options_.per_row_activations();
  const bool tune = per_row && autotunes();
  const std::pair<int64_t, int> tune_key{row_class(rows), at::get_num_threads()};
  QuantEngine engine = fixed_engine_for(rows);
  PackedPtr packed;
  std::shared_ptr<const RowWeights> row_weights;
  bool timed = false;  // this batch is one of autotune's timed runs
  {
    std::lock_guard<std::mutex> lock(packed_->mutex);
    Packed& p = *packed_;
    const int64_t versions[3] = {version_of(weight), version_of(scale), version_of(bias)};
    const void* ptrs[3] = {weight.data_ptr(), scale.data_ptr(),
                           bias.defined() ? bias.data_ptr() : nullptr};
    if (ptrs[0] != p.weight_ptr || ptrs[1] != p.scale_ptr || ptrs[2] != p.bias_ptr ||
        !std::equal(versions, versions + 3, p.versions)) {
      for (auto& slot : p.by_engine) slot.reset();
      for (auto& slot : p.by_rows) slot.reset();
      p.tuned.clear();
      p.trials.clear();
      p.weight_ptr = ptrs[0];
      p.scale_ptr = ptrs[1];
      p.bias_ptr = ptrs[2];
      std::copy(versions, versions + 3, p.versions);
    }
    if (tune) {
      auto it = p.tuned.find(tune_key);
      if (it != p.tuned.end()) {
        engine = it->second;
      } else {
        // This batch is one of its class's timed runs: the engine with fewer runs so far.
        const Packed::Trial& t = p.trials[tune_key];
        engine = kRowEngines[t.runs[1] < t.runs[0] ? 1 : 0];
        timed = true;
      }
    }
    if (per_row) {
      auto& slot = p.by_rows[engine_slot(engine)];
      if (!slot) slot = pack_rows(engine);
      row_weights = slot;
    } else {
      PackedPtr& slot = p.by_engine[engine_slot(engine)];
      if (!slot) {
        c10::InferenceMode guard;
        std::optional<at::Tensor> b;
        if (bias.defined()) b = bias.detach();
        if (fp16) {
          slot = prepack(engine, weight.detach().to(torch::kFloat), b, /*fp16=*/true);
        } else {
          at::Tensor w = weight.detach();
          at::Tensor s = scale.detach();
          at::Tensor qw =
              s.numel() == 1 && !options_.per_channel()
                  ? at::_make_per_tensor_quantized_tensor(w, s.item<double>(), 0)
                  : at::_make_per_channel_quantized_tensor(
                        w, s.to(torch::kDouble), torch::zeros({out_features_}, torch::kLong), 0);
          slot = prepack(engine, qw, b, /*fp16=*/false);
        }
      }
      packed = slot;
    }
  }
  if (timed) {
    // Autotune: the first kTuneRuns batches of a class alternate between the
    // engines (both give the same bits), each timed; then the class keeps the
    // fixed rule's engine unless the other's best time beat it by kTuneMargin.
    const auto t0 = std::chrono::steady_clock::now();
    torch::Tensor y = forward_rows(input, rows, engine, *row_weights, out_shape);
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::lock_guard<std::mutex> lock(packed_->mutex);
    Packed& p = *packed_;
    if (p.tuned.count(tune_key) != 0) return y;  // decided meanwhile, by another thread
    Packed::Trial& t = p.trials[tune_key];
    const int e = engine_slot(engine);
    ++t.runs[e];
    t.best[e] = std::min(t.best[e], seconds);
    if (t.runs[0] + t.runs[1] >= kTuneRuns) {
      const int rule = engine_slot(fixed_engine_for(rows));
      const int other = 1 - rule;
      const int pick = t.best[other] < t.best[rule] * (1 - kTuneMargin) ? other : rule;
      p.tuned.emplace(tune_key, kRowEngines[pick]);
      p.trials.erase(tune_key);
    }
    return y;
  }
  if (per_row) return forward_rows(input, rows, engine, *row_weights, out_shape);
  // Without VNNI, FBGEMM and oneDNN multiply u8 x s8 pairs into int16 and
  // can saturate; 7-bit activations avoid that (what torch.ao does on every CPU).
  const bool reduce_range = !fp16 && int8_activation_qmax(engine) < 255;
  at::Tensor x = input.dim() == 1 ? input.unsqueeze(0) : input;
  at::Tensor y = packed->apply_dynamic(x.contiguous(), reduce_range);
  return input.dim() == 1 ? y.squeeze(0) : y;
}

std::shared_ptr<const QuantizedLinearImpl::RowWeights> QuantizedLinearImpl::pack_rows(
    QuantEngine engine) const {
  c10::InferenceMode guard;
  auto r = std::make_shared<RowWeights>();
  const at::Tensor w = weight.detach().contiguous();
  const auto* wp = w.data_ptr<int8_t>();
  r->colsum.assign(static_cast<size_t>(out_features_), 0);
  for (int64_t j = 0; j < out_features_; ++j) {
    int32_t sum = 0;
    for (int64_t k = 0; k < in_features_; ++k) sum += wp[j * in_features_ + k];
    r->colsum[static_cast<size_t>(j)] = sum;
  }
  const at::Tensor s = scale.detach().to(torch::kFloat).contiguous();
  r->wscale.assign(static_cast<size_t>(out_features_), s.data_ptr<float>()[0]);
  if (s.numel() == out_features_) {
    std::copy(s.data_ptr<float>(), s.data_ptr<float>() + out_features_, r->wscale.begin());
  }
  if (bias.defined()) {
    const at::Tensor b = bias.detach().to(torch::kFloat).contiguous();
    r->bias.assign(b.data_ptr<float>(), b.data_ptr<float>() + out_features_);
  }
  if (engine == QuantEngine::kFbgemm) {
    r->fbgemm = std::make_unique<detail::FbgemmInt8Weight>(wp, out_features_, in_features_);
  } else {
    r->weight_t = w.t();  // [in, out], column-major: the weight as stored
  }
  return r;
}

torch::Tensor QuantizedLinearImpl::forward_rows(const torch::Tensor& input, int64_t rows,
                                                QuantEngine engine, const RowWeights& r,
                                                const std::vector<int64_t>& out_shape) const {
  const at::Tensor x = input.reshape({rows, in_features_}).contiguous();
  const int32_t qmax = static_cast<int32_t>(activation_qmax(rows));
  const bool u8 = engine == QuantEngine::kFbgemm;  // FBGEMM multiplies u8 x s8; _int_mm s8 x s8
  RowScratch& scratch = row_scratch();
  uint8_t* codes = sized(scratch.codes, rows * in_features_);
  float* row_scale = sized(scratch.scale, rows);
  int32_t* row_zp = sized(scratch.zero_point, rows);
  detail::quantize_rows(x.data_ptr<float>(), rows, in_features_, in_features_, qmax, u8 ? 0 : -128,
                        codes, row_scale, row_zp);
  at::Tensor y = at::empty(out_shape, input.options());
  float* yp = y.data_ptr<float>();
  // The int32 products go into y's own memory and are dequantized in place:
  // one buffer in cache where a separate one took twice the room, and the
  // dequantization rewrites lines the product just wrote (the forward at
  // 4096 outputs, one thread, min of 400 calls: 5% faster at 64 rows, 10% at 256).
  int32_t* acc = reinterpret_cast<int32_t*>(yp);
  const int64_t n = out_features_;
  auto dequantize = [&](int64_t r0, int64_t r1) {
    detail::dequantize_rows(acc + r0 * n, r1 - r0, n, row_scale + r0, row_zp + r0, r.colsum.data(),
                            r.wscale.data(), r.bias.empty() ? nullptr : r.bias.data(), yp + r0 * n);
  };
  if (u8) {
    r.fbgemm->matmul(codes, rows, acc, dequantize);  // block by block
  } else {
    at::Tensor a = at::from_blob(codes, {rows, in_features_}, at::TensorOptions(at::kChar));
    at::Tensor out = at::from_blob(acc, {rows, n}, at::TensorOptions(at::kInt));
    at::_int_mm_out(out, a, r.weight_t);
    TORCH_INTERNAL_ASSERT(out.data_ptr<int32_t>() == acc, "at::_int_mm_out reallocated its output");
    dequantize(0, rows);
  }
  return y;
}

torch::Tensor QuantizedLinearImpl::forward_cuda(const torch::Tensor& input) {
  TORCH_CHECK(input.is_floating_point(), "QuantizedLinear: input must be floating point, got ",
              dtype_name(input.scalar_type()));
  const auto out_dtype = input.scalar_type();
  if (dtype_ == torch::kInt8) {
    // Weight-only: the int8 weights stay int8 in memory and are widened, with
    // their scales, into the input's dtype for the product.
    at::Tensor s = scale.numel() == 1 ? scale : scale.unsqueeze(1);
    at::Tensor w = weight.to(out_dtype).mul_(s.to(out_dtype));
    return at::linear(input, w, bias.defined() ? bias.to(out_dtype) : at::Tensor());
  }
  // fp8: row-wise scaled e4m3 inputs and weights, at::_scaled_mm.
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = out_features_;
  at::Tensor x = input.reshape({-1, in_features_});
  const int64_t rows = x.size(0);
  if (rows == 0) return torch::zeros(out_shape, input.options());
  at::Tensor xf = x.to(torch::kFloat);
  at::Tensor sx = (xf.abs().amax(1, /*keepdim=*/true) / 448.0f).clamp_min(1e-12);
  at::Tensor xq = (xf / sx).clamp(-448.0f, 448.0f).to(torch::kFloat8_e4m3fn);
  // _scaled_mm: mat2 column-major [in, out], scale_a [rows, 1], scale_b [1, out].
  const auto mm_dtype = out_dtype == torch::kFloat ? torch::kBFloat16 : out_dtype;
  at::Tensor y =
      at::_scaled_mm(xq, weight.t(), sx, scale.unsqueeze(0), std::nullopt, std::nullopt, mm_dtype);
  if (bias.defined()) y = y.to(torch::kFloat).add_(bias);
  return y.to(out_dtype).reshape(out_shape);
}

// ---------------------------------------------------------- quantize_dynamic

namespace {

bool is_linear_type(const std::type_index& t) {
  return t == std::type_index(typeid(torch::nn::LinearImpl)) ||
         t == std::type_index(typeid(torch::nn::Linear));
}

void find_quantized(const torch::nn::Module& module, const std::string& prefix) {
  for (const auto& child : module.named_children()) {
    const std::string path = prefix.empty() ? child.key() : prefix + "." + child.key();
    TORCH_CHECK(
        std::dynamic_pointer_cast<QuantizedLinearImpl>(child.value()) == nullptr,
        "quantize_dynamic: '", path,
        "' is already a wick::QuantizedLinear; quantizing a quantized model again would compound "
        "the rounding error. Quantize the fp32 model once.");
    find_quantized(*child.value(), path);
  }
}

}  // namespace

int64_t module_state_bytes(const torch::nn::Module& module) {
  int64_t total = 0;
  for (const auto& p : module.parameters(/*recurse=*/true)) total += bytes_of(p);
  for (const auto& b : module.buffers(/*recurse=*/true)) total += bytes_of(b);
  return total;
}

QuantizeReport quantize_dynamic(torch::nn::Module& module, const std::set<std::type_index>& types,
                                torch::Dtype dtype, QuantizeOptions options) {
  TORCH_CHECK(
      !types.empty(),
      "quantize_dynamic: the set of module types is empty; pass {typeid(torch::nn::Linear)}");
  for (const auto& t : types) {
    TORCH_CHECK(is_linear_type(t), "quantize_dynamic: module type ", c10::demangle(t.name()),
                " is not supported; wick quantizes torch::nn::Linear (typeid(torch::nn::Linear) or "
                "typeid(torch::nn::LinearImpl))");
  }
  TORCH_CHECK(dynamic_cast<torch::nn::LinearImpl*>(&module) == nullptr,
              "quantize_dynamic: the module is itself a torch::nn::Linear, which cannot be "
              "replaced in place; "
              "wrap it (torch::nn::Sequential(linear)) or build a wick::QuantizedLinear from it");
  TORCH_CHECK(dynamic_cast<QuantizedLinearImpl*>(&module) == nullptr,
              "quantize_dynamic: the module is already a wick::QuantizedLinear");
  check_options(options);
  find_quantized(module, "");

  // Check every Linear before changing anything, so a refusal leaves the model as it was.
  for (const auto& item : module.named_modules("", /*include_self=*/false)) {
    if (auto linear = std::dynamic_pointer_cast<torch::nn::LinearImpl>(item.value())) {
      const auto device = linear->weight.device();
      try {
        check_dtype_device(dtype, device);
      } catch (const c10::Error& e) {
        TORCH_CHECK(false, "quantize_dynamic: '", item.key(), "' (on ", device,
                    "): ", e.what_without_backtrace());
      }
      if (dtype == torch::kFloat8_e4m3fn) {
        TORCH_CHECK(
            linear->options.in_features() % 16 == 0 && linear->options.out_features() % 16 == 0,
            "quantize_dynamic: '", item.key(), "' is ", linear->options.in_features(), " -> ",
            linear->options.out_features(), "; fp8 (at::_scaled_mm) needs multiples of 16");
      }
    }
  }

  QuantizeReport report;
  report.dtype = dtype;
  report.model_bytes_before = module_state_bytes(module);
  const auto swapped = detail::swap_linears(
      module,
      [&](const std::string& /*path*/, torch::nn::LinearImpl& linear) {
        auto q = std::make_shared<QuantizedLinearImpl>(linear, dtype, options);
        return detail::LinearReplacement{q, torch::nn::AnyModule(q),
                                         [q](const at::Tensor& x) { return q->forward(x); }};
      },
      /*select=*/{}, "quantize_dynamic");
  for (const auto& r : swapped) {
    auto q = std::dynamic_pointer_cast<QuantizedLinearImpl>(r.new_module);
    QuantizedLayer layer;
    layer.name = r.path;
    layer.in_features = q->in_features();
    layer.out_features = q->out_features();
    layer.bytes_before = r.bytes_before;
    layer.bytes_after = q->state_bytes();
    report.linear_bytes_before += layer.bytes_before;
    report.linear_bytes_after += layer.bytes_after;
    report.layers.push_back(layer);
  }
  report.model_bytes_after = module_state_bytes(module);
  return report;
}

std::string QuantizeReport::format() const {
  size_t width = 5;
  for (const auto& l : layers) width = std::max(width, l.name.size());
  std::string s = fmt::format("{:<{}}{:>14}{:>14}{:>14}\n", "layer", width, "shape", "bytes before",
                              dtype_name(dtype) + " bytes");
  for (const auto& l : layers) {
    fmt::format_to(std::back_inserter(s), "{:<{}}{:>14}{:>14}{:>14}\n", l.name, width,
                   fmt::format("{}->{}", l.in_features, l.out_features), l.bytes_before,
                   l.bytes_after);
  }
  auto ratio = [](int64_t a, int64_t b) {
    return b > 0 ? static_cast<double>(a) / static_cast<double>(b) : 0.0;
  };
  fmt::format_to(
      std::back_inserter(s),
      "{} Linear layers: {} -> {} bytes ({:.3f}x); whole model {} -> {} bytes ({:.3f}x)\n",
      layers.size(), linear_bytes_before, linear_bytes_after,
      ratio(linear_bytes_after, linear_bytes_before), model_bytes_before, model_bytes_after,
      ratio(model_bytes_after, model_bytes_before));
  return s;
}

}  // namespace wick
