#pragma once
// Run report: one self-contained HTML file (inline SVG drawn by inline JS, no
// network, no external scripts) with a run's curves from MetricLogger's
// metrics.jsonl (loss and accuracy for train and validation, learning rate,
// throughput, step time, memory) and, when the run was profiled, its top ops.
//
//   wick::write_run_report(wick::RunReportOptions("runs/a/metrics.jsonl", "runs/a/report.html")
//                              .title("fmnist mlp")
//                              .ops(profiler.key_averages())
//                              .summary({{"test accuracy", "0.884"}}));
//
// Open it in any browser; everything it needs is inside the file.

#include <wick/profiler.h>

#include <torch/torch.h>

#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace wick {

/// (name, value) lines of a report's summary.
using ReportSummary = std::vector<std::pair<std::string, std::string>>;

struct RunReportOptions {
  RunReportOptions(std::string metrics_jsonl, std::string output_html)
      : metrics_jsonl_(std::move(metrics_jsonl)), output_html_(std::move(output_html)) {}
  /// MetricLogger's metrics.jsonl: one object per line with "kind" ("train" | "val"), "step" and
  /// metrics.
  TORCH_ARG(std::string, metrics_jsonl);
  /// Where the HTML goes (written atomically: a temporary file, then a rename).
  TORCH_ARG(std::string, output_html);
  /// Heading of the page.
  TORCH_ARG(std::string, title) = "wick run report";
  /// Lines shown under the title, in this order (name, value).
  TORCH_ARG(ReportSummary, summary) = {};
  /// The profiled ops (Profiler::key_averages()); unset: no ops section.
  TORCH_ARG(std::optional<OpTable>, ops) = std::nullopt;
  /// Rows of the ops table shown, sorted by total CPU time; >= 1.
  TORCH_ARG(int64_t, ops_row_limit) = 15;
  /// Path of the Chrome trace to mention beside the ops ("" = none).
  TORCH_ARG(std::string, trace_path) = "";
};

/// The report's HTML for `options` (reads metrics_jsonl; writes nothing).
/// Throws naming the file when it cannot be read or a line is not JSON.
std::string render_run_report(const RunReportOptions& options);

/// Renders and writes the report; returns options.output_html().
std::string write_run_report(const RunReportOptions& options);

}  // namespace wick
