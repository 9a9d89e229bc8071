#include "wick/distributed.h"

#include "format.h"  // before c10d's headers, which may include fmt

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#ifdef USE_C10D_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#if defined(WICK_WITH_CUDA) && defined(USE_C10D_NCCL)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include <unistd.h>
#endif

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <regex>
#include <sstream>

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

// An exception's message without c10's backtrace.
std::string error_text(const std::exception& e) {
  const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
  return c10_error != nullptr ? c10_error->what_without_backtrace() : e.what();
}

bool is_loopback(const std::string& host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}

// What a collective's errors name: the rank, the timeout, and every rank's GPU.
struct CollectiveContext {
  int64_t rank = 0;
  std::chrono::milliseconds timeout{0};
  std::shared_ptr<const std::vector<detail::GpuIdentity>> gpus;  // by rank; empty: unknown
};

// Rethrows the exception in flight as wick's error for `what`. Ranks sharing a
// GPU (NCCL refuses them when the communicator is made, at the first
// collective) are explained in plain words. c10d's wait throws "Operation
// timed out!" (Gloo: "Timed out waiting ...") rather than returning false:
// reported as a timeout with the group's value, so a hung peer reads
// differently from a dead one.
[[noreturn]] void rethrow_collective_error(const char* what, const CollectiveContext& ctx) {
  std::string message;
  try {
    throw;
  } catch (const std::exception& e) {
    message = error_text(e);
  }
  static const std::vector<detail::GpuIdentity> kUnknown;
  if (auto shared = detail::explain_shared_gpu_error(message, ctx.gpus ? *ctx.gpus : kUnknown)) {
    C10_THROW_ERROR(DistBackendError,
                    c10::str("ProcessGroup: ", what, " failed on rank ", ctx.rank, ": ", *shared));
  }
  const bool timeout_error = message.find("timed out") != std::string::npos ||
                             message.find("Timed out") != std::string::npos;
  TORCH_CHECK(!timeout_error, "ProcessGroup: ", what, " timed out on rank ", ctx.rank, " after ",
              ctx.timeout.count(), " ms (a peer hung, died or never joined?): ", message);
  TORCH_CHECK(false, "ProcessGroup: ", what, " failed on rank ", ctx.rank, ": ", message);
}

// Waits for `work` with the group's timeout; a failure or timeout names the collective.
void wait_for(const c10::intrusive_ptr<c10d::Work>& work, const char* what,
              const CollectiveContext& ctx) {
  bool done = false;
  try {
    done = work->wait(ctx.timeout);
  } catch (const std::exception&) {
    rethrow_collective_error(what, ctx);
  }
  TORCH_CHECK(done, "ProcessGroup: ", what, " timed out on rank ", ctx.rank, " after ",
              ctx.timeout.count(), " ms (a peer hung, died or never joined?)");
}

// Starts a collective: NCCL makes its communicator here, at the first one, so
// this is where it refuses ranks sharing a GPU.
template <typename Start>
c10::intrusive_ptr<c10d::Work> start(const char* what, const CollectiveContext& ctx,
                                     Start&& start_collective) {
  try {
    return start_collective();
  } catch (const std::exception&) {
    rethrow_collective_error(what, ctx);
  }
}

// "no GPU is visible", "only 1 GPU is visible (CUDA_VISIBLE_DEVICES=3)".
std::string visible_gpus_words(int64_t visible) {
  const auto mask = env("CUDA_VISIBLE_DEVICES");
  return fmt::format("{} (CUDA_VISIBLE_DEVICES{})",
                     visible == 0   ? std::string("no GPU is visible")
                     : visible == 1 ? std::string("only 1 GPU is visible")
                                    : fmt::format("only {} GPUs are visible", visible),
                     mask ? "=" + *mask : std::string(" unset"));
}

#if defined(WICK_WITH_CUDA) && defined(USE_C10D_NCCL)
// Every rank publishes its GPU (host, UUID, PCI bus id) through the store and
// reads the others', so that a group whose ranks share a GPU can say which
// when NCCL refuses it. Nothing is refused here: a NCCL that accepts it works.
std::vector<detail::GpuIdentity> exchange_gpu_identities(c10d::Store& store, torch::Device device,
                                                         int64_t rank, int64_t world,
                                                         std::chrono::milliseconds timeout) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device.index());
  detail::GpuIdentity me;
  char host[256] = {};
  if (::gethostname(host, sizeof(host) - 1) == 0) me.host = host;
  // NOLINTNEXTLINE(bugprone-signed-char-misuse): c10::DeviceIndex (int8_t) is an ordinal here
  me.device_index = device.index();
  const auto* u = reinterpret_cast<const unsigned char*>(prop->uuid.bytes);
  // As nvidia-smi prints them: GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx and 0000:3b:00.0.
  if (std::any_of(u, u + 16, [](unsigned char b) { return b != 0; })) {
    me.uuid = "GPU-";
    for (int i = 0; i < 16; ++i)
      fmt::format_to(std::back_inserter(me.uuid), "{}{:02x}",
                     i == 4 || i == 6 || i == 8 || i == 10 ? "-" : "", u[i]);
  }
  me.pci_bus_id =
      fmt::format("{:04x}:{:02x}:{:02x}.0", prop->pciDomainID, prop->pciBusID, prop->pciDeviceID);

  const std::string mine = detail::encode_gpu_identity(me);
  std::vector<std::string> keys;
  for (int64_t r = 0; r < world; ++r) keys.push_back("wick_gpu/" + std::to_string(r));
  try {
    store.set(keys[static_cast<size_t>(rank)], std::vector<uint8_t>(mine.begin(), mine.end()));
    store.wait(keys, timeout);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "init_process_group: rank ", rank, " waited ", timeout.count(),
                " ms for the other ranks to name their GPUs (a peer hung, died or never "
                "joined?): ",
                error_text(e));
  }
  std::vector<detail::GpuIdentity> gpus;
  for (const auto& value : store.multiGet(keys)) {
    gpus.push_back(detail::decode_gpu_identity(std::string(value.begin(), value.end())));
  }
  return gpus;
}
#endif

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
  BackendWork(c10::intrusive_ptr<c10d::Work> work, CollectiveContext ctx, const char* what)
      : work_(std::move(work)), ctx_(std::move(ctx)), what_(what) {}
  void wait() override {
    if (work_) wait_for(work_, what_, ctx_);
    work_.reset();
  }

 private:
  c10::intrusive_ptr<c10d::Work> work_;
  CollectiveContext ctx_;
  const char* what_;
};

// Checks the operands of an all-gather or reduce-scatter: `whole` holds
// `world` times `part`'s elements, both contiguous, one dtype, one device.
void check_scatter_gather_operands(const char* what, const torch::Tensor& whole,
                                   const torch::Tensor& part, int64_t world) {
  TORCH_CHECK(whole.defined() && part.defined(), "ProcessGroup: ", what, " needs defined tensors");
  TORCH_CHECK(whole.is_contiguous() && part.is_contiguous(), "ProcessGroup: ", what,
              " needs contiguous tensors");
  TORCH_CHECK(whole.scalar_type() == part.scalar_type() && whole.device() == part.device(),
              "ProcessGroup: ", what, " needs one dtype and device, got ", whole.scalar_type(),
              " on ", whole.device(), " and ", part.scalar_type(), " on ", part.device());
  TORCH_CHECK(whole.numel() == world * part.numel(), "ProcessGroup: ", what, " needs ", world,
              " x ", part.numel(), " = ", world * part.numel(),
              " elements in the whole tensor (world size x shard), got ", whole.numel());
}

class DoneWork : public ProcessGroup::Work {
 public:
  void wait() override {}
};

}  // namespace

// ---------------------------------------------------------------------------
// Ranks sharing a GPU

namespace detail {

std::string encode_gpu_identity(const GpuIdentity& gpu) {
  // Host names hold no newline.
  return gpu.host + "\n" + std::to_string(gpu.device_index) + "\n" + gpu.uuid + "\n" +
         gpu.pci_bus_id;
}

GpuIdentity decode_gpu_identity(const std::string& text) {
  std::vector<std::string> fields;
  std::istringstream in(text);
  for (std::string field; std::getline(in, field, '\n');) fields.push_back(field);
  if (!text.empty() && text.back() == '\n') fields.emplace_back();
  TORCH_CHECK(fields.size() == 4, "ProcessGroup: malformed GPU identity '", text, "'");
  GpuIdentity gpu;
  gpu.host = fields[0];
  errno = 0;
  char* end = nullptr;
  gpu.device_index = std::strtoll(fields[1].c_str(), &end, 10);
  TORCH_CHECK(errno == 0 && end != fields[1].c_str() && *end == '\0',
              "ProcessGroup: malformed GPU identity '", text, "'");
  gpu.uuid = fields[2];
  gpu.pci_bus_id = fields[3];
  return gpu;
}

bool same_gpu(const GpuIdentity& a, const GpuIdentity& b) {
  // A UUID is unique across machines; a bus id only within one.
  if (!a.uuid.empty() && !b.uuid.empty()) return a.uuid == b.uuid;
  return !a.pci_bus_id.empty() && a.host == b.host && a.pci_bus_id == b.pci_bus_id;
}

std::vector<std::vector<int64_t>> ranks_sharing_gpus(const std::vector<GpuIdentity>& by_rank) {
  std::vector<std::vector<int64_t>> sets;
  std::vector<char> placed(by_rank.size(), 0);
  for (size_t i = 0; i < by_rank.size(); ++i) {
    if (placed[i]) continue;
    std::vector<int64_t> ranks{static_cast<int64_t>(i)};
    for (size_t j = i + 1; j < by_rank.size(); ++j) {
      if (!placed[j] && same_gpu(by_rank[i], by_rank[j])) {
        placed[j] = 1;
        ranks.push_back(static_cast<int64_t>(j));
      }
    }
    if (ranks.size() > 1) sets.push_back(std::move(ranks));
  }
  return sets;
}

namespace {

// "ranks 0 and 1", "ranks 0, 2 and 3".
std::string ranks_words(const std::vector<int64_t>& ranks) {
  std::ostringstream os;
  os << "ranks ";
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (i > 0) os << (i + 1 == ranks.size() ? " and " : ", ");
    os << ranks[i];
  }
  return os.str();
}

// NCCL names a GPU by its PCI bus id read as one hex number ("0000:1d:00.0"
// is 1d000): back to the bus id's usual form.
std::string pci_bus_id_from_nccl(std::string hex) {
  if (hex.size() < 9) hex.insert(0, 9 - hex.size(), '0');
  const size_t n = hex.size();
  return hex.substr(0, n - 5) + ":" + hex.substr(n - 5, 2) + ":" + hex.substr(n - 3, 2) + "." +
         hex.substr(n - 1);
}

constexpr const char* kOneRankPerGpu =
    ", and NCCL takes one rank per GPU. Give each rank a GPU of its own: start one process per "
    "GPU (torchrun --nproc_per_node=<GPUs on the host>) and leave the device's index unset, so "
    "that each rank runs on cuda:LOCAL_RANK; or, to put several ranks on one GPU on purpose, use "
    "the Gloo backend (ProcessGroupOptions().backend(wick::DistributedBackend::kGloo)), which "
    "reduces through host memory. NCCL said: ";

}  // namespace

std::optional<std::string> explain_shared_gpu_error(const std::string& error,
                                                    const std::vector<GpuIdentity>& by_rank) {
  std::ostringstream os;
  const auto sets = ranks_sharing_gpus(by_rank);
  static const std::regex kDuplicate(
      R"(Duplicate GPU detected\s*:\s*rank (\d+) and rank (\d+) both on CUDA device ([0-9a-fA-F]+))");
  std::smatch nccl;
  if (!sets.empty()) {
    for (size_t s = 0; s < sets.size(); ++s) {
      const auto& ranks = sets[s];
      const auto& gpu = by_rank[static_cast<size_t>(ranks.front())];
      const bool one_index = std::all_of(ranks.begin(), ranks.end(), [&](int64_t r) {
        return by_rank[static_cast<size_t>(r)].device_index == gpu.device_index;
      });
      os << (s > 0 ? "; " : "") << ranks_words(ranks) << " share one GPU";
      if (one_index) {
        os << ", cuda:" << gpu.device_index << " on host " << gpu.host;
      } else {
        os << " on host " << gpu.host << " (";
        for (size_t i = 0; i < ranks.size(); ++i) {
          os << (i > 0 ? ", " : "") << "rank " << ranks[i]
             << " on cuda:" << by_rank[static_cast<size_t>(ranks[i])].device_index;
        }
        os << ")";
      }
      os << " (UUID " << (gpu.uuid.empty() ? "unknown" : gpu.uuid) << ", PCI bus "
         << (gpu.pci_bus_id.empty() ? "unknown" : gpu.pci_bus_id) << ")";
    }
  } else if (std::regex_search(error, nccl, kDuplicate)) {
    std::vector<int64_t> ranks{std::stoll(nccl[1].str()), std::stoll(nccl[2].str())};
    std::sort(ranks.begin(), ranks.end());
    os << ranks_words(ranks) << " are on one GPU (PCI bus " << pci_bus_id_from_nccl(nccl[3].str())
       << ", NCCL's CUDA device " << nccl[3].str() << ")";
  } else if (error.find("Duplicate GPU") != std::string::npos) {
    os << "two ranks are on one GPU";
  } else {
    return std::nullopt;
  }
  os << kOneRankPerGpu << error;
  return os.str();
}

}  // namespace detail

ProcessGroup::ProcessGroup() = default;

ProcessGroup::ProcessGroup(c10::intrusive_ptr<c10d::Store> store,
                           c10::intrusive_ptr<c10d::Backend> backend, int64_t rank,
                           int64_t world_size, int64_t local_rank, int64_t local_world_size,
                           torch::Device device, std::chrono::milliseconds timeout,
                           std::vector<detail::GpuIdentity> gpus)
    : store_(std::move(store)),
      backend_(std::move(backend)),
      rank_(rank),
      world_size_(world_size),
      local_rank_(local_rank),
      local_world_size_(local_world_size),
      device_(device),
      timeout_(timeout) {
  TORCH_CHECK(gpus.empty() || static_cast<int64_t>(gpus.size()) == world_size,
              "ProcessGroup: gpus must hold one identity per rank (", world_size, "), got ",
              gpus.size());
  if (!gpus.empty()) {
    gpus_ = std::make_shared<const std::vector<detail::GpuIdentity>>(std::move(gpus));
  }
}

ProcessGroup::~ProcessGroup() = default;

std::string ProcessGroup::backend_name() const {
  return backend_ ? backend_->getBackendName() : "none";
}

std::vector<int64_t> ProcessGroup::ranks_sharing_gpu() const {
  std::vector<int64_t> out;
  if (!gpus_) return out;
  for (const auto& ranks : detail::ranks_sharing_gpus(*gpus_)) {
    if (std::find(ranks.begin(), ranks.end(), rank_) == ranks.end()) continue;
    for (int64_t r : ranks) {
      if (r != rank_) out.push_back(r);
    }
  }
  return out;
}

void ProcessGroup::allreduce_sum(const std::vector<torch::Tensor>& tensors) {
  if (!backend_ || world_size_ == 1 || tensors.empty()) return;
  const CollectiveContext ctx{rank_, timeout_, gpus_};
  for (auto& group : by_kind(tensors)) {
    std::vector<torch::Tensor> flat{flatten(group)};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    opts.timeout = timeout_;
    wait_for(start("allreduce", ctx, [&] { return backend_->allreduce(flat, opts); }), "allreduce",
             ctx);
    unflatten_into(flat.front(), group);
  }
}

void ProcessGroup::broadcast(const std::vector<torch::Tensor>& tensors, int64_t root) {
  TORCH_CHECK(root >= 0 && root < world_size_, "ProcessGroup: broadcast root must be in [0, ",
              world_size_, "), got ", root);
  if (!backend_ || world_size_ == 1 || tensors.empty()) return;
  const CollectiveContext ctx{rank_, timeout_, gpus_};
  for (auto& group : by_kind(tensors)) {
    std::vector<torch::Tensor> flat{flatten(group)};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.timeout = timeout_;
    wait_for(start("broadcast", ctx, [&] { return backend_->broadcast(flat, opts); }), "broadcast",
             ctx);
    unflatten_into(flat.front(), group);
  }
}

void ProcessGroup::barrier() {
  if (!backend_ || world_size_ == 1) return;
  const CollectiveContext ctx{rank_, timeout_, gpus_};
  c10d::BarrierOptions opts;
  opts.timeout = timeout_;
  if (device_.is_cuda()) opts.device = device_;
  wait_for(start("barrier", ctx, [&] { return backend_->barrier(opts); }), "barrier", ctx);
}

std::shared_ptr<ProcessGroup::Work> ProcessGroup::allreduce_sum_async(torch::Tensor flat) {
  if (!backend_ || world_size_ == 1) return std::make_shared<DoneWork>();
  TORCH_CHECK(flat.defined() && flat.is_contiguous(),
              "ProcessGroup: allreduce_sum_async needs a contiguous tensor");
  std::vector<torch::Tensor> tensors{std::move(flat)};
  c10d::AllreduceOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  opts.timeout = timeout_;
  CollectiveContext ctx{rank_, timeout_, gpus_};
  auto work = start("allreduce", ctx, [&] { return backend_->allreduce(tensors, opts); });
  return std::make_shared<BackendWork>(std::move(work), std::move(ctx), "allreduce");
}

std::shared_ptr<ProcessGroup::Work> ProcessGroup::all_gather_async(torch::Tensor output,
                                                                   torch::Tensor input) {
  check_scatter_gather_operands("all_gather", output, input, world_size_);
  if (!backend_ || world_size_ == 1) {
    if (output.data_ptr() != input.data_ptr()) output.copy_(input);
    return std::make_shared<DoneWork>();
  }
  c10d::AllgatherOptions opts;
  opts.timeout = timeout_;
  CollectiveContext ctx{rank_, timeout_, gpus_};
  auto work =
      start("all_gather", ctx, [&] { return backend_->_allgather_base(output, input, opts); });
  return std::make_shared<BackendWork>(std::move(work), std::move(ctx), "all_gather");
}

std::shared_ptr<ProcessGroup::Work> ProcessGroup::reduce_scatter_sum_async(torch::Tensor output,
                                                                           torch::Tensor input) {
  check_scatter_gather_operands("reduce_scatter", input, output, world_size_);
  if (!backend_ || world_size_ == 1) {
    if (output.data_ptr() != input.data_ptr()) output.copy_(input);
    return std::make_shared<DoneWork>();
  }
  c10d::ReduceScatterOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  opts.timeout = timeout_;
  CollectiveContext ctx{rank_, timeout_, gpus_};
  auto work = start("reduce_scatter", ctx,
                    [&] { return backend_->_reduce_scatter_base(output, input, opts); });
  return std::make_shared<BackendWork>(std::move(work), std::move(ctx), "reduce_scatter");
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
  const bool index_from_local_rank = device.is_cuda() && !device.has_index();
  if (index_from_local_rank) device = torch::Device(torch::kCUDA, local_rank);
  if (device.is_cuda()) {
    // Checked here: CUDA's own "invalid device ordinal" names neither the
    // rank nor the way out.
    // NOLINTNEXTLINE(bugprone-signed-char-misuse): c10::DeviceIndex (int8_t) is a count here
    const auto visible = static_cast<int64_t>(torch::cuda::device_count());
    if (device.index() >= visible) {
      std::ostringstream os;
      os << "init_process_group: ";
      if (index_from_local_rank) {
        os << "LOCAL_RANK=" << local_rank << " puts this rank on " << device;
      } else {
        os << "rank " << *rank << " asks for " << device;
      }
      os << ", but " << visible_gpus_words(visible) << "; ";
      const std::string existing =
          visible == 1 ? "cuda:0" : "cuda:0 to cuda:" + std::to_string(visible - 1);
      if (visible == 0) {
        os << "make a GPU visible to this process, or train on the CPU (device kCPU, Gloo "
              "backend)";
      } else if (index_from_local_rank) {
        os << "start one process per GPU (torchrun --nproc_per_node=" << visible
           << " on this host), name a device explicitly (" << existing
           << "; NCCL takes one rank per GPU), or use the Gloo backend";
      } else {
        os << "name a device that exists (" << existing
           << "), or leave the index unset so that each rank runs on cuda:LOCAL_RANK, one process "
              "per GPU (torchrun --nproc_per_node="
           << visible << " on this host)";
      }
      TORCH_CHECK(false, os.str());
    }
  }
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
  std::function<c10::intrusive_ptr<c10d::Backend>(const c10::intrusive_ptr<c10d::Store>&)> make;
  std::vector<detail::GpuIdentity> gpus;
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
    make = [r = static_cast<int>(*rank), w = static_cast<int>(*world), gloo_options](
               const c10::intrusive_ptr<c10d::Store>& s) -> c10::intrusive_ptr<c10d::Backend> {
      return c10::make_intrusive<c10d::ProcessGroupGloo>(s, r, w, gloo_options);
    };
    try {
      impl = make(store);
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
    gpus = exchange_gpu_identities(*store, device, *rank, *world, timeout);
    auto nccl_options = c10d::ProcessGroupNCCL::Options::create();
    nccl_options->timeout = timeout;
    make = [r = static_cast<int>(*rank), w = static_cast<int>(*world), nccl_options](
               const c10::intrusive_ptr<c10d::Store>& s) -> c10::intrusive_ptr<c10d::Backend> {
      return c10::make_intrusive<c10d::ProcessGroupNCCL>(s, r, w, nccl_options);
    };
    impl = make(store);
#else
    TORCH_CHECK(
        false,
        "init_process_group: this wick build has no NCCL backend (needs WICK_WITH_CUDA and a "
        "LibTorch built with NCCL)");
#endif
  }
  auto pg = std::make_shared<ProcessGroup>(store, impl, *rank, *world, local_rank, local_world,
                                           device, timeout, std::move(gpus));
  pg->make_backend_ = std::move(make);
  return pg;
}

std::shared_ptr<ProcessGroup> ProcessGroup::new_group(const std::string& name) const {
  TORCH_CHECK(!name.empty(), "ProcessGroup: new_group needs a name");
  if (!backend_ || world_size_ == 1 || !make_backend_) return std::make_shared<ProcessGroup>();
  auto store = c10::make_intrusive<c10d::PrefixStore>(name, store_);
  c10::intrusive_ptr<c10d::Backend> impl;
  try {
    impl = make_backend_(store);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "ProcessGroup: rank ", rank_, " could not connect the group '", name,
                "': ", error_text(e));
  }
  auto pg = std::make_shared<ProcessGroup>(store, impl, rank_, world_size_, local_rank_,
                                           local_world_size_, device_, timeout_,
                                           gpus_ ? *gpus_ : std::vector<detail::GpuIdentity>{});
  pg->make_backend_ = make_backend_;
  return pg;
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
