#pragma once
// Dynamic quantization for inference: the C++ counterpart of
// torch.ao.quantization.quantize_dynamic. Every torch::nn::Linear in a module
// tree becomes a wick::QuantizedLinear whose weights are int8 (one scale per
// output row by default) and whose input is quantized to uint8 row by row (each
// row with its own scale, so a row's answer does not depend on the rest of its
// batch), so the matrix product runs on an int8 GEMM (FBGEMM or oneDNN on x86,
// QNNPACK on ARM) with the weights packed once.
//
//   auto model = torch::nn::Sequential(torch::nn::Linear(784, 512), torch::nn::ReLU(),
//                                      torch::nn::Linear(512, 10));
//   ... train ...
//   model->eval();
//   wick::QuantizeReport report = wick::quantize_dynamic(*model);  // in place
//   std::cout << report.format();          // layers replaced, bytes before and after
//   torch::Tensor y = model->forward(x);   // now runs the int8 kernels
//
// What is replaced, and how:
// - A Linear registered in Sequential, ModuleList or ModuleDict is replaced in
//   the container's own list too, so the container's forward (and iteration)
//   runs the quantized module.
// - A Linear that a custom module holds as a member (`torch::nn::Linear fc{nullptr}`)
//   cannot be swapped in C++: the member is bound to the old object. That old
//   torch::nn::Linear is therefore redirected: its fp32 weight and bias are
//   freed and its `weight` becomes a handle whose only operation is linear(),
//   which runs the QuantizedLinear. So `fc(x)` and `fc->forward(x)` run int8,
//   and the tree (named_children, parameters, checkpoints) holds the
//   QuantizedLinear. Any other use of the old weight (fc->weight.sum(),
//   printing it) throws; most operations say why, a few (those that touch its
//   storage first) only that it has none.
//
// A QuantizedLinear's state is ordinary buffers (`weight` int8, `scale`,
// `bias`), so wick::Checkpoint and torch::save keep it; load it into a model on
// which quantize_dynamic was run with the same options. The packed copies the
// kernels use are derived from those buffers and rebuilt when they change.
//
// On CUDA (the Linear's weight on a GPU) the same call makes weight-only int8
// (dtype torch::kInt8: int8 weights and a scale per row, dequantized into the
// matrix product in the input's dtype) or fp8 (dtype torch::kFloat8_e4m3fn:
// weights and, per batch, inputs in e4m3 with row-wise scales, multiplied by
// at::_scaled_mm on sm_89 and newer, e.g. Hopper).

#include <torch/torch.h>

#include <cstdint>
#include <iosfwd>
#include <memory>
#include <set>
#include <string>
#include <typeindex>
#include <vector>

namespace wick {

/// Which int8 GEMM library runs a CPU QuantizedLinear.
enum class QuantEngine {
  /// With per-row activations (the default) and both FBGEMM and oneDNN built
  /// in: each class of batch sizes (rows rounded up to a power of two) and
  /// intra-op thread count runs on the engine that was faster over its first
  /// 16 batches, which alternate between them (QuantizeOptions::autotune);
  /// every engine computes the same bits there, so the choice is speed only.
  /// Otherwise (and until a class has been timed, in engine_for): FBGEMM, except on CPUs
  /// with AMX (Intel Sapphire Rapids and newer), where batches of at least
  /// QuantizeOptions::onednn_min_rows rows on layers of at least 64 Ki
  /// weights run on oneDNN (each packed on first use); engines that are not
  /// built in are skipped, QNNPACK is the last resort.
  kAuto,
  kFbgemm,   ///< x86 (AVX2, AVX-512, VNNI)
  kOnednn,   ///< x86; uses AMX on CPUs that have it
  kQnnpack,  ///< ARM, and x86 without the others (slow there)
};

/// "auto", "fbgemm", "onednn", "qnnpack".
const char* to_string(QuantEngine engine);
/// The engines this LibTorch build supports (kAuto not included).
std::vector<QuantEngine> available_quant_engines();
/// The largest code of a batch's uint8 inputs on `engine` on this CPU: 255,
/// or 127 (7-bit inputs, torch.ao's `reduce_range`) where the engine's kernels
/// multiply u8 x s8 pairs into int16 and could saturate: FBGEMM without
/// AVX-512 VNNI (or capped below it by FBGEMM_ENABLE_INSTRUCTIONS), oneDNN
/// without VNNI (or capped below it by ONEDNN_MAX_CPU_ISA).
/// kAuto is refused: QuantizedLinear::engine_for(rows) resolves it.
int64_t int8_activation_qmax(QuantEngine engine);

struct QuantizeOptions {
  /// int8 weights: one scale per output row (true, default) or one for the whole matrix.
  TORCH_ARG(bool, per_channel) = true;
  /// CPU int8 GEMM library; see QuantEngine. Default kAuto.
  TORCH_ARG(QuantEngine, engine) = QuantEngine::kAuto;
  /// kAuto on a CPU with AMX: a batch of at least this many rows (product of
  /// the leading dimensions) runs on oneDNN, smaller ones on FBGEMM. Default
  /// 16, where the two cross over on a Sapphire Rapids core
  /// (docs/quantization.md). Without AMX, FBGEMM runs every batch.
  TORCH_ARG(int64_t, onednn_min_rows) = 16;
  /// int8 on CPU: quantize the input row by row, each row (sample) with its
  /// own scale and zero point (true, default), or with one scale and zero
  /// point for the whole batch (false: LibTorch's own dynamic kernels, as
  /// Python's quantize_dynamic). Per row, an output depends only on its own
  /// input row: a served request gets the same bits whatever its batch mates
  /// and batch size, and whichever engine runs it.
  TORCH_ARG(bool, per_row_activations) = true;
  /// kAuto with per-row activations: the first 16 batches of each class of
  /// batch sizes (1, 2, 3-4, 5-8, ... rows) and intra-op thread count run on
  /// FBGEMM and on oneDNN alternately, each timed, and the class then keeps
  /// the fixed rule's engine unless the other's best time was at least 3%
  /// better; the answers are the same bits either way. Costs no extra runs,
  /// 8 batches per class on the slower engine, and both packed weights.
  /// false: the fixed rule of QuantEngine::kAuto (oneDNN from
  /// onednn_min_rows rows on CPUs with AMX). Default true.
  TORCH_ARG(bool, autotune) = true;
};

/// Whether this CPU has AMX tiles for int8 (what QuantEngine::kAuto's rule reads).
bool cpu_has_amx_int8();

/// A Linear with quantized weights. Built by quantize_dynamic, or directly from a Linear.
class QuantizedLinearImpl : public torch::nn::Cloneable<QuantizedLinearImpl> {
 public:
  /// Quantizes `linear`'s weight and bias. dtype: torch::kInt8 (CPU and CUDA),
  /// torch::kFloat16 (CPU, fp16 weights on FBGEMM), torch::kFloat8_e4m3fn (CUDA, sm_89+).
  QuantizedLinearImpl(const torch::nn::LinearImpl& linear, torch::Dtype dtype = torch::kInt8,
                      QuantizeOptions options = {});
  /// An empty one of this shape (state to be loaded), on `device`.
  QuantizedLinearImpl(int64_t in_features, int64_t out_features, bool with_bias,
                      torch::Dtype dtype = torch::kInt8, QuantizeOptions options = {},
                      torch::Device device = torch::kCPU);
  /// Copies share the int8 weights, not the packed caches: each copy packs its
  /// own on first use (a copy may be moved to another device or reloaded).
  QuantizedLinearImpl(const QuantizedLinearImpl& other) = default;
  QuantizedLinearImpl& operator=(const QuantizedLinearImpl& other) = default;

  /// (Re)creates the buffers at their shapes, zero; the packed copies are rebuilt on use.
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  /// input: [..., in_features] float32 (CPU) or any floating dtype (CUDA);
  /// returns [..., out_features] in the input's dtype. Like torch.ao's dynamic
  /// Linear it is for inference: no gradient flows through it.
  torch::Tensor forward(const torch::Tensor& input);

  /// The engine a CPU batch of `rows` rows (the product of the input's leading
  /// dimensions) runs on with the current intra-op thread count: under
  /// autotune, what its class chose once its 16 timed batches have run, the
  /// fixed rule before (while they run, they alternate between the engines).
  QuantEngine engine_for(int64_t rows) const;
  /// Whether this layer times its engines (QuantizeOptions::autotune under
  /// kAuto, per-row int8 on CPU, with both FBGEMM and oneDNN built in).
  bool autotunes() const;
  /// The largest code of the uint8 inputs (255, or 127 where an engine this
  /// layer may run on could saturate; see int8_activation_qmax). Per-row
  /// layers use one value for every batch, so that the engine a batch size
  /// picks cannot change its bits; per-batch layers use their engine's.
  int64_t activation_qmax(int64_t rows) const;
  /// The weights as float32 (quantization error included).
  torch::Tensor dequantized_weight() const;
  /// Bytes of the state: weight + scale + bias buffers.
  int64_t state_bytes() const;

  int64_t in_features() const { return in_features_; }
  int64_t out_features() const { return out_features_; }
  torch::Dtype dtype() const { return dtype_; }
  const QuantizeOptions& options() const { return options_; }

  /// int8 [out, in] | float16 [out, in] | float8_e4m3fn [out, in].
  torch::Tensor weight;
  /// float32 [out] (per channel) or [1] (per tensor); for float16 weights, [0].
  torch::Tensor scale;
  /// float32 [out], or undefined without bias.
  torch::Tensor bias;

 private:
  struct Packed;
  /// The packed caches of one layer: a copy (constructed or assigned) starts
  /// with empty caches of its own, never sharing the original's.
  class PackedCache {
   public:
    PackedCache();
    PackedCache(const PackedCache& other);
    PackedCache& operator=(const PackedCache& other);
    Packed* operator->() const { return packed_.get(); }
    Packed& operator*() const { return *packed_; }

   private:
    std::shared_ptr<Packed> packed_;
  };
  struct RowWeights;
  torch::Tensor forward_cpu(const torch::Tensor& input);
  std::shared_ptr<const RowWeights> pack_rows(QuantEngine engine) const;
  torch::Tensor forward_rows(const torch::Tensor& input, int64_t rows, QuantEngine engine,
                             const RowWeights& r, const std::vector<int64_t>& out_shape) const;
  QuantEngine fixed_engine_for(int64_t rows) const;
  torch::Tensor forward_cuda(const torch::Tensor& input);

  int64_t in_features_;
  int64_t out_features_;
  bool with_bias_;
  torch::Dtype dtype_;
  QuantizeOptions options_;
  torch::Device device_;
  PackedCache packed_;  // caches of the packed weights, per engine
};
TORCH_MODULE(QuantizedLinear);

/// One replaced layer in QuantizeReport.
struct QuantizedLayer {
  std::string name;  ///< its path in the tree ("0", "encoder.fc1")
  int64_t in_features = 0;
  int64_t out_features = 0;
  int64_t bytes_before = 0;  ///< its weight and bias before, in their dtype
  int64_t bytes_after = 0;   ///< weight, scale and bias after
};

struct QuantizeReport {
  std::vector<QuantizedLayer> layers;
  int64_t model_bytes_before = 0;   ///< every parameter and buffer of the model, before
  int64_t model_bytes_after = 0;    ///< and after
  int64_t linear_bytes_before = 0;  ///< the replaced layers only
  int64_t linear_bytes_after = 0;
  torch::Dtype dtype = torch::kInt8;
  /// A table of the layers and the totals.
  std::string format() const;
};

/// Replaces, in place, every module of the listed types in `module`'s tree
/// (the root included only as a child of nothing: pass a container or a custom
/// module) with its quantized counterpart. Types: typeid(torch::nn::Linear)
/// or typeid(torch::nn::LinearImpl), the only one supported; asking for another
/// type is an error naming it. dtype: torch::kInt8 or torch::kFloat16 on CPU,
/// torch::kInt8 or torch::kFloat8_e4m3fn on CUDA. A module that already holds
/// a QuantizedLinear is refused (quantizing twice would compound the error).
QuantizeReport quantize_dynamic(
    torch::nn::Module& module,
    const std::set<std::type_index>& types = {typeid(torch::nn::LinearImpl)},
    torch::Dtype dtype = torch::kInt8, QuantizeOptions options = {});

/// Bytes of every parameter and buffer in `module`'s tree.
int64_t module_state_bytes(const torch::nn::Module& module);

}  // namespace wick
