#include "wick/distributed.h"

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#ifdef USE_C10D_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#if defined(WICK_WITH_CUDA) && defined(USE_C10D_NCCL)
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <cerrno>
#include <cstdlib>
#include <limits>
#include <map>

namespace wick {

namespace {

std::optional<std::string> env(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return std::nullopt;
  return std::string(v);
}

// An integer environment variable, or the override; errors name the variable.
std::optional<int64_t> env_int(const char* name, const std::optional<int64_t>& override_value) {
  if (override_value.has_value()) return override_value;
  auto text = env(name);
  if (!text.has_value()) return std::nullopt;
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(text->c_str(), &end, 10);
  TORCH_CHECK(errno == 0 && end != text->c_str() && *end == '\0',
              "init_process_group: environment variable ", name, " must be an integer, got '",
              *text, "'");
  return static_cast<int64_t>(v);
}

bool is_loopback(const std::string& host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}

// Waits for `work` with the group's timeout; a failure or timeout names the
// collective. c10d's wait throws "Operation timed out!" (Gloo: "Timed out
// waiting ...") rather than returning false: reported as a timeout with the
// group's value, so a hung peer reads differently from a dead one.
void wait_for(const c10::intrusive_ptr<c10d::Work>& work, const char* what, int64_t rank,
              std::chrono::milliseconds timeout) {
  bool done = false;
  const char* timed_out = " timed out on rank ";
  const char* hint = " ms (a peer hung, died or never joined?)";
  try {
    done = work->wait(timeout);
  } catch (const std::exception& e) {
    const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
    const std::string message =
        c10_error != nullptr ? c10_error->what_without_backtrace() : e.what();
    const bool timeout_error = message.find("timed out") != std::string::npos ||
                               message.find("Timed out") != std::string::npos;
    TORCH_CHECK(!timeout_error, "ProcessGroup: ", what, timed_out, rank, " after ", timeout.count(),
                hint, ": ", message);
    TORCH_CHECK(false, "ProcessGroup: ", what, " failed on rank ", rank, ": ", message);
  }
  TORCH_CHECK(done, "ProcessGroup: ", what, timed_out, rank, " after ", timeout.count(), hint);
}

// Tensors grouped by (device, dtype), in first-seen order: one flat buffer each.
std::vector<std::vector<torch::Tensor>> by_kind(const std::vector<torch::Tensor>& tensors) {
  std::vector<std::vector<torch::Tensor>> groups;
  for (const auto& t : tensors) {
    TORCH_CHECK(t.defined(), "ProcessGroup: undefined tensor in a collective");
    auto g = std::find_if(groups.begin(), groups.end(), [&](const auto& group) {
      return group.front().device() == t.device() && group.front().scalar_type() == t.scalar_type();
    });
    if (g == groups.end()) {
      groups.push_back({t});
    } else {
      g->push_back(t);
    }
  }
  return groups;
}

torch::Tensor flatten(const std::vector<torch::Tensor>& group) {
  std::vector<torch::Tensor> flat;
  flat.reserve(group.size());
  for (const auto& t : group) flat.push_back(t.reshape(-1));
  return group.size() == 1 && group.front().is_contiguous() ? group.front().view(-1)
                                                            : torch::cat(flat);
}

void unflatten_into(const torch::Tensor& flat, const std::vector<torch::Tensor>& group) {
  if (group.size() == 1 && group.front().is_contiguous() &&
      flat.data_ptr() == group.front().data_ptr())
    return;
  int64_t offset = 0;
  for (const auto& t : group) {
    t.copy_(flat.narrow(0, offset, t.numel()).view_as(t));
    offset += t.numel();
  }
}

class BackendWork : public ProcessGroup::Work {
 public:
  BackendWork(c10::intrusive_ptr<c10d::Work> work, int64_t rank, std::chrono::milliseconds timeout)
      : work_(std::move(work)), rank_(rank), timeout_(timeout) {}
  void wait() override {
    if (work_) wait_for(work_, "allreduce", rank_, timeout_);
    work_.reset();
  }

 private:
  c10::intrusive_ptr<c10d::Work> work_;
  int64_t rank_;
  std::chrono::milliseconds timeout_;
};

class DoneWork : public ProcessGroup::Work {
 public:
  void wait() override {}
};

}  // namespace

ProcessGroup::ProcessGroup() = default;

ProcessGroup::ProcessGroup(c10::intrusive_ptr<c10d::Store> store,
                           c10::intrusive_ptr<c10d::Backend> backend, int64_t rank,
                           int64_t world_size, int64_t local_rank, int64_t local_world_size,
                           torch::Device device, std::chrono::milliseconds timeout)
    : store_(std::move(store)),
      backend_(std::move(backend)),
      rank_(rank),
      world_size_(world_size),
      local_rank_(local_rank),
      local_world_size_(local_world_size),
      device_(device),
      timeout_(timeout) {}

ProcessGroup::~ProcessGroup() = default;

std::string ProcessGroup::backend_name() const {
  return backend_ ? backend_->getBackendName() : "none";
}

void ProcessGroup::allreduce_sum(const std::vector<torch::Tensor>& tensors) {
  if (!backend_ || world_size_ == 1 || tensors.empty()) return;
  for (auto& group : by_kind(tensors)) {
    std::vector<torch::Tensor> flat{flatten(group)};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    opts.timeout = timeout_;
    wait_for(backend_->allreduce(flat, opts), "allreduce", rank_, timeout_);
    unflatten_into(flat.front(), group);
  }
}

void ProcessGroup::broadcast(const std::vector<torch::Tensor>& tensors, int64_t root) {
  TORCH_CHECK(root >= 0 && root < world_size_, "ProcessGroup: broadcast root must be in [0, ",
              world_size_, "), got ", root);
  if (!backend_ || world_size_ == 1 || tensors.empty()) return;
  for (auto& group : by_kind(tensors)) {
    std::vector<torch::Tensor> flat{flatten(group)};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.timeout = timeout_;
    wait_for(backend_->broadcast(flat, opts), "broadcast", rank_, timeout_);
    unflatten_into(flat.front(), group);
  }
}

void ProcessGroup::barrier() {
  if (!backend_ || world_size_ == 1) return;
  c10d::BarrierOptions opts;
  opts.timeout = timeout_;
  if (device_.is_cuda()) opts.device = device_;
  wait_for(backend_->barrier(opts), "barrier", rank_, timeout_);
}

std::shared_ptr<ProcessGroup::Work> ProcessGroup::allreduce_sum_async(torch::Tensor flat) {
  if (!backend_ || world_size_ == 1) return std::make_shared<DoneWork>();
  TORCH_CHECK(flat.defined() && flat.is_contiguous(),
              "ProcessGroup: allreduce_sum_async needs a contiguous tensor");
  std::vector<torch::Tensor> tensors{std::move(flat)};
  c10d::AllreduceOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  opts.timeout = timeout_;
  return std::make_shared<BackendWork>(backend_->allreduce(tensors, opts), rank_, timeout_);
}

std::shared_ptr<ProcessGroup> init_process_group(ProcessGroupOptions options) {
  const auto rank = env_int("RANK", options.rank());
  const auto world = env_int("WORLD_SIZE", options.world_size());
  TORCH_CHECK(
      rank.has_value() == world.has_value(), "init_process_group: ",
      rank.has_value() ? "RANK is set but WORLD_SIZE is not" : "WORLD_SIZE is set but RANK is not",
      " (launch with torchrun, or set both)");
  const auto timeout = options.timeout();
  TORCH_CHECK(timeout.count() > 0, "init_process_group: timeout must be > 0 ms, got ",
              timeout.count());
  if (!rank.has_value()) return std::make_shared<ProcessGroup>();  // a world of one

  TORCH_CHECK(*world >= 1, "init_process_group: WORLD_SIZE must be >= 1, got ", *world);
  TORCH_CHECK(*rank >= 0 && *rank < *world,
              "init_process_group: RANK must be in [0, WORLD_SIZE=", *world, "), got ", *rank);
  const int64_t local_rank = env_int("LOCAL_RANK", std::nullopt).value_or(*rank);
  const int64_t local_world = env_int("LOCAL_WORLD_SIZE", std::nullopt).value_or(*world);
  TORCH_CHECK(local_rank >= 0 && local_rank < local_world,
              "init_process_group: LOCAL_RANK must be in [0, ", "LOCAL_WORLD_SIZE=", local_world,
              "), got ", local_rank);

  torch::Device device = options.device().value_or(torch::kCPU);
  if (device.is_cuda() && !device.has_index()) device = torch::Device(torch::kCUDA, local_rank);
  DistributedBackend backend = options.backend();
  if (backend == DistributedBackend::kAuto) {
    backend = device.is_cuda() ? DistributedBackend::kNccl : DistributedBackend::kGloo;
  }
  if (*world == 1 && !device.is_cuda()) {
    // One process: nothing to rendezvous with.
    return std::make_shared<ProcessGroup>();
  }

  const auto addr = options.master_addr().has_value() ? options.master_addr() : env("MASTER_ADDR");
  TORCH_CHECK(addr.has_value(), "init_process_group: MASTER_ADDR is not set (WORLD_SIZE=", *world,
              "); launch with torchrun or set it");
  const auto port = env_int("MASTER_PORT", options.master_port());
  TORCH_CHECK(port.has_value(),
              "init_process_group: MASTER_PORT is not set; launch with torchrun or set it");
  TORCH_CHECK(*port > 0 && *port <= std::numeric_limits<uint16_t>::max(),
              "init_process_group: MASTER_PORT must be in [1, 65535], got ", *port);

  // Under torchrun the elastic agent already hosts the store at MASTER_PORT.
  const bool agent_store = env("TORCHELASTIC_USE_AGENT_STORE").value_or("") == "True";
  c10d::TCPStoreOptions store_options;
  store_options.port = static_cast<uint16_t>(*port);
  store_options.isServer = *rank == 0 && !agent_store;
  store_options.numWorkers = agent_store ? std::nullopt : std::optional<size_t>(*world);
  store_options.waitWorkers = !agent_store;
  store_options.timeout = timeout;
  c10::intrusive_ptr<c10d::Store> store;
  try {
    store = c10::make_intrusive<c10d::TCPStore>(*addr, store_options);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "init_process_group: rank ", *rank, " cannot rendezvous at ", *addr, ":",
                *port, store_options.isServer ? " (hosting the store)" : "", " within ",
                timeout.count(), " ms: ", e.what());
  }
  store = c10::make_intrusive<c10d::PrefixStore>("wick/default_pg", store);

  c10::intrusive_ptr<c10d::Backend> impl;
  if (backend == DistributedBackend::kGloo) {
#ifdef USE_C10D_GLOO
    auto gloo_options = c10d::ProcessGroupGloo::Options::create(timeout);
    if (auto iface = env("GLOO_SOCKET_IFNAME")) {
      gloo_options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(*iface));
    } else if (is_loopback(*addr)) {
      gloo_options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    } else {
      gloo_options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    try {
      impl = c10::make_intrusive<c10d::ProcessGroupGloo>(store, static_cast<int>(*rank),
                                                         static_cast<int>(*world), gloo_options);
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "init_process_group: rank ", *rank,
                  " could not connect the Gloo group of ", *world, " through ", *addr, ":", *port,
                  ": ", e.what());
    }
#else
    TORCH_CHECK(false,
                "init_process_group: this LibTorch build has no Gloo backend (USE_C10D_GLOO)");
#endif
  } else {
#if defined(WICK_WITH_CUDA) && defined(USE_C10D_NCCL)
    TORCH_CHECK(device.is_cuda(), "init_process_group: the NCCL backend needs a CUDA device, got ",
                device);
    TORCH_CHECK(torch::cuda::is_available(),
                "init_process_group: the NCCL backend needs CUDA, and no GPU is visible");
    c10::cuda::set_device(device.index());
    auto nccl_options = c10d::ProcessGroupNCCL::Options::create();
    nccl_options->timeout = timeout;
    impl = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, static_cast<int>(*rank),
                                                       static_cast<int>(*world), nccl_options);
#else
    TORCH_CHECK(
        false,
        "init_process_group: this wick build has no NCCL backend (needs WICK_WITH_CUDA and a "
        "LibTorch built with NCCL)");
#endif
  }
  return std::make_shared<ProcessGroup>(store, impl, *rank, *world, local_rank, local_world, device,
                                        timeout);
}

// ---------------------------------------------------------------------------
// DistributedSampler

DistributedSampler::DistributedSampler(int64_t dataset_size, int64_t rank, int64_t world_size,
                                       DistributedSamplerOptions options)
    : size_(dataset_size), rank_(rank), world_size_(world_size), options_(options) {
  TORCH_CHECK(dataset_size >= 1, "DistributedSampler: dataset_size must be >= 1, got ",
              dataset_size);
  TORCH_CHECK(world_size >= 1, "DistributedSampler: world_size must be >= 1, got ", world_size);
  TORCH_CHECK(rank >= 0 && rank < world_size, "DistributedSampler: rank must be in [0, ",
              world_size, "), got ", rank);
  TORCH_CHECK(!options.drop_last() || dataset_size >= world_size,
              "DistributedSampler: drop_last with ", dataset_size, " samples and ", world_size,
              " ranks leaves no sample per rank");
}

int64_t DistributedSampler::num_samples() const {
  return options_.drop_last() ? size_ / world_size_ : (size_ + world_size_ - 1) / world_size_;
}

torch::Tensor DistributedSampler::indices() const {
  // As torch.utils.data.DistributedSampler: randperm with a generator seeded
  // seed + epoch, so the order is the same on every rank (and as Python's).
  torch::Tensor order;
  if (options_.shuffle()) {
    auto gen =
        at::make_generator<at::CPUGeneratorImpl>(options_.seed() + static_cast<uint64_t>(epoch_));
    order = torch::randperm(size_, gen, torch::TensorOptions().dtype(torch::kLong));
  } else {
    order = torch::arange(size_, torch::TensorOptions().dtype(torch::kLong));
  }
  const int64_t total = num_samples() * world_size_;
  if (total <= size_) {
    order = order.narrow(0, 0, total);
  } else {
    // Pad by repeating the order from its start (more than once if the data is tiny).
    std::vector<torch::Tensor> parts{order};
    int64_t have = size_;
    while (have < total) {
      const int64_t take = std::min(size_, total - have);
      parts.push_back(order.narrow(0, 0, take));
      have += take;
    }
    order = torch::cat(parts);
  }
  return order.slice(0, rank_, total, world_size_).contiguous();
}

}  // namespace wick
