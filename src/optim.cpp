#include <wick/optim.h>

#include <torch/optim/serialize.h>

#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_fused_adam.h>
#include <ATen/ops/_fused_adamw.h>

#ifdef WICK_WITH_CUDA
#include <c10/cuda/CUDAGraphsC10Utils.h>
#endif

#include <string>
#include <utility>
#include <vector>

namespace wick {

namespace {

void check_options(const FusedAdamOptions& o, const char* where) {
  TORCH_CHECK(o.lr() >= 0, "FusedAdam: lr must be >= 0, got ", o.lr(), where);
  const auto [beta1, beta2] = o.betas();
  TORCH_CHECK(beta1 >= 0 && beta1 < 1, "FusedAdam: betas[0] must be in [0, 1), got ", beta1, where);
  TORCH_CHECK(beta2 >= 0 && beta2 < 1, "FusedAdam: betas[1] must be in [0, 1), got ", beta2, where);
  TORCH_CHECK(o.eps() >= 0, "FusedAdam: eps must be >= 0, got ", o.eps(), where);
  TORCH_CHECK(o.weight_decay() >= 0, "FusedAdam: weight_decay must be >= 0, got ", o.weight_decay(),
              where);
}

// The tensors of one fused call: parameters of one group on one device with one dtype.
struct Bucket {
  c10::Device device;
  c10::ScalarType dtype;
  std::vector<torch::Tensor> params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps;
};

Bucket& bucket_for(std::vector<Bucket>& buckets, const torch::Tensor& p) {
  for (auto& b : buckets) {
    if (b.device == p.device() && b.dtype == p.scalar_type()) return b;
  }
  buckets.push_back(Bucket{p.device(), p.scalar_type(), {}, {}, {}, {}, {}, {}});
  return buckets.back();
}

// Whether work queued now on `device` is being captured into a CUDA graph
// (then a host value written into a tensor would be baked into the graph).
bool capturing(const c10::Device& device) {
#ifdef WICK_WITH_CUDA
  if (device.is_cuda()) {
    return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  }
#endif
  (void)device;
  return false;
}

}  // namespace

// ---- FusedAdamOptions ----

FusedAdamOptions::FusedAdamOptions(double lr) : lr_(lr) {}

bool operator==(const FusedAdamOptions& lhs, const FusedAdamOptions& rhs) {
  return lhs.lr() == rhs.lr() && lhs.betas() == rhs.betas() && lhs.eps() == rhs.eps() &&
         lhs.weight_decay() == rhs.weight_decay() && lhs.amsgrad() == rhs.amsgrad() &&
         lhs.decoupled_weight_decay() == rhs.decoupled_weight_decay() &&
         lhs.maximize() == rhs.maximize() && lhs.tensor_lr() == rhs.tensor_lr();
}

// The keys torch::optim::AdamOptions writes, plus ours: an Adam checkpoint loads.
void FusedAdamOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(betas);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(amsgrad);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(decoupled_weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(maximize);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(tensor_lr);
}

void FusedAdamOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(betas_t, betas);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, eps);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, amsgrad);
  c10::IValue v;
  if (archive.try_read("decoupled_weight_decay", v)) decoupled_weight_decay(v.toBool());
  if (archive.try_read("maximize", v)) maximize(v.toBool());
  if (archive.try_read("tensor_lr", v)) tensor_lr(v.toBool());
}

double FusedAdamOptions::get_lr() const { return lr(); }

void FusedAdamOptions::set_lr(const double lr) { this->lr(lr); }

// ---- FusedAdamParamState ----

bool operator==(const FusedAdamParamState& lhs, const FusedAdamParamState& rhs) {
  const auto same = [](const torch::Tensor& a, const torch::Tensor& b) {
    return a.defined() == b.defined() && (!a.defined() || torch::equal(a, b));
  };
  return same(lhs.step(), rhs.step()) && same(lhs.exp_avg(), rhs.exp_avg()) &&
         same(lhs.exp_avg_sq(), rhs.exp_avg_sq()) &&
         same(lhs.max_exp_avg_sq(), rhs.max_exp_avg_sq());
}

void FusedAdamParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg_sq);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(max_exp_avg_sq);
}

void FusedAdamParamState::serialize(torch::serialize::InputArchive& archive) {
  c10::IValue v;
  archive.read("step", v);
  if (v.isTensor()) {
    step(v.toTensor());
  } else {
    // torch::optim::AdamParamState keeps the step as an int64.
    step(torch::tensor(static_cast<float>(v.toInt()), torch::kFloat32));
  }
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, exp_avg);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, exp_avg_sq);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, max_exp_avg_sq);
}

// ---- FusedAdam ----

FusedAdam::FusedAdam(const std::vector<torch::optim::OptimizerParamGroup>& param_groups,
                     const FusedAdamOptions& defaults)
    : Optimizer(param_groups, std::make_unique<FusedAdamOptions>(defaults)) {
  check_options(defaults, "");
  for (size_t g = 0; g < param_groups_.size(); ++g) {
    const std::string where = " (parameter group " + std::to_string(g) + ")";
    check_options(static_cast<const FusedAdamOptions&>(param_groups_[g].options()), where.c_str());
    for (size_t i = 0; i < param_groups_[g].params().size(); ++i) {
      const auto& p = param_groups_[g].params()[i];
      TORCH_CHECK(p.is_floating_point(), "FusedAdam: parameters must be floating point, got ",
                  p.scalar_type(), " for parameter ", i, " of group ", g);
    }
  }
}

FusedAdam::FusedAdam(std::vector<torch::Tensor> params, const FusedAdamOptions& defaults)
    : FusedAdam({torch::optim::OptimizerParamGroup(std::move(params))}, defaults) {}

torch::Tensor FusedAdam::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  torch::Tensor loss;
  if (closure != nullptr) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  std::vector<Bucket> buckets;
  for (size_t g = 0; g < param_groups_.size(); ++g) {
    auto& group = param_groups_[g];
    const auto& o = static_cast<const FusedAdamOptions&>(group.options());
    buckets.clear();
    for (size_t i = 0; i < group.params().size(); ++i) {
      auto& p = group.params()[i];
      const auto& grad = p.grad();
      if (!grad.defined()) continue;
      TORCH_CHECK(!grad.is_sparse(),
                  "FusedAdam: sparse gradients are not supported, got one for parameter ", i,
                  " of group ", g);
      auto& slot = state_[p.unsafeGetTensorImpl()];
      if (!slot) {
        auto s = std::make_unique<FusedAdamParamState>();
        s->step(torch::zeros({}, p.options().dtype(torch::kFloat32)));
        s->exp_avg(torch::zeros_like(p, torch::MemoryFormat::Preserve));
        s->exp_avg_sq(torch::zeros_like(p, torch::MemoryFormat::Preserve));
        slot = std::move(s);
      }
      auto& s = static_cast<FusedAdamParamState&>(*slot);
      // Loaded state may sit elsewhere (a checkpoint written on another device).
      if (s.exp_avg().device() != p.device() || s.exp_avg().scalar_type() != p.scalar_type()) {
        s.exp_avg(s.exp_avg().to(p.options()));
        s.exp_avg_sq(s.exp_avg_sq().to(p.options()));
        if (s.max_exp_avg_sq().defined()) s.max_exp_avg_sq(s.max_exp_avg_sq().to(p.options()));
      }
      if (s.step().device() != p.device() || s.step().scalar_type() != torch::kFloat32) {
        s.step(s.step().to(p.device(), torch::kFloat32));
      }
      if (o.amsgrad() && !s.max_exp_avg_sq().defined()) {
        s.max_exp_avg_sq(torch::zeros_like(p, torch::MemoryFormat::Preserve));
      }
      Bucket& b = bucket_for(buckets, p);
      b.params.push_back(p);
      b.grads.push_back(grad);
      b.exp_avgs.push_back(s.exp_avg());
      b.exp_avg_sqs.push_back(s.exp_avg_sq());
      if (o.amsgrad()) b.max_exp_avg_sqs.push_back(s.max_exp_avg_sq());
      b.steps.push_back(s.step());
    }
    const auto [beta1, beta2] = o.betas();
    for (auto& b : buckets) {
      at::_foreach_add_(b.steps, 1);
      if (o.tensor_lr()) {
        auto lr = lr_tensor(g, b.device);
        if (!capturing(b.device)) lr.fill_(o.lr());
        if (o.decoupled_weight_decay()) {
          at::_fused_adamw_(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.max_exp_avg_sqs,
                            b.steps, lr, beta1, beta2, o.weight_decay(), o.eps(), o.amsgrad(),
                            o.maximize());
        } else {
          at::_fused_adam_(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.max_exp_avg_sqs, b.steps,
                           lr, beta1, beta2, o.weight_decay(), o.eps(), o.amsgrad(), o.maximize());
        }
      } else if (o.decoupled_weight_decay()) {
        at::_fused_adamw_(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.max_exp_avg_sqs, b.steps,
                          o.lr(), beta1, beta2, o.weight_decay(), o.eps(), o.amsgrad(),
                          o.maximize());
      } else {
        at::_fused_adam_(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.max_exp_avg_sqs, b.steps,
                         o.lr(), beta1, beta2, o.weight_decay(), o.eps(), o.amsgrad(),
                         o.maximize());
      }
    }
  }
  return loss;
}

torch::Tensor FusedAdam::lr_tensor(size_t group, const c10::Device& device) {
  for (auto& t : lr_tensors_) {
    if (t.group == group && t.device == device) return t.lr;
  }
  const auto& o = static_cast<const FusedAdamOptions&>(param_groups_[group].options());
  TORCH_CHECK(
      !capturing(device), "FusedAdam: the lr tensor of parameter group ", group, " on ", device,
      " is first needed inside a CUDA graph capture; run one step eagerly before capturing");
  auto lr = torch::full({}, o.lr(), torch::TensorOptions(torch::kFloat32).device(device));
  lr_tensors_.push_back(LrTensor{group, device, lr});
  return lr;
}

void FusedAdam::update_lr_tensors() {
  for (auto& t : lr_tensors_) {
    TORCH_CHECK(t.group < param_groups_.size(), "FusedAdam: lr tensor of parameter group ", t.group,
                " but the optimizer has ", param_groups_.size(), " groups");
    const auto& o = static_cast<const FusedAdamOptions&>(param_groups_[t.group].options());
    t.lr.fill_(o.lr());
  }
}

void FusedAdam::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<FusedAdamParamState, FusedAdamOptions>(archive, *this);
}

void FusedAdam::load(torch::serialize::InputArchive& archive) {
  torch::optim::serialize<FusedAdamParamState, FusedAdamOptions>(archive, *this);
}

}  // namespace wick
