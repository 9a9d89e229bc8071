#pragma once
// Profiler: what torch.profiler gives a Python user, for C++ (LibTorch's
// Kineto profiler underneath): op tables, Chrome/Perfetto traces, schedules,
// memory, user annotations.
//
//   wick::Profiler profiler(wick::ProfilerOptions()
//                               .record_shapes(true)
//                               .schedule(wick::ProfilerSchedule().wait(1).warmup(1).active(3))
//                               .on_trace_ready([](wick::Profiler& p) {
//                                 std::cout << p.key_averages().table("cpu_time_total", 10);
//                                 p.export_chrome_trace("trace.json");
//                               }));
//   profiler.start();
//   for (int i = 0; i < 8; ++i) {
//     { auto scope = wick::record_scope("data_loading"); batch = next(); }
//     train_step(batch);
//     profiler.step();
//   }
//   profiler.stop();
//
// Without a schedule the profiler records from start() to stop() (or use
// `auto guard = profiler.scope();`), like `with torch.profiler.profile():`.

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace at {
class RecordFunction;
}

namespace wick {

enum class ProfilerActivity { kCPU, kCUDA };

/// torch.profiler.schedule: after skip_first steps, cycles of `wait` idle
/// steps, `warmup` steps recorded and thrown away, `active` steps recorded;
/// the trace is ready (on_trace_ready) at the end of each cycle's last active step.
struct ProfilerSchedule {
  /// Steps ignored before the first cycle; >= 0.
  TORCH_ARG(int64_t, skip_first) = 0;
  /// Idle steps at the start of each cycle (the profiler is off); >= 0.
  TORCH_ARG(int64_t, wait) = 0;
  /// Steps recorded and discarded (the profiler's start-up cost stays out of the trace); >= 0.
  TORCH_ARG(int64_t, warmup) = 0;
  /// Steps recorded into the trace; >= 1.
  TORCH_ARG(int64_t, active) = 1;
  /// Cycles (0: cycle until stop()); >= 0.
  TORCH_ARG(int64_t, repeat) = 0;
};

/// What the profiler does during a step under a schedule.
enum class ProfilerAction { kNone, kWarmup, kRecord, kRecordAndSave };
std::string to_string(ProfilerAction action);

class Profiler;

struct ProfilerOptions {
  /// What to record: CPU ops (and user scopes), CUDA kernels and runtime calls (CUPTI).
  TORCH_ARG(std::vector<ProfilerActivity>, activities) = {ProfilerActivity::kCPU};
  /// Record the input shapes of each op (tables grouped by shape, "Input Dims" in traces).
  TORCH_ARG(bool, record_shapes) = false;
  /// Record allocations and frees (CPU and CUDA memory columns).
  TORCH_ARG(bool, profile_memory) = false;
  /// Record source locations of ops (TorchScript stacks; plain C++ has none, so traces carry no
  /// stacks).
  TORCH_ARG(bool, with_stack) = false;
  /// Estimate FLOPs of matmul and convolution ops.
  TORCH_ARG(bool, with_flops) = false;
  /// Unset: record from start() to stop(). Set: step() drives the schedule.
  TORCH_ARG(std::optional<ProfilerSchedule>, schedule) = std::nullopt;
  /// Called when a trace is ready: at the end of each schedule cycle, and at
  /// stop() when recording (without a schedule, or stopped mid-cycle).
  TORCH_ARG(std::function<void(Profiler&)>, on_trace_ready) = nullptr;
};

/// One recorded event, times relative to the trace's start.
struct ProfiledEvent {
  std::string name;
  int64_t start_ns = 0;
  int64_t duration_ns = 0;
  uint64_t thread = 0;
  bool on_device = false;   ///< a CUDA kernel / memcpy (duration is device time)
  int64_t correlation = 0;  ///< CPU op's correlation id (device events: the linked one)
  std::vector<std::vector<int64_t>> shapes;  ///< input shapes (record_shapes)
  uint64_t flops = 0;
};

/// One row of an OpTable: an op name (and input shapes when grouped by them).
/// Times in nanoseconds; memory in bytes (allocations minus frees).
struct OpStats {
  std::string name;
  std::string input_shapes;  ///< "[[64, 784], [512, 784]]" when grouped by shape, else ""
  int64_t count = 0;
  int64_t self_cpu_ns = 0;    ///< time in the op itself, not in ops it called
  int64_t cpu_total_ns = 0;   ///< time including the ops it called
  int64_t self_cuda_ns = 0;   ///< kernels launched by the op itself
  int64_t cuda_total_ns = 0;  ///< kernels launched by it and the ops it called
  int64_t self_cpu_memory = 0;
  int64_t cpu_memory = 0;
  int64_t self_cuda_memory = 0;
  int64_t cuda_memory = 0;
  uint64_t flops = 0;
  double cpu_avg_ns() const { return count ? static_cast<double>(cpu_total_ns) / count : 0.0; }
  double cuda_avg_ns() const { return count ? static_cast<double>(cuda_total_ns) / count : 0.0; }
};

/// Per-op aggregates, as Python's key_averages(). Sort keys are Python's names:
/// "count", "self_cpu_time_total", "cpu_time_total", "cpu_time" (average),
/// "self_cuda_time_total", "cuda_time_total", "cuda_time", "self_cpu_memory_usage",
/// "cpu_memory_usage", "self_cuda_memory_usage", "cuda_memory_usage", "flops", "name"
/// ("device_time..." spellings are accepted for the cuda ones). Numbers sort descending, names
/// ascending.
class OpTable {
 public:
  OpTable() = default;
  OpTable(std::vector<OpStats> rows, bool has_cuda, bool has_memory, bool has_shapes);

  const std::vector<OpStats>& rows() const { return rows_; }
  /// The row of `name` (the first one when grouped by shape), or nullptr.
  const OpStats* find(const std::string& name) const;
  /// Calls of `name` over all its rows (0 when absent).
  int64_t count(const std::string& name) const;
  /// Sum of the self CPU (CUDA) times over all rows: the "% " columns' denominator.
  int64_t self_cpu_total_ns() const;
  int64_t self_cuda_total_ns() const;
  /// A copy sorted by `sort_by` (see above); throws naming the valid keys.
  OpTable sorted(const std::string& sort_by) const;
  /// The table as torch.profiler prints it, top `row_limit` rows (< 0: all).
  std::string table(const std::string& sort_by = "cpu_time_total", int64_t row_limit = 100) const;
  /// Rows as JSON (an array of objects with OpStats' field names).
  std::string to_json() const;

 private:
  std::vector<OpStats> rows_;
  bool has_cuda_ = false, has_memory_ = false, has_shapes_ = false;
};

/// LibTorch's Kineto profiler with torch.profiler's interface. One Profiler
/// records at a time per process (LibTorch's profiler is process-wide):
/// starting a second while one records throws.
class Profiler {
 public:
  explicit Profiler(ProfilerOptions options = {});
  /// Stops recording if still running (on_trace_ready is not called then).
  ~Profiler();
  Profiler(const Profiler&) = delete;
  Profiler& operator=(const Profiler&) = delete;

  /// Begins: records at once without a schedule; with one, step 0's action applies.
  void start();
  /// Ends: a recording in progress becomes the trace (on_trace_ready called).
  void stop();
  /// Marks a step boundary (after each training step); advances the schedule.
  /// Under a schedule each recorded step is a "ProfilerStep#N" range (as in
  /// torch.profiler); without one, step() only counts.
  void step();

  /// RAII: start() now, stop() at the end of the scope.
  class Scope {
   public:
    explicit Scope(Profiler& profiler) : profiler_(&profiler) { profiler_->start(); }
    ~Scope();
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    Profiler* profiler_;
  };
  Scope scope() { return Scope(*this); }

  bool running() const { return started_; }
  /// Whether the LibTorch profiler is recording now.
  bool recording() const { return recording_; }
  int64_t step_num() const { return step_num_; }
  ProfilerAction current_action() const;
  /// Steps whose work is in the latest trace.
  int64_t traced_steps() const { return traced_steps_; }
  /// Traces completed so far.
  int64_t trace_count() const { return trace_count_; }
  bool has_trace() const { return static_cast<bool>(result_); }
  const ProfilerOptions& options() const { return options_; }

  /// The latest trace's events (CPU ops, user scopes, step ranges, device kernels).
  const std::vector<ProfiledEvent>& events() const { return events_; }
  /// Per-op aggregates of the latest trace; by op name, or by name and input shapes.
  OpTable key_averages(bool group_by_input_shape = false) const;
  /// Writes the latest trace as Chrome trace JSON (opens in Perfetto and chrome://tracing).
  void export_chrome_trace(const std::string& path) const;

 private:
  void enable();
  void disable_and_keep(bool keep);
  void release_warmup();
  ProfilerAction action_at(int64_t step) const;
  void begin_step_range();
  void end_step_range();
  void transition(ProfilerAction from, ProfilerAction to);

  ProfilerOptions options_;
  bool started_ = false;
  bool recording_ = false;
  bool prepared_ = false;  // prepareProfiler ran (warm-up) and no trace began since
  int64_t step_num_ = 0;
  int64_t traced_steps_ = 0;
  int64_t steps_in_recording_ = 0;
  int64_t trace_count_ = 0;
  std::unique_ptr<at::RecordFunction> step_range_;
  std::string step_range_name_;
  struct Trace;
  std::shared_ptr<Trace> result_;
  std::vector<ProfiledEvent> events_;
};

/// A named range (torch.profiler.record_function) that shows in op tables and
/// traces while a profiler records; costs one check when none does.
class RecordScope {
 public:
  explicit RecordScope(std::string name);
  ~RecordScope();
  RecordScope(const RecordScope&) = delete;
  RecordScope& operator=(const RecordScope&) = delete;

 private:
  std::string name_;
  std::unique_ptr<at::RecordFunction> guard_;
};

/// `auto scope = wick::record_scope("data_loading");` (C++17: no copy or move).
inline RecordScope record_scope(std::string name) { return RecordScope(std::move(name)); }

/// Python's formatting of profiler times (microseconds in): "1.234ms", "12.000us", "1.500s".
std::string format_profiler_time(double us);
/// Python's formatting of profiler memory: "1.50 MB", "-512 B".
std::string format_profiler_memory(int64_t bytes);

}  // namespace wick
