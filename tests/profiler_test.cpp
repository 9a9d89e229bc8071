// Profiler: op tables from known work, nesting, schedules, traces, and the op
// names and counts of one MLP training step against Python's torch.profiler
// (tests/gen/profiler_baseline.py -> tests/profiler_baseline.h).
#include <wick/profiler.h>

#include "profiler_baseline.h"
#include "support.h"

#include <functional>
#include <map>

#include <nlohmann/json.hpp>

#include <chrono>
#include <fstream>
#include <thread>

namespace {

using wick::OpTable;
using wick::Profiler;
using wick::ProfilerOptions;
using wick::ProfilerSchedule;
using wick::testing::TempDir;

class ProfilerTest : public wick::testing::SeededTest {};

void busy_wait(std::chrono::microseconds d) {
  const auto end = std::chrono::steady_clock::now() + d;
  while (std::chrono::steady_clock::now() < end) {
  }
}

TEST_F(ProfilerTest, CountsFiveMatmulsExactly) {
  auto a = torch::randn({64, 128}), b = torch::randn({128, 32});
  Profiler profiler;
  {
    auto guard = profiler.scope();
    for (int i = 0; i < 5; ++i) a.mm(b);
    for (int i = 0; i < 3; ++i) a.relu();
  }
  const OpTable table = profiler.key_averages();
  EXPECT_EQ(table.count("aten::mm"), 5);
  EXPECT_EQ(table.count("aten::relu"), 3);
  EXPECT_EQ(table.count("aten::addmm"), 0);
  const auto* mm = table.find("aten::mm");
  ASSERT_NE(mm, nullptr);
  EXPECT_GT(mm->cpu_total_ns, 0);
  for (const auto& r : table.rows()) {
    EXPECT_LE(r.self_cpu_ns, r.cpu_total_ns) << r.name;
    EXPECT_GE(r.self_cpu_ns, 0) << r.name;
  }
}

// What docs/profiling.md says of LibTorch's torch::nn::functional::linear
// (torch/nn/functional/linear.h): aten::addmm only for 2-dim input with a
// bias; otherwise aten::matmul (an aten::mm on the folded input) and an
// in-place add of the bias; never aten::linear.
TEST_F(ProfilerTest, FunctionalLinearRunsAddmmOnlyFor2dInputWithBias) {
  namespace F = torch::nn::functional;
  auto w = torch::randn({16, 8}), b = torch::randn({16});
  const auto ops = [](const std::function<void()>& f) {
    Profiler profiler;
    {
      auto guard = profiler.scope();
      f();
    }
    std::map<std::string, int64_t> counts;
    const auto table = profiler.key_averages();
    for (const auto& r : table.rows()) counts[r.name] = r.count;
    return counts;
  };
  auto two_d = ops([&] { F::linear(torch::randn({4, 8}), w, b); });
  EXPECT_EQ(two_d["aten::addmm"], 1);
  EXPECT_EQ(two_d["aten::matmul"], 0);
  EXPECT_EQ(two_d["aten::linear"], 0);
  auto three_d = ops([&] { F::linear(torch::randn({2, 4, 8}), w, b); });  // a sequence model's
  EXPECT_EQ(three_d["aten::addmm"], 0);
  EXPECT_EQ(three_d["aten::matmul"], 1);
  EXPECT_EQ(three_d["aten::mm"], 1);
  EXPECT_EQ(three_d["aten::add_"], 1);
  EXPECT_EQ(three_d["aten::linear"], 0);
  auto no_bias = ops([&] { F::linear(torch::randn({4, 8}), w); });
  EXPECT_EQ(no_bias["aten::addmm"], 0);
  EXPECT_EQ(no_bias["aten::matmul"], 1);
  EXPECT_EQ(no_bias["aten::mm"], 1);
}

TEST_F(ProfilerTest, GroupsByInputShape) {
  auto a = torch::randn({8, 16}), b = torch::randn({16, 4}), c = torch::randn({4, 16});
  Profiler profiler(ProfilerOptions().record_shapes(true));
  profiler.start();
  a.mm(b);
  a.mm(b);
  c.mm(torch::randn({16, 2}));
  profiler.stop();
  const OpTable by_shape = profiler.key_averages(/*group_by_input_shape=*/true);
  int64_t rows = 0;
  for (const auto& r : by_shape.rows()) {
    if (r.name != "aten::mm") continue;
    ++rows;
    if (r.input_shapes == "[[8, 16], [16, 4]]") {
      EXPECT_EQ(r.count, 2);
    } else {
      EXPECT_EQ(r.input_shapes, "[[4, 16], [16, 2]]");
      EXPECT_EQ(r.count, 1);
    }
  }
  EXPECT_EQ(rows, 2);
  EXPECT_EQ(profiler.key_averages().count("aten::mm"), 3);
  EXPECT_NE(by_shape.table("count", 5).find("Input Shapes"), std::string::npos);
}

TEST_F(ProfilerTest, NestedScopesNest) {
  auto x = torch::randn({256, 256});
  Profiler profiler;
  profiler.start();
  {
    auto outer = wick::record_scope("outer");
    busy_wait(std::chrono::microseconds(2000));
    {
      auto inner = wick::record_scope("inner");
      busy_wait(std::chrono::microseconds(3000));
      x.mm(x);
    }
  }
  profiler.stop();
  const OpTable table = profiler.key_averages();
  const auto* outer = table.find("outer");
  const auto* inner = table.find("inner");
  const auto* mm = table.find("aten::mm");
  ASSERT_TRUE(outer && inner && mm);
  EXPECT_EQ(outer->count, 1);
  EXPECT_EQ(inner->count, 1);
  // outer's self time is its total minus inner's total; inner's excludes mm.
  EXPECT_EQ(outer->self_cpu_ns, outer->cpu_total_ns - inner->cpu_total_ns);
  EXPECT_EQ(inner->self_cpu_ns, inner->cpu_total_ns - mm->cpu_total_ns);
  EXPECT_GE(outer->self_cpu_ns, 1'500'000);  // the 2 ms busy wait, measured by the profiler's clock
  EXPECT_GE(inner->self_cpu_ns, 2'500'000);
  EXPECT_LT(inner->cpu_total_ns, outer->cpu_total_ns);
  // The events carry the nesting in time.
  const auto& evs = profiler.events();
  auto find = [&](const std::string& n) {
    return *std::find_if(evs.begin(), evs.end(),
                         [&](const wick::ProfiledEvent& e) { return e.name == n; });
  };
  const auto o = find("outer"), i = find("inner");
  EXPECT_LE(o.start_ns, i.start_ns);
  EXPECT_GE(o.start_ns + o.duration_ns, i.start_ns + i.duration_ns);
}

TEST_F(ProfilerTest, ScopesCostNothingWithoutAProfiler) {
  // No profiler: the scope records nothing, and a later profile does not see it.
  { auto s = wick::record_scope("before"); }
  Profiler profiler;
  profiler.start();
  { auto s = wick::record_scope("during"); }
  profiler.stop();
  { auto s = wick::record_scope("after"); }
  const auto table = profiler.key_averages();
  EXPECT_EQ(table.count("before"), 0);
  EXPECT_EQ(table.count("during"), 1);
  EXPECT_EQ(table.count("after"), 0);
}

TEST_F(ProfilerTest, ScheduleFollowsTorchProfilerActions) {
  // torch.profiler.schedule(skip_first=1, wait=1, warmup=1, active=2, repeat=2):
  // steps 0..8 -> none, none, warmup, record, record_and_save, none, warmup, record,
  // record_and_save.
  using A = wick::ProfilerAction;
  const std::vector<A> expected = {A::kNone,          A::kNone, A::kWarmup, A::kRecord,
                                   A::kRecordAndSave, A::kNone, A::kWarmup, A::kRecord,
                                   A::kRecordAndSave, A::kNone, A::kNone};
  std::vector<int64_t> ready_at;
  std::vector<int64_t> mm_counts;
  auto a = torch::randn({4, 4});
  Profiler profiler(
      ProfilerOptions()
          .schedule(ProfilerSchedule().skip_first(1).wait(1).warmup(1).active(2).repeat(2))
          .on_trace_ready([&](Profiler& p) {
            ready_at.push_back(p.step_num());
            mm_counts.push_back(p.key_averages().count("aten::mm"));
          }));
  profiler.start();
  for (size_t step = 0; step < expected.size(); ++step) {
    EXPECT_EQ(wick::to_string(profiler.current_action()), wick::to_string(expected[step]))
        << "step " << step;
    EXPECT_EQ(profiler.recording(),
              expected[step] == A::kRecord || expected[step] == A::kRecordAndSave)
        << "step " << step;
    for (size_t k = 0; k <= step; ++k) a.mm(a);  // step s does s+1 matmuls
    profiler.step();
  }
  profiler.stop();
  // Traces were ready when steps 4 and 8 ended; they hold steps 3+4 (4+5 mm) and 7+8 (8+9).
  EXPECT_EQ(ready_at, (std::vector<int64_t>{5, 9}));
  EXPECT_EQ(mm_counts, (std::vector<int64_t>{9, 17}));
  EXPECT_EQ(profiler.trace_count(), 2);
  EXPECT_EQ(profiler.traced_steps(), 2);
  EXPECT_EQ(profiler.key_averages().count("ProfilerStep*"), 2);
}

TEST_F(ProfilerTest, StopMidCycleDeliversThePartialTrace) {
  int ready = 0;
  auto a = torch::randn({4, 4});
  Profiler profiler(ProfilerOptions()
                        .schedule(ProfilerSchedule().wait(1).active(5))
                        .on_trace_ready([&](Profiler&) { ++ready; }));
  profiler.start();
  for (int s = 0; s < 3; ++s) {
    a.mm(a);
    profiler.step();
  }
  profiler.stop();
  EXPECT_EQ(ready, 1);
  // Steps 1 and 2, and step 3, begun (no work yet) when stop() came.
  EXPECT_EQ(profiler.traced_steps(), 3);
  EXPECT_EQ(profiler.key_averages().count("aten::mm"), 2);
}

TEST_F(ProfilerTest, StopInWarmupLeavesTheProfilerUsable) {
  auto a = torch::randn({4, 4});
  {
    int ready = 0;
    Profiler warm(ProfilerOptions()
                      .schedule(ProfilerSchedule().warmup(2).active(1))
                      .on_trace_ready([&](Profiler&) { ++ready; }));
    warm.start();
    a.mm(a);
    warm.step();
    EXPECT_EQ(warm.current_action(), wick::ProfilerAction::kWarmup);
    warm.stop();
    EXPECT_EQ(ready, 0);
    EXPECT_FALSE(warm.has_trace());
    // And one destroyed while warming up.
    Profiler dropped(ProfilerOptions().schedule(ProfilerSchedule().warmup(1).active(1)));
    dropped.start();
  }
  Profiler next;
  next.start();
  a.mm(a);
  next.stop();
  EXPECT_EQ(next.key_averages().count("aten::mm"), 1);
}

TEST_F(ProfilerTest, ExportsAChromeTrace) {
  TempDir dir;
  auto a = torch::randn({32, 32});
  Profiler profiler(ProfilerOptions().record_shapes(true).schedule(ProfilerSchedule().active(2)));
  profiler.start();
  {
    auto s = wick::record_scope("my_scope");
    a.mm(a);
  }
  profiler.step();
  profiler.stop();
  const std::string path = (dir.path() / "trace.json").string();
  profiler.export_chrome_trace(path);
  std::ifstream in(path);
  ASSERT_TRUE(in.good());
  const auto j = nlohmann::json::parse(in);
  ASSERT_TRUE(j.contains("traceEvents"));
  ASSERT_TRUE(j["traceEvents"].is_array());
  bool saw_mm = false, saw_scope = false, saw_step = false;
  for (const auto& e : j["traceEvents"]) {
    ASSERT_TRUE(e.contains("ph")) << e.dump();
    if (e["ph"] != "X") continue;
    // Complete events: name, microsecond ts and dur, pid and tid.
    ASSERT_TRUE(e.contains("name") && e.contains("ts") && e.contains("dur") && e.contains("pid") &&
                e.contains("tid"))
        << e.dump();
    EXPECT_TRUE(e["ts"].is_number());
    EXPECT_GE(e["dur"].get<double>(), 0.0);
    const std::string name = e["name"];
    if (name == "aten::mm") {
      saw_mm = true;
      ASSERT_TRUE(e.contains("args"));
      EXPECT_EQ(e["args"]["Input Dims"], nlohmann::json::parse("[[32, 32], [32, 32]]"));
    }
    if (name == "my_scope") {
      saw_scope = true;
      EXPECT_EQ(e["cat"], "user_annotation");
    }
    if (name == "ProfilerStep#0") saw_step = true;
  }
  EXPECT_TRUE(saw_mm);
  EXPECT_TRUE(saw_scope);
  EXPECT_TRUE(saw_step);
}

TEST_F(ProfilerTest, TableLooksLikeTorchProfilers) {
  auto a = torch::randn({64, 64});
  Profiler profiler(ProfilerOptions().profile_memory(true));
  profiler.start();
  for (int i = 0; i < 4; ++i) a.mm(a);
  profiler.stop();
  const auto table = profiler.key_averages();
  const std::string text = table.table("cpu_time_total", 3);
  EXPECT_NE(text.find("Name    Self CPU %      Self CPU   CPU total %     CPU total  CPU time avg"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("CPU Mem  Self CPU Mem    # of Calls"), std::string::npos) << text;
  EXPECT_NE(text.find("Self CPU time total: "), std::string::npos);
  // Four 64x64 float outputs were allocated by aten::mm: 4 * 16 KiB.
  const auto* mm = table.find("aten::mm");
  ASSERT_NE(mm, nullptr);
  EXPECT_EQ(mm->cpu_memory, 4 * 64 * 64 * 4);
  EXPECT_NE(text.find("64.00 KB"), std::string::npos) << text;
  // Rows limit: 3 data rows between the second and last separator lines.
  std::istringstream lines(text);
  std::string line;
  int sep = 0, data = 0;
  while (std::getline(lines, line)) {
    if (line.rfind("---", 0) == 0) {
      ++sep;
    } else if (sep == 2) {
      ++data;
    }
  }
  EXPECT_EQ(sep, 3);
  EXPECT_EQ(data, 3);
  // Sorting: descending by the column, any column.
  for (const char* key : {"count", "self_cpu_time_total", "cpu_time_total", "cpu_memory_usage"}) {
    const auto s = table.sorted(key);
    for (size_t i = 1; i < s.rows().size(); ++i) {
      const auto& p = s.rows()[i - 1];
      const auto& q = s.rows()[i];
      if (std::string(key) == "count") EXPECT_GE(p.count, q.count);
      if (std::string(key) == "self_cpu_time_total") EXPECT_GE(p.self_cpu_ns, q.self_cpu_ns);
      if (std::string(key) == "cpu_time_total") EXPECT_GE(p.cpu_total_ns, q.cpu_total_ns);
      if (std::string(key) == "cpu_memory_usage") EXPECT_GE(p.cpu_memory, q.cpu_memory);
    }
  }
  EXPECT_THROWS_WITH(table.sorted("cpu_time_totl"), "OpTable: sort_by must be one of");
}

TEST_F(ProfilerTest, FormatsLikePython) {
  // torch.autograd.profiler_util._format_time / _format_memory.
  EXPECT_EQ(wick::format_profiler_time(12.0), "12.000us");
  EXPECT_EQ(wick::format_profiler_time(1234.5), "1.234ms");
  EXPECT_EQ(wick::format_profiler_time(2.5e6), "2.500s");
  EXPECT_EQ(wick::format_profiler_memory(512), "512 B");
  EXPECT_EQ(wick::format_profiler_memory(-1536), "-1.50 KB");
  EXPECT_EQ(wick::format_profiler_memory(3 * 1024 * 1024), "3.00 MB");
}

TEST_F(ProfilerTest, RejectsBadOptionsAndMisuse) {
  EXPECT_THROWS_WITH(Profiler(ProfilerOptions().schedule(ProfilerSchedule().active(0))),
                     "Profiler: schedule active must be >= 1, got 0");
  EXPECT_THROWS_WITH(Profiler(ProfilerOptions().schedule(ProfilerSchedule().wait(-1))),
                     "Profiler: schedule wait must be >= 0, got -1");
  Profiler p;
  EXPECT_THROWS_WITH(p.key_averages(), "Profiler: key_averages() before any trace");
  EXPECT_THROWS_WITH(p.step(), "Profiler: step() before start()");
  p.start();
  Profiler q;
  EXPECT_THROWS_WITH(q.start(), "another wick::Profiler is running");
  p.stop();
  q.start();  // fine once the first stopped
  q.stop();
}

// One training step of the MLP 784-512-256-10 (bench/peers/trainer_peer.py's
// model), SGD(lr=0.01): the ops and their counts equal what Python's
// torch.profiler reports for the same step (tests/gen/profiler_baseline.py).
TEST_F(ProfilerTest, TrainingStepOpsMatchPythonTorchProfiler) {
  namespace nn = torch::nn;
  auto model = nn::Sequential(nn::Linear(784, 512), nn::ReLU(), nn::Linear(512, 256), nn::ReLU(),
                              nn::Linear(256, 10));
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.01));
  auto x = torch::randn({64, 784});
  auto y = torch::randint(0, 10, {64});
  auto step = [&] {
    optimizer.zero_grad();
    auto loss = torch::nn::functional::cross_entropy(model->forward(x), y);
    loss.backward();
    optimizer.step();
  };
  step();  // as the script does: one step before the profiled one
  Profiler profiler;
  profiler.start();
  step();
  profiler.stop();
  const auto table = profiler.key_averages();
  std::map<std::string, int64_t> ours;
  for (const auto& r : table.rows()) ours[r.name] = r.count;
  std::map<std::string, int64_t> python(wick::testing::kProfilerPythonStepCounts.begin(),
                                        wick::testing::kProfilerPythonStepCounts.end());
  // The known differences, exactly (tests/gen/profiler_baseline.py says why each one is
  // legitimate).
  for (const auto& d : wick::testing::kProfilerPythonOnlyOps) {
    EXPECT_EQ(ours.count(d.name), 0u) << d.name;
    EXPECT_EQ(python[d.name], d.count) << d.name;
    python.erase(d.name);
  }
  for (const auto& d : wick::testing::kProfilerCppOnlyOps) {
    EXPECT_EQ(ours[d.name], d.count) << d.name << ": " << d.why;
    ours.erase(d.name);
  }
  EXPECT_GT(python.size(), 30u);
  for (const auto& [name, count] : python) {
    auto it = ours.find(name);
    EXPECT_EQ(it == ours.end() ? 0 : it->second, count) << name << " (Python's count on the right)";
  }
  for (const auto& [name, count] : ours)
    EXPECT_TRUE(python.count(name)) << name << " only in C++, " << count << " calls";
}

}  // namespace

namespace {

// The example of docs/profiling.md, as it stands there.
TEST_F(ProfilerTest, DocsExample) {
  TempDir dir;
  const std::string run_dir = dir.path().string();
  namespace nn = torch::nn;
  auto model = nn::Sequential(nn::Linear(784, 512), nn::ReLU(), nn::Linear(512, 256), nn::ReLU(),
                              nn::Linear(256, 10));
  torch::optim::Adam optimizer(model->parameters(), 1e-3);
  auto x = torch::randn({64, 784});
  auto y = torch::randint(0, 10, {64});

  std::string table;
  wick::Profiler profiler(
      wick::ProfilerOptions()
          .record_shapes(true)
          .schedule(wick::ProfilerSchedule().skip_first(2).wait(1).warmup(1).active(3).repeat(1))
          .on_trace_ready([&](wick::Profiler& p) {
            table = p.key_averages().table("cpu_time_total", 10);
            p.export_chrome_trace(run_dir + "/trace.json");
          }));
  profiler.start();
  for (int step = 0; step < 10; ++step) {
    torch::Tensor input;
    {
      auto scope = wick::record_scope("data_loading");
      input = x * 1.0f;  // stands in for fetching a batch
    }
    optimizer.zero_grad();
    auto loss = torch::nn::functional::cross_entropy(model->forward(input), y);
    loss.backward();
    optimizer.step();
    profiler.step();
  }
  profiler.stop();
  std::cout << table;

  EXPECT_EQ(profiler.traced_steps(), 3);
  EXPECT_EQ(profiler.key_averages().count("data_loading"), 3);
  EXPECT_EQ(profiler.key_averages().count("aten::addmm"), 9);
  EXPECT_NE(table.find("ProfilerStep*"), std::string::npos);
  std::ifstream trace(run_dir + "/trace.json");
  EXPECT_TRUE(nlohmann::json::parse(trace).contains("traceEvents"));
}

}  // namespace
