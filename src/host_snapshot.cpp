#include "host_snapshot.h"

#include <wick/optim.h>

#include <string>
#include <typeinfo>

namespace wick::detail {

// ---------------------------------------------------------------- HostStaging

torch::Tensor HostStaging::buffer(int64_t nbytes, bool pinned) {
  bytes_ += nbytes;
  torch::Tensor b;
  const auto it = free_.find({nbytes, pinned});
  if (it != free_.end()) {
    b = std::move(it->second);
    free_.erase(it);
  } else {
    b = torch::empty({nbytes}, torch::TensorOptions().dtype(torch::kUInt8).pinned_memory(pinned));
  }
  used_.emplace_back(pinned, b);
  return b;
}

torch::Tensor HostStaging::copy(const torch::Tensor& t) {
  if (!t.defined()) return t;
  const bool plain = t.layout() == torch::kStrided && !t.is_quantized() && !t.is_conj() &&
                     !t.is_neg() && (t.is_cpu() || t.is_cuda()) && t.has_storage();
  if (!plain) {
    // Sparse, quantized, a conjugate or negative view, another device: a
    // whole copy on the host (the archive then holds the copy's layout).
    torch::Tensor c = t.detach().resolve_conj().resolve_neg();
    c = c.is_cpu() ? c.clone() : c.to(torch::kCPU);
    bytes_ += static_cast<int64_t>(c.nbytes());
    if (t.requires_grad()) c.set_requires_grad(true);
    return c;
  }
  const c10::Storage& storage = t.storage();
  const void* key = storage.unsafeGetStorageImpl();
  auto it = memo_.find(key);
  if (it == memo_.end()) {
    const auto nbytes = static_cast<int64_t>(storage.nbytes());
    torch::Tensor host = buffer(nbytes, t.is_cuda());
    if (nbytes > 0) {
      // The whole storage as bytes, as torch's serializer writes it.
      torch::Tensor source =
          torch::empty({0}, t.options().dtype(torch::kUInt8)).set_(storage, 0, {nbytes}, {1});
      host.copy_(source);
    }
    it = memo_.emplace(key, Copied{storage, host}).first;
  }
  torch::Tensor view =
      torch::empty({0}, torch::TensorOptions().dtype(t.scalar_type()))
          .set_(it->second.bytes.storage(), t.storage_offset(), t.sizes(), t.strides());
  if (t.requires_grad()) view.set_requires_grad(true);
  return view;
}

torch::Tensor HostStaging::copy_compact(const torch::Tensor& t) {
  if (!t.defined()) return t;
  TORCH_CHECK(t.layout() == torch::kStrided && (t.is_cpu() || t.is_cuda()),
              "HostStaging: copy_compact needs a dense CPU or CUDA tensor, got ", t.toString());
  const auto nbytes = static_cast<int64_t>(t.numel() * t.element_size());
  torch::Tensor host = buffer(nbytes, t.is_cuda()).view(t.scalar_type()).view(t.sizes());
  host.copy_(t.detach());
  return host;
}

void HostStaging::end_snapshot() {
  memo_.clear();
  free_.clear();  // buffers of the last snapshot this one did not need
}

void HostStaging::recycle() {
  memo_.clear();
  free_.clear();
  bytes_ = 0;
  if (reuse_) {
    for (auto& [pinned, b] : used_) {
      // Reused only when nothing else holds its storage any longer.
      if (b.storage().use_count() == 1) free_.emplace(std::make_pair(b.numel(), pinned), b);
    }
  }
  used_.clear();
}

namespace {

// ---------------------------------------------------------------- modules

struct ModuleTree {
  std::vector<std::pair<std::string, torch::Tensor>> params, buffers;
  std::vector<std::string> child_names;
  std::vector<ModuleTree> children;
};

void capture(ModuleTree& tree, const torch::nn::Module& module, HostStaging& staging) {
  for (const auto& p : module.named_parameters(/*recurse=*/false)) {
    if (p.value().defined()) tree.params.emplace_back(p.key(), staging.copy(p.value().detach()));
  }
  for (const auto& b : module.named_buffers(/*recurse=*/false)) {
    if (b.value().defined()) tree.buffers.emplace_back(b.key(), staging.copy(b.value().detach()));
  }
  for (const auto& child : module.named_children()) {
    tree.child_names.push_back(child.key());
    tree.children.emplace_back();
    capture(tree.children.back(), *child.value(), staging);
  }
}

// The layout of write_module in checkpoint.cpp (torch::nn::Module::save's).
// Each tensor goes in as a fresh alias (detach()), as write_module's do: torch's
// pickler memoizes a tensor that something else also holds, which would
// change the bytes though not the meaning.
void write_tree(torch::serialize::OutputArchive& archive, const ModuleTree& tree) {
  for (const auto& [name, t] : tree.params) archive.write(name, t.detach());
  for (const auto& [name, t] : tree.buffers) archive.write(name, t.detach(), /*is_buffer=*/true);
  for (size_t i = 0; i < tree.children.size(); ++i) {
    torch::serialize::OutputArchive child(archive.compilation_unit());
    write_tree(child, tree.children[i]);
    archive.write(tree.child_names[i], child);
  }
}

class ModuleSnapshot final : public SectionSnapshot {
 public:
  explicit ModuleSnapshot(ModuleTree tree) : tree_(std::move(tree)) {}
  void write(torch::serialize::OutputArchive& archive) const override {
    write_tree(archive, tree_);
  }

 private:
  ModuleTree tree_;
};

// ---------------------------------------------------------------- optimizers

// An optimizer of the live one's exact type over the same parameters (so its
// archive names them by the same keys), with the same options and a copy of
// every parameter's state whose tensors `copy_state` replaced by host copies.
// Saving it writes what the live optimizer's save() wrote at the time of the
// copy. nullptr when an option or state object is not of the expected type.
template <typename Opt, typename Options, typename State, typename CopyState>
std::unique_ptr<torch::optim::Optimizer> freeze(const torch::optim::Optimizer& live,
                                                const CopyState& copy_state) {
  const auto* defaults = dynamic_cast<const Options*>(&live.defaults());
  if (defaults == nullptr) return nullptr;
  for (const auto& group : live.param_groups()) {
    if (!group.has_options() || dynamic_cast<const Options*>(&group.options()) == nullptr) {
      return nullptr;
    }
  }
  for (const auto& item : live.state()) {
    if (!item.second || dynamic_cast<const State*>(item.second.get()) == nullptr) return nullptr;
  }
  auto frozen = std::make_unique<Opt>(live.param_groups(), *defaults);
  auto& state = frozen->state();
  state.clear();  // what the constructor made (Adagrad's initial sums)
  // The same bucket count and insertion order give the same iteration order,
  // so the archive lists the states in the live optimizer's order.
  state.rehash(live.state().bucket_count());
  for (const auto& item : live.state()) {
    auto copy = std::make_unique<State>(static_cast<const State&>(*item.second));
    copy_state(*copy);
    state.emplace(item.first, std::move(copy));
  }
  return frozen;
}

class OptimizerSnapshot final : public SectionSnapshot {
 public:
  explicit OptimizerSnapshot(std::unique_ptr<torch::optim::Optimizer> frozen)
      : frozen_(std::move(frozen)) {}
  void write(torch::serialize::OutputArchive& archive) const override { frozen_->save(archive); }

 private:
  std::unique_ptr<torch::optim::Optimizer> frozen_;
};

}  // namespace

std::shared_ptr<const SectionSnapshot> snapshot_module(const torch::nn::Module& module,
                                                       HostStaging& staging) {
  ModuleTree tree;
  capture(tree, module, staging);
  staging.end_section();
  return std::make_shared<ModuleSnapshot>(std::move(tree));
}

std::shared_ptr<const SectionSnapshot> snapshot_optimizer(const torch::optim::Optimizer& optimizer,
                                                          HostStaging& staging) {
  namespace optim = torch::optim;
  const auto c = [&staging](const torch::Tensor& t) { return staging.copy(t); };
  const std::type_info& type = typeid(optimizer);
  std::unique_ptr<optim::Optimizer> frozen;
  if (type == typeid(optim::Adam)) {
    frozen = freeze<optim::Adam, optim::AdamOptions, optim::AdamParamState>(
        optimizer, [&](optim::AdamParamState& s) {
          s.exp_avg(c(s.exp_avg()));
          s.exp_avg_sq(c(s.exp_avg_sq()));
          s.max_exp_avg_sq(c(s.max_exp_avg_sq()));
        });
  } else if (type == typeid(optim::AdamW)) {
    frozen = freeze<optim::AdamW, optim::AdamWOptions, optim::AdamWParamState>(
        optimizer, [&](optim::AdamWParamState& s) {
          s.exp_avg(c(s.exp_avg()));
          s.exp_avg_sq(c(s.exp_avg_sq()));
          s.max_exp_avg_sq(c(s.max_exp_avg_sq()));
        });
  } else if (type == typeid(FusedAdam)) {
    frozen = freeze<FusedAdam, FusedAdamOptions, FusedAdamParamState>(
        optimizer, [&](FusedAdamParamState& s) {
          s.step(c(s.step()));
          s.exp_avg(c(s.exp_avg()));
          s.exp_avg_sq(c(s.exp_avg_sq()));
          s.max_exp_avg_sq(c(s.max_exp_avg_sq()));
        });
  } else if (type == typeid(optim::SGD)) {
    frozen = freeze<optim::SGD, optim::SGDOptions, optim::SGDParamState>(
        optimizer, [&](optim::SGDParamState& s) { s.momentum_buffer(c(s.momentum_buffer())); });
  } else if (type == typeid(optim::RMSprop)) {
    frozen = freeze<optim::RMSprop, optim::RMSpropOptions, optim::RMSpropParamState>(
        optimizer, [&](optim::RMSpropParamState& s) {
          s.square_avg(c(s.square_avg()));
          s.momentum_buffer(c(s.momentum_buffer()));
          s.grad_avg(c(s.grad_avg()));
        });
  } else if (type == typeid(optim::Adagrad)) {
    frozen = freeze<optim::Adagrad, optim::AdagradOptions, optim::AdagradParamState>(
        optimizer, [&](optim::AdagradParamState& s) { s.sum(c(s.sum())); });
  }
  staging.end_section();
  if (!frozen) return nullptr;
  return std::make_shared<OptimizerSnapshot>(std::move(frozen));
}

}  // namespace wick::detail
