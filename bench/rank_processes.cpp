#include "rank_processes.h"

#include <c10/util/Exception.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

namespace wick_bench {

ScratchFolder::ScratchFolder(const std::string& tag) {
  const char* tmp = std::getenv("TMPDIR");
  std::string templ =
      std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/wick-bench-" + tag + "-XXXXXX";
  TORCH_CHECK(::mkdtemp(templ.data()) != nullptr, "wick-bench: cannot create a scratch folder in ",
              templ);
  path = templ;
}

ScratchFolder::~ScratchFolder() {
  if (DIR* d = ::opendir(path.c_str())) {
    while (dirent* e = ::readdir(d)) {
      const std::string name = e->d_name;
      if (name != "." && name != "..") ::unlink((path + "/" + name).c_str());
    }
    ::closedir(d);
  }
  ::rmdir(path.c_str());
}

int free_loopback_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  TORCH_CHECK(fd >= 0, "wick-bench: cannot open a socket to find a free port");
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

std::string read_text_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<Json> run_rank_processes(const std::vector<std::string>& argv, int world,
                                     const std::string& dir, int timeout_s, const std::string& what,
                                     bool group_of_one) {
  TORCH_CHECK(!argv.empty(), "wick-bench: run_rank_processes needs a program");
  TORCH_CHECK(world >= 1, "wick-bench: run_rank_processes needs world >= 1, got ", world);
  const std::string port = std::to_string(free_loopback_port());
  std::fflush(stdout);
  std::fflush(stderr);
  std::vector<pid_t> pids;
  for (int rank = 0; rank < world; ++rank) {
    const std::string log = dir + "/rank" + std::to_string(rank) + ".log";
    const pid_t pid = ::fork();
    TORCH_CHECK(pid >= 0, "wick-bench: fork failed");
    if (pid == 0) {
      const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (fd >= 0) {
        ::dup2(fd, 1);
        ::dup2(fd, 2);
        ::close(fd);
      }
      if (world > 1 || group_of_one) {
        ::setenv("RANK", std::to_string(rank).c_str(), 1);
        ::setenv("LOCAL_RANK", std::to_string(rank).c_str(), 1);
        ::setenv("WORLD_SIZE", std::to_string(world).c_str(), 1);
        ::setenv("LOCAL_WORLD_SIZE", std::to_string(world).c_str(), 1);
        ::setenv("MASTER_ADDR", "127.0.0.1", 1);
        ::setenv("MASTER_PORT", port.c_str(), 1);
      } else {
        for (const char* v : {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                              "MASTER_PORT"}) {
          ::unsetenv(v);
        }
      }
      ::setenv("OMP_NUM_THREADS", "1", 1);
      std::vector<char*> args;
      for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      ::execvp(args[0], args.data());
      std::perror(("wick-bench: cannot start " + argv[0]).c_str());
      ::_exit(127);
    }
    pids.push_back(pid);
  }
  std::vector<int> status(pids.size(), -1);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  size_t done = 0;
  while (done < pids.size() && std::chrono::steady_clock::now() < deadline) {
    for (size_t i = 0; i < pids.size(); ++i) {
      if (pids[i] == 0) continue;
      int st = 0;
      if (::waitpid(pids[i], &st, WNOHANG) == pids[i]) {
        status[i] = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        pids[i] = 0;
        ++done;
      }
    }
    ::usleep(5000);
  }
  for (auto& pid : pids) {
    if (pid != 0) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  }
  std::vector<Json> results;
  std::string failure;
  for (int rank = 0; rank < world; ++rank) {
    const std::string base = dir + "/rank" + std::to_string(rank);
    if (status[rank] != 0 || ::access((base + ".json").c_str(), R_OK) != 0) {
      failure += "rank " + std::to_string(rank) + " exit status " + std::to_string(status[rank]) +
                 (status[rank] == -1 ? " (killed after the timeout)" : "") + "; log:\n" +
                 read_text_file(base + ".log") + "\n";
      continue;
    }
    results.push_back(Json::parse(read_text_file(base + ".json")));
  }
  TORCH_CHECK(failure.empty(), "wick-bench: a ", world, "-rank run of ", what, " failed:\n",
              failure);
  return results;
}

}  // namespace wick_bench
