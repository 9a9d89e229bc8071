// Run report: a self-contained HTML file from metrics.jsonl (and a profiler's ops).
#include <wick/report.h>

#include "support.h"

#include <nlohmann/json.hpp>

#include <fstream>
#include <regex>
#include <sstream>

namespace {

using wick::testing::TempDir;

class ReportTest : public wick::testing::SeededTest {};

std::string write_jsonl(const TempDir& dir) {
  const std::string path = (dir.path() / "metrics.jsonl").string();
  std::ofstream out(path);
  out << R"({"kind":"train","step":10,"epoch":0,"time":1.0,"train/loss":2.25,"lr":0.001,"train/samples_per_s":5000,"sys/rss_mb":300})"
      << "\n";
  out << R"({"kind":"train","step":20,"epoch":0,"time":2.0,"train/loss":1.5,"lr":0.0009,"train/samples_per_s":5100,"sys/rss_mb":310})"
      << "\n";
  out << R"({"kind":"val","step":20,"epoch":0,"time":2.5,"val/loss":1.625,"val/accuracy":0.75,"note":"</script><b>"})"
      << "\n";
  return path;
}

// The JSON embedded under id="wick-logs", parsed back.
nlohmann::json embedded_logs(const std::string& html) {
  const std::string open = "<script type=\"application/json\" id=\"wick-logs\">";
  const auto a = html.find(open);
  EXPECT_NE(a, std::string::npos);
  const auto b = html.find("</script>", a);
  std::string json = html.substr(a + open.size(), b - a - open.size());
  return nlohmann::json::parse(json);
}

TEST_F(ReportTest, EmbedsEveryLogAndNothingFromTheNetwork) {
  TempDir dir;
  const auto jsonl = write_jsonl(dir);
  const std::string html = wick::render_run_report(
      wick::RunReportOptions(jsonl, "unused.html").title("t<1>").summary({{"k", "v&w"}}));
  // Self-contained: no external scripts, styles, images or fonts.
  EXPECT_EQ(html.find("src="), std::string::npos);
  EXPECT_EQ(html.find("<link"), std::string::npos);
  EXPECT_EQ(html.find("@import"), std::string::npos);
  EXPECT_EQ(html.find("url("), std::string::npos);
  EXPECT_NE(html.find("<h1>t&lt;1&gt;</h1>"), std::string::npos);
  EXPECT_NE(html.find("<b>k:</b> v&amp;w"), std::string::npos);
  EXPECT_NE(html.find("2 train, 1 validation"), std::string::npos);
  // The logs travel intact, even a value with "</script>" in it.
  const auto logs = embedded_logs(html);
  ASSERT_EQ(logs.size(), 3u);
  EXPECT_EQ(logs[1]["train/loss"], 1.5);
  EXPECT_EQ(logs[2]["val/accuracy"], 0.75);
  EXPECT_EQ(logs[2]["note"], "</script><b>");
  EXPECT_EQ(html.find("id=\"wick-ops\""), std::string::npos);  // not profiled: no ops table
}

TEST_F(ReportTest, ShowsTheTopOpsOfAProfile) {
  TempDir dir;
  const auto jsonl = write_jsonl(dir);
  auto a = torch::randn({64, 64});
  wick::Profiler profiler;
  profiler.start();
  for (int i = 0; i < 7; ++i) a.mm(a);
  profiler.stop();
  const std::string out = (dir.path() / "report.html").string();
  EXPECT_EQ(
      wick::write_run_report(
          wick::RunReportOptions(jsonl, out).ops(profiler.key_averages()).trace_path("t.json")),
      out);
  std::ifstream in(out);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string html = ss.str();
  EXPECT_NE(html.find("<tr><td>aten::mm</td>"), std::string::npos);
  // aten::mm's row ends with its 7 calls.
  std::smatch m;
  ASSERT_TRUE(
      std::regex_search(html, m, std::regex("<tr><td>aten::mm</td>.*?<td>(\\d+)</td></tr>")));
  EXPECT_EQ(m[1], "7");
  EXPECT_NE(html.find("Trace: t.json"), std::string::npos);
  EXPECT_EQ(embedded_logs(html).size(), 3u);
}

TEST_F(ReportTest, NamesTheFileItCannotRead) {
  TempDir dir;
  EXPECT_THROWS_WITH(
      wick::render_run_report(wick::RunReportOptions("/nonexistent/m.jsonl", "x.html")),
      "RunReport: cannot read metrics_jsonl '/nonexistent/m.jsonl'");
  const std::string bad = (dir.path() / "bad.jsonl").string();
  std::ofstream(bad) << "{\"kind\":\"train\"}\nnot json\n";
  EXPECT_THROWS_WITH(wick::render_run_report(wick::RunReportOptions(bad, "x.html")),
                     "RunReport: line 2 of '");
}

}  // namespace
