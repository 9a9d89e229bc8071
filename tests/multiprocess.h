#pragma once
// Multi-process tests: the running gtest binary re-executes itself once per
// rank with --gtest_filter=<the current test> and torchrun's variables, so a
// test body runs in real processes that form a process group over 127.0.0.1.
//
//   TEST(MyTest, TwoRanksAgree) {
//     if (!wick::testing::is_rank_child()) {                 // the parent
//       wick::testing::TempDir dir;
//       ASSERT_TRUE(wick::testing::run_ranks(2, dir.str()));  // every child exited 0
//       ... read what the children wrote into dir ...
//       return;
//     }
//     auto pg = wick::init_process_group();                   // a child: RANK etc. are set
//     ... gtest assertions (a failure makes the child exit 1), files into child_dir() ...
//   }
//
// Each child's stdout and stderr go to <dir>/rank<r>.log; on failure the
// result carries the logs.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

namespace wick::testing {

/// True inside a rank child started by run_ranks().
inline bool is_rank_child() { return std::getenv("WICK_TEST_CHILD") != nullptr; }

/// The parent's scratch directory, in a rank child.
inline std::string child_dir() {
  const char* d = std::getenv("WICK_TEST_DIR");
  return d ? d : "";
}

/// This child's rank (0 in the parent).
inline int child_rank() {
  const char* r = std::getenv("RANK");
  return r ? std::atoi(r) : 0;
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
inline int free_port() {
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

inline std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

/// Starts the current test in children for `ranks` of a `world`-rank group
/// (a rank left out never joins), sharing `dir`; waits at most `timeout`,
/// then kills what still runs (SIGKILL). Returns each child's exit status
/// (128 + signal when killed by one, -1 when it outlived the timeout).
/// `kill_now`, when given, is asked every 10 ms while the children run;
/// true kills them all at once (SIGKILL).
inline std::vector<int> run_rank_processes(const std::vector<int>& ranks, int world,
                                           const std::string& dir,
                                           std::chrono::milliseconds timeout,
                                           const std::function<bool()>& kill_now = {}) {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const std::string filter =
      std::string("--gtest_filter=") + info->test_suite_name() + "." + info->name();
  const std::string port = std::to_string(free_port());
  std::vector<pid_t> pids;
  for (int rank : ranks) {
    const std::string log = dir + "/rank" + std::to_string(rank) + ".log";
    const pid_t pid = ::fork();
    if (pid == 0) {
      const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (fd >= 0) {
        ::dup2(fd, 1);
        ::dup2(fd, 2);
        ::close(fd);
      }
      ::setenv("WICK_TEST_CHILD", "1", 1);
      ::setenv("WICK_TEST_DIR", dir.c_str(), 1);
      ::setenv("RANK", std::to_string(rank).c_str(), 1);
      ::setenv("LOCAL_RANK", std::to_string(rank).c_str(), 1);
      ::setenv("WORLD_SIZE", std::to_string(world).c_str(), 1);
      ::setenv("LOCAL_WORLD_SIZE", std::to_string(world).c_str(), 1);
      ::setenv("MASTER_ADDR", "127.0.0.1", 1);
      ::setenv("MASTER_PORT", port.c_str(), 1);
      ::setenv("OMP_NUM_THREADS", "1", 1);
      ::execl("/proc/self/exe", "wick-rank-child", filter.c_str(), static_cast<char*>(nullptr));
      ::_exit(127);
    }
    pids.push_back(pid);
  }
  std::vector<int> status(pids.size(), -1);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  size_t done = 0;
  while (done < pids.size() && std::chrono::steady_clock::now() < deadline &&
         !(kill_now && kill_now())) {
    for (size_t i = 0; i < pids.size(); ++i) {
      if (pids[i] == 0) continue;
      int st = 0;
      if (::waitpid(pids[i], &st, WNOHANG) == pids[i]) {
        status[i] = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        pids[i] = 0;
        ++done;
      }
    }
    ::usleep(10000);
  }
  for (auto& pid : pids) {
    if (pid != 0) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  }
  return status;
}

inline std::vector<int> run_rank_processes(const std::vector<int>& ranks, int world,
                                           const std::string& dir, int timeout_s) {
  return run_rank_processes(ranks, world, dir, std::chrono::seconds(timeout_s));
}

/// Runs the current test in `world` children (ranks 0..world-1) sharing
/// `dir`, waits at most `timeout_s` seconds (then kills them), and succeeds
/// when every child exited with status 0; a failure carries every rank's log.
inline ::testing::AssertionResult run_ranks(int world, const std::string& dir,
                                            int timeout_s = 120) {
  std::vector<int> ranks;
  for (int rank = 0; rank < world; ++rank) ranks.push_back(rank);
  const auto status = run_rank_processes(ranks, world, dir, timeout_s);
  bool ok = true;
  for (int s : status) ok = ok && s == 0;
  if (ok) return ::testing::AssertionSuccess();
  auto failure = ::testing::AssertionFailure();
  for (int rank = 0; rank < world; ++rank) {
    failure << "rank " << rank << " exit status " << status[rank]
            << (status[rank] == -1 ? " (still running after the timeout, killed)" : "")
            << "; log:\n"
            << read_text(dir + "/rank" + std::to_string(rank) + ".log") << "\n";
  }
  return failure;
}

}  // namespace wick::testing
