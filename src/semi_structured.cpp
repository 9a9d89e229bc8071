#include <wick/pruner.h>

#include "linear_swap.h"

#include <ostream>

namespace wick {
namespace {

std::string why_not_convertible(const torch::nn::LinearImpl& linear) {
  const auto& w = linear.weight;
  if (!w.is_cuda())
    return c10::str("its weight is on ", w.device(), "; semi-structured sparse kernels need CUDA");
  if (w.scalar_type() != torch::kHalf && w.scalar_type() != torch::kBFloat16) {
    return c10::str("its weight is ", w.scalar_type(),
                    "; cuSPARSELt's 2:4 kernels take float16 or bfloat16");
  }
  if (w.size(0) % 16 != 0 || w.size(1) % 16 != 0) {
    return c10::str("its weight is ", w.sizes(), "; both dimensions must be multiples of 16");
  }
  return "";
}

}  // namespace

bool follows_24_pattern(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "follows_24_pattern: weight must be 2-D, got ", weight.sizes());
  if (weight.size(1) % 4 != 0) return false;
  torch::NoGradGuard no_grad;
  auto nonzero = weight.detach().ne(0).reshape({weight.size(0), weight.size(1) / 4, 4}).sum(2);
  return nonzero.le(2).all().item<bool>();
}

SemiStructuredLinearImpl::SemiStructuredLinearImpl(const torch::nn::LinearImpl& linear)
    : in_features_(linear.options.in_features()),
      out_features_(linear.options.out_features()),
      with_bias_(linear.options.bias()),
      dtype_(linear.weight.scalar_type()),
      device_(linear.weight.device()) {
  const std::string why = why_not_convertible(linear);
  TORCH_CHECK(why.empty(), "SemiStructuredLinear: ", why);
  TORCH_CHECK(
      follows_24_pattern(linear.weight),
      "SemiStructuredLinear: the weight does not keep at most 2 of every 4 entries along its input "
      "dimension; prune it with Pruner::semi_structured_24 first");
  torch::NoGradGuard no_grad;
  const at::Tensor compressed = at::_cslt_compress(linear.weight.detach().contiguous());
  packed_numel_ = compressed.numel();
  reset();
  packed.copy_(compressed.reshape({-1}));
  if (with_bias_) bias.copy_(linear.bias.detach());
}

void SemiStructuredLinearImpl::reset() {
  auto on = torch::TensorOptions().device(device_).dtype(dtype_);
  packed = register_buffer("packed", torch::zeros({packed_numel_}, on));
  bias = with_bias_ ? register_buffer("bias", torch::zeros({out_features_}, on)) : at::Tensor();
}

void SemiStructuredLinearImpl::pretty_print(std::ostream& stream) const {
  stream << "wick::SemiStructuredLinear(in_features=" << in_features_
         << ", out_features=" << out_features_ << ", bias=" << (with_bias_ ? "true" : "false")
         << ", dtype=" << dtype_ << ", 2:4)";
}

torch::Tensor SemiStructuredLinearImpl::forward(const torch::Tensor& input) {
  TORCH_CHECK(input.defined() && input.dim() >= 1 && input.size(-1) == in_features_,
              "SemiStructuredLinear: input's last dimension must be ", in_features_, ", got shape ",
              input.defined() ? input.sizes() : c10::IntArrayRef{});
  TORCH_CHECK(input.device() == packed.device() && input.scalar_type() == dtype_,
              "SemiStructuredLinear: input must be ", dtype_, " on ", packed.device(), ", got ",
              input.scalar_type(), " on ", input.device());
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = out_features_;
  at::Tensor x = input.reshape({-1, in_features_});
  const int64_t rows = x.size(0);
  if (rows == 0) return torch::zeros(out_shape, input.options());
  // cuSPARSELt takes dense operands whose dimensions are multiples of 8.
  const int64_t pad = (8 - rows % 8) % 8;
  if (pad) x = torch::cat({x, torch::zeros({pad, in_features_}, x.options())});
  // W (sparse, [out, in]) @ x^T ([in, rows]) = y^T.
  at::Tensor yt = at::_cslt_sparse_mm(
      packed, x.t(), bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt, std::nullopt,
      std::nullopt, /*transpose_result=*/false, /*alg_id=*/0,
      /*split_k=*/1, /*split_k_mode=*/-1);
  return yt.t().narrow(0, 0, rows).reshape(out_shape);
}

std::vector<std::string> to_semi_structured(torch::nn::Module& module) {
  // Check first, so a refusal leaves the model as it was.
  int64_t matching = 0;
  for (const auto& item : module.named_modules("", /*include_self=*/false)) {
    auto linear = std::dynamic_pointer_cast<torch::nn::LinearImpl>(item.value());
    if (!linear || !follows_24_pattern(linear->weight)) continue;
    const std::string why = why_not_convertible(*linear);
    TORCH_CHECK(why.empty(), "to_semi_structured: '", item.key(), "' follows the 2:4 pattern but ",
                why);
    ++matching;
  }
  TORCH_CHECK(matching > 0,
              "to_semi_structured: no torch::nn::Linear weight follows the 2:4 pattern (at most 2 "
              "nonzeros in "
              "every 4 along the input dimension); prune with Pruner::semi_structured_24 first");
  const auto swapped = detail::swap_linears(
      module,
      [](const std::string& /*path*/, torch::nn::LinearImpl& linear) {
        auto s = std::make_shared<SemiStructuredLinearImpl>(linear);
        return detail::LinearReplacement{s, torch::nn::AnyModule(s),
                                         [s](const at::Tensor& x) { return s->forward(x); }};
      },
      [](const std::string& /*path*/, const torch::nn::LinearImpl& linear) {
        return follows_24_pattern(linear.weight);
      },
      "to_semi_structured");
  std::vector<std::string> paths;
  paths.reserve(swapped.size());
  for (const auto& s : swapped) paths.push_back(s.path);
  return paths;
}

}  // namespace wick
