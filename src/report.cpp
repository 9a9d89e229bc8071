#include <wick/report.h>

#include "format.h"

#include <nlohmann/json.hpp>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

namespace wick {

namespace {

std::string html_escape(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

// JSON inside <script>: "</script" would end the element early, and "<!--"
// followed by "<script" would make the parser skip the real "</script>" after
// it. JSON has '<' only inside strings, where "\u003c" means the same; with no
// '<' left the element's content is inert (fuzz/metrics_jsonl_fuzz.cpp checks).
std::string script_safe(const std::string& json) {
  std::string out;
  out.reserve(json.size());
  for (char c : json) {
    if (c == '<') {
      out += "\\u003c";
    } else {
      out += c;
    }
  }
  return out;
}

// The charts: each a list of series (metric keys, with the kind of log they come from).
const char* kChartsJson = R"CHARTS([
 {"title": "Loss", "series": [["train", "train/loss"], ["val", "val/loss"]]},
 {"title": "Accuracy", "series": [["train", "train/accuracy"], ["val", "val/accuracy"]]},
 {"title": "Learning rate", "series": [["train", "lr"]]},
 {"title": "Throughput (samples/s)", "series": [["train", "train/samples_per_s"], ["train", "train/tokens_per_s"]]},
 {"title": "Step time (ms)", "series": [["train", "train/step_time_ms_p50"], ["train", "train/step_time_ms_p90"], ["train", "train/step_time_ms_p99"]]},
 {"title": "Memory (MB)", "series": [["train", "sys/rss_mb"], ["train", "sys/peak_rss_mb"], ["train", "cuda/allocated_mb"], ["train", "cuda/reserved_mb"], ["train", "gpu/memory_used_mb"]]},
 {"title": "GPU", "series": [["train", "gpu/utilization_pct"], ["train", "gpu/power_w"], ["train", "gpu/temperature_c"]]},
 {"title": "MFU", "series": [["train", "train/mfu"]]}
])CHARTS";

const char* kStyle = R"(
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 8px} h2{font-size:17px;margin:24px 0 8px}
.summary{display:flex;flex-wrap:wrap;gap:8px 24px;margin:8px 0 16px;font-size:14px}
.summary b{color:#555;font-weight:600}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,1fr));gap:16px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px}
.card h3{font-size:14px;margin:0 0 4px}
svg text{font-size:11px;fill:#444}
table{border-collapse:collapse;font-size:12px;background:#fff}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right} td:first-child,th:first-child{text-align:left}
th{background:#f0f0f0} pre{font-size:11px;background:#fff;border:1px solid #ddd;padding:8px;overflow:auto}
.note{color:#666;font-size:12px}
.legend{font-size:11px;color:#444;display:flex;flex-wrap:wrap;gap:2px 14px;padding-left:56px}
.legend i{display:inline-block;width:12px;height:3px;margin:0 5px 3px 0;vertical-align:middle}
)";

// Draws the charts into inline SVG; no library, no network.
const char* kScript = R"JS(
(function(){
var logs = JSON.parse(document.getElementById('wick-logs').textContent);
var charts = JSON.parse(document.getElementById('wick-charts').textContent);
var colors = ['#1f77b4','#ff7f0e','#2ca02c','#d62728','#9467bd'];
var NS = 'http://www.w3.org/2000/svg';
function el(name, attrs, parent){ var e = document.createElementNS(NS, name);
  for (var k in attrs) e.setAttribute(k, attrs[k]); if (parent) parent.appendChild(e); return e; }
function ticks(lo, hi, n){ var span = hi - lo; if (span <= 0) return {v: [lo], d: 2};
  var step = Math.pow(10, Math.floor(Math.log10(span / n))); var err = n / (span / step);
  if (err <= 0.15) step *= 10; else if (err <= 0.35) step *= 5; else if (err <= 0.75) step *= 2;
  var out = []; for (var t = Math.ceil(lo / step) * step; t <= hi + 1e-9 * span; t += step) out.push(t);
  return {v: out, d: Math.max(0, -Math.floor(Math.log10(step) + 1e-9))}; }
function label(t, d){ var a = Math.abs(t); if (a >= 1e5 || (a > 0 && a < 1e-3)) return t.toExponential(1);
  return t.toFixed(Math.min(d, 6)); }
var grid = document.getElementById('wick-charts-grid'); var drawn = 0;
charts.forEach(function(chart){
  var series = [];
  chart.series.forEach(function(s){ var pts = [];
    logs.forEach(function(l){ if (l.kind === s[0] && typeof l[s[1]] === 'number' && isFinite(l[s[1]])) pts.push([l.step, l[s[1]]]); });
    if (pts.length) series.push({name: s[0] === 'val' ? s[1] + ' (val)' : s[1], pts: pts}); });
  if (!series.length) return;
  drawn++;
  var card = document.createElement('div'); card.className = 'card'; grid.appendChild(card);
  var h = document.createElement('h3'); h.textContent = chart.title; card.appendChild(h);
  var W = 440, H = 215, L = 56, R = 10, T = 10, B = 30;
  var svg = el('svg', {width: W, height: H, viewBox: '0 0 ' + W + ' ' + H, role: 'img'}, card);
  var xs = [], ys = []; series.forEach(function(s){ s.pts.forEach(function(p){ xs.push(p[0]); ys.push(p[1]); }); });
  var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs), y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
  if (x1 === x0) { x0 -= 1; x1 += 1; } if (y1 === y0) { var d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
  var pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  function X(v){ return L + (v - x0) / (x1 - x0) * (W - L - R); } function Y(v){ return T + (1 - (v - y0) / (y1 - y0)) * (H - T - B); }
  var yt = ticks(y0, y1, 5), xt = ticks(x0, x1, 6);
  yt.v.forEach(function(t){ el('line', {x1: L, x2: W - R, y1: Y(t), y2: Y(t), stroke: '#eee'}, svg);
    var tx = el('text', {x: L - 4, y: Y(t) + 4, 'text-anchor': 'end'}, svg); tx.textContent = label(t, yt.d); });
  xt.v.forEach(function(t){ var tx = el('text', {x: X(t), y: H - B + 14, 'text-anchor': 'middle'}, svg); tx.textContent = label(t, xt.d); });
  el('rect', {x: L, y: T, width: W - L - R, height: H - T - B, fill: 'none', stroke: '#bbb'}, svg);
  var lab = el('text', {x: (L + W - R) / 2, y: H - B + 27, 'text-anchor': 'middle'}, svg); lab.textContent = 'step';
  var legend = document.createElement('div'); legend.className = 'legend'; card.appendChild(legend);
  series.forEach(function(s, i){ var c = colors[i % colors.length];
    var d = s.pts.map(function(p, j){ return (j ? 'L' : 'M') + X(p[0]).toFixed(1) + ' ' + Y(p[1]).toFixed(1); }).join(' ');
    el('path', {d: d, fill: 'none', stroke: c, 'stroke-width': 1.8}, svg);
    if (s.pts.length < 40) s.pts.forEach(function(p){ el('circle', {cx: X(p[0]), cy: Y(p[1]), r: 2.5, fill: c}, svg); });
    var item = document.createElement('span'); var sw = document.createElement('i'); sw.style.background = c;
    item.appendChild(sw); item.appendChild(document.createTextNode(s.name)); legend.appendChild(item); });
});
if (!drawn) grid.textContent = 'No metrics logged.';
document.body.setAttribute('data-charts', String(drawn));
})();
)JS";

}  // namespace

std::string render_run_report(const RunReportOptions& options) {
  TORCH_CHECK(options.ops_row_limit() >= 1, "RunReport: ops_row_limit must be >= 1, got ",
              options.ops_row_limit());
  std::ifstream in(options.metrics_jsonl());
  TORCH_CHECK(in.good(), "RunReport: cannot read metrics_jsonl '", options.metrics_jsonl(), "'");
  nlohmann::json logs = nlohmann::json::array();
  std::string line;
  int64_t line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    TORCH_CHECK(!j.is_discarded() && j.is_object(), "RunReport: line ", line_no, " of '",
                options.metrics_jsonl(), "' is not a JSON object");
    logs.push_back(std::move(j));
  }

  std::ostringstream html;
  html << "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n<title>"
       << html_escape(options.title()) << "</title>\n<style>" << kStyle
       << "</style></head>\n<body>\n<h1>" << html_escape(options.title()) << "</h1>\n";
  html << "<div class=\"summary\">";
  for (const auto& [k, v] : options.summary())
    html << "<span><b>" << html_escape(k) << ":</b> " << html_escape(v) << "</span>";
  int64_t n_train = 0, n_val = 0;
  for (const auto& l : logs) {
    // "kind" is free-form on input: only the strings "train" and "val" count.
    const auto kind_it = l.find("kind");
    const std::string kind =
        kind_it != l.end() && kind_it->is_string() ? kind_it->get<std::string>() : "";
    n_train += kind == "train";
    n_val += kind == "val";
  }
  html << "<span><b>logs:</b> " << n_train << " train, " << n_val << " validation</span></div>\n";
  html << "<h2>Curves</h2>\n<div class=\"grid\" id=\"wick-charts-grid\"></div>\n";

  if (options.ops()) {
    const auto sorted = options.ops()->sorted("cpu_time_total");
    const int64_t self_total = sorted.self_cpu_total_ns();
    bool cuda = false;
    for (const auto& r : sorted.rows()) cuda = cuda || r.cuda_total_ns > 0;
    html << "<h2>Top ops by total CPU time</h2>\n";
    if (!options.trace_path().empty())
      html << "<p class=\"note\">Trace: " << html_escape(options.trace_path())
           << " (open in https://ui.perfetto.dev or chrome://tracing)</p>\n";
    html << "<table id=\"wick-ops\"><tr><th>Name</th><th>Self CPU %</th><th>Self CPU</th><th>CPU "
            "total</th>"
            "<th>CPU time avg</th>";
    if (cuda) html << "<th>Self CUDA</th><th>CUDA total</th>";
    html << "<th># of Calls</th></tr>\n";
    int64_t shown = 0;
    for (const auto& r : sorted.rows()) {
      if (shown++ >= options.ops_row_limit()) break;
      const std::string pct =
          fmt::format("{:.2f}%", self_total ? 100.0 * static_cast<double>(r.self_cpu_ns) /
                                                  static_cast<double>(self_total)
                                            : 0.0);
      html << "<tr><td>" << html_escape(r.name) << "</td><td>" << pct << "</td><td>"
           << format_profiler_time(static_cast<double>(r.self_cpu_ns) / 1e3) << "</td><td>"
           << format_profiler_time(static_cast<double>(r.cpu_total_ns) / 1e3) << "</td><td>"
           << format_profiler_time(r.cpu_avg_ns() / 1e3) << "</td>";
      if (cuda)
        html << "<td>" << format_profiler_time(static_cast<double>(r.self_cuda_ns) / 1e3)
             << "</td><td>" << format_profiler_time(static_cast<double>(r.cuda_total_ns) / 1e3)
             << "</td>";
      html << "<td>" << r.count << "</td></tr>\n";
    }
    html << "</table>\n<p class=\"note\">Self CPU time total: "
         << format_profiler_time(static_cast<double>(self_total) / 1e3) << "</p>\n";
  }
  html << "<p class=\"note\">Generated by wick from " << html_escape(options.metrics_jsonl())
       << "; self-contained (no network).</p>\n";
  html << "<script type=\"application/json\" id=\"wick-logs\">" << script_safe(logs.dump())
       << "</script>\n";
  html << "<script type=\"application/json\" id=\"wick-charts\">" << kChartsJson << "</script>\n";
  html << "<script>" << kScript << "</script>\n</body></html>\n";
  return html.str();
}

std::string write_run_report(const RunReportOptions& options) {
  const std::string html = render_run_report(options);
  const std::string& path = options.output_html();
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    TORCH_CHECK(out.good(), "RunReport: cannot write '", tmp, "': ", std::strerror(errno));
    out << html;
    out.flush();
    TORCH_CHECK(out.good(), "RunReport: writing '", tmp, "' failed: ", std::strerror(errno));
  }
  TORCH_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0, "RunReport: cannot rename '", tmp,
              "' to '", path, "': ", std::strerror(errno));
  return path;
}

}  // namespace wick
