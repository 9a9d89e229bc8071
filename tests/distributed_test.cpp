#include <wick/data.h>
#include <wick/ddp.h>
#include <wick/distributed.h>

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include "multiprocess.h"
#include "sampler_baseline.h"
#include "support.h"

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <vector>

namespace {

// ---------------------------------------------------------------------------
// DistributedSampler against torch.utils.data.DistributedSampler

TEST(DistributedSamplerTest, MatchesPythonDistributedSampler) {
  for (const auto& c : wick::testing::sampler_baseline::cases()) {
    for (int64_t rank = 0; rank < c.world; ++rank) {
      wick::DistributedSampler sampler(
          c.size, rank, c.world,
          wick::DistributedSamplerOptions().shuffle(c.shuffle).seed(c.seed).drop_last(c.drop_last));
      sampler.set_epoch(c.epoch);
      auto idx = sampler.indices();
      SCOPED_TRACE("size " + std::to_string(c.size) + " world " + std::to_string(c.world) +
                   " rank " + std::to_string(rank) + " epoch " + std::to_string(c.epoch));
      EXPECT_EQ(sampler.num_samples(), c.num_samples);
      ASSERT_EQ(idx.size(0), c.num_samples);
      const auto& head = c.per_rank[rank];
      for (size_t i = 0; i < head.size(); ++i)
        EXPECT_EQ(idx[i].item<int64_t>(), head[i]) << "position " << i;
      EXPECT_EQ(idx.sum().item<int64_t>(), c.per_rank_sum[rank]);
    }
  }
}

TEST(DistributedSamplerTest, RanksPartitionTheEpochAndEpochsDiffer) {
  const int64_t n = 1000, world = 3;
  std::vector<int64_t> seen(n, 0);
  torch::Tensor first_epoch0;
  for (int64_t rank = 0; rank < world; ++rank) {
    wick::DistributedSampler s(n, rank, world, wick::DistributedSamplerOptions().seed(5));
    auto idx = s.indices();
    if (rank == 0) first_epoch0 = idx;
    for (int64_t i = 0; i < idx.size(0); ++i) seen[idx[i].item<int64_t>()] += 1;
    s.set_epoch(1);
    if (rank == 0) EXPECT_FALSE(torch::equal(s.indices(), first_epoch0));
  }
  // 1000 = 3 * 334 - 2: two samples are read twice (padding), none missed.
  int64_t twice = 0;
  for (auto count : seen) {
    EXPECT_GE(count, 1);
    twice += count == 2;
  }
  EXPECT_EQ(twice, 2);
}

// TensorBatchSource's shard of an epoch is what Python's DistributedSampler gives that rank.
TEST(DistributedSamplerTest, TensorBatchSourceReadsItsRanksShard) {
  for (const auto& c : wick::testing::sampler_baseline::cases()) {
    if (c.drop_last || c.size > 100) continue;
    auto data = torch::arange(c.size, torch::kLong).view({c.size, 1});
    for (int64_t rank = 0; rank < c.world; ++rank) {
      wick::TensorBatchSource source(
          data, data.view(-1),
          wick::TensorBatchSourceOptions(3).shuffle(c.shuffle).seed(c.seed).rank(rank).world_size(
              c.world));
      source.reset(c.epoch);
      std::vector<int64_t> read;
      while (auto b = source.next()) {
        for (int64_t i = 0; i < b->target.size(0); ++i)
          read.push_back(b->target[i].item<int64_t>());
      }
      EXPECT_EQ(read, c.per_rank[rank]) << "size " << c.size << " rank " << rank;
      EXPECT_EQ(*source.size(), (c.num_samples + 2) / 3);
    }
  }
  EXPECT_THROWS_WITH(
      wick::TensorBatchSource(torch::zeros({4, 1}), torch::zeros({4}),
                              wick::TensorBatchSourceOptions(2).rank(2).world_size(2)),
      "rank must be in [0, world_size=2), got 2");
}

TEST(DistributedSamplerTest, RejectsBadArguments) {
  EXPECT_THROWS_WITH(wick::DistributedSampler(10, 3, 3), "rank must be in [0, 3), got 3");
  EXPECT_THROWS_WITH(wick::DistributedSampler(0, 0, 1), "dataset_size must be >= 1, got 0");
  EXPECT_THROWS_WITH(
      wick::DistributedSampler(2, 0, 4, wick::DistributedSamplerOptions().drop_last(true)),
      "leaves no sample per rank");
}

// ---------------------------------------------------------------------------
// init_process_group from the environment

// Sets environment variables for one scope, restoring what was there.
class EnvGuard {
 public:
  void set(const char* name, const char* value) {
    if (!saved_.count(name)) {
      const char* old = std::getenv(name);
      saved_[name] = old ? std::optional<std::string>(old) : std::nullopt;
    }
    if (value) {
      ::setenv(name, value, 1);
    } else {
      ::unsetenv(name);
    }
  }
  ~EnvGuard() {
    for (const auto& [name, value] : saved_) {
      if (value) {
        ::setenv(name.c_str(), value->c_str(), 1);
      } else {
        ::unsetenv(name.c_str());
      }
    }
  }

 private:
  std::map<std::string, std::optional<std::string>> saved_;
};

TEST(InitProcessGroupTest, WithoutTorchrunIsAWorldOfOne) {
  EnvGuard env;
  for (auto name : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"})
    env.set(name, nullptr);
  auto pg = wick::init_process_group();
  EXPECT_EQ(pg->rank(), 0);
  EXPECT_EQ(pg->world_size(), 1);
  EXPECT_TRUE(pg->is_main());
  EXPECT_EQ(pg->backend_name(), "none");
  auto t = torch::tensor({1.0, 2.0});
  pg->allreduce_sum({t});
  pg->broadcast({t});
  pg->barrier();
  pg->allreduce_sum_async(t)->wait();
  EXPECT_TRUE(torch::equal(t, torch::tensor({1.0, 2.0})));
}

TEST(InitProcessGroupTest, NamesMissingOrMalformedVariables) {
  EnvGuard env;
  for (auto name :
       {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}) {
    env.set(name, nullptr);
  }
  env.set("RANK", "0");
  EXPECT_THROWS_WITH(wick::init_process_group(), "RANK is set but WORLD_SIZE is not");
  env.set("WORLD_SIZE", "two");
  EXPECT_THROWS_WITH(wick::init_process_group(), "WORLD_SIZE must be an integer, got 'two'");
  env.set("WORLD_SIZE", "2");
  env.set("RANK", "2");
  EXPECT_THROWS_WITH(wick::init_process_group(), "RANK must be in [0, WORLD_SIZE=2), got 2");
  env.set("RANK", "1");
  EXPECT_THROWS_WITH(wick::init_process_group(), "MASTER_ADDR is not set");
  env.set("MASTER_ADDR", "127.0.0.1");
  EXPECT_THROWS_WITH(wick::init_process_group(), "MASTER_PORT is not set");
  env.set("MASTER_PORT", "70000");
  EXPECT_THROWS_WITH(wick::init_process_group(), "MASTER_PORT must be in [1, 65535], got 70000");
}

// A LOCAL_RANK past the visible GPUs (none here; one or more on a GPU machine).
TEST(InitProcessGroupTest, NamesLocalRankBeyondTheVisibleGpus) {
  EnvGuard env;
  for (auto name : {"MASTER_ADDR", "MASTER_PORT"}) env.set(name, nullptr);
  const auto visible = static_cast<int64_t>(torch::cuda::device_count());
  const std::string local = std::to_string(visible + 1), world = std::to_string(visible + 2);
  env.set("RANK", local.c_str());
  env.set("WORLD_SIZE", world.c_str());
  env.set("LOCAL_RANK", local.c_str());
  env.set("LOCAL_WORLD_SIZE", world.c_str());
  const auto cuda = wick::ProcessGroupOptions().device(torch::Device(torch::kCUDA));
  const std::string on = "cuda:" + local;
  EXPECT_THROWS_WITH(wick::init_process_group(cuda), "init_process_group: LOCAL_RANK=" + local +
                                                         " puts this rank on " + on + ", but ");
  // An explicit index past the visible GPUs names the rank instead.
  const auto explicit_device =
      wick::ProcessGroupOptions().device(torch::Device("cuda:" + std::to_string(visible)));
  EXPECT_THROWS_WITH(
      wick::init_process_group(explicit_device),
      "init_process_group: rank " + local + " asks for cuda:" + std::to_string(visible) + ", but ");
  if (visible == 0) {
    EXPECT_THROWS_WITH(wick::init_process_group(cuda),
                       "but no GPU is visible (CUDA_VISIBLE_DEVICES");
    EXPECT_THROWS_WITH(wick::init_process_group(cuda),
                       "make a GPU visible to this process, or train on the CPU (device kCPU, "
                       "Gloo backend)");
    return;
  }
  const std::string n = std::to_string(visible);
  EXPECT_THROWS_WITH(
      wick::init_process_group(cuda),
      "start one process per GPU (torchrun --nproc_per_node=" + n + " on this host)");
  EXPECT_THROWS_WITH(wick::init_process_group(cuda), "name a device explicitly (cuda:0");
  EXPECT_THROWS_WITH(wick::init_process_group(cuda), "or use the Gloo backend");
  EXPECT_THROWS_WITH(wick::init_process_group(explicit_device),
                     "name a device that exists (cuda:0");
}

// ---------------------------------------------------------------------------
// Ranks sharing a GPU (NCCL takes one rank per GPU)

using wick::detail::GpuIdentity;

// The form of the text torch 2.x's ProcessGroupNCCL throws (c10::DistBackendError)
// when NCCL makes the communicator for two ranks on one GPU (file, line and
// version vary).
const char* kNcclDuplicateGpu =
    "NCCL error in: /pytorch/torch/csrc/distributed/c10d/NCCLUtils.cpp:77, invalid usage (run "
    "with NCCL_DEBUG=WARN for details), NCCL version 2.27.5\n"
    "ncclInvalidUsage: This usually reflects invalid usage of NCCL library.\n"
    "Last error:\n"
    "Duplicate GPU detected : rank 1 and rank 0 both on CUDA device 1d000";
// The same failure without NCCL's last-error line (another NCCL version).
const char* kNcclInvalidUsage =
    "NCCL error in: /pytorch/torch/csrc/distributed/c10d/NCCLUtils.cpp:77, invalid usage (run "
    "with NCCL_DEBUG=WARN for details), NCCL version 2.27.5\n"
    "ncclInvalidUsage: This usually reflects invalid usage of NCCL library.";

GpuIdentity gpu(const std::string& host, int64_t index, const std::string& uuid,
                const std::string& bus) {
  GpuIdentity g;
  g.host = host;
  g.device_index = index;
  g.uuid = uuid;
  g.pci_bus_id = bus;
  return g;
}

const char* kUuidA = "GPU-8f2a31c4-0d6e-2b7a-91e5-3c4d5e6f7a8b";
const char* kUuidB = "GPU-1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901";

TEST(SharedGpuTest, IdentitiesRoundTripThroughTheStoreForm) {
  for (const auto& g : {gpu("node-a", 3, kUuidA, "0000:1d:00.0"), gpu("node-b", 0, "", ""),
                        gpu("", -1, kUuidB, "")}) {
    const auto back = wick::detail::decode_gpu_identity(wick::detail::encode_gpu_identity(g));
    EXPECT_EQ(back.host, g.host);
    EXPECT_EQ(back.device_index, g.device_index);
    EXPECT_EQ(back.uuid, g.uuid);
    EXPECT_EQ(back.pci_bus_id, g.pci_bus_id);
  }
  EXPECT_THROWS_WITH(wick::detail::decode_gpu_identity("node-a\n0"), "malformed GPU identity");
  EXPECT_THROWS_WITH(wick::detail::decode_gpu_identity("node-a\nzero\n\n"),
                     "malformed GPU identity");
}

TEST(SharedGpuTest, FindsTheRanksOnEachGpu) {
  const std::vector<GpuIdentity> by_rank{
      gpu("node-a", 0, kUuidA, "0000:1d:00.0"),  // 0 and 1: one UUID, seen as cuda:0 and cuda:1
      gpu("node-a", 1, kUuidA, "0000:1d:00.0"),
      gpu("node-a", 1, kUuidB, "0000:3b:00.0"),  // 2: its own GPU
      gpu("node-b", 0, "", "0000:1d:00.0"),      // 3 and 4: no UUIDs, one host and bus id
      gpu("node-b", 0, "", "0000:1d:00.0"),
      gpu("node-c", 0, "", "0000:1d:00.0"),  // 5: the same bus id on another host
  };
  EXPECT_EQ(wick::detail::ranks_sharing_gpus(by_rank),
            (std::vector<std::vector<int64_t>>{{0, 1}, {3, 4}}));
  EXPECT_TRUE(wick::detail::ranks_sharing_gpus({by_rank[0], by_rank[2], by_rank[5]}).empty());
  // Unknown identities share nothing.
  EXPECT_TRUE(wick::detail::ranks_sharing_gpus({GpuIdentity{}, GpuIdentity{}}).empty());
}

TEST(SharedGpuTest, ExplainsWhichRanksShareWhichGpu) {
  const std::vector<GpuIdentity> by_rank{
      gpu("node-a", 0, kUuidA, "0000:1d:00.0"), gpu("node-a", 0, kUuidA, "0000:1d:00.0"),
      gpu("node-a", 1, kUuidB, "0000:3b:00.0"), gpu("node-a", 0, kUuidB, "0000:3b:00.0")};
  const auto message = wick::detail::explain_shared_gpu_error(kNcclInvalidUsage, by_rank);
  ASSERT_TRUE(message.has_value());
  EXPECT_EQ(*message,
            std::string("ranks 0 and 1 share one GPU, cuda:0 on host node-a (UUID ") + kUuidA +
                ", PCI bus 0000:1d:00.0); ranks 2 and 3 share one GPU on host node-a (rank 2 on "
                "cuda:1, rank 3 on cuda:0) (UUID " +
                kUuidB +
                ", PCI bus 0000:3b:00.0), and NCCL takes one rank per GPU. Give each rank a GPU "
                "of its own: start one process per GPU (torchrun --nproc_per_node=<GPUs on the "
                "host>) and leave the device's index unset, so that each rank runs on "
                "cuda:LOCAL_RANK; or, to put several ranks on one GPU on purpose, use the Gloo "
                "backend (ProcessGroupOptions().backend(wick::DistributedBackend::kGloo)), which "
                "reduces through host memory. NCCL said: " +
                kNcclInvalidUsage);
}

TEST(SharedGpuTest, ExplainsNcclsDuplicateGpuWithoutIdentities) {
  const auto message = wick::detail::explain_shared_gpu_error(kNcclDuplicateGpu, {});
  ASSERT_TRUE(message.has_value());
  EXPECT_EQ(
      message->rfind("ranks 0 and 1 are on one GPU (PCI bus 0000:1d:00.0, NCCL's CUDA device "
                     "1d000), and NCCL takes one rank per GPU. Give each rank a GPU of its own",
                     0),
      0u)
      << *message;
  EXPECT_NE(message->find(std::string("NCCL said: ") + kNcclDuplicateGpu), std::string::npos);
  // A text that names no ranks still gets the rule and the remedies.
  const auto bare = wick::detail::explain_shared_gpu_error("Duplicate GPU detected", {});
  ASSERT_TRUE(bare.has_value());
  EXPECT_EQ(bare->rfind("two ranks are on one GPU, and NCCL takes one rank per GPU", 0), 0u);
}

TEST(SharedGpuTest, LeavesOtherFailuresAlone) {
  const std::vector<GpuIdentity> apart{gpu("node-a", 0, kUuidA, "0000:1d:00.0"),
                                       gpu("node-a", 1, kUuidB, "0000:3b:00.0")};
  EXPECT_FALSE(wick::detail::explain_shared_gpu_error("Connection reset by peer", apart));
  EXPECT_FALSE(wick::detail::explain_shared_gpu_error(kNcclInvalidUsage, {}));
}

// A stand-in for ProcessGroupNCCL that fails every collective with `text`, as
// the real one does when NCCL refuses the communicator: when the collective
// starts (blocking communicators) or when it is waited for.
class FailingNccl : public c10d::Backend {
 public:
  FailingNccl(int rank, int size, std::string text, bool at_start)
      : c10d::Backend(rank, size), text_(std::move(text)), at_start_(at_start) {}
  const std::string getBackendName() const override { return "nccl"; }
  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>&,
                                           const c10d::AllreduceOptions&) override {
    return fail();
  }
  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>&,
                                           const c10d::BroadcastOptions&) override {
    return fail();
  }
  c10::intrusive_ptr<c10d::Work> barrier(const c10d::BarrierOptions&) override { return fail(); }

 private:
  class FailingWork : public c10d::Work {
   public:
    explicit FailingWork(std::string text) : text_(std::move(text)) {}
    bool wait(std::chrono::milliseconds) override { C10_THROW_ERROR(DistBackendError, text_); }

   private:
    std::string text_;
  };
  c10::intrusive_ptr<c10d::Work> fail() {
    if (at_start_) C10_THROW_ERROR(DistBackendError, text_);
    return c10::make_intrusive<FailingWork>(text_);
  }
  std::string text_;
  bool at_start_;
};

std::shared_ptr<wick::ProcessGroup> failing_group(const std::string& text, bool at_start,
                                                  std::vector<GpuIdentity> gpus) {
  return std::make_shared<wick::ProcessGroup>(
      nullptr, c10::make_intrusive<FailingNccl>(0, 2, text, at_start), /*rank=*/0,
      /*world_size=*/2, /*local_rank=*/0, /*local_world_size=*/2, torch::kCPU,
      std::chrono::seconds(5), std::move(gpus));
}

TEST(ProcessGroupTest, RanksSharingAGpuFailEveryCollectiveSayingSo) {
  const std::vector<GpuIdentity> shared{gpu("node-a", 0, kUuidA, "0000:1d:00.0"),
                                        gpu("node-a", 0, kUuidA, "0000:1d:00.0")};
  const std::string says = "ranks 0 and 1 share one GPU, cuda:0 on host node-a (UUID ";
  for (bool at_start : {true, false}) {
    SCOPED_TRACE(at_start ? "fails when started" : "fails when waited for");
    auto pg = failing_group(kNcclInvalidUsage, at_start, shared);
    EXPECT_EQ(pg->ranks_sharing_gpu(), (std::vector<int64_t>{1}));
    auto t = torch::ones({4});
    EXPECT_THROWS_WITH(pg->allreduce_sum({t}), "ProcessGroup: allreduce failed on rank 0: " + says);
    EXPECT_THROWS_WITH(pg->broadcast({t}), "ProcessGroup: broadcast failed on rank 0: " + says);
    EXPECT_THROWS_WITH(pg->barrier(), "ProcessGroup: barrier failed on rank 0: " + says);
    EXPECT_THROWS_WITH(pg->allreduce_sum_async(t)->wait(),
                       "ProcessGroup: allreduce failed on rank 0: " + says);
    EXPECT_THROWS_WITH(pg->barrier(), std::string("NCCL said: ") + kNcclInvalidUsage);
    EXPECT_THROW(pg->barrier(), c10::DistBackendError);
    // The DDP wrapper's first collective (rank 0's parameter description) says the same.
    EXPECT_THROWS_WITH(wick::DistributedDataParallel(torch::nn::Linear(2, 2).ptr(), pg),
                       "ProcessGroup: broadcast failed on rank 0: " + says);
  }
}

TEST(ProcessGroupTest, NcclsDuplicateGpuTextIsExplainedWithoutIdentities) {
  auto pg = failing_group(kNcclDuplicateGpu, /*at_start=*/false, {});
  EXPECT_TRUE(pg->ranks_sharing_gpu().empty());
  auto t = torch::ones({4});
  EXPECT_THROWS_WITH(
      pg->allreduce_sum_async(t)->wait(),
      "ProcessGroup: allreduce failed on rank 0: ranks 0 and 1 are on one GPU (PCI "
      "bus 0000:1d:00.0, NCCL's CUDA device 1d000), and NCCL takes one rank per GPU");
}

TEST(ProcessGroupTest, OtherNcclFailuresKeepTheirMessage) {
  const std::vector<GpuIdentity> apart{gpu("node-a", 0, kUuidA, "0000:1d:00.0"),
                                       gpu("node-a", 1, kUuidB, "0000:3b:00.0")};
  auto pg = failing_group(kNcclInvalidUsage, /*at_start=*/true, apart);
  EXPECT_TRUE(pg->ranks_sharing_gpu().empty());
  auto t = torch::ones({4});
  EXPECT_THROWS_WITH(pg->allreduce_sum({t}),
                     std::string("ProcessGroup: allreduce failed on rank 0: ") + kNcclInvalidUsage);
  EXPECT_THROWS_WITH(failing_group(kNcclInvalidUsage, true, {apart.front()}),
                     "gpus must hold one identity per rank (2), got 1");
}

// ---------------------------------------------------------------------------
// Real processes: this test binary re-executed once per rank (multiprocess.h).

using wick::testing::is_rank_child;
using wick::testing::run_rank_processes;
using wick::testing::run_ranks;
using wick::testing::TempDir;

TEST(ProcessGroupTest, TwoRanksReduceBroadcastAndMeet) {
  if (!is_rank_child()) {
    TempDir dir;
    EXPECT_TRUE(run_ranks(2, dir.str()));
    return;
  }
  auto pg = wick::init_process_group(wick::ProcessGroupOptions().timeout(std::chrono::seconds(60)));
  ASSERT_EQ(pg->world_size(), 2);
  ASSERT_EQ(pg->backend_name(), "gloo");
  const double r = static_cast<double>(pg->rank());
  // Mixed shapes and dtypes in one call; values identify the rank.
  auto a = torch::full({3}, r + 1, torch::kFloat32);
  auto b = torch::full({2, 2}, 10 * (r + 1), torch::kFloat64);
  auto c = torch::full({5}, static_cast<int64_t>(r + 1), torch::kLong);
  pg->allreduce_sum({a, b, c});
  EXPECT_TRUE(torch::equal(a, torch::full({3}, 3.0f)));
  EXPECT_TRUE(torch::equal(b, torch::full({2, 2}, 30.0, torch::kFloat64)));
  EXPECT_TRUE(torch::equal(c, torch::full({5}, 3, torch::kLong)));
  auto d = torch::full({4}, r, torch::kFloat32);
  auto e = torch::full({1}, r * 7, torch::kFloat32);
  pg->broadcast({d, e}, /*root=*/1);
  EXPECT_TRUE(torch::equal(d, torch::full({4}, 1.0f)));
  EXPECT_TRUE(torch::equal(e, torch::full({1}, 7.0f)));
  auto f = torch::arange(6, torch::kFloat32) * (r + 1);
  auto work = pg->allreduce_sum_async(f);
  work->wait();
  EXPECT_TRUE(torch::equal(f, torch::arange(6, torch::kFloat32) * 3));
  pg->barrier();
}

// A rank that never joins: the other fails with a timeout error in about the
// configured time, never hangs.
TEST(ProcessGroupTest, RankThatNeverJoinsTimesOut) {
  if (!is_rank_child()) {
    TempDir dir;
    const auto start = std::chrono::steady_clock::now();
    auto status = run_rank_processes({0}, 2, dir.str(), 60);  // rank 1 is never started
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_EQ(status, (std::vector<int>{0}));  // the child's own checks passed
    EXPECT_LT(seconds, 30.0);
    return;
  }
  const auto start = std::chrono::steady_clock::now();
  EXPECT_THROWS_WITH(
      wick::init_process_group(wick::ProcessGroupOptions().timeout(std::chrono::seconds(3))),
      "cannot rendezvous at 127.0.0.1");
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_GE(seconds, 2.5);
  EXPECT_LT(seconds, 15.0);
}

// A peer that dies after joining: the survivor's collective fails with an error, not a hang.
TEST(ProcessGroupTest, PeerDeathFailsTheCollective) {
  if (!is_rank_child()) {
    TempDir dir;
    EXPECT_EQ(run_rank_processes({0, 1}, 2, dir.str(), 60), (std::vector<int>{0, 3}));
    return;
  }
  auto pg = wick::init_process_group(wick::ProcessGroupOptions().timeout(std::chrono::seconds(5)));
  pg->barrier();
  if (pg->rank() == 1) ::_exit(3);  // dies without a word
  const auto start = std::chrono::steady_clock::now();
  auto t = torch::ones({16});
  EXPECT_THROWS_WITH(pg->allreduce_sum({t}), "ProcessGroup: allreduce");
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 15.0);
}

}  // namespace
