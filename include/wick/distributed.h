#pragma once
// Process groups for data-parallel training, on LibTorch's c10d (Gloo on CPU,
// NCCL on CUDA), set up from torchrun's environment.
//
//   // torchrun --standalone --nproc_per_node=2 --no-python ./my_trainer
//   auto pg = wick::init_process_group();          // RANK, WORLD_SIZE, MASTER_ADDR, ... from the
//   env std::cout << pg->rank() << "/" << pg->world_size() << "\n"; auto t = torch::ones({4});
//   pg->allreduce_sum({t});                         // in place, on every rank
//
// Without torchrun's variables it is a world of one: every collective is a
// no-op and training code runs unchanged.

#include <torch/torch.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace c10d {
class Backend;
class Store;
}  // namespace c10d

namespace wick {

enum class DistributedBackend {
  kAuto,  ///< NCCL when the device is CUDA, else Gloo
  kGloo,
  kNccl,
};

namespace detail {

/// The GPU a rank's collectives run on, as each rank of an NCCL group
/// publishes it through the store at init (NCCL takes one rank per GPU).
struct GpuIdentity {
  /// gethostname() of the rank's process.
  std::string host;
  /// CUDA ordinal in that process (after its CUDA_VISIBLE_DEVICES); -1: unknown.
  int64_t device_index = -1;
  /// "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" as nvidia-smi -L prints it; empty: unknown.
  std::string uuid;
  /// PCI bus id, "0000:1d:00.0"; empty: unknown.
  std::string pci_bus_id;
};

/// The store's form of an identity, and back (throws on a malformed value).
std::string encode_gpu_identity(const GpuIdentity& gpu);
GpuIdentity decode_gpu_identity(const std::string& text);

/// Whether two identities name the same physical GPU: the same UUID, or
/// (without UUIDs) the same host and PCI bus id.
bool same_gpu(const GpuIdentity& a, const GpuIdentity& b);

/// The sets of two or more ranks that share a GPU, `by_rank[r]` being rank
/// r's GPU; each set ascending, the sets in order of their first rank.
std::vector<std::vector<int64_t>> ranks_sharing_gpus(const std::vector<GpuIdentity>& by_rank);

/// When `error`, the text of a failed collective, comes from ranks sharing a
/// GPU (by `by_rank`, or NCCL's own "Duplicate GPU detected" in the text):
/// which ranks share which GPU, that NCCL takes one rank per GPU, the
/// remedies, then `error`. Otherwise nullopt.
std::optional<std::string> explain_shared_gpu_error(const std::string& error,
                                                    const std::vector<GpuIdentity>& by_rank);

}  // namespace detail

struct ProcessGroupOptions {
  /// Which collective library; kAuto picks from `device`.
  TORCH_ARG(DistributedBackend, backend) = DistributedBackend::kAuto;
  /// Device the collectives run on (CUDA: this rank's LOCAL_RANK device when
  /// unset). NCCL takes one rank per GPU: two ranks on one device fail at
  /// their first collective with an error saying so.
  TORCH_ARG(std::optional<torch::Device>, device) = std::nullopt;
  /// Rendezvous and collective timeout: a peer that never joins or dies mid-step
  /// ends in an error after this long, never a hang.
  TORCH_ARG(std::chrono::milliseconds, timeout) = std::chrono::minutes(5);
  /// Overrides of torchrun's variables (unset: read RANK, WORLD_SIZE, LOCAL_RANK,
  /// LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the environment).
  TORCH_ARG(std::optional<int64_t>, rank) = std::nullopt;
  TORCH_ARG(std::optional<int64_t>, world_size) = std::nullopt;
  TORCH_ARG(std::optional<std::string>, master_addr) = std::nullopt;
  TORCH_ARG(std::optional<int64_t>, master_port) = std::nullopt;
};

/// A group of processes (ranks) and the collectives wick needs, each of which
/// waits with the group's timeout and throws naming the operation on failure.
class ProcessGroup {
 public:
  /// A world of one (no communication).
  ProcessGroup();
  /// `gpus`: every rank's GPU by rank (NCCL groups; empty when unknown), so
  /// that a collective failing on ranks that share a GPU says so.
  ProcessGroup(c10::intrusive_ptr<c10d::Store> store, c10::intrusive_ptr<c10d::Backend> backend,
               int64_t rank, int64_t world_size, int64_t local_rank, int64_t local_world_size,
               torch::Device device, std::chrono::milliseconds timeout,
               std::vector<detail::GpuIdentity> gpus = {});
  ~ProcessGroup();

  int64_t rank() const { return rank_; }
  int64_t world_size() const { return world_size_; }
  int64_t local_rank() const { return local_rank_; }
  int64_t local_world_size() const { return local_world_size_; }
  bool is_main() const { return rank_ == 0; }
  const torch::Device& device() const { return device_; }
  std::chrono::milliseconds timeout() const { return timeout_; }
  /// "gloo", "nccl", or "none" (world of one).
  std::string backend_name() const;
  /// The other ranks whose collectives run on this rank's GPU (known in NCCL
  /// groups, from the GPU identities exchanged at init; else empty).
  std::vector<int64_t> ranks_sharing_gpu() const;

  /// Sums `tensors` in place across ranks (any shapes; one coalesced collective).
  void allreduce_sum(const std::vector<torch::Tensor>& tensors);
  /// Copies rank `root`'s tensors into every rank's, in place.
  void broadcast(const std::vector<torch::Tensor>& tensors, int64_t root = 0);
  /// Waits until every rank arrives.
  void barrier();
  /// Starts an asynchronous sum of one flat tensor; wait on the returned handle.
  class Work;
  std::shared_ptr<Work> allreduce_sum_async(torch::Tensor flat);
  /// Starts an asynchronous all-gather: `output` (contiguous, world_size() *
  /// input.numel() elements) receives every rank's `input`, rank r's at
  /// element r * input.numel(). Same dtype and device. In a world of one, a copy.
  std::shared_ptr<Work> all_gather_async(torch::Tensor output, torch::Tensor input);
  /// Starts an asynchronous reduce-scatter: `input` (contiguous, world_size() *
  /// output.numel() elements) is summed across ranks and rank r receives
  /// elements [r * output.numel(), (r + 1) * output.numel()) of the sum in
  /// `output`. In a world of one, a copy.
  std::shared_ptr<Work> reduce_scatter_sum_async(torch::Tensor output, torch::Tensor input);

  /// Another group of the same ranks, backend and device, with a
  /// communicator of its own (over this group's store, under `name`): its
  /// collectives are ordered apart from this group's, so two kinds of
  /// traffic whose relative order differs between ranks (ShardedDataParallel's
  /// all-gathers and reduce-scatters in backward) cannot be mismatched. Every
  /// rank must call it, with the same name, once per name. In a world of
  /// one, another world of one.
  std::shared_ptr<ProcessGroup> new_group(const std::string& name) const;

  /// The c10d backend (nullptr in a world of one), for what wick does not wrap.
  const c10::intrusive_ptr<c10d::Backend>& backend() const { return backend_; }

 private:
  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<c10d::Backend> backend_;
  int64_t rank_ = 0, world_size_ = 1, local_rank_ = 0, local_world_size_ = 1;
  torch::Device device_ = torch::kCPU;
  std::chrono::milliseconds timeout_{std::chrono::minutes(5)};
  std::shared_ptr<const std::vector<detail::GpuIdentity>> gpus_;  // by rank; empty: unknown
  // Makes a backend like this group's over another store (new_group); set by init_process_group.
  std::function<c10::intrusive_ptr<c10d::Backend>(const c10::intrusive_ptr<c10d::Store>&)>
      make_backend_;
  friend std::shared_ptr<ProcessGroup> init_process_group(ProcessGroupOptions options);
};

class ProcessGroup::Work {
 public:
  virtual ~Work() = default;
  /// Blocks until done (throws on failure or timeout).
  virtual void wait() = 0;
};

/// Sets up the process group from torchrun's environment (or the options):
/// rendezvous through c10d's TCPStore at MASTER_ADDR:MASTER_PORT (rank 0
/// hosts it), then a Gloo or NCCL backend. Missing or malformed variables, an
/// unreachable master, a CUDA device past the visible GPUs (e.g. LOCAL_RANK 1
/// on a one-GPU host), or a backend this build lacks: a clear error naming
/// the variable, the device or the address. NCCL: the ranks exchange their
/// GPUs' identities, so that ranks sharing one are named when NCCL refuses
/// them. Without RANK/WORLD_SIZE: a world of one.
std::shared_ptr<ProcessGroup> init_process_group(ProcessGroupOptions options = {});

struct DistributedSamplerOptions {
  /// Shuffle each epoch with a generator seeded by (seed, epoch), the same on every rank.
  TORCH_ARG(bool, shuffle) = true;
  TORCH_ARG(uint64_t, seed) = 0;
  /// true: drop the tail so every rank gets floor(n / world) samples;
  /// false: pad by repeating the first samples so every rank gets ceil(n / world).
  TORCH_ARG(bool, drop_last) = false;
};

/// Which samples this rank reads: the epoch's order (shuffled by seed and
/// epoch), padded or cut to a multiple of the world size, then every
/// world_size-th index starting at rank (as torch.utils.data.DistributedSampler).
class DistributedSampler {
 public:
  DistributedSampler(int64_t dataset_size, int64_t rank, int64_t world_size,
                     DistributedSamplerOptions options = {});
  void set_epoch(int64_t epoch) { epoch_ = epoch; }
  int64_t epoch() const { return epoch_; }
  /// This rank's indices for the current epoch (int64).
  torch::Tensor indices() const;
  /// Samples per rank per epoch.
  int64_t num_samples() const;

 private:
  int64_t size_, rank_, world_size_;
  DistributedSamplerOptions options_;
  int64_t epoch_ = 0;
};

}  // namespace wick
