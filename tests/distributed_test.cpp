#include <wick/data.h>
#include <wick/distributed.h>

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
