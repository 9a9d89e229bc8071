#include <wick/distributed.h>

#include "sampler_baseline.h"
#include "support.h"

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

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
      SCOPED_TRACE("size " + std::to_string(c.size) + " world " + std::to_string(c.world) + " rank " +
                   std::to_string(rank) + " epoch " + std::to_string(c.epoch));
      EXPECT_EQ(sampler.num_samples(), c.num_samples);
      ASSERT_EQ(idx.size(0), c.num_samples);
      const auto& head = c.per_rank[rank];
      for (size_t i = 0; i < head.size(); ++i) EXPECT_EQ(idx[i].item<int64_t>(), head[i]) << "position " << i;
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

TEST(DistributedSamplerTest, RejectsBadArguments) {
  EXPECT_THROWS_WITH(wick::DistributedSampler(10, 3, 3), "rank must be in [0, 3), got 3");
  EXPECT_THROWS_WITH(wick::DistributedSampler(0, 0, 1), "dataset_size must be >= 1, got 0");
  EXPECT_THROWS_WITH(wick::DistributedSampler(2, 0, 4, wick::DistributedSamplerOptions().drop_last(true)),
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
  for (auto name : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}) env.set(name, nullptr);
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
  for (auto name : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}) {
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
// Real processes: this test binary re-executed once per rank.

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  const int port = ntohs(addr.sin_port);
  ::close(fd);
  return port;
}

bool is_child() { return std::getenv("WICK_TEST_RANK_CHILD") != nullptr; }

std::string current_test() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  return std::string(info->test_suite_name()) + "." + info->name();
}

// Starts `ranks` of a `world`-rank group running the current test as children;
// returns each child's exit status (-1 for one killed by the `timeout_s` limit).
std::vector<int> run_ranks(const std::vector<int>& ranks, int world, int timeout_s) {
  const std::string port = std::to_string(free_port());
  const std::string filter = "--gtest_filter=" + current_test();
  std::vector<pid_t> pids;
  for (int rank : ranks) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      ::setenv("WICK_TEST_RANK_CHILD", "1", 1);
      ::setenv("RANK", std::to_string(rank).c_str(), 1);
      ::setenv("LOCAL_RANK", std::to_string(rank).c_str(), 1);
      ::setenv("WORLD_SIZE", std::to_string(world).c_str(), 1);
      ::setenv("LOCAL_WORLD_SIZE", std::to_string(world).c_str(), 1);
      ::setenv("MASTER_ADDR", "127.0.0.1", 1);
      ::setenv("MASTER_PORT", port.c_str(), 1);
      ::setenv("OMP_NUM_THREADS", "1", 1);
      ::execl("/proc/self/exe", "distributed_test", filter.c_str(), static_cast<char*>(nullptr));
      ::_exit(127);
    }
    pids.push_back(pid);
  }
  std::vector<int> status(pids.size(), -1);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  size_t done = 0;
  while (done < pids.size() && std::chrono::steady_clock::now() < deadline) {
    for (size_t i = 0; i < pids.size(); ++i) {
      if (status[i] != -1 || pids[i] == 0) continue;
      int st = 0;
      if (::waitpid(pids[i], &st, WNOHANG) == pids[i]) {
        status[i] = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        pids[i] = 0;
        ++done;
      }
    }
    ::usleep(20000);
  }
  for (size_t i = 0; i < pids.size(); ++i) {
    if (pids[i] != 0) {
      ::kill(pids[i], SIGKILL);
      ::waitpid(pids[i], nullptr, 0);
    }
  }
  return status;
}

TEST(ProcessGroupTest, TwoRanksReduceBroadcastAndMeet) {
  if (!is_child()) {
    EXPECT_EQ(run_ranks({0, 1}, 2, 120), (std::vector<int>{0, 0}));
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
  if (!is_child()) {
    const auto start = std::chrono::steady_clock::now();
    auto status = run_ranks({0}, 2, 60);  // rank 1 is never started
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_EQ(status, (std::vector<int>{0}));  // the child's own checks passed
    EXPECT_LT(seconds, 30.0);
    return;
  }
  const auto start = std::chrono::steady_clock::now();
  EXPECT_THROWS_WITH(wick::init_process_group(wick::ProcessGroupOptions().timeout(std::chrono::seconds(3))),
                     "cannot rendezvous at 127.0.0.1");
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_GE(seconds, 2.5);
  EXPECT_LT(seconds, 15.0);
}

// A peer that dies after joining: the survivor's collective fails with an error, not a hang.
TEST(ProcessGroupTest, PeerDeathFailsTheCollective) {
  if (!is_child()) {
    EXPECT_EQ(run_ranks({0, 1}, 2, 60), (std::vector<int>{0, 3}));
    return;
  }
  auto pg = wick::init_process_group(wick::ProcessGroupOptions().timeout(std::chrono::seconds(5)));
  pg->barrier();
  if (pg->rank() == 1) ::_exit(3);  // dies without a word
  const auto start = std::chrono::steady_clock::now();
  auto t = torch::ones({16});
  EXPECT_THROWS_WITH(pg->allreduce_sum({t}), "ProcessGroup: allreduce");
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 15.0);
}

}  // namespace
