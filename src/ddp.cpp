#include "wick/ddp.h"

#include "wick/distributed.h"

#include "data_parallel.h"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

namespace wick {
namespace {

constexpr const char* kName = "DistributedDataParallel";

}  // namespace

struct DistributedDataParallel::Impl {
  struct Param {
    std::string name;
    torch::Tensor tensor;
    std::shared_ptr<torch::autograd::Node> accumulator;  // kept alive so every graph reuses it
    uintptr_t hook_key = 0;
    size_t bucket = 0;
    int64_t offset = 0;
  };
  struct Bucket {
    std::vector<size_t> params;
    torch::Tensor flat;
    size_t pending = 0;
    bool ready = false;
    bool launched = false;
    std::shared_ptr<ProcessGroup::Work> work;
  };

  std::shared_ptr<torch::nn::Module> module;
  std::shared_ptr<ProcessGroup> pg;
  DistributedDataParallelOptions options;
  std::vector<Param> params;  // trainable parameters, in bucket (reverse registration) order
  std::vector<Bucket> buckets;
  std::vector<char> grad_ready;
  size_t next_bucket = 0;
  bool sync = true;
  int64_t launched_this_round = 0;
  DistributedDataParallelStats stats;
  std::mutex mutex;

  bool distributed() const { return pg->world_size() > 1; }

  void build_buckets(const std::vector<std::pair<std::string, torch::Tensor>>& named);
  void register_hooks();
  void remove_hooks() noexcept;
  void on_grad_ready(size_t index);
  void launch_ready_buckets(bool in_backward);
  void launch(size_t b, bool in_backward);
  void wait_launched() noexcept;
  void reset_round();
  void finalize();
};

void DistributedDataParallel::Impl::build_buckets(
    const std::vector<std::pair<std::string, torch::Tensor>>& named) {
  const double cap_bytes = options.bucket_cap_mb() * 1024.0 * 1024.0;
  // Reverse registration order: backward produces the last layers' gradients first.
  for (auto it = named.rbegin(); it != named.rend(); ++it) {
    if (!it->second.requires_grad()) continue;
    Param p;
    p.name = it->first;
    p.tensor = it->second;
    params.push_back(std::move(p));
  }
  double bytes = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& t = params[i].tensor;
    const bool new_bucket =
        buckets.empty() || bytes >= cap_bytes ||
        params[buckets.back().params.front()].tensor.scalar_type() != t.scalar_type() ||
        params[buckets.back().params.front()].tensor.device() != t.device();
    if (new_bucket) {
      buckets.emplace_back();
      bytes = 0;
    }
    auto& b = buckets.back();
    params[i].bucket = buckets.size() - 1;
    params[i].offset = 0;
    for (size_t j : b.params) params[i].offset += params[j].tensor.numel();
    b.params.push_back(i);
    bytes += static_cast<double>(t.numel() * t.element_size());
  }
  for (auto& b : buckets) {
    int64_t numel = 0;
    for (size_t j : b.params) numel += params[j].tensor.numel();
    const auto& first = params[b.params.front()].tensor;
    b.flat = torch::zeros({numel}, first.options().requires_grad(false));
  }
  grad_ready.assign(params.size(), 0);
  stats.num_buckets = static_cast<int64_t>(buckets.size());
  reset_round();
}

void DistributedDataParallel::Impl::register_hooks() {
  for (size_t i = 0; i < params.size(); ++i) {
    auto& p = params[i];
    p.accumulator = torch::autograd::impl::grad_accumulator(p.tensor);
    TORCH_CHECK(p.accumulator != nullptr, kName, ": parameter '", p.name,
                "' has no gradient accumulator (is it a leaf tensor?)");
    p.hook_key =
        p.accumulator->add_post_hook(std::make_unique<detail::GradReadyHook<Impl>>(this, i));
  }
}

void DistributedDataParallel::Impl::remove_hooks() noexcept {
  for (auto& p : params) {
    if (p.accumulator) p.accumulator->del_post_hook(p.hook_key);
  }
}

void DistributedDataParallel::Impl::reset_round() {
  std::fill(grad_ready.begin(), grad_ready.end(), 0);
  for (auto& b : buckets) {
    b.pending = b.params.size();
    b.ready = false;
    b.launched = false;
    b.work.reset();
  }
  next_bucket = 0;
  launched_this_round = 0;
}

void DistributedDataParallel::Impl::on_grad_ready(size_t index) {
  std::lock_guard<std::mutex> lock(mutex);
  if (!sync) return;
  TORCH_CHECK(
      !grad_ready[index], kName, ": parameter '", params[index].name,
      "' received a gradient twice before finalize_backward(); call finalize_backward() after "
      "each backward, and run accumulation micro-batches under no_sync()");
  grad_ready[index] = 1;
  auto& b = buckets[params[index].bucket];
  if (--b.pending == 0) b.ready = true;
  launch_ready_buckets(/*in_backward=*/true);
}

void DistributedDataParallel::Impl::launch_ready_buckets(bool in_backward) {
  // Strictly in bucket order: collectives are matched by their sequence on
  // each rank, so every rank must start the same buckets in the same order.
  while (next_bucket < buckets.size() && buckets[next_bucket].ready) {
    launch(next_bucket, in_backward);
    ++next_bucket;
  }
}

void DistributedDataParallel::Impl::launch(size_t bi, bool in_backward) {
  auto& b = buckets[bi];
  torch::NoGradGuard no_grad;
  for (size_t j : b.params) {
    const auto& p = params[j];
    auto slice = b.flat.narrow(0, p.offset, p.tensor.numel());
    const auto& g = p.tensor.grad();
    if (g.defined()) {
      slice.copy_(g.reshape({-1}));
    } else {
      slice.zero_();
    }
  }
  b.work = pg->allreduce_sum_async(b.flat);
  b.launched = true;
  if (in_backward) {
    ++launched_this_round;
    ++stats.buckets_launched_in_backward;
  } else {
    ++stats.buckets_launched_in_finalize;
  }
}

void DistributedDataParallel::Impl::wait_launched() noexcept {
  for (auto& b : buckets) {
    if (!b.launched || !b.work) continue;
    try {
      b.work->wait();
    } catch (...) {
      // The caller is already reporting an error; a failed wait adds nothing.
    }
  }
}

void DistributedDataParallel::Impl::finalize() {
  std::lock_guard<std::mutex> lock(mutex);
  if (!distributed() || !sync) return;

  // Parameters without a gradient: zeros with find_unused_parameters, else an error.
  for (size_t i = 0; i < params.size(); ++i) {
    if (grad_ready[i]) continue;
    if (!options.find_unused_parameters()) {
      wait_launched();
      reset_round();
      TORCH_CHECK(
          false, kName, ": parameter '", params[i].name,
          "' got no gradient in this backward, so its bucket cannot be reduced; if parts of the "
          "model are unused on purpose, construct with "
          "DistributedDataParallelOptions().find_unused_parameters(true) (and call "
          "finalize_backward() only after a backward)");
    }
    grad_ready[i] = 1;
    auto& b = buckets[params[i].bucket];
    if (--b.pending == 0) b.ready = true;
  }
  launch_ready_buckets(/*in_backward=*/false);
  TORCH_INTERNAL_ASSERT(next_bucket == buckets.size(), kName, ": not every bucket was launched");

  const double world = static_cast<double>(pg->world_size());
  torch::NoGradGuard no_grad;
  for (size_t bi = 0; bi < buckets.size(); ++bi) {
    auto& b = buckets[bi];
    try {
      b.work->wait();
    } catch (...) {
      wait_launched();
      reset_round();
      throw;
    }
    b.flat.div_(world);
    for (size_t j : b.params) {
      auto& p = params[j];
      auto slice = b.flat.narrow(0, p.offset, p.tensor.numel()).view(p.tensor.sizes());
      auto& g = p.tensor.mutable_grad();
      if (g.defined()) {
        g.copy_(slice);
      } else {
        g = slice.clone();
      }
    }
  }
  stats.last_buckets_launched_in_backward = launched_this_round;
  ++stats.synced_steps;
  reset_round();
}

DistributedDataParallel::DistributedDataParallel(std::shared_ptr<torch::nn::Module> module,
                                                 std::shared_ptr<ProcessGroup> pg,
                                                 DistributedDataParallelOptions options)
    : impl_(std::make_unique<Impl>()) {
  TORCH_CHECK(module != nullptr, kName, ": module must not be null");
  TORCH_CHECK(pg != nullptr, kName, ": process group must not be null");
  TORCH_CHECK(options.bucket_cap_mb() > 0, kName, ": bucket_cap_mb must be > 0, got ",
              options.bucket_cap_mb());
  impl_->module = std::move(module);
  impl_->pg = std::move(pg);
  impl_->options = options;

  std::vector<std::pair<std::string, torch::Tensor>> named;
  for (const auto& item : impl_->module->named_parameters(/*recurse=*/true)) {
    named.emplace_back(item.key(), item.value());
  }
  if (impl_->distributed()) {
    detail::check_same_parameters(*impl_->pg, named, kName);
    std::vector<torch::Tensor> state;
    state.reserve(named.size());
    for (const auto& [name, t] : named) state.push_back(t);
    for (const auto& b : impl_->module->buffers(/*recurse=*/true)) state.push_back(b);
    detail::broadcast_coalesced(*impl_->pg, state);
  }
  impl_->build_buckets(named);
  if (impl_->distributed()) impl_->register_hooks();
}

DistributedDataParallel::~DistributedDataParallel() {
  if (impl_) {
    impl_->wait_launched();
    impl_->remove_hooks();
  }
}

DistributedDataParallel::DistributedDataParallel(DistributedDataParallel&&) noexcept = default;
DistributedDataParallel& DistributedDataParallel::operator=(
    DistributedDataParallel&& other) noexcept {
  if (this != &other) {
    if (impl_) {
      impl_->wait_launched();
      impl_->remove_hooks();
    }
    impl_ = std::move(other.impl_);
  }
  return *this;
}

void DistributedDataParallel::prepare_forward() {
  if (!impl_->distributed() || !impl_->options.broadcast_buffers()) return;
  auto buffers = impl_->module->buffers(/*recurse=*/true);
  if (!buffers.empty()) detail::broadcast_coalesced(*impl_->pg, buffers);
}

void DistributedDataParallel::finalize_backward() { impl_->finalize(); }

void DistributedDataParallel::set_sync(bool enabled) {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  impl_->sync = enabled;
}

bool DistributedDataParallel::sync_enabled() const { return impl_->sync; }

const std::shared_ptr<torch::nn::Module>& DistributedDataParallel::module() const {
  return impl_->module;
}
const std::shared_ptr<ProcessGroup>& DistributedDataParallel::process_group() const {
  return impl_->pg;
}
const DistributedDataParallelOptions& DistributedDataParallel::options() const {
  return impl_->options;
}

DistributedDataParallelStats DistributedDataParallel::stats() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->stats;
}

std::vector<std::vector<std::string>> DistributedDataParallel::bucket_parameter_names() const {
  std::vector<std::vector<std::string>> out;
  for (const auto& b : impl_->buckets) {
    out.emplace_back();
    for (size_t j : b.params) out.back().push_back(impl_->params[j].name);
  }
  return out;
}

}  // namespace wick
