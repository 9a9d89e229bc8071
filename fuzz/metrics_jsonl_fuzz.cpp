// libFuzzer target: wick::render_run_report (src/report.cpp) reading a
// MetricLogger metrics.jsonl file of arbitrary contents.
//
// Fine: the HTML, or a c10::Error naming RunReport. On success the logs
// embedded in the page must be inert inside their <script> element (no '<'
// at all, so neither "</script" nor "<!--" can end or garble it) and must
// parse back as one JSON object per non-blank line.

#include "fuzz_support.h"

#include <wick/report.h>

#include <nlohmann/json.hpp>

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  wick::fuzz::init();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using wick::fuzz::expect;
  const std::string dir = wick::fuzz::scratch().fresh();
  const std::string path = dir + "/metrics.jsonl";
  wick::fuzz::write_file(path, data, size);

  std::string html;
  if (!wick::fuzz::expect_clear_error("RunReport", [&] {
        html = wick::render_run_report(wick::RunReportOptions(path, dir + "/report.html"));
      }))
    return 0;
  const std::string open = "<script type=\"application/json\" id=\"wick-logs\">";
  const size_t begin = html.find(open);
  expect(begin != std::string::npos, "RunReport: no wick-logs script element");
  const size_t from = begin + open.size();
  const size_t end = html.find("</script>", from);
  expect(end != std::string::npos, "RunReport: wick-logs script element not closed");
  const std::string logs = html.substr(from, end - from);
  expect(logs.find('<') == std::string::npos,
         "RunReport: a '<' inside the wick-logs script element: " + logs);
  const auto parsed = nlohmann::json::parse(logs, nullptr, /*allow_exceptions=*/false);
  expect(!parsed.is_discarded() && parsed.is_array(),
         "RunReport: the embedded logs are not a JSON array");
  size_t lines = 0;
  std::string_view text(reinterpret_cast<const char*>(data), size);
  while (!text.empty()) {
    const size_t nl = text.find('\n');
    const std::string_view line = text.substr(0, nl);
    if (line.find_first_not_of(" \t\r") != std::string_view::npos) ++lines;
    if (nl == std::string_view::npos) break;
    text.remove_prefix(nl + 1);
  }
  expect(parsed.size() == lines, "RunReport: " + std::to_string(parsed.size()) +
                                     " logs embedded for " + std::to_string(lines) +
                                     " non-blank lines");
  return 0;
}
