#pragma once
// wick-fmnist's --profile: a Trainer callback that profiles a few training
// steps by schedule (wick::Profiler), and the run report written at the end.

#include <wick/callbacks.h>
#include <wick/profiler.h>
#include <wick/report.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

namespace fmnist {

/// Runs a wick::Profiler over the fit: start at fit start, step() after every
/// optimizer step, stop at fit end. The schedule skips the first steps (warm
/// caches), then records `active` steps once; the trace goes to
/// <run_dir>/trace.json when ready.
class ProfileCallback : public wick::Callback {
 public:
  explicit ProfileCallback(
      std::string run_dir,
      wick::ProfilerSchedule schedule =
          wick::ProfilerSchedule().skip_first(5).wait(5).warmup(2).active(3).repeat(1));
  std::string name() const override { return "ProfileCallback"; }
  bool main_rank_only() const override { return true; }
  void on_fit_start(wick::Trainer& trainer) override;
  void on_batch_start(wick::Trainer& trainer) override;
  void on_batch_end(wick::Trainer& trainer) override;
  void on_step_end(wick::Trainer& trainer) override;
  void on_fit_end(wick::Trainer& trainer) override;

  /// The latest trace's ops (none when no active step ran).
  const std::optional<wick::OpTable>& ops() const { return ops_; }
  const std::string& trace_path() const { return trace_path_; }  // "" until a trace is written
  int64_t profiled_steps() const { return profiled_steps_; }

 private:
  std::string run_dir_;
  wick::Profiler profiler_;
  std::unique_ptr<wick::RecordScope> batch_scope_;
  std::optional<wick::OpTable> ops_;
  std::string trace_path_;
  int64_t profiled_steps_ = 0;
};

/// Writes <run_dir>/report.html from <run_dir>/metrics.jsonl (and the profile
/// when there is one); returns its path.
std::string write_report(const std::string& run_dir, const std::string& title,
                         const wick::ReportSummary& summary, const ProfileCallback* profile);

}  // namespace fmnist
