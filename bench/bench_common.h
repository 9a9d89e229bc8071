#pragma once
// Shared pieces of wick-bench's subcommands: options every subcommand sees,
// JSON-line output, timers that read wall and CPU time, medians, running a
// Python peer and reading its JSON, and a description of the machine.

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace CLI {
class App;
}

namespace wick_bench {

using Json = nlohmann::ordered_json;

/// Options of the wick-bench command itself (given before or after the subcommand).
struct GlobalOptions {
  /// Python that runs the peers ("": $WICK_PYTHON, else the build's default).
  std::string python;
  /// Folder of the peer scripts ("": $WICK_BENCH_PEERS_DIR, else bench/peers in the source tree).
  std::string peers_dir;
  /// Also append every JSON line to this file ("": stdout only).
  std::string jsonl;

  std::string resolved_python() const;
  std::string resolved_peers_dir() const;
};

/// Prints JSON lines to stdout (flushed at once) and, when asked, appends them to a file.
class JsonOut {
 public:
  explicit JsonOut(const std::string& jsonl_path);
  void emit(const Json& line);

 private:
  std::string path_;
};

/// Wall and process-CPU time of a stretch of code, in seconds, and the minor
/// page faults taken meanwhile (fresh memory from the kernel: a sign of the
/// allocator returning memory and taking it back).
class Stopwatch {
 public:
  Stopwatch();
  double wall_s() const;
  double cpu_s() const;
  int64_t minor_faults() const;

 private:
  double wall0_, cpu0_;
  int64_t faults0_;
};

/// Milliseconds per call of `fn`: `warmup` calls untimed, then calls until
/// `min_time` seconds have passed (at least one).
template <class F>
double per_call_ms(F&& fn, int warmup, double min_time) {
  for (int i = 0; i < warmup; ++i) fn();
  int64_t calls = 0;
  const auto start = std::chrono::steady_clock::now();
  while (true) {
    fn();
    ++calls;
    const double elapsed =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (elapsed >= min_time) return 1e3 * elapsed / static_cast<double>(calls);
  }
}

double median(std::vector<double> values);
/// The median over rounds of a[r] / b[r] (rounds both have): with cases
/// measured back to back within a round, the machine's drift between rounds
/// stays out of the ratio, as it would not in median(a) / median(b).
double median_ratio(const std::vector<double>& a, const std::vector<double>& b);

/// Intra-op threads for torch (and OpenMP/MKL); inter-op threads too, once per
/// process, as far as the runtime still allows it. Returns torch's intra-op count.
int set_torch_threads(int threads);

/// What a peer run returned: the JSON lines of its stdout, its exit status,
/// and an error text when it failed or printed no JSON.
struct PeerResult {
  std::vector<Json> lines;
  int exit_status = 0;
  std::string error;
  bool ok() const { return error.empty() && !lines.empty(); }
};

/// Runs `python <peers_dir>/<script> args...`, its stderr passing through.
PeerResult run_peer(const GlobalOptions& global, const std::string& script,
                    const std::vector<std::string>& args);

/// A peer kept running to answer one request at a time: `python
/// <peers_dir>/<script> args...` reads JSON lines on its stdin and answers
/// each with one JSON line on its stdout (its stderr passes through). A bench
/// that asks it right after measuring the same case itself puts the two
/// measurements within a second of each other, where separate peer runs
/// would leave the machine's drift between them.
class PeerProcess {
 public:
  PeerProcess(const GlobalOptions& global, const std::string& script,
              const std::vector<std::string>& args);
  ~PeerProcess();
  PeerProcess(const PeerProcess&) = delete;
  PeerProcess& operator=(const PeerProcess&) = delete;
  /// Sends `request`, returns the peer's answer; throws naming the peer if it
  /// died or answered something other than a JSON line.
  Json ask(const Json& request);

 private:
  std::string command_;
  int pid_ = -1;
  FILE* to_ = nullptr;
  FILE* from_ = nullptr;
};

/// Today's date (YYYY-MM-DD) and the time (ISO 8601, local).
std::string today();
std::string now_iso();
/// The CPU model from /proc/cpuinfo, logical CPUs, and the 1-minute load average.
std::string cpu_model();
int logical_cpus();
double load_average_1m();
/// Where CPU time went, cumulative since boot: the machine's steal time (what
/// its hypervisor gave other guests, /proc/stat) and, summed over this
/// process's threads named `thread_name` (/proc/self/task/*/comm), their time
/// on a CPU and waiting in a run queue for one (/proc/self/task/*/schedstat).
/// Subtract two samples for an interval.
struct SchedSample {
  double steal_s = 0, run_s = 0, wait_s = 0;
  int threads = 0;  // threads of that name found
};
SchedSample sched_sample(const std::string& thread_name);
/// The environment variables that change these measurements (allocator,
/// thread pools, preloaded libraries), those that are set.
Json performance_env();
/// "2.11.0" and the like.
std::string torch_version();
/// Adds where and when a run was measured to its summary line: date, time,
/// torch version, CPU model, logical CPUs, performance environment variables,
/// and the 1-minute load average at the start (`load_start`) and now.
void add_run_environment(Json& summary, double load_start);

/// Subcommands: each adds itself to `app`; `global` is filled before they run.
void add_trainer_command(CLI::App& app, std::shared_ptr<GlobalOptions> global);
void add_ddp_command(CLI::App& app, std::shared_ptr<GlobalOptions> global);
void add_quant_command(CLI::App& app, std::shared_ptr<GlobalOptions> global);
void add_pipeline_command(CLI::App& app, std::shared_ptr<GlobalOptions> global);
void add_profiler_command(CLI::App& app, std::shared_ptr<GlobalOptions> global);
void add_gpt_command(CLI::App& app, std::shared_ptr<GlobalOptions> global);  // with the examples
void add_batcher_command(CLI::App& app, std::shared_ptr<GlobalOptions> global);
void add_safetensors_command(CLI::App& app, std::shared_ptr<GlobalOptions> global);
void add_export_command(CLI::App& app, std::shared_ptr<GlobalOptions> global);
void add_checkpoint_command(CLI::App& app, std::shared_ptr<GlobalOptions> global);
void add_shard_command(CLI::App& app, std::shared_ptr<GlobalOptions> global);

}  // namespace wick_bench
