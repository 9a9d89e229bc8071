#include <wick/profiler.h>

#include "format.h"

#include <ATen/record_function.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdio>
#include <map>
#include <set>
#include <unordered_map>
#include <unordered_set>

namespace wick {

namespace P = torch::autograd::profiler;
using torch::profiler::impl::ActivityType;

namespace {

// One process-wide profiler at a time: LibTorch's Kineto profiler is.
const Profiler* g_active = nullptr;

// The events Python's key_averages leaves out (torch/autograd/profiler_util.py _filter_name).
bool filtered_name(const std::string& name) {
  static const std::unordered_set<std::string> names = {"[memory]",
                                                        "[OutOfMemory]",
                                                        "profiler::_record_function_enter",
                                                        "profiler::_record_function_enter_new",
                                                        "profiler::_record_function_exit",
                                                        "aten::is_leaf",
                                                        "aten::output_nr",
                                                        "aten::_version"};
  return names.count(name) > 0;
}

// Python's _rewrite_name(with_wildcard=True): every step range aggregates as one row.
std::string rewrite_name(const std::string& name) {
  if (name.rfind("ProfilerStep#", 0) == 0) return "ProfilerStep*";
  return name;
}

std::string shapes_string(const std::vector<std::vector<int64_t>>& shapes) {
  std::string s = "[";
  for (size_t i = 0; i < shapes.size(); ++i) {
    if (i) s += ", ";
    s += "[";
    for (size_t j = 0; j < shapes[i].size(); ++j) {
      if (j) s += ", ";
      s += std::to_string(shapes[i][j]);
    }
    s += "]";
  }
  return s + "]";
}

bool is_device(c10::DeviceType t) {
  return t == c10::DeviceType::CUDA || t == c10::DeviceType::PrivateUse1 ||
         t == c10::DeviceType::XPU || t == c10::DeviceType::HIP;
}
bool is_cpu_memory(c10::DeviceType t) {
  return t == c10::DeviceType::CPU || t == c10::DeviceType::MKLDNN || t == c10::DeviceType::IDEEP;
}

std::unique_ptr<at::RecordFunction> open_range(const std::string& name) {
  auto callbacks = at::getStepCallbacksUnlessEmpty(at::RecordScope::USER_SCOPE);
  if (!callbacks) return nullptr;
  auto guard = std::make_unique<at::RecordFunction>(std::move(*callbacks));
  if (!guard->isActive()) return nullptr;
  guard->before(name);
  return guard;
}

}  // namespace

// The latest trace: LibTorch's result (for save()) and our parsed events with
// what key_averages needs beyond ProfiledEvent.
struct Profiler::Trace {
  std::unique_ptr<P::ProfilerResult> result;
  struct Event {
    ProfiledEvent pub;
    int64_t end_ns = 0;
    bool is_async = false;
    int64_t linked = 0;
    int64_t self_cuda_ns = 0;  // kernels linked to this CPU op
    int64_t cpu_mem = 0, cuda_mem = 0;
    std::vector<size_t> children;
    bool memory_row = false;  // an unattributed "[memory]" record
  };
  std::vector<Event> events;
  bool has_cuda = false, has_memory = false, has_shapes = false;
};

std::string to_string(ProfilerAction action) {
  switch (action) {
    case ProfilerAction::kNone:
      return "none";
    case ProfilerAction::kWarmup:
      return "warmup";
    case ProfilerAction::kRecord:
      return "record";
    case ProfilerAction::kRecordAndSave:
      return "record_and_save";
  }
  return "unknown";
}

// ---------------------------------------------------------------------------
// Profiler

Profiler::Profiler(ProfilerOptions options) : options_(std::move(options)) {
  if (const auto& s = options_.schedule()) {
    TORCH_CHECK(s->skip_first() >= 0, "Profiler: schedule skip_first must be >= 0, got ",
                s->skip_first());
    TORCH_CHECK(s->wait() >= 0, "Profiler: schedule wait must be >= 0, got ", s->wait());
    TORCH_CHECK(s->warmup() >= 0, "Profiler: schedule warmup must be >= 0, got ", s->warmup());
    TORCH_CHECK(s->active() >= 1, "Profiler: schedule active must be >= 1, got ", s->active());
    TORCH_CHECK(s->repeat() >= 0, "Profiler: schedule repeat must be >= 0, got ", s->repeat());
  }
  TORCH_CHECK(!options_.activities().empty(), "Profiler: activities must not be empty");
}

Profiler::~Profiler() {
  try {
    step_range_.reset();
    if (recording_) disable_and_keep(false);
    if (prepared_) release_warmup();
  } catch (...) {
  }
  if (g_active == this) g_active = nullptr;
}

Profiler::Scope::~Scope() {
  try {
    profiler_->stop();
  } catch (...) {
  }
}

ProfilerAction Profiler::action_at(int64_t step) const {
  if (!options_.schedule()) return ProfilerAction::kRecord;
  const auto& s = *options_.schedule();
  if (step < s.skip_first()) return ProfilerAction::kNone;
  step -= s.skip_first();
  const int64_t cycle = s.wait() + s.warmup() + s.active();
  if (s.repeat() > 0 && step / cycle >= s.repeat()) return ProfilerAction::kNone;
  const int64_t m = step % cycle;
  if (m < s.wait()) return ProfilerAction::kNone;
  if (m < s.wait() + s.warmup()) return ProfilerAction::kWarmup;
  return m < cycle - 1 ? ProfilerAction::kRecord : ProfilerAction::kRecordAndSave;
}

ProfilerAction Profiler::current_action() const {
  return started_ ? action_at(step_num_) : ProfilerAction::kNone;
}

namespace {
struct Config {
  P::ProfilerConfig config;
  std::set<ActivityType> activities;
};
Config make_config(const ProfilerOptions& o) {
  Config c{P::ProfilerConfig(P::ProfilerState::KINETO, o.record_shapes(), o.profile_memory(),
                             o.with_stack(), o.with_flops()),
           {}};
  for (auto a : o.activities()) {
    if (a == ProfilerActivity::kCPU) c.activities.insert(ActivityType::CPU);
    // CUPTI only where a GPU is visible; a CPU-only machine records CPU events.
    if (a == ProfilerActivity::kCUDA && torch::cuda::is_available())
      c.activities.insert(ActivityType::CUDA);
  }
  if (c.activities.empty()) c.activities.insert(ActivityType::CPU);
  return c;
}
}  // namespace

void Profiler::enable() {
  auto c = make_config(options_);
  // Kineto's prepareTrace must run once per trace: a warm-up already did.
  if (!prepared_) P::prepareProfiler(c.config, c.activities);
  prepared_ = false;
  P::enableProfiler(c.config, c.activities);
  recording_ = true;
  steps_in_recording_ = 0;
}

void Profiler::start() {
  TORCH_CHECK(!started_, "Profiler: start() called twice without stop()");
  TORCH_CHECK(g_active == nullptr,
              "Profiler: another wick::Profiler is running (LibTorch's profiler is process-wide)");
  TORCH_CHECK(!P::isProfilerEnabledInMainThread(),
              "Profiler: LibTorch's profiler is already enabled in this process");
  g_active = this;
  started_ = true;
  transition(ProfilerAction::kNone, current_action());
  begin_step_range();
}

void Profiler::stop() {
  if (!started_) return;
  end_step_range();
  const auto action = current_action();
  started_ = false;
  g_active = nullptr;
  if (recording_) {
    if (action == ProfilerAction::kRecord || action == ProfilerAction::kRecordAndSave)
      ++steps_in_recording_;
    disable_and_keep(true);
    if (options_.on_trace_ready()) options_.on_trace_ready()(*this);
  } else if (prepared_) {
    release_warmup();
  }
}

// Kineto stays prepared after a warm-up that no recording followed, and the
// next prepareProfiler in the process would fail: start and drop a trace, as
// torch.profiler does on WARMUP -> stop.
void Profiler::release_warmup() {
  enable();
  disable_and_keep(false);
}

void Profiler::step() {
  TORCH_CHECK(started_, "Profiler: step() before start()");
  end_step_range();
  const auto prev = current_action();
  if (prev == ProfilerAction::kRecord || prev == ProfilerAction::kRecordAndSave)
    ++steps_in_recording_;
  ++step_num_;
  transition(prev, current_action());
  begin_step_range();
}

void Profiler::transition(ProfilerAction from, ProfilerAction to) {
  using A = ProfilerAction;
  const bool save = from == A::kRecordAndSave;
  if (save && recording_) {
    disable_and_keep(true);
    if (options_.on_trace_ready()) options_.on_trace_ready()(*this);
  } else if (recording_ && to != A::kRecord && to != A::kRecordAndSave) {
    // Left the active phase without a save point (a schedule cannot do this; kept for safety).
    disable_and_keep(false);
  }
  if (to == A::kWarmup && from != A::kWarmup) {
    auto c = make_config(options_);
    P::prepareProfiler(c.config, c.activities);
    prepared_ = true;
  }
  if ((to == A::kRecord || to == A::kRecordAndSave) && !recording_) enable();
}

void Profiler::begin_step_range() {
  // As torch.profiler: step ranges only under a schedule.
  if (!recording_ || !options_.schedule()) return;
  step_range_name_ = "ProfilerStep#" + std::to_string(step_num_);
  step_range_ = open_range(step_range_name_);
}

void Profiler::end_step_range() { step_range_.reset(); }

void Profiler::disable_and_keep(bool keep) {
  recording_ = false;
  auto result = P::disableProfiler();
  if (!keep || !result) return;
  auto trace = std::make_shared<Trace>();
  const int64_t t0 = static_cast<int64_t>(result->trace_start_ns());
  std::unordered_map<int64_t, size_t> by_correlation;  // frontend CPU ops
  std::vector<std::pair<int64_t, int64_t>> memory;     // (time, index into result events)
  const auto& kevents = result->events();
  for (size_t k = 0; k < kevents.size(); ++k) {
    const auto& e = kevents[k];
    if (e.name() == "[memory]") {
      memory.emplace_back(static_cast<int64_t>(e.startNs()), static_cast<int64_t>(k));
      trace->has_memory = true;
    }
  }
  std::sort(memory.begin(), memory.end());
  std::vector<bool> memory_used(memory.size(), false);

  for (const auto& e : kevents) {
    const std::string name = e.name();
    if (filtered_name(name) || e.isHiddenEvent()) continue;
    Trace::Event ev;
    ev.pub.name = name;
    ev.pub.start_ns = static_cast<int64_t>(e.startNs()) - t0;
    ev.end_ns = static_cast<int64_t>(e.endNs()) - t0;
    ev.pub.duration_ns = ev.end_ns - ev.pub.start_ns;
    ev.pub.thread = e.startThreadId();
    ev.pub.on_device = is_device(e.deviceType());
    ev.pub.correlation = static_cast<int64_t>(e.correlationId());
    ev.linked = static_cast<int64_t>(e.linkedCorrelationId());
    if (e.hasShapes()) {
      for (const auto& s : e.shapes()) ev.pub.shapes.push_back(s);
      if (!ev.pub.shapes.empty()) trace->has_shapes = true;
    }
    ev.pub.flops = e.flops();
    ev.is_async = e.isAsync() || e.startThreadId() != e.endThreadId();
    if (ev.pub.on_device) trace->has_cuda = true;
    if (e.deviceType() == c10::DeviceType::CPU) {
      // Python's MemRecordsAcc.in_interval: every record with start <= t <= end.
      auto lo = std::lower_bound(memory.begin(), memory.end(),
                                 std::make_pair(static_cast<int64_t>(e.startNs()), int64_t{-1}));
      for (auto it = lo; it != memory.end() && it->first <= static_cast<int64_t>(e.endNs()); ++it) {
        const auto& m = kevents[static_cast<size_t>(it->second)];
        if (is_cpu_memory(m.deviceType())) ev.cpu_mem += m.nBytes();
        if (is_device(m.deviceType())) ev.cuda_mem += m.nBytes();
        memory_used[static_cast<size_t>(it - memory.begin())] = true;
      }
    }
    if (ev.linked == 0 && !ev.pub.on_device)
      by_correlation.emplace(ev.pub.correlation, trace->events.size());
    trace->events.push_back(std::move(ev));
  }
  // Kernels count as CUDA time of the CPU op that launched them (correlation ids).
  for (auto& ev : trace->events) {
    if (!ev.pub.on_device || ev.linked <= 0) continue;
    auto it = by_correlation.find(ev.linked);
    if (it != by_correlation.end() && !trace->events[it->second].is_async)
      trace->events[it->second].self_cuda_ns += ev.pub.duration_ns;
  }
  // Memory records outside every op are rows of their own, as in Python.
  for (size_t i = 0; i < memory.size(); ++i) {
    if (memory_used[i]) continue;
    const auto& m = kevents[static_cast<size_t>(memory[i].second)];
    Trace::Event ev;
    ev.pub.name = "[memory]";
    ev.pub.start_ns = static_cast<int64_t>(m.startNs()) - t0;
    ev.end_ns = ev.pub.start_ns;
    ev.pub.thread = m.startThreadId();
    ev.memory_row = true;
    if (is_cpu_memory(m.deviceType())) ev.cpu_mem = m.nBytes();
    if (is_device(m.deviceType())) ev.cuda_mem = m.nBytes();
    trace->events.push_back(std::move(ev));
  }
  // Parents and children per thread (Python's _populate_cpu_children).
  std::map<uint64_t, std::vector<size_t>> threads;
  for (size_t i = 0; i < trace->events.size(); ++i) {
    const auto& ev = trace->events[i];
    if (!ev.is_async && !ev.pub.on_device) threads[ev.pub.thread].push_back(i);
  }
  for (auto& [tid, idx] : threads) {
    auto& evs = trace->events;
    std::stable_sort(idx.begin(), idx.end(), [&](size_t a, size_t b) {
      if (evs[a].pub.start_ns != evs[b].pub.start_ns)
        return evs[a].pub.start_ns < evs[b].pub.start_ns;
      return evs[a].end_ns > evs[b].end_ns;
    });
    std::vector<size_t> stack;
    for (size_t i : idx) {
      while (!stack.empty()) {
        const auto& parent = evs[stack.back()];
        if (evs[i].pub.start_ns >= parent.end_ns || evs[i].end_ns > parent.end_ns) {
          stack.pop_back();
        } else {
          evs[stack.back()].children.push_back(i);
          break;
        }
      }
      stack.push_back(i);
    }
  }
  trace->result = std::move(result);
  result_ = trace;
  events_.clear();
  for (const auto& ev : trace->events)
    if (!ev.memory_row) events_.push_back(ev.pub);
  traced_steps_ = steps_in_recording_;
  ++trace_count_;
}

OpTable Profiler::key_averages(bool group_by_input_shape) const {
  TORCH_CHECK(result_,
              "Profiler: key_averages() before any trace was recorded (start() ... stop(), or a "
              "schedule's active steps)");
  const auto& evs = result_->events;
  // Totals per event: CUDA time includes the children's, as in Python's FunctionEvent.
  const size_t n = evs.size();
  std::vector<int64_t> cuda_total(n, -1);
  std::function<int64_t(size_t)> cuda_of = [&](size_t i) -> int64_t {
    if (cuda_total[i] >= 0) return cuda_total[i];
    int64_t t = evs[i].self_cuda_ns;
    for (size_t c : evs[i].children) t += cuda_of(c);
    return cuda_total[i] = t;
  };
  std::map<std::pair<std::string, std::string>, OpStats> rows;
  std::vector<std::pair<std::string, std::string>> order;
  for (size_t i = 0; i < n; ++i) {
    const auto& ev = evs[i];
    const std::string name = rewrite_name(ev.pub.name);
    const std::string shapes = group_by_input_shape ? shapes_string(ev.pub.shapes) : "";
    auto key = std::make_pair(name, shapes);
    auto it = rows.find(key);
    if (it == rows.end()) {
      it = rows.emplace(key, OpStats{}).first;
      it->second.name = name;
      it->second.input_shapes = shapes;
      order.push_back(key);
    }
    OpStats& r = it->second;
    r.count += 1;
    r.flops += ev.pub.flops;
    if (ev.pub.on_device) {
      r.self_cuda_ns += ev.pub.duration_ns;
      r.cuda_total_ns += ev.pub.duration_ns;
      continue;
    }
    int64_t child_cpu = 0, child_cuda = 0, child_cpu_mem = 0, child_cuda_mem = 0;
    for (size_t c : ev.children) {
      child_cpu += evs[c].pub.duration_ns;
      child_cuda += cuda_of(c);
      child_cpu_mem += evs[c].cpu_mem;
      child_cuda_mem += evs[c].cuda_mem;
    }
    r.cpu_total_ns += ev.pub.duration_ns;
    r.self_cpu_ns += ev.is_async ? ev.pub.duration_ns : ev.pub.duration_ns - child_cpu;
    r.cuda_total_ns += cuda_of(i);
    r.self_cuda_ns += cuda_of(i) - child_cuda;
    r.cpu_memory += ev.cpu_mem;
    r.self_cpu_memory += ev.cpu_mem - child_cpu_mem;
    r.cuda_memory += ev.cuda_mem;
    r.self_cuda_memory += ev.cuda_mem - child_cuda_mem;
  }
  std::vector<OpStats> out;
  out.reserve(order.size());
  for (const auto& k : order) out.push_back(rows.at(k));
  return OpTable(std::move(out), result_->has_cuda, options_.profile_memory(),
                 group_by_input_shape);
}

void Profiler::export_chrome_trace(const std::string& path) const {
  TORCH_CHECK(result_ && result_->result, "Profiler: export_chrome_trace(\"", path,
              "\") before any trace was recorded");
  result_->result->save(path);
}

// ---------------------------------------------------------------------------
// OpTable

OpTable::OpTable(std::vector<OpStats> rows, bool has_cuda, bool has_memory, bool has_shapes)
    : rows_(std::move(rows)),
      has_cuda_(has_cuda),
      has_memory_(has_memory),
      has_shapes_(has_shapes) {}

const OpStats* OpTable::find(const std::string& name) const {
  for (const auto& r : rows_)
    if (r.name == name) return &r;
  return nullptr;
}

int64_t OpTable::count(const std::string& name) const {
  int64_t c = 0;
  for (const auto& r : rows_)
    if (r.name == name) c += r.count;
  return c;
}

int64_t OpTable::self_cpu_total_ns() const {
  int64_t t = 0;
  for (const auto& r : rows_) t += r.self_cpu_ns;
  return t;
}

int64_t OpTable::self_cuda_total_ns() const {
  int64_t t = 0;
  for (const auto& r : rows_) t += r.self_cuda_ns;
  return t;
}

namespace {
using KeyFn = std::function<double(const OpStats&)>;
const std::map<std::string, KeyFn>& sort_keys() {
  static const std::map<std::string, KeyFn> keys = {
      {"count", [](const OpStats& r) { return static_cast<double>(r.count); }},
      {"self_cpu_time_total", [](const OpStats& r) { return static_cast<double>(r.self_cpu_ns); }},
      {"cpu_time_total", [](const OpStats& r) { return static_cast<double>(r.cpu_total_ns); }},
      {"cpu_time", [](const OpStats& r) { return r.cpu_avg_ns(); }},
      {"self_cuda_time_total",
       [](const OpStats& r) { return static_cast<double>(r.self_cuda_ns); }},
      {"cuda_time_total", [](const OpStats& r) { return static_cast<double>(r.cuda_total_ns); }},
      {"cuda_time", [](const OpStats& r) { return r.cuda_avg_ns(); }},
      {"self_device_time_total",
       [](const OpStats& r) { return static_cast<double>(r.self_cuda_ns); }},
      {"device_time_total", [](const OpStats& r) { return static_cast<double>(r.cuda_total_ns); }},
      {"device_time", [](const OpStats& r) { return r.cuda_avg_ns(); }},
      {"self_cpu_memory_usage",
       [](const OpStats& r) { return static_cast<double>(r.self_cpu_memory); }},
      {"cpu_memory_usage", [](const OpStats& r) { return static_cast<double>(r.cpu_memory); }},
      {"self_cuda_memory_usage",
       [](const OpStats& r) { return static_cast<double>(r.self_cuda_memory); }},
      {"cuda_memory_usage", [](const OpStats& r) { return static_cast<double>(r.cuda_memory); }},
      {"self_device_memory_usage",
       [](const OpStats& r) { return static_cast<double>(r.self_cuda_memory); }},
      {"device_memory_usage", [](const OpStats& r) { return static_cast<double>(r.cuda_memory); }},
      {"flops", [](const OpStats& r) { return static_cast<double>(r.flops); }},
  };
  return keys;
}

std::string pad(const std::string& s, size_t width, bool left) {
  std::string t = s;
  if (t.size() > width) t = t.substr(0, width - 3) + "...";
  const std::string fill(width - t.size(), ' ');
  return left ? t + fill : fill + t;
}

std::string share(int64_t part, int64_t total) {
  if (total == 0) return "NaN";
  return fmt::format("{:.2f}%", 100.0 * static_cast<double>(part) / static_cast<double>(total));
}
}  // namespace

OpTable OpTable::sorted(const std::string& sort_by) const {
  OpTable t = *this;
  if (sort_by == "name") {
    std::stable_sort(t.rows_.begin(), t.rows_.end(),
                     [](const OpStats& a, const OpStats& b) { return a.name < b.name; });
    return t;
  }
  auto it = sort_keys().find(sort_by);
  if (it == sort_keys().end()) {
    std::string valid = "name";
    for (const auto& [k, f] : sort_keys()) valid += ", " + k;
    TORCH_CHECK(false, "OpTable: sort_by must be one of ", valid, "; got \"", sort_by, "\"");
  }
  const auto& key = it->second;
  std::stable_sort(t.rows_.begin(), t.rows_.end(),
                   [&](const OpStats& a, const OpStats& b) { return key(a) > key(b); });
  return t;
}

std::string format_profiler_time(double us) {
  if (us >= 1e6) return fmt::format("{:.3f}s", us / 1e6);
  if (us >= 1e3) return fmt::format("{:.3f}ms", us / 1e3);
  return fmt::format("{:.3f}us", us);
}

std::string format_profiler_memory(int64_t bytes) {
  const double kb = 1024.0, mb = kb * 1024, gb = mb * 1024;
  const double a = std::abs(static_cast<double>(bytes)), b = static_cast<double>(bytes);
  if (a >= gb) return fmt::format("{:.2f} GB", b / gb);
  if (a >= mb) return fmt::format("{:.2f} MB", b / mb);
  if (a >= kb) return fmt::format("{:.2f} KB", b / kb);
  return fmt::format("{} B", bytes);
}

std::string OpTable::table(const std::string& sort_by, int64_t row_limit) const {
  const OpTable t = sorted(sort_by);
  std::vector<const OpStats*> shown;
  for (const auto& r : t.rows_) {
    if (row_limit >= 0 && static_cast<int64_t>(shown.size()) >= row_limit) break;
    shown.push_back(&r);
  }
  // Widths as Python's _build_table: names up to 55, other columns 12, shapes up to 80.
  size_t name_w = 0, shapes_w = 0;
  for (const auto& r : t.rows_) {
    name_w = std::max(name_w, r.name.size() + 4);
    shapes_w = std::max(shapes_w, r.input_shapes.size() + 4);
  }
  name_w = std::min<size_t>(std::max<size_t>(name_w, 8), 55);
  shapes_w = std::min<size_t>(std::max<size_t>(shapes_w, 16), 80);
  const size_t w = 12;
  struct Col {
    std::string header;
    size_t width;
    bool left;
    std::function<std::string(const OpStats&)> cell;
  };
  const int64_t cpu_total = t.self_cpu_total_ns(), cuda_total = t.self_cuda_total_ns();
  auto us = [](double ns) { return format_profiler_time(ns / 1000.0); };
  std::vector<Col> cols;
  cols.push_back({"Name", name_w, false, [](const OpStats& r) { return r.name; }});
  cols.push_back(
      {"Self CPU %", w, false, [&](const OpStats& r) { return share(r.self_cpu_ns, cpu_total); }});
  cols.push_back({"Self CPU", w, false,
                  [&](const OpStats& r) { return us(static_cast<double>(r.self_cpu_ns)); }});
  cols.push_back({"CPU total %", w, false,
                  [&](const OpStats& r) { return share(r.cpu_total_ns, cpu_total); }});
  cols.push_back({"CPU total", w, false,
                  [&](const OpStats& r) { return us(static_cast<double>(r.cpu_total_ns)); }});
  cols.push_back({"CPU time avg", w, false, [&](const OpStats& r) { return us(r.cpu_avg_ns()); }});
  if (has_cuda_) {
    cols.push_back({"Self CUDA", w, false,
                    [&](const OpStats& r) { return us(static_cast<double>(r.self_cuda_ns)); }});
    cols.push_back({"Self CUDA %", w, false,
                    [&](const OpStats& r) { return share(r.self_cuda_ns, cuda_total); }});
    cols.push_back({"CUDA total", w, false,
                    [&](const OpStats& r) { return us(static_cast<double>(r.cuda_total_ns)); }});
    cols.push_back(
        {"CUDA time avg", w, false, [&](const OpStats& r) { return us(r.cuda_avg_ns()); }});
  }
  if (has_memory_) {
    cols.push_back({"CPU Mem", w, false,
                    [](const OpStats& r) { return format_profiler_memory(r.cpu_memory); }});
    cols.push_back({"Self CPU Mem", w, false,
                    [](const OpStats& r) { return format_profiler_memory(r.self_cpu_memory); }});
    if (has_cuda_) {
      cols.push_back({"CUDA Mem", w, false,
                      [](const OpStats& r) { return format_profiler_memory(r.cuda_memory); }});
      cols.push_back({"Self CUDA Mem", w, false,
                      [](const OpStats& r) { return format_profiler_memory(r.self_cuda_memory); }});
    }
  }
  cols.push_back(
      {"# of Calls", w, false, [](const OpStats& r) { return std::to_string(r.count); }});
  if (has_shapes_)
    cols.push_back(
        {"Input Shapes", shapes_w, true, [](const OpStats& r) { return r.input_shapes; }});

  std::string sep, head;
  for (const auto& c : cols) {
    sep += std::string(c.width, '-') + "  ";
    head += pad(c.header, c.width, c.left) + "  ";
  }
  std::string out = sep + "\n" + head + "\n" + sep + "\n";
  for (const auto* r : shown) {
    std::string line;
    for (const auto& c : cols) line += pad(c.cell(*r), c.width, c.left) + "  ";
    out += line + "\n";
  }
  out += sep + "\n";
  out += "Self CPU time total: " + us(static_cast<double>(cpu_total)) + "\n";
  if (has_cuda_) out += "Self CUDA time total: " + us(static_cast<double>(cuda_total)) + "\n";
  return out;
}

std::string OpTable::to_json() const {
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& r : rows_) {
    rows.push_back({{"name", r.name},
                    {"input_shapes", r.input_shapes},
                    {"count", r.count},
                    {"self_cpu_ns", r.self_cpu_ns},
                    {"cpu_total_ns", r.cpu_total_ns},
                    {"self_cuda_ns", r.self_cuda_ns},
                    {"cuda_total_ns", r.cuda_total_ns},
                    {"self_cpu_memory", r.self_cpu_memory},
                    {"cpu_memory", r.cpu_memory},
                    {"self_cuda_memory", r.self_cuda_memory},
                    {"cuda_memory", r.cuda_memory},
                    {"flops", r.flops}});
  }
  return rows.dump();
}

// ---------------------------------------------------------------------------
// RecordScope

RecordScope::RecordScope(std::string name) : name_(std::move(name)) { guard_ = open_range(name_); }

RecordScope::~RecordScope() { guard_.reset(); }

}  // namespace wick
