#include "bench_common.h"

#include <torch/torch.h>
#include <torch/version.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <thread>

#include <dirent.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

namespace wick_bench {

namespace {

std::string env_or(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::string(v) : fallback;
}

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  return out + "'";
}

}  // namespace

std::string GlobalOptions::resolved_python() const {
  return python.empty() ? env_or("WICK_PYTHON", WICK_BENCH_PYTHON) : python;
}

std::string GlobalOptions::resolved_peers_dir() const {
  return peers_dir.empty() ? env_or("WICK_BENCH_PEERS_DIR", WICK_BENCH_PEERS_DIR) : peers_dir;
}

JsonOut::JsonOut(const std::string& jsonl_path) : path_(jsonl_path) {}

void JsonOut::emit(const Json& line) {
  const std::string text = line.dump();
  std::cout << text << std::endl;
  if (!path_.empty()) {
    std::ofstream out(path_, std::ios::app);
    TORCH_CHECK(out, "wick-bench: cannot append to --jsonl file ", path_);
    out << text << '\n';
  }
}

namespace {
double clock_s(clockid_t id) {
  timespec ts{};
  clock_gettime(id, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}
int64_t minor_faults_now() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<int64_t>(ru.ru_minflt);
}
}  // namespace

Stopwatch::Stopwatch()
    : wall0_(clock_s(CLOCK_MONOTONIC)),
      cpu0_(clock_s(CLOCK_PROCESS_CPUTIME_ID)),
      faults0_(minor_faults_now()) {}
double Stopwatch::wall_s() const { return clock_s(CLOCK_MONOTONIC) - wall0_; }
double Stopwatch::cpu_s() const { return clock_s(CLOCK_PROCESS_CPUTIME_ID) - cpu0_; }
int64_t Stopwatch::minor_faults() const { return minor_faults_now() - faults0_; }

double median(std::vector<double> values) {
  TORCH_CHECK(!values.empty(), "wick-bench: median of no values");
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

double median_ratio(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> r;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) r.push_back(a[i] / b[i]);
  return median(r);
}

int set_torch_threads(int threads) {
  TORCH_CHECK(threads >= 1, "wick-bench: --threads must be >= 1, got ", threads);
  torch::set_num_threads(threads);
  // The inter-op pool can be sized only before it starts, once per process;
  // the training loops here never use it, so a refusal changes nothing.
  static bool interop_set = false;
  if (!interop_set) {
    try {
      at::set_num_interop_threads(threads);
    } catch (const c10::Error&) {
    }
    interop_set = true;
  }
  return torch::get_num_threads();
}

PeerResult run_peer(const GlobalOptions& global, const std::string& script,
                    const std::vector<std::string>& args) {
  std::string cmd = shell_quote(global.resolved_python()) + " " +
                    shell_quote(global.resolved_peers_dir() + "/" + script);
  for (const auto& a : args) cmd += " " + shell_quote(a);
  PeerResult result;
  std::fflush(stdout);
  FILE* pipe = popen(cmd.c_str(), "r");
  if (pipe == nullptr) {
    result.error = "cannot start: " + cmd;
    return result;
  }
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, pipe)) > 0) out.append(buf, n);
  const int status = pclose(pipe);
  result.exit_status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;

  std::istringstream lines(out);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.empty() || line.front() != '{') continue;
    try {
      result.lines.push_back(Json::parse(line));
    } catch (const nlohmann::json::exception&) {
    }
  }
  if (result.exit_status != 0) {
    result.error = "exit status " + std::to_string(result.exit_status) + " from: " + cmd;
  } else if (result.lines.empty()) {
    result.error = "no JSON output from: " + cmd;
  }
  return result;
}

PeerProcess::PeerProcess(const GlobalOptions& global, const std::string& script,
                         const std::vector<std::string>& args) {
  std::vector<std::string> argv{global.resolved_python(),
                                global.resolved_peers_dir() + "/" + script};
  argv.insert(argv.end(), args.begin(), args.end());
  for (const auto& a : argv) command_ += (command_.empty() ? "" : " ") + shell_quote(a);
  std::signal(SIGPIPE, SIG_IGN);  // a dead peer is an error from ask(), not a killed bench
  int in[2], out[2];
  TORCH_CHECK(pipe(in) == 0 && pipe(out) == 0, "wick-bench: cannot make pipes for ", command_);
  std::fflush(stdout);
  const pid_t pid = fork();
  TORCH_CHECK(pid >= 0, "wick-bench: cannot fork for ", command_);
  if (pid == 0) {
    dup2(in[0], 0);
    dup2(out[1], 1);
    for (int fd : {in[0], in[1], out[0], out[1]}) close(fd);
    std::vector<char*> cargv;
    for (auto& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
    cargv.push_back(nullptr);
    execvp(cargv[0], cargv.data());
    std::fprintf(stderr, "wick-bench: cannot start %s\n", cargv[0]);
    _exit(127);
  }
  close(in[0]);
  close(out[1]);
  pid_ = pid;
  to_ = fdopen(in[1], "w");
  from_ = fdopen(out[0], "r");
}

PeerProcess::~PeerProcess() {
  if (to_ != nullptr) std::fclose(to_);  // EOF on its stdin: the peer exits
  if (from_ != nullptr) std::fclose(from_);
  if (pid_ > 0) {
    int status = 0;
    waitpid(pid_, &status, 0);
  }
}

Json PeerProcess::ask(const Json& request) {
  const std::string text = request.dump() + "\n";
  TORCH_CHECK(std::fwrite(text.data(), 1, text.size(), to_) == text.size() && std::fflush(to_) == 0,
              "wick-bench: the peer stopped reading: ", command_);
  std::string line;
  for (;;) {
    line.clear();
    int c;
    while ((c = std::fgetc(from_)) != EOF && c != '\n') line.push_back(static_cast<char>(c));
    TORCH_CHECK(c != EOF || !line.empty(), "wick-bench: the peer exited without answering ",
                request.dump(), ": ", command_);
    if (!line.empty() && line.front() == '{') break;  // anything else is the peer talking
  }
  try {
    return Json::parse(line);
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, "wick-bench: the peer answered ", request.dump(), " with '", line,
                "', not JSON (", e.what(), "): ", command_);
  }
}

std::string today() {
  std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d", std::localtime(&t));
  return buf;
}

std::string now_iso() {
  std::time_t t = std::time(nullptr);
  char buf[64];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S%z", std::localtime(&t));
  return buf;
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      auto colon = line.find(':');
      if (colon != std::string::npos) {
        auto value = line.substr(colon + 1);
        value.erase(0, value.find_first_not_of(" \t"));
        return value;
      }
    }
  }
  return "unknown";
}

int logical_cpus() { return static_cast<int>(std::thread::hardware_concurrency()); }

double load_average_1m() {
  std::ifstream in("/proc/loadavg");
  double load = -1.0;
  in >> load;
  return load;
}

SchedSample sched_sample(const std::string& thread_name) {
  SchedSample s;
  {
    std::ifstream in("/proc/stat");
    std::string cpu;
    double v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    in >> cpu;
    for (double& x : v) in >> x;
    const long hz = sysconf(_SC_CLK_TCK);
    if (cpu == "cpu" && hz > 0) s.steal_s = v[7] / static_cast<double>(hz);
  }
  DIR* dir = opendir("/proc/self/task");
  if (dir == nullptr) return s;
  while (const dirent* e = readdir(dir)) {
    if (e->d_name[0] == '.') continue;
    const std::string task = std::string("/proc/self/task/") + e->d_name;
    std::string comm;
    std::getline(std::ifstream(task + "/comm"), comm);
    if (comm != thread_name) continue;
    std::ifstream in(task + "/schedstat");
    double run_ns = 0, wait_ns = 0;
    if (in >> run_ns >> wait_ns) {
      s.run_s += run_ns * 1e-9;
      s.wait_s += wait_ns * 1e-9;
      ++s.threads;
    }
  }
  closedir(dir);
  return s;
}

Json performance_env() {
  Json env = Json::object();
  for (const char* name :
       {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "LD_PRELOAD",
        "OMP_NUM_THREADS", "MKL_NUM_THREADS", "KMP_AFFINITY", "OMP_PROC_BIND",
        "THP_MEM_ALLOC_ENABLE", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
        "FBGEMM_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS"}) {
    if (const char* v = std::getenv(name)) env[name] = v;
  }
  return env;
}

std::string torch_version() {
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
}

void add_run_environment(Json& summary, double load_start) {
  summary["date"] = today();
  summary["time"] = now_iso();
  summary["torch"] = torch_version();
  summary["cpu_model"] = cpu_model();
  summary["logical_cpus"] = logical_cpus();
  summary["env"] = performance_env();
  summary["load_avg_1m_start"] = load_start;
  summary["load_avg_1m_end"] = load_average_1m();
}

}  // namespace wick_bench
