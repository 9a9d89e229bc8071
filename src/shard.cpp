#include "wick/shard.h"

#include "wick/distributed.h"
#include "wick/optim.h"

#include "data_parallel.h"
#include "shard_impl.h"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <exception>
#include <map>
#include <mutex>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

namespace wick {
namespace {

constexpr const char* kSdpName = "ShardedDataParallel";

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t storage_bytes(const torch::Tensor& t) { return static_cast<int64_t>(t.storage().nbytes()); }

// A unit's unsharded flat tensor keeps one StorageImpl for its whole life:
// the module's parameters, and the views of them that autograd saves during
// forward, point into it. At rest its memory is released and the storage is
// empty; gathering allocates it again in place, so those saved views read the
// gathered values in backward.
void release_storage(const torch::Tensor& t) {
  auto* impl = t.storage().unsafeGetStorageImpl();
  impl->set_data_ptr_noswap(at::DataPtr(nullptr, t.device()));
  impl->set_nbytes(0);
}

void allocate_storage(const torch::Tensor& t) {
  auto* impl = t.storage().unsafeGetStorageImpl();
  const auto nbytes = static_cast<size_t>(t.numel()) * t.element_size();
  if (impl->nbytes() == nbytes) return;
  TORCH_INTERNAL_ASSERT(impl->allocator() != nullptr, kSdpName, ": a flat unit has no allocator");
  impl->set_data_ptr_noswap(impl->allocator()->allocate(nbytes));
  impl->set_nbytes(nbytes);
}

struct UnitRegistry {
  std::mutex mutex;
  std::unordered_map<const torch::nn::Module*,
                     std::pair<std::weak_ptr<ShardedDataParallel::Impl>, size_t>>
      units;
};

UnitRegistry& registry() {
  static auto* r = new UnitRegistry();  // never destroyed: unit_call may run at exit
  return *r;
}

}  // namespace

std::string to_string(ShardingStrategy strategy) {
  switch (strategy) {
    case ShardingStrategy::kZero1:
      return "zero1";
    case ShardingStrategy::kZero2:
      return "zero2";
    case ShardingStrategy::kFull:
      return "full";
  }
  return "?";
}

ShardingStrategy parse_sharding_strategy(const std::string& text) {
  std::string t;
  for (char c : text) {
    if (c != '-' && c != '_') t += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  }
  if (t == "zero1") return ShardingStrategy::kZero1;
  if (t == "zero2") return ShardingStrategy::kZero2;
  if (t == "full" || t == "fsdp" || t == "zero3") return ShardingStrategy::kFull;
  TORCH_CHECK(false, "unknown sharding strategy '", text, "' (expected zero1, zero2 or full)");
}

int64_t optimizer_state_bytes(const torch::optim::Optimizer& optimizer) {
  namespace optim = torch::optim;
  std::unordered_set<const void*> seen;
  int64_t bytes = 0;
  const auto count = [&](const torch::Tensor& t) {
    if (!t.defined()) return;
    if (seen.insert(t.storage().unsafeGetStorageImpl()).second) bytes += storage_bytes(t);
  };
  for (const auto& [key, state] : optimizer.state()) {
    const auto* s = state.get();
    if (const auto* a = dynamic_cast<const optim::AdamParamState*>(s)) {
      for (const auto& t : {a->exp_avg(), a->exp_avg_sq(), a->max_exp_avg_sq()}) count(t);
    } else if (const auto* w = dynamic_cast<const optim::AdamWParamState*>(s)) {
      for (const auto& t : {w->exp_avg(), w->exp_avg_sq(), w->max_exp_avg_sq()}) count(t);
    } else if (const auto* f = dynamic_cast<const FusedAdamParamState*>(s)) {
      for (const auto& t : {f->step(), f->exp_avg(), f->exp_avg_sq(), f->max_exp_avg_sq()})
        count(t);
    } else if (const auto* m = dynamic_cast<const optim::SGDParamState*>(s)) {
      count(m->momentum_buffer());
    } else if (const auto* r = dynamic_cast<const optim::RMSpropParamState*>(s)) {
      for (const auto& t : {r->square_avg(), r->momentum_buffer(), r->grad_avg()}) count(t);
    } else if (const auto* g = dynamic_cast<const optim::AdagradParamState*>(s)) {
      count(g->sum());
    } else {
      // Another optimizer's state: what its archive takes.
      torch::serialize::OutputArchive archive;
      state->serialize(archive);
      std::ostringstream out;
      archive.save_to(out);
      bytes += static_cast<int64_t>(out.str().size());
    }
  }
  return bytes;
}

// ---------------------------------------------------------------------------
// Construction

std::vector<std::vector<size_t>> ShardedDataParallel::Impl::plan_units(
    const std::vector<std::pair<std::string, torch::Tensor>>& trainable) {
  std::vector<std::vector<size_t>> plan;
  if (!full()) {
    // Buckets in reverse registration order, as DDP: backward produces the
    // last layers' gradients first.
    const double cap = options.bucket_cap_mb() * 1024.0 * 1024.0;
    double bytes = 0;
    for (size_t k = trainable.size(); k-- > 0;) {
      const auto& t = trainable[k].second;
      const bool new_bucket =
          plan.empty() || bytes >= cap ||
          trainable[plan.back().front()].second.scalar_type() != t.scalar_type() ||
          trainable[plan.back().front()].second.device() != t.device();
      if (new_bucket) {
        plan.emplace_back();
        bytes = 0;
      }
      plan.back().push_back(k);
      bytes += static_cast<double>(t.numel() * t.element_size());
    }
    for (auto& b : plan) std::reverse(b.begin(), b.end());
    for (size_t b = 0; b < plan.size(); ++b) {
      units.emplace_back();
      units.back().name = "bucket " + std::to_string(b);
    }
    return plan;
  }

  // Full sharding: one unit per marked module, the rest in the root.
  std::unordered_map<const torch::nn::Module*, std::string> module_names;
  for (const auto& item : module->named_modules("", /*include_self=*/true)) {
    module_names[item.value().get()] = item.key().empty() ? "<the module>" : item.key();
  }
  std::unordered_map<const c10::TensorImpl*, size_t> unit_of;
  for (const auto& m : options.units()) {
    TORCH_CHECK(m != nullptr, kSdpName, ": a unit is null");
    auto found = module_names.find(m.get());
    TORCH_CHECK(found != module_names.end(), kSdpName,
                ": a unit is not a submodule of the module (units must be modules inside it)");
    for (const auto& u : units) {
      TORCH_CHECK(u.module != m.get(), kSdpName, ": unit '", found->second, "' is listed twice");
    }
    Unit unit;
    unit.name = found->second;
    unit.module = m.get();
    const size_t index = units.size();
    for (const auto& item : m->named_parameters(/*recurse=*/true)) {
      const auto* impl = item.value().unsafeGetTensorImpl();
      auto [it, inserted] = unit_of.emplace(impl, index);
      TORCH_CHECK(inserted, kSdpName, ": units '", units[it->second].name, "' and '", unit.name,
                  "' share parameters (units may not nest or overlap)");
    }
    units.push_back(std::move(unit));
  }
  plan.resize(units.size());
  std::vector<size_t> rest;
  for (size_t k = 0; k < trainable.size(); ++k) {
    auto it = unit_of.find(trainable[k].second.unsafeGetTensorImpl());
    if (it == unit_of.end()) {
      rest.push_back(k);
    } else {
      plan[it->second].push_back(k);
    }
  }
  if (!rest.empty()) {
    root = units.size();
    units.emplace_back();
    units.back().name = "root";
    plan.push_back(std::move(rest));
  }
  for (size_t u = 0; u < plan.size(); ++u) {
    TORCH_CHECK(!plan[u].empty(), kSdpName, ": unit '", units[u].name,
                "' has no trainable parameter");
    const auto& first = trainable[plan[u].front()];
    for (size_t k : plan[u]) {
      const auto& [name, t] = trainable[k];
      TORCH_CHECK(
          t.scalar_type() == first.second.scalar_type() && t.device() == first.second.device(),
          kSdpName, ": unit '", units[u].name, "' mixes parameters of different dtypes or ",
          "devices ('", first.first, "' is ", first.second.scalar_type(), " on ",
          first.second.device(), ", '", name, "' is ", t.scalar_type(), " on ", t.device(),
          "); a unit is one flat tensor");
    }
  }
  return plan;
}

void ShardedDataParallel::Impl::make_unit(Unit& unit) {
  torch::NoGradGuard no_grad;
  const auto& first = params[unit.params.front()].tensor;
  // Parameters sorted by optimizer group: each group's elements are one
  // range of the flat tensor, so a rank's shard holds one piece per group.
  std::stable_sort(unit.params.begin(), unit.params.end(),
                   [&](size_t a, size_t b) { return params[a].group < params[b].group; });
  for (size_t i : unit.params) {
    params[i].offset = unit.numel;
    unit.numel += params[i].numel;
  }
  unit.padded = ceil_div(unit.numel, world()) * world();
  unit.shard_numel = unit.padded / world();
  unit.full = torch::zeros({unit.padded}, first.options().requires_grad(false));
  for (size_t i : unit.params) {
    auto& p = params[i];
    p.view = unit.full.narrow(0, p.offset, p.numel).view(p.shape);
    p.view.copy_(p.tensor.detach());
    p.empty = torch::empty({0}, first.options().requires_grad(false));
    // The parameter keeps its identity (module, autograd); its data becomes
    // a view of the flat tensor, and its own storage is freed.
    p.tensor.set_data(p.view);
  }
  // Rank 0's values everywhere.
  if (world() > 1) pg->broadcast({unit.full}, 0);
  unit.gathered = true;
  account(storage_bytes(unit.full));
  const int64_t begin = rank() * unit.shard_numel;
  // ZeRO keeps every parameter whole, so its master shard is its slice of
  // the flat tensor (the all-gather then reads it in place); full sharding
  // frees the flat tensor at rest, so its shard is a copy.
  unit.shard = full() ? unit.full.narrow(0, begin, unit.shard_numel).clone()
                      : unit.full.narrow(0, begin, unit.shard_numel);
  unit.shard_version = static_cast<int64_t>(unit.shard._version());
  // Pieces: the intersection of this rank's range with each group's range.
  for (size_t i : unit.params) {
    const auto& p = params[i];
    const int64_t lo = std::max(begin, p.offset);
    const int64_t hi = std::min(begin + unit.shard_numel, p.offset + p.numel);
    if (hi <= lo) continue;
    if (!unit.pieces.empty() && unit.pieces.back().group == p.group &&
        unit.pieces.back().offset + unit.pieces.back().numel == lo - begin) {
      unit.pieces.back().numel += hi - lo;
    } else {
      unit.pieces.push_back(Piece{p.group, lo - begin, hi - lo, {}});
    }
  }
  for (auto& piece : unit.pieces) {
    piece.tensor = unit.shard.narrow(0, piece.offset, piece.numel).detach();
    piece.tensor.set_requires_grad(true);
  }
}

void ShardedDataParallel::Impl::build(
    const std::vector<std::pair<std::string, torch::Tensor>>& named, torch::optim::Optimizer& opt) {
  TORCH_CHECK(dynamic_cast<torch::optim::LBFGS*>(&opt) == nullptr, kSdpName,
              ": LBFGS is not elementwise (its steps use dot products over all parameters), so "
              "it cannot step shards; use SGD, Adam, AdamW, FusedAdam, RMSprop or Adagrad");
  TORCH_CHECK(opt.state().empty(), kSdpName,
              ": the optimizer already has state (it has stepped or loaded a checkpoint); "
              "construct ShardedDataParallel before the first step, and load checkpoints after");
  std::unordered_map<const c10::TensorImpl*, size_t> group_of;
  for (size_t g = 0; g < opt.param_groups().size(); ++g) {
    for (const auto& t : opt.param_groups()[g].params()) {
      TORCH_CHECK(group_of.emplace(t.unsafeGetTensorImpl(), g).second, kSdpName,
                  ": a tensor of shape ", t.sizes(), " is in the optimizer twice");
    }
  }
  std::vector<std::pair<std::string, torch::Tensor>> trainable;
  std::vector<size_t> groups;
  for (const auto& [name, t] : named) {
    if (!t.requires_grad()) continue;
    auto it = group_of.find(t.unsafeGetTensorImpl());
    TORCH_CHECK(it != group_of.end(), kSdpName, ": parameter '", name,
                "' is trainable but not in the optimizer; give it to the optimizer, or freeze it "
                "(requires_grad false) to keep it whole on every rank");
    trainable.emplace_back(name, t);
    groups.push_back(it->second);
  }
  if (group_of.size() != trainable.size()) {
    std::unordered_set<const c10::TensorImpl*> mine;
    for (const auto& [name, t] : trainable) mine.insert(t.unsafeGetTensorImpl());
    for (size_t g = 0; g < opt.param_groups().size(); ++g) {
      for (const auto& t : opt.param_groups()[g].params()) {
        TORCH_CHECK(mine.count(t.unsafeGetTensorImpl()) != 0, kSdpName,
                    ": the optimizer's parameter group ", g, " holds a tensor of shape ", t.sizes(),
                    " that is not a trainable parameter of the module");
      }
    }
  }
  TORCH_CHECK(!trainable.empty(), kSdpName, ": the module has no trainable parameter");
  for (const auto& [name, t] : trainable) {
    TORCH_CHECK(t.is_floating_point(), kSdpName, ": parameter '", name, "' is ", t.scalar_type(),
                "; only floating-point parameters are sharded");
  }

  const auto plan = plan_units(trainable);
  params.resize(trainable.size());
  for (size_t k = 0; k < trainable.size(); ++k) {
    auto& p = params[k];
    p.name = trainable[k].first;
    p.tensor = trainable[k].second;
    p.shape = p.tensor.sizes().vec();
    p.numel = p.tensor.numel();
    p.group = groups[k];
  }
  for (size_t u = 0; u < plan.size(); ++u) {
    units[u].params = plan[u];
    for (size_t k : plan[u]) params[k].unit = u;
  }
  // One unit at a time, and (kFull) released before the next is built: the
  // peak is the module plus one unit, not two copies of the module.
  for (size_t u = 0; u < units.size(); ++u) {
    make_unit(units[u]);
    // The gradient accumulators are made while the parameters have their
    // shapes: their input metadata must be the parameter's, not the empty
    // tensor's a released unit leaves.
    for (size_t k : units[u].params) {
      auto& p = params[k];
      p.accumulator = torch::autograd::impl::grad_accumulator(p.tensor);
      TORCH_CHECK(p.accumulator != nullptr, kSdpName, ": parameter '", p.name,
                  "' has no gradient accumulator (is it a leaf tensor?)");
    }
    if (full()) release(u);
  }
  grad_ready.assign(params.size(), 0);
  rewire(opt);
  register_hooks();

  stats.rank = rank();
  stats.world_size = world();
  stats.num_units = static_cast<int64_t>(units.size());
  for (const auto& u : units) {
    stats.param_numel += u.numel;
    stats.shard_numel += u.shard_numel;
    stats.padding_numel +=
        std::max<int64_t>(0, std::min(u.shard_numel, (rank() + 1) * u.shard_numel - u.numel));
    stats.shard_bytes += u.shard.numel() * static_cast<int64_t>(u.shard.element_size());
  }
  reset_round();
}

void ShardedDataParallel::Impl::rewire(torch::optim::Optimizer& opt) {
  optimizer = &opt;
  auto& groups = opt.param_groups();
  for (auto& g : groups) g.params().clear();
  for (const auto& u : units) {
    for (const auto& piece : u.pieces) groups[piece.group].params().push_back(piece.tensor);
  }
}

void ShardedDataParallel::Impl::register_hooks() {
  for (size_t i = 0; i < params.size(); ++i) {
    params[i].hook_key = params[i].accumulator->add_post_hook(
        std::make_unique<detail::GradReadyHook<Impl>>(this, i));
  }
}

void ShardedDataParallel::Impl::remove_hooks() noexcept {
  for (auto& p : params) {
    if (p.accumulator) p.accumulator->del_post_hook(p.hook_key);
  }
}

// ---------------------------------------------------------------------------
// Gathering

void ShardedDataParallel::Impl::start_gather(size_t u, bool prefetch) {
  auto& unit = units[u];
  if (unit.gathered || unit.gather_work) return;
  allocate_storage(unit.full);
  account(storage_bytes(unit.full));
  unit.gather_work = (gather_pg ? gather_pg : pg)->all_gather_async(unit.full, unit.shard);
  ++stats.all_gathers;
  if (prefetch) ++stats.prefetched_all_gathers;
}

void ShardedDataParallel::Impl::finish_gather(size_t u) {
  auto& unit = units[u];
  if (unit.gathered) return;
  start_gather(u, /*prefetch=*/false);
  auto work = std::move(unit.gather_work);
  work->wait();
  for (size_t i : unit.params) params[i].tensor.set_data(params[i].view);
  unit.gathered = true;
  unit.shard_version = static_cast<int64_t>(unit.shard._version());
}

void ShardedDataParallel::Impl::release(size_t u) {
  auto& unit = units[u];
  if (pinned) return;
  if (unit.gather_work) {
    // A prefetch nobody used: its buffer is the collective's until it ends.
    auto work = std::move(unit.gather_work);
    work->wait();
  } else if (!unit.gathered) {
    return;
  }
  for (size_t i : unit.params) params[i].tensor.set_data(params[i].empty);
  account(-storage_bytes(unit.full));
  release_storage(unit.full);
  unit.gathered = false;
}

void ShardedDataParallel::Impl::enter_unit(size_t u) {
  std::lock_guard<std::mutex> lock(mutex);
  forward_order.push_back(u);
  finish_gather(u);
  if (!options.prefetch()) return;
  // The unit that followed this one in the previous forward.
  const size_t position = forward_order.size() - 1;
  if (position + 1 < last_forward_order.size() && last_forward_order[position] == u) {
    start_gather(last_forward_order[position + 1], /*prefetch=*/true);
  }
}

void ShardedDataParallel::Impl::exit_unit(size_t u, const std::vector<torch::Tensor>& outputs) {
  bool hooked = false;
  if (torch::GradMode::is_enabled()) {
    std::weak_ptr<Impl> weak = weak_from_this();
    for (const auto& t : outputs) {
      if (!t.defined() || !t.requires_grad()) continue;
      t.register_hook([weak, u](const torch::Tensor&) {
        if (auto impl = weak.lock()) impl->pre_backward(u);
      });
      hooked = true;
    }
  }
  std::lock_guard<std::mutex> lock(mutex);
  if (hooked) units[u].pre_backward_done = false;
  if (!hooked || options.reshard_after_forward()) release(u);
  if (hooked && options.reshard_after_forward() && !pinned) {
    // Backward gathers it again; the last forward call decides its place.
    regather_order.erase(std::remove(regather_order.begin(), regather_order.end(), u),
                         regather_order.end());
    regather_order.push_back(u);
  }
}

void ShardedDataParallel::Impl::finish_regathers() {
  // Gathers backward never asked for on this rank (no gradient reached the
  // unit): issued anyway, so that every rank's sequence stays the same.
  const size_t from = next_regather;
  if (from >= regather_order.size()) return;
  issue_regathers_through(regather_order.size() - 1);
  for (size_t k = from; k < regather_order.size(); ++k) {
    const size_t u = regather_order[regather_order.size() - 1 - k];
    finish_gather(u);
    release(u);
  }
}

void ShardedDataParallel::Impl::issue_regathers_through(size_t position) {
  // regather_order is in forward order: backward takes it from the end.
  while (next_regather < regather_order.size() && next_regather <= position) {
    start_gather(regather_order[regather_order.size() - 1 - next_regather], /*prefetch=*/false);
    ++next_regather;
  }
}

void ShardedDataParallel::Impl::pre_backward(size_t u) {
  std::lock_guard<std::mutex> lock(mutex);
  auto& unit = units[u];
  if (unit.pre_backward_done) return;
  unit.pre_backward_done = true;
  // Its gather, and those of every unit due before it, in the canonical order.
  auto it = std::find(regather_order.rbegin(), regather_order.rend(), u);
  if (it != regather_order.rend()) {
    issue_regathers_through(static_cast<size_t>(it - regather_order.rbegin()));
  }
  finish_gather(u);
  // Prefetch: the next unit backward will need.
  if (options.prefetch() && next_regather < regather_order.size()) {
    ++stats.prefetched_all_gathers;
    issue_regathers_through(next_regather);
  }
}

// ---------------------------------------------------------------------------
// Backward

void ShardedDataParallel::Impl::on_grad_ready(size_t index) {
  std::lock_guard<std::mutex> lock(mutex);
  if (!sync) {
    // Accumulating locally: nothing to send, but a fully sharded unit whose
    // backward is done still frees its gathered parameters.
    if (full() && !grad_ready[index]) {
      grad_ready[index] = 1;
      const size_t u = params[index].unit;
      if (--units[u].pending == 0 && u != root) release(u);
    }
    return;
  }
  TORCH_CHECK(
      !grad_ready[index], kSdpName, ": parameter '", params[index].name,
      "' received a gradient twice before finalize_backward(); call finalize_backward() after "
      "each backward, and run accumulation micro-batches with synchronization off");
  grad_ready[index] = 1;
  auto& unit = units[params[index].unit];
  if (--unit.pending > 0) return;
  copy_grads(params[index].unit);
  launch_in_order();
}

void ShardedDataParallel::Impl::launch_in_order() {
  if (launch_order.empty()) {
    // kFull: the units backward met, last forward call first, then the rest
    // (the root, units without a hooked output) by index. kZero: the buckets.
    std::vector<char> placed(units.size(), 0);
    for (auto it = regather_order.rbegin(); it != regather_order.rend(); ++it) {
      launch_order.push_back(*it);
      placed[*it] = 1;
    }
    for (size_t u = 0; u < units.size(); ++u) {
      if (!placed[u]) launch_order.push_back(u);
    }
  }
  while (next_launch < launch_order.size() && units[launch_order[next_launch]].copied) {
    launch(launch_order[next_launch++]);
  }
}

void ShardedDataParallel::Impl::copy_grads(size_t u) {
  auto& unit = units[u];
  torch::NoGradGuard no_grad;
  if (unit.spare_grad_flat.defined() && unit.spare_grad_flat.storage().use_count() == 1) {
    unit.grad_flat = std::move(unit.spare_grad_flat);
  } else {
    unit.grad_flat = torch::empty({unit.padded}, unit.full.options());
  }
  unit.spare_grad_flat = torch::Tensor();
  if (unit.padded > unit.numel)
    unit.grad_flat.narrow(0, unit.numel, unit.padded - unit.numel).zero_();
  for (size_t i : unit.params) {
    auto& p = params[i];
    auto slice = unit.grad_flat.narrow(0, p.offset, p.numel);
    auto& g = p.tensor.mutable_grad();
    if (g.defined()) {
      slice.copy_(g.reshape({-1}));
    } else {
      slice.zero_();
    }
    // The whole gradient lives on in the flat buffer only (kZero1 hands it
    // back averaged in finalize).
    g.reset();
  }
  unit.copied = true;
  // Its backward is done: a fully sharded unit gives its gathered memory back.
  if (full() && u != root) release(u);
}

void ShardedDataParallel::Impl::launch(size_t u) {
  auto& unit = units[u];
  // Gloo's reduce-scatter is a copy, a whole all-reduce and another copy
  // (measured: 28.8 ms against 17.6 ms for an all-reduce of a 28.8 MB model
  // on 2 ranks), so on Gloo ZeRO-2 and full sharding all-reduce their
  // private gradient buffer and keep their slice; NCCL reduce-scatters.
  if (options.strategy() == ShardingStrategy::kZero1 || allreduce_gradients) {
    unit.grad_work = pg->allreduce_sum_async(unit.grad_flat);
    ++stats.allreduces;
  } else {
    unit.grad_out = torch::empty({unit.shard_numel}, unit.full.options());
    unit.grad_work = pg->reduce_scatter_sum_async(unit.grad_out, unit.grad_flat);
    ++stats.reduce_scatters;
  }
  unit.launched = true;
  // At most two gradient collectives in flight: each holds a whole unit's
  // gradient, so waiting for the oldest bounds that memory to two units.
  in_flight.push_back(u);
  while (in_flight.size() > 2) {
    const size_t oldest = in_flight.front();
    in_flight.erase(in_flight.begin());
    wait_gradients(oldest);
  }
}

void ShardedDataParallel::Impl::wait_gradients(size_t u) {
  auto& unit = units[u];
  if (unit.grad_done) return;
  unit.grad_work->wait();
  unit.grad_done = true;
  // ZeRO-1 hands the whole averaged gradient back; the others keep only their shard.
  if (options.strategy() != ShardingStrategy::kZero1) {
    if (allreduce_gradients) {
      unit.grad_out = unit.grad_flat.narrow(0, rank() * unit.shard_numel, unit.shard_numel).clone();
    }
    unit.grad_work.reset();
    unit.grad_flat = torch::Tensor();
  }
}

void ShardedDataParallel::Impl::wait_all() noexcept {
  for (auto& unit : units) {
    for (auto* work : {&unit.grad_work, &unit.gather_work}) {
      if (!*work) continue;
      try {
        (*work)->wait();
      } catch (...) {
        // The caller is already reporting an error; a failed wait adds nothing.
      }
    }
    unit.gather_work.reset();
  }
}

void ShardedDataParallel::Impl::reset_round() {
  std::fill(grad_ready.begin(), grad_ready.end(), 0);
  for (auto& unit : units) {
    unit.pending = unit.params.size();
    unit.copied = false;
    unit.launched = false;
    unit.pre_backward_done = false;
    unit.grad_work.reset();
    unit.grad_done = false;
    if (options.strategy() == ShardingStrategy::kZero1 && unit.grad_flat.defined()) {
      unit.spare_grad_flat = std::move(unit.grad_flat);
    }
    unit.grad_flat = torch::Tensor();
    unit.grad_out = torch::Tensor();
  }
  next_launch = 0;
  in_flight.clear();
  if (full()) launch_order.clear();  // kZero's is the buckets' order, set once
  regather_order.clear();
  next_regather = 0;
  if (!forward_order.empty()) last_forward_order = std::move(forward_order);
  forward_order.clear();
}

void ShardedDataParallel::Impl::finalize() {
  std::lock_guard<std::mutex> lock(mutex);
  if (!sync) {
    // Gradients stay whole and local; a fully sharded model still gives its
    // gathered parameters back.
    finish_regathers();
    if (full()) {
      for (size_t u = 0; u < units.size(); ++u) release(u);
    }
    reset_round();
    return;
  }
  for (size_t i = 0; i < params.size(); ++i) {
    if (grad_ready[i]) continue;
    if (!options.find_unused_parameters()) {
      wait_all();
      reset_round();
      TORCH_CHECK(false, kSdpName, ": parameter '", params[i].name,
                  "' got no gradient in this backward, so its unit's gradients cannot be reduced; "
                  "if parts of the model are unused on purpose, set "
                  "ShardingOptions().find_unused_parameters(true) (and call finalize_backward() "
                  "only after a backward)");
    }
    grad_ready[i] = 1;
    auto& unit = units[params[i].unit];
    if (--unit.pending == 0) copy_grads(params[i].unit);
  }
  launch_in_order();
  finish_regathers();
  for (size_t u = 0; u < units.size(); ++u) {
    TORCH_INTERNAL_ASSERT(units[u].launched, kSdpName, ": unit ", units[u].name,
                          " was not launched");
  }

  const double world_size = static_cast<double>(world());
  torch::NoGradGuard no_grad;
  for (size_t u = 0; u < units.size(); ++u) {
    auto& unit = units[u];
    try {
      wait_gradients(u);
    } catch (...) {
      wait_all();
      reset_round();
      throw;
    }
    torch::Tensor mine;
    if (options.strategy() == ShardingStrategy::kZero1) {
      unit.grad_flat.div_(world_size);
      // Every rank holds the averaged gradient whole, as under DDP.
      for (size_t i : unit.params) {
        auto& p = params[i];
        p.tensor.mutable_grad() =
            unit.grad_flat.narrow(0, p.offset, p.numel).view(p.shape).detach();
      }
      mine = unit.grad_flat.narrow(0, rank() * unit.shard_numel, unit.shard_numel);
    } else {
      unit.grad_out.div_(world_size);
      mine = unit.grad_out;
    }
    for (auto& piece : unit.pieces) {
      // detach(): an alias, not an autograd view, so zero_grad() may detach_() it.
      auto g = mine.narrow(0, piece.offset, piece.numel).detach();
      auto& current = piece.tensor.mutable_grad();
      if (current.defined()) {
        current.add_(g);
      } else {
        current = g;
      }
    }
  }
  if (full()) {
    for (size_t u = 0; u < units.size(); ++u) release(u);
  }
  stale_params = true;
  stale_grads = options.strategy() == ShardingStrategy::kZero1;
  ++stats.synced_steps;
  reset_round();
}

// ---------------------------------------------------------------------------
// ShardedDataParallel

ShardedDataParallel::ShardedDataParallel(std::shared_ptr<torch::nn::Module> module,
                                         std::shared_ptr<ProcessGroup> pg,
                                         torch::optim::Optimizer& optimizer,
                                         ShardingOptions options)
    : impl_(std::make_shared<Impl>()) {
  TORCH_CHECK(module != nullptr, kSdpName, ": module must not be null");
  TORCH_CHECK(pg != nullptr, kSdpName, ": process group must not be null");
  TORCH_CHECK(options.bucket_cap_mb() > 0, kSdpName, ": bucket_cap_mb must be > 0, got ",
              options.bucket_cap_mb());
  TORCH_CHECK(options.strategy() == ShardingStrategy::kFull || options.units().empty(), kSdpName,
              ": units are for full sharding; ", to_string(options.strategy()),
              " shards by buckets (bucket_cap_mb)");
  impl_->module = std::move(module);
  impl_->pg = std::move(pg);
  impl_->options = std::move(options);
  std::vector<std::pair<std::string, torch::Tensor>> named;
  for (const auto& item : impl_->module->named_parameters(/*recurse=*/true)) {
    named.emplace_back(item.key(), item.value());
  }
  if (impl_->world() > 1) {
    detail::check_same_parameters(*impl_->pg, named, kSdpName);
    // Frozen parameters and buffers are not in any unit: rank 0's, whole.
    std::vector<torch::Tensor> rest;
    for (const auto& [name, t] : named) {
      if (!t.requires_grad()) rest.push_back(t);
    }
    for (const auto& b : impl_->module->buffers(/*recurse=*/true)) rest.push_back(b);
    detail::broadcast_coalesced(*impl_->pg, rest);
  }
  if (impl_->full()) {
    // The all-gathers' own communicator; the name is the same on every rank
    // because every rank builds its ShardedDataParallels in the same order.
    static std::atomic<int64_t> instances{0};
    impl_->gather_pg = impl_->pg->new_group("wick/shard_gather/" + std::to_string(instances++));
  }
  impl_->allreduce_gradients = impl_->pg->backend_name() == "gloo";
  impl_->build(named, optimizer);
  auto& reg = registry();
  std::lock_guard<std::mutex> lock(reg.mutex);
  for (size_t u = 0; u < impl_->units.size(); ++u) {
    if (impl_->units[u].module == nullptr) continue;
    auto [it, inserted] = reg.units.emplace(impl_->units[u].module, std::make_pair(impl_, u));
    if (!inserted) {
      if (!it->second.first.expired()) {
        for (size_t v = 0; v < u; ++v) reg.units.erase(impl_->units[v].module);
        TORCH_CHECK(false, kSdpName, ": unit '", impl_->units[u].name,
                    "' is already a unit of another live ShardedDataParallel");
      }
      it->second = std::make_pair(impl_, u);
    }
  }
}

ShardedDataParallel::~ShardedDataParallel() {
  if (!impl_) return;
  {
    auto& reg = registry();
    std::lock_guard<std::mutex> lock(reg.mutex);
    for (const auto& unit : impl_->units) {
      auto it = reg.units.find(unit.module);
      if (it != reg.units.end() && it->second.first.lock() == impl_) reg.units.erase(it);
    }
  }
  impl_->wait_all();
  impl_->remove_hooks();
  // The module outlives the wrapper: leave it whole, with the latest shards.
  // Not while unwinding: the other ranks may not be destroying theirs, and a
  // collective they never join would wait out the group's timeout.
  if (std::uncaught_exceptions() > 0) return;
  try {
    gather_full_params();
  } catch (const std::exception& e) {
    TORCH_WARN(kSdpName, ": could not gather the module whole on destruction: ", e.what());
  }
}

void ShardedDataParallel::prepare_forward() {
  auto& impl = *impl_;
  {
    std::lock_guard<std::mutex> lock(impl.mutex);
    if (impl.stale_grads) {
      // kZero1: last step's averaged gradients are spent; backward starts afresh.
      for (auto& p : impl.params) p.tensor.mutable_grad().reset();
      impl.stale_grads = false;
    }
    if (impl.full()) {
      if (impl.root != SIZE_MAX) impl.finish_gather(impl.root);
    } else {
      // After a step: every rank's updated shard into every rank's parameters.
      bool stale = impl.stale_params;
      for (const auto& unit : impl.units) {
        stale = stale || static_cast<int64_t>(unit.shard._version()) != unit.shard_version;
      }
      if (stale) {
        torch::NoGradGuard no_grad;
        std::vector<std::shared_ptr<ProcessGroup::Work>> works;
        for (auto& unit : impl.units) {
          works.push_back(impl.pg->all_gather_async(unit.full, unit.shard));
          ++impl.stats.all_gathers;
        }
        for (auto& w : works) w->wait();
        for (auto& unit : impl.units)
          unit.shard_version = static_cast<int64_t>(unit.shard._version());
        impl.stale_params = false;
      }
    }
  }
  if (impl.world() > 1 && impl.options.broadcast_buffers()) {
    auto buffers = impl.module->buffers(/*recurse=*/true);
    if (!buffers.empty()) detail::broadcast_coalesced(*impl.pg, buffers);
  }
}

void ShardedDataParallel::finalize_backward() { impl_->finalize(); }

void ShardedDataParallel::set_sync(bool enabled) {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  impl_->sync = enabled;
}

bool ShardedDataParallel::sync_enabled() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->sync;
}

double ShardedDataParallel::clip_grad_norm_(double max_norm) {
  TORCH_CHECK(max_norm > 0, kSdpName, ": clip_grad_norm_ needs max_norm > 0, got ", max_norm);
  auto& impl = *impl_;
  torch::NoGradGuard no_grad;
  // As torch::nn::utils::clip_grad_norm_ on a replica: the norm of the
  // parameters' norms. Each parameter's squared norm is summed over the
  // ranks' parts of it, in the gradients' dtype.
  const auto options = impl.units.front().shard.options();
  auto squares =
      torch::zeros({static_cast<int64_t>(impl.params.size())}, options.device(impl.pg->device()));
  std::vector<torch::Tensor> grads;
  for (const auto& unit : impl.units) {
    const int64_t begin = impl.rank() * unit.shard_numel;
    for (const auto& piece : unit.pieces) {
      const auto& g = piece.tensor.grad();
      if (!g.defined()) continue;
      grads.push_back(g);
      // The parameters this piece covers, and its part of each.
      const int64_t lo = begin + piece.offset, hi = lo + piece.numel;
      for (size_t i : unit.params) {
        const auto& p = impl.params[i];
        const int64_t a = std::max(lo, p.offset), b = std::min(hi, p.offset + p.numel);
        if (b <= a) continue;
        squares[static_cast<int64_t>(i)] += g.narrow(0, a - lo, b - a).square().sum();
      }
    }
  }
  impl.pg->allreduce_sum({squares});
  const auto total_tensor = squares.sqrt().norm(2);
  const double total = total_tensor.item<double>();
  auto coef = torch::clamp(max_norm / (total_tensor + 1e-6), std::nullopt, 1.0);
  for (auto& g : grads) g.mul_(coef);
  return total;
}

void ShardedDataParallel::gather_full_params() {
  auto& impl = *impl_;
  if (!impl.full()) {
    {
      std::lock_guard<std::mutex> lock(impl.mutex);
      impl.stale_params = true;
    }
    prepare_forward();
    return;
  }
  std::lock_guard<std::mutex> lock(impl.mutex);
  for (size_t u = 0; u < impl.units.size(); ++u) impl.start_gather(u, /*prefetch=*/false);
  for (size_t u = 0; u < impl.units.size(); ++u) impl.finish_gather(u);
  impl.pinned = true;
}

void ShardedDataParallel::reshard() {
  auto& impl = *impl_;
  if (!impl.full()) return;
  std::lock_guard<std::mutex> lock(impl.mutex);
  impl.pinned = false;
  for (size_t u = 0; u < impl.units.size(); ++u) impl.release(u);
}

std::vector<torch::Tensor> ShardedDataParallel::sharded_parameters() const {
  std::vector<torch::Tensor> out;
  for (const auto& unit : impl_->units) {
    for (const auto& piece : unit.pieces) out.push_back(piece.tensor);
  }
  return out;
}

ShardingStats ShardedDataParallel::stats() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  ShardingStats s = impl_->stats;
  s.gathered_param_bytes = impl_->gathered_bytes;
  s.optimizer_state_bytes = optimizer_state_bytes(*impl_->optimizer);
  return s;
}

void ShardedDataParallel::reset_peak() {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  impl_->stats.peak_gathered_param_bytes = impl_->gathered_bytes;
}

const ShardingOptions& ShardedDataParallel::options() const { return impl_->options; }
const std::shared_ptr<ProcessGroup>& ShardedDataParallel::process_group() const {
  return impl_->pg;
}
const std::shared_ptr<torch::nn::Module>& ShardedDataParallel::module() const {
  return impl_->module;
}

// ---------------------------------------------------------------------------
// unit_call

namespace detail {

UnitScope::UnitScope(const torch::nn::Module& unit) {
  {
    auto& reg = registry();
    std::lock_guard<std::mutex> lock(reg.mutex);
    auto it = reg.units.find(&unit);
    if (it == reg.units.end()) return;
    impl_ = it->second.first.lock();
    unit_ = it->second.second;
  }
  if (impl_) impl_->enter_unit(unit_);
}

UnitScope::~UnitScope() {
  if (!impl_ || finished_) return;
  try {
    std::lock_guard<std::mutex> lock(impl_->mutex);
    impl_->release(unit_);
  } catch (...) {
    // Already unwinding from the forward's exception.
  }
}

void UnitScope::finish(const std::vector<torch::Tensor>& outputs) {
  finished_ = true;
  if (impl_) impl_->exit_unit(unit_, outputs);
}

}  // namespace detail
}  // namespace wick
