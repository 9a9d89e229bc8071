#include "profile.h"

#include <wick/trainer.h>

namespace fmnist {

ProfileCallback::ProfileCallback(std::string run_dir, wick::ProfilerSchedule schedule)
    : run_dir_(std::move(run_dir)),
      profiler_(
          wick::ProfilerOptions().schedule(schedule).on_trace_ready([this](wick::Profiler& p) {
            ops_ = p.key_averages();
            trace_path_ = run_dir_ + "/trace.json";
            p.export_chrome_trace(trace_path_);
            profiled_steps_ += p.traced_steps();
          })) {}

void ProfileCallback::on_fit_start(wick::Trainer&) { profiler_.start(); }

// Each micro-batch (forward and backward) as a named range in tables and traces.
void ProfileCallback::on_batch_start(wick::Trainer&) {
  if (profiler_.recording()) batch_scope_ = std::make_unique<wick::RecordScope>("train_batch");
}

void ProfileCallback::on_batch_end(wick::Trainer&) { batch_scope_.reset(); }

void ProfileCallback::on_step_end(wick::Trainer&) { profiler_.step(); }

void ProfileCallback::on_fit_end(wick::Trainer&) {
  batch_scope_.reset();
  profiler_.stop();
}

std::string write_report(const std::string& run_dir, const std::string& title,
                         const wick::ReportSummary& summary, const ProfileCallback* profile) {
  wick::RunReportOptions options(run_dir + "/metrics.jsonl", run_dir + "/report.html");
  options.title(title).summary(summary);
  if (profile != nullptr && profile->ops())
    options.ops(*profile->ops()).trace_path(profile->trace_path());
  return wick::write_run_report(options);
}

}  // namespace fmnist
