#include "linear_swap.h"

#include <ATen/OpaqueTensorImpl.h>
#include <torch/library.h>

namespace wick::detail {
namespace {

// -------------------------------------------------- redirected Linear members
//
// A custom module's `torch::nn::Linear fc` member keeps pointing at the old
// LinearImpl after the tree holds the replacement. LinearImpl::forward calls
// torch::nn::functional::linear (inline code, see redirected_linear), so the
// old module's weight becomes an opaque tensor on the PrivateUse3 dispatch
// key whose t() and matmul() (and linear()) run the replacement; every other
// operation on it fails with an explanation.

struct Redirect {
  std::function<at::Tensor(const at::Tensor&)> forward;
  std::shared_ptr<torch::nn::Module> keep_alive;
  std::string name;         // the layer's path
  std::string replaced_by;  // the new module's type
  bool transposed = false;  // the handle that weight.t() returns
};

// Without ADInplaceOrView: t() on it must reach the kernel below even under
// InferenceMode, where that key would try to make the result a tracked view.
struct RedirectImpl : at::OpaqueTensorImpl<std::shared_ptr<Redirect>> {
  RedirectImpl(std::shared_ptr<Redirect> handle, const caffe2::TypeMeta dtype, c10::Device device,
               c10::IntArrayRef sizes)
      : at::OpaqueTensorImpl<std::shared_ptr<Redirect>>(
            c10::DispatchKeySet(c10::DispatchKey::PrivateUse3), dtype, device, std::move(handle),
            sizes) {
    key_set_ = key_set_.remove(c10::DispatchKey::ADInplaceOrView);
  }
};

at::Tensor make_redirect(std::shared_ptr<Redirect> handle, const at::Tensor& like) {
  return at::detail::make_tensor<RedirectImpl>(std::move(handle), like.dtype(), like.device(),
                                               like.sizes());
}

const Redirect& redirect_of(const at::Tensor& t) {
  auto* impl = dynamic_cast<RedirectImpl*>(t.unsafeGetTensorImpl());
  TORCH_CHECK(
      impl != nullptr,
      "wick: a PrivateUse3 tensor that is not one of wick's redirected Linear weights reached its "
      "kernels (does another library use the PrivateUse3 dispatch key?)");
  return *impl->opaque_handle();
}

// torch::nn::functional::linear is linear(x, W, b) in ATen but, in the C++
// frontend, x.matmul(W.t()) (+ b) or addmm(b, x, W.t()); the old module's bias
// is undefined, so its forward reaches linear() or matmul(x, W.t()).
at::Tensor redirected_linear(const at::Tensor& input, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias) {
  const Redirect& r = redirect_of(weight);
  TORCH_CHECK(!r.transposed, "wick: linear() got the transposed weight of replaced Linear '",
              r.name, "'");
  TORCH_CHECK(!bias.has_value() || !bias->defined(), "wick: Linear '", r.name,
              "' was replaced by a ", r.replaced_by,
              "; its bias lives there and cannot be passed again");
  return r.forward(input);
}

at::Tensor redirected_t(const at::Tensor& weight) {
  const Redirect& r = redirect_of(weight);
  auto handle = std::make_shared<Redirect>(r);
  handle->transposed = !r.transposed;
  std::vector<int64_t> sizes(weight.sizes().rbegin(), weight.sizes().rend());
  return at::detail::make_tensor<RedirectImpl>(handle, weight.dtype(), weight.device(), sizes);
}

at::Tensor redirected_matmul(const at::Tensor& input, const at::Tensor& other) {
  const Redirect& r = redirect_of(other);
  TORCH_CHECK(r.transposed && dynamic_cast<RedirectImpl*>(input.unsafeGetTensorImpl()) == nullptr,
              "wick: matmul() with the weight of replaced Linear '", r.name,
              "' is only supported as x.matmul(weight.t()), what LinearImpl::forward does");
  return r.forward(input);
}

void redirect_fallback(const c10::OperatorHandle& op, torch::jit::Stack* /*stack*/) {
  TORCH_CHECK(
      false,
      "wick replaced this torch::nn::Linear by another module (the module tree holds the new "
      "one); the old module's weight only supports linear(), which runs the new module, not '",
      op.schema().name(), "'. Use the module from the tree (named_children()).");
}

TORCH_LIBRARY_IMPL(aten, PrivateUse3, m) {
  m.impl("linear", TORCH_FN(redirected_linear));
  m.impl("t", TORCH_FN(redirected_t));
  m.impl("matmul", TORCH_FN(redirected_matmul));
}
TORCH_LIBRARY_IMPL(aten, AutogradPrivateUse3, m) {
  m.impl("linear", TORCH_FN(redirected_linear));
  m.impl("t", TORCH_FN(redirected_t));
  m.impl("matmul", TORCH_FN(redirected_matmul));
}
TORCH_LIBRARY_IMPL(_, PrivateUse3, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&redirect_fallback>());
}

// ---------------------------------------------------------------- swapping

int64_t bytes_of(const at::Tensor& t) {
  return t.defined() ? t.numel() * static_cast<int64_t>(t.element_size()) : 0;
}

struct Done {
  SwappedLinear swapped;
  LinearReplacement replacement;
};

// Swaps the child `key` of `parent`, in the container's own list as well as
// in the registered children.
void replace_child(torch::nn::Module& parent, const std::string& key,
                   const std::shared_ptr<torch::nn::Module>& old_child,
                   const LinearReplacement& r) {
  if (auto* seq = dynamic_cast<torch::nn::SequentialImpl*>(&parent)) {
    // Every entry: a Linear registered twice is swapped at its first key.
    for (auto& any : *seq) {
      if (any.ptr() == old_child) any = r.any;
    }
    parent.replace_module(key, r.module);
  } else if (auto* list = dynamic_cast<torch::nn::ModuleListImpl*>(&parent)) {
    for (auto& entry : *list) {
      if (entry == old_child) entry = r.module;
    }
    parent.replace_module(key, r.module);
  } else if (auto* dict = dynamic_cast<torch::nn::ModuleDictImpl*>(&parent)) {
    dict->update(
        std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>>{{key, r.module}});
  } else {
    parent.replace_module(key, r.module);
  }
}

void swap_tree(torch::nn::Module& module, const std::string& prefix, const MakeReplacement& make,
               const SelectLinear& select, const std::string& who, std::vector<Done>& done) {
  // Copy the list: replacing children while iterating them would invalidate it.
  const auto children = module.named_children();
  for (const auto& child : children) {
    const std::string path = prefix.empty() ? child.key() : prefix + "." + child.key();
    auto linear = std::dynamic_pointer_cast<torch::nn::LinearImpl>(child.value());
    if (!linear) {
      swap_tree(*child.value(), path, make, select, who, done);
      continue;
    }
    const Done* previous = nullptr;  // the same Linear registered twice: replaced once
    for (const auto& d : done) {
      if (d.swapped.old_module == linear) previous = &d;
    }
    if (previous != nullptr) {
      replace_child(module, child.key(), linear, previous->replacement);
      continue;
    }
    if (select && !select(path, *linear)) continue;
    LinearReplacement r;
    try {
      r = make(path, *linear);
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, who, ": cannot replace '", path, "': ", e.what_without_backtrace());
    }
    replace_child(module, child.key(), linear, r);
    done.push_back(
        {SwappedLinear{path, linear, r.module, bytes_of(linear->weight) + bytes_of(linear->bias)},
         r});
  }
}

}  // namespace

std::vector<SwappedLinear> swap_linears(torch::nn::Module& root, const MakeReplacement& make,
                                        const SelectLinear& select, const std::string& who) {
  std::vector<Done> done;
  swap_tree(root, "", make, select, who, done);
  std::vector<SwappedLinear> out;
  torch::NoGradGuard no_grad;
  for (auto& d : done) {
    // Retire the old module: free its weights and point whoever still holds
    // it (a custom module's member) at the replacement.
    auto& old = *d.swapped.old_module;
    auto handle =
        std::make_shared<Redirect>(Redirect{d.replacement.forward, d.replacement.module,
                                            d.swapped.path, d.replacement.module->name(), false});
    const at::Tensor like = old.weight;
    at::Tensor redirect = make_redirect(handle, like);
    old.weight.set_data(torch::empty({0}, like.options()));
    if (old.bias.defined()) old.bias.set_data(torch::empty({0}, old.bias.options()));
    old.weight = redirect;
    old.bias = at::Tensor();
    out.push_back(std::move(d.swapped));
  }
  return out;
}

}  // namespace wick::detail
