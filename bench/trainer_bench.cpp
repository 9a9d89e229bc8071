// wick-bench trainer: what the Trainer costs over a hand-written LibTorch
// loop, and how both compare with the same loop in PyTorch eager (and
// torch.compile) from Python.
//
// The work: an MLP 784-512-256-10 (ReLU), cross-entropy, Adam(lr 1e-3), batch
// 64, on random inputs and class targets drawn with a fixed seed into a
// preallocated dataset of steps*batch samples, read in order. Each run builds
// a fresh model and optimizer, takes `warmup` untimed steps, then times
// `steps` steps. The Trainer and raw runs alternate (order flipped every
// round), the Python peer runs in its own process in the first `repeats`
// rounds, and case figures are medians over the rounds. The Trainer runs with
// its default options (logs every 50 steps with the system meters). The
// overhead verdict comes from the paired ratios trainer/raw of each round:
// their median and its distribution-free 95% confidence interval, for wall
// and for process CPU time (which other work on the machine inflates
// less); rounds continue past `repeats` until both intervals are narrower than
// +-ci_target or max_repeats rounds ran. With --breakdown, variants of the
// Trainer run in every round too, and the summary says what each part of the
// Trainer's step costs (meters, logging, the batch source, callbacks, the loop).

#include "bench_common.h"

#include <wick/callbacks.h>
#include <wick/optim.h>
#include <wick/profiler.h>
#include <wick/trainer.h>

#include <torch/torch.h>
#include <CLI/CLI.hpp>

#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

namespace wick_bench {

namespace {

struct TrainerBenchOptions {
  int threads = 1;
  // Short runs, many rounds: two runs next to each other share the machine's
  // load, so the paired ratio's interval narrows with rounds (docs/benchmarks.md).
  int64_t steps = 100;
  int64_t warmup = 10;
  int repeats = 10;
  int max_repeats = 300;
  double ci_target = 0.01;
  bool breakdown = false;
  int64_t batch = 64;
  double lr = 1e-3;
  uint64_t seed = 0;
  bool no_python = false;
  bool compile = false;
  int compile_repeats = 3;
  bool fused_adam = false;
  std::string trainer_source = "tensor";
};

constexpr double kOverheadGoal = 1.03;  // trainer / raw, at most
constexpr double kPythonGoal = 1.10;    // python eager / trainer, at least

// nn.Sequential as in the peer. The layers are built one statement each: as
// arguments of one call their order of construction, and so of drawing their
// initial weights, would be unspecified (GCC builds the last first).
torch::nn::Sequential make_mlp(uint64_t seed) {
  torch::manual_seed(seed);
  torch::nn::Linear fc1(784, 512);
  torch::nn::Linear fc2(512, 256);
  torch::nn::Linear fc3(256, 10);
  return torch::nn::Sequential(fc1, torch::nn::ReLU(), fc2, torch::nn::ReLU(), fc3);
}

struct Data {
  torch::Tensor x, y;
};

// Drawn as the Python peer draws them (a generator seeded seed+1: randn, then
// randint), so every case trains on the same numbers.
Data make_data(int64_t samples, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed + 1);
  Data d;
  d.x = torch::randn({samples, 784}, gen);
  d.y = torch::randint(0, 10, {samples}, gen, torch::kLong);
  return d;
}

// A value that depends on every step taken: the trained model's loss on the
// first batch. Equal across the C++ cases when they do the same work.
double check_loss(torch::nn::Sequential& model, const Data& d, int64_t batch) {
  torch::NoGradGuard no_grad;
  auto out = model->forward(d.x.narrow(0, 0, batch));
  return torch::nn::functional::cross_entropy(out, d.y.narrow(0, 0, batch)).item<double>();
}

struct Run {
  double wall_s = 0, cpu_s = 0, check_loss = 0;
  int64_t faults = 0;
};

Run measured(const Stopwatch& sw) { return Run{sw.wall_s(), sw.cpu_s(), 0.0, sw.minor_faults()}; }

// Batches as views of consecutive slices, as the raw loop and the Python peer
// take them (TensorBatchSource gathers each batch into a new tensor).
class SliceSource : public wick::BatchSource {
 public:
  SliceSource(torch::Tensor x, torch::Tensor y, int64_t batch)
      : x_(std::move(x)), y_(std::move(y)), batch_(batch) {}
  void reset(int64_t) override { cursor_ = 0; }
  std::optional<wick::Batch> next() override {
    if (cursor_ + batch_ > x_.size(0)) return std::nullopt;
    wick::Batch b(x_.narrow(0, cursor_, batch_), y_.narrow(0, cursor_, batch_));
    cursor_ += batch_;
    return b;
  }
  std::optional<int64_t> size() const override { return x_.size(0) / batch_; }

 private:
  torch::Tensor x_, y_;
  int64_t batch_, cursor_ = 0;
};

// A scratch directory, removed with its contents (std::filesystem is safe
// here: wick::wick's link binds it to libstdc++, docs/getting-started.md).
struct TempDir {
  TempDir() {
    std::string templ = (std::filesystem::temp_directory_path() / "wick-bench-XXXXXX").string();
    TORCH_CHECK(::mkdtemp(templ.data()) != nullptr, "wick-bench: mkdtemp failed");
    path = templ;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string path;
};

// What a Trainer run leaves out or adds (--breakdown's variants).
struct TrainerVariant {
  bool logs = true;        // on_log every 50 steps (the default); false: only at fit's end
  bool meters = true;      // log_system_metrics (the default)
  bool slices = false;     // SliceSource (views) instead of the --trainer-source
  bool callbacks = false;  // + ProgressBar (to /dev/null) and MetricLogger (to a temp dir)
};

// Discards what it is given: the ProgressBar's stream.
std::FILE* null_stream() {
  static std::FILE* f = std::fopen("/dev/null", "w");
  return f;
}

// (a) wick::Trainer: SupervisedTask, batches in order (TensorBatchSource, or
// SliceSource with --trainer-source slices), default options (logs every 50
// steps with the system meters), no callbacks; `variant` changes that.
// `fused`: wick::FusedAdam (one at::_fused_adam_ call per step) instead of
// torch::optim::Adam (case wick_trainer_fused_adam).
Run run_trainer(const TrainerBenchOptions& o, const Data& d, bool fused = false,
                const TrainerVariant& variant = {}) {
  auto model = make_mlp(o.seed);
  std::unique_ptr<torch::optim::Optimizer> owned_optimizer;
  if (fused) {
    owned_optimizer =
        std::make_unique<wick::FusedAdam>(model->parameters(), wick::FusedAdamOptions(o.lr));
  } else {
    owned_optimizer =
        std::make_unique<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(o.lr));
  }
  torch::optim::Optimizer& optimizer = *owned_optimizer;
  wick::SupervisedTask task(model);
  std::unique_ptr<wick::BatchSource> owned;
  if (o.trainer_source == "slices" || variant.slices) {
    owned = std::make_unique<SliceSource>(d.x, d.y, o.batch);
  } else {
    owned = std::make_unique<wick::TensorBatchSource>(
        d.x, d.y, wick::TensorBatchSourceOptions(o.batch).shuffle(false));
  }
  wick::BatchSource& source = *owned;
  const auto options = [&](int64_t max_steps) {
    auto opts = wick::TrainerOptions()
                    .max_epochs(-1)  // max_steps ends the run, as i % n_batches does below
                    .max_steps(max_steps)
                    .log_system_metrics(variant.meters)
                    .seed(o.seed);
    if (!variant.logs) opts.log_every_n_steps(std::numeric_limits<int64_t>::max());
    return opts;
  };
  std::optional<TempDir> log_dir;
  const auto add_callbacks = [&](wick::Trainer& t) {
    if (!variant.callbacks) return;
    if (!log_dir) log_dir.emplace();
    t.add_callback(std::make_shared<wick::ProgressBar>(
        wick::ProgressBarOptions().force_lines(true).print_every_n_steps(50).stream(
            null_stream())));
    t.add_callback(std::make_shared<wick::MetricLogger>(wick::MetricLoggerOptions(log_dir->path)));
  };
  if (o.warmup > 0) {
    wick::Trainer warm(options(o.warmup));
    add_callbacks(warm);
    warm.fit(task, optimizer, source);
  }
  wick::Trainer trainer(options(o.steps));
  add_callbacks(trainer);
  Stopwatch sw;
  auto result = trainer.fit(task, optimizer, source);
  Run run = measured(sw);
  TORCH_CHECK(result.state.step == o.steps, "wick-bench trainer: the Trainer took ",
              result.state.step, " steps, expected ", o.steps);
  run.check_loss = check_loss(model, d, o.batch);
  return run;
}

// (b) The loop a LibTorch user writes by hand for the same work.
Run run_raw(const TrainerBenchOptions& o, const Data& d) {
  auto model = make_mlp(o.seed);
  torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(o.lr));
  const int64_t n_batches = d.x.size(0) / o.batch;
  const auto step = [&](int64_t i) {
    auto x = d.x.narrow(0, i * o.batch, o.batch);
    auto y = d.y.narrow(0, i * o.batch, o.batch);
    auto loss = torch::nn::functional::cross_entropy(model->forward(x), y);
    loss.backward();
    optimizer.step();
    optimizer.zero_grad();
  };
  for (int64_t i = 0; i < o.warmup; ++i) step(i % n_batches);
  Stopwatch sw;
  for (int64_t i = 0; i < o.steps; ++i) step(i % n_batches);
  Run run = measured(sw);
  run.check_loss = check_loss(model, d, o.batch);
  return run;
}

// --breakdown: the ATen ops the Trainer (default options) runs beyond the raw
// loop over the same `steps` steps, per step, from wick::Profiler. Op counts
// do not depend on the machine's load, so they say where the Trainer's extra
// work is even when timing cannot resolve it; self CPU time is beside them.
Json extra_ops_per_step(const TrainerBenchOptions& o, const Data& d) {
  using Counts = std::map<std::string, std::pair<int64_t, int64_t>>;  // name -> count, self ns
  const auto table = [](wick::Profiler& profiler) {
    Counts c;
    const auto ops = profiler.key_averages();
    for (const auto& r : ops.rows()) c[r.name] = {r.count, r.self_cpu_ns};
    return c;
  };
  Counts trainer_ops, raw_ops;
  {
    auto model = make_mlp(o.seed);
    torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(o.lr));
    wick::SupervisedTask task(model);
    wick::TensorBatchSource source(d.x, d.y,
                                   wick::TensorBatchSourceOptions(o.batch).shuffle(false));
    wick::Trainer trainer(wick::TrainerOptions().max_epochs(-1).max_steps(o.steps).seed(o.seed));
    wick::Profiler profiler;
    {
      auto guard = profiler.scope();
      trainer.fit(task, optimizer, source);
    }
    trainer_ops = table(profiler);
  }
  {
    auto model = make_mlp(o.seed);
    torch::optim::Adam optimizer(model->parameters(), torch::optim::AdamOptions(o.lr));
    const int64_t n_batches = d.x.size(0) / o.batch;
    wick::Profiler profiler;
    {
      auto guard = profiler.scope();
      for (int64_t i = 0; i < o.steps; ++i) {
        auto x = d.x.narrow(0, (i % n_batches) * o.batch, o.batch);
        auto y = d.y.narrow(0, (i % n_batches) * o.batch, o.batch);
        auto loss = torch::nn::functional::cross_entropy(model->forward(x), y);
        loss.backward();
        optimizer.step();
        optimizer.zero_grad();
      }
    }
    raw_ops = table(profiler);
  }
  const auto steps = static_cast<double>(o.steps);
  Json out = Json::array();
  double total_ops = 0, total_us = 0;
  for (const auto& [name, tr] : trainer_ops) {
    const auto it = raw_ops.find(name);
    const int64_t raw_count = it == raw_ops.end() ? 0 : it->second.first;
    const int64_t raw_ns = it == raw_ops.end() ? 0 : it->second.second;
    if (tr.first == raw_count) continue;
    Json j;
    j["op"] = name;
    j["per_step"] = static_cast<double>(tr.first - raw_count) / steps;
    j["self_us_per_step"] = 1e-3 * static_cast<double>(tr.second - raw_ns) / steps;
    total_ops += static_cast<double>(tr.first - raw_count) / steps;
    total_us += 1e-3 * static_cast<double>(tr.second - raw_ns) / steps;
    out.push_back(j);
  }
  for (const auto& [name, raw] : raw_ops) {
    if (trainer_ops.count(name) == 0) {
      Json j;
      j["op"] = name;
      j["per_step"] = -static_cast<double>(raw.first) / steps;
      j["self_us_per_step"] = -1e-3 * static_cast<double>(raw.second) / steps;
      out.push_back(j);
    }
  }
  Json result;
  result["ops"] = out;
  result["ops_per_step"] = total_ops;
  result["self_us_per_step"] = total_us;
  return result;
}

// (investigation) The raw loop with Adam done by ATen's fused kernel, one call
// for all parameters, instead of torch::optim::Adam's per-parameter ops.
Run run_raw_fused_adam(const TrainerBenchOptions& o, const Data& d) {
  auto model = make_mlp(o.seed);
  std::vector<torch::Tensor> params = model->parameters();
  std::vector<torch::Tensor> exp_avgs, exp_avg_sqs, state_steps;
  for (const auto& p : params) {
    exp_avgs.push_back(torch::zeros_like(p));
    exp_avg_sqs.push_back(torch::zeros_like(p));
    state_steps.push_back(torch::zeros({}, torch::kFloat));
  }
  const int64_t n_batches = d.x.size(0) / o.batch;
  std::vector<torch::Tensor> grads(params.size());
  const auto step = [&](int64_t i) {
    auto x = d.x.narrow(0, i * o.batch, o.batch);
    auto y = d.y.narrow(0, i * o.batch, o.batch);
    auto loss = torch::nn::functional::cross_entropy(model->forward(x), y);
    loss.backward();
    torch::NoGradGuard no_grad;
    for (size_t k = 0; k < params.size(); ++k) grads[k] = params[k].grad();
    at::_foreach_add_(state_steps, 1);
    at::_fused_adam_(params, grads, exp_avgs, exp_avg_sqs, /*max_exp_avg_sqs=*/{}, state_steps,
                     o.lr,
                     /*beta1=*/0.9, /*beta2=*/0.999, /*weight_decay=*/0.0, /*eps=*/1e-8,
                     /*amsgrad=*/false, /*maximize=*/false);
    for (auto& p : params) p.mutable_grad().reset();
  };
  for (int64_t i = 0; i < o.warmup; ++i) step(i % n_batches);
  Stopwatch sw;
  for (int64_t i = 0; i < o.steps; ++i) step(i % n_batches);
  Run run = measured(sw);
  run.check_loss = check_loss(model, d, o.batch);
  return run;
}

// One case's runs, as milliseconds per step.
struct CaseRuns {
  explicit CaseRuns(std::string case_name) : name(std::move(case_name)) {}
  std::string name;
  std::vector<double> ms, cpu_ms, faults;
  std::optional<double> check_loss;
  Json extra = Json::object();  // fields the peer reported
  std::string error;

  void add(double wall_ms, double cpu_ms_step, double faults_step) {
    ms.push_back(wall_ms);
    cpu_ms.push_back(cpu_ms_step);
    faults.push_back(faults_step);
  }
  void add(const Run& r, int64_t steps) {
    const auto n = static_cast<double>(steps);
    add(1e3 * r.wall_s / n, 1e3 * r.cpu_s / n, static_cast<double>(r.faults) / n);
    check_loss = r.check_loss;
  }
  bool measured() const { return !ms.empty(); }
  double median_ms() const { return median(ms); }
  double median_cpu_ms() const { return median(cpu_ms); }
};

Json case_line(const CaseRuns& c, const TrainerBenchOptions& o, int threads) {
  Json j;
  j["bench"] = "trainer";
  j["case"] = c.name;
  if (c.measured()) {
    j["ms_per_step"] = c.median_ms();
    j["cpu_ms_per_step"] = c.median_cpu_ms();
    j["page_faults_per_step"] = median(c.faults);
  } else {
    j["ms_per_step"] = nullptr;
  }
  j["threads"] = threads;
  j["batch"] = o.batch;
  j["steps"] = o.steps;
  j["warmup"] = o.warmup;
  if (c.name == "wick_trainer" || c.name == "wick_trainer_fused_adam")
    j["source"] = o.trainer_source;
  j["repeats"] = c.ms.size();
  j["runs_ms_per_step"] = c.ms;
  j["runs_cpu_ms_per_step"] = c.cpu_ms;
  j["runs_page_faults_per_step"] = c.faults;
  if (c.check_loss) j["check_loss"] = *c.check_loss;
  for (const auto& [k, v] : c.extra.items()) {
    if (!j.contains(k)) j[k] = v;
  }
  if (!c.error.empty()) j["error"] = c.error;
  return j;
}

std::vector<std::string> peer_args(const TrainerBenchOptions& o, int repeats) {
  return {"--threads", std::to_string(o.threads), "--steps",   std::to_string(o.steps),
          "--warmup",  std::to_string(o.warmup),  "--repeats", std::to_string(repeats),
          "--batch",   std::to_string(o.batch),   "--lr",      Json(o.lr).dump(),
          "--seed",    std::to_string(o.seed)};
}

// Reads the peer's case line into `c`; false (with c.error set) when the peer failed.
bool take_peer(const PeerResult& r, CaseRuns& c) {
  if (!r.ok()) {
    c.error = r.error;
    return false;
  }
  const Json& line = r.lines.back();
  if (line.contains("error")) c.error = line["error"].get<std::string>();
  if (line.contains("runs_ms_per_step")) {
    auto ms = line["runs_ms_per_step"].get<std::vector<double>>();
    auto cpu = line["runs_cpu_ms_per_step"].get<std::vector<double>>();
    auto faults = line.value("runs_page_faults_per_step", std::vector<double>(ms.size(), 0.0));
    for (size_t i = 0; i < ms.size(); ++i) c.add(ms[i], cpu[i], faults[i]);
  }
  if (line.contains("check_loss")) c.check_loss = line["check_loss"].get<double>();
  for (const char* k : {"torch", "python", "compile_s", "adam"}) {
    if (line.contains(k)) c.extra[k] = line[k];
  }
  return c.error.empty();
}

// The 95% interval of a median from n sorted samples, distribution-free: the
// k-th smallest and k-th largest, k the largest rank with
// P(Binomial(n, 1/2) < k) <= 2.5% (0 when n < 6: too few for an interval).
size_t median_ci_rank(size_t n) {
  size_t k = 0;
  double cdf = 0;  // P(Binomial(n, 1/2) <= i)
  for (size_t i = 0; i < n; ++i) {
    const double log_pmf =
        std::lgamma(static_cast<double>(n) + 1) - std::lgamma(static_cast<double>(i) + 1) -
        std::lgamma(static_cast<double>(n - i) + 1) - static_cast<double>(n) * std::log(2.0);
    cdf += std::exp(log_pmf);
    if (cdf > 0.025) break;
    k = i + 1;
  }
  return k;
}

// The median of `x` and its distribution-free 95% interval (NaN bounds when
// there are too few samples).
struct MedianCI {
  double median = 0, lo = 0, hi = 0;
};
MedianCI median_ci(std::vector<double> x) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  if (x.empty()) return {nan, nan, nan};
  std::sort(x.begin(), x.end());
  const size_t n = x.size(), k = median_ci_rank(n);
  const double med = n % 2 == 1 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]);
  if (k == 0) return {med, nan, nan};
  return {med, x[k - 1], x[n - k]};
}

// The paired ratio a/b of the rounds: the median of the rounds' ratios and its
// distribution-free 95% interval. Paired, because runs next to each other
// share the machine's load; the median, because a burst of load from other
// processes that hits one run of a pair makes that pair an outlier.
struct RatioCI {
  double ratio = 0, lo = 0, hi = 0;
  /// The interval's larger relative distance from the ratio (0.01: +-1%; NaN without one).
  double half_width() const { return std::max(hi / ratio - 1.0, 1.0 - lo / ratio); }
  Json json() const { return std::isfinite(lo) ? Json::array({lo, hi}) : Json(nullptr); }
};
RatioCI paired_ratio(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> ratios;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) ratios.push_back(a[i] / b[i]);
  const MedianCI m = median_ci(ratios);
  return {m.median, m.lo, m.hi};
}

// "met" when the whole interval is within the goal, "missed" when it is all
// above, else "undecided" (more rounds, or a quieter machine, would tell).
std::string verdict(const RatioCI& r, double goal) {
  if (!std::isfinite(r.hi)) return "undecided";
  return r.hi <= goal ? "met" : r.lo > goal ? "missed" : "undecided";
}

// Paired difference a - b of the rounds in us/step: the median and its 95% interval.
Json paired_diff_us(const std::vector<double>& a_ms, const std::vector<double>& b_ms) {
  std::vector<double> d;
  for (size_t i = 0; i < std::min(a_ms.size(), b_ms.size()); ++i)
    d.push_back(1e3 * (a_ms[i] - b_ms[i]));
  const MedianCI m = median_ci(d);
  Json j;
  j["us"] = m.median;
  j["ci95"] = std::isfinite(m.lo) ? Json::array({m.lo, m.hi}) : Json(nullptr);
  return j;
}

void run_trainer_bench(const TrainerBenchOptions& o, const GlobalOptions& global) {
  TORCH_CHECK(o.steps >= 1, "wick-bench trainer: --steps must be >= 1, got ", o.steps);
  TORCH_CHECK(o.warmup >= 0, "wick-bench trainer: --warmup must be >= 0, got ", o.warmup);
  TORCH_CHECK(o.repeats >= 1, "wick-bench trainer: --repeats must be >= 1, got ", o.repeats);
  TORCH_CHECK(o.max_repeats >= o.repeats,
              "wick-bench trainer: --max-repeats must be >= --repeats (", o.repeats, "), got ",
              o.max_repeats);
  TORCH_CHECK(o.ci_target > 0, "wick-bench trainer: --ci-target must be > 0, got ", o.ci_target);
  TORCH_CHECK(o.batch >= 1, "wick-bench trainer: --batch must be >= 1, got ", o.batch);
  TORCH_CHECK(o.trainer_source == "tensor" || o.trainer_source == "slices",
              "wick-bench trainer: --trainer-source must be tensor or slices, got ",
              o.trainer_source);
  const int threads = set_torch_threads(o.threads);
  JsonOut out(global.jsonl);
  const double load_start = load_average_1m();

  const Data data = make_data(o.steps * o.batch, o.seed);
  CaseRuns trainer("wick_trainer"), raw("raw_libtorch"), fused("raw_fused_adam"),
      trainer_fused("wick_trainer_fused_adam"), eager("python_eager"), compiled("python_compile");

  // --breakdown: the Trainer without each of its parts in turn.
  struct Variant {
    CaseRuns runs;
    TrainerVariant variant;
  };
  std::vector<Variant> variants;
  if (o.breakdown) {
    variants.push_back({CaseRuns("wick_trainer_no_meters"), {true, false, false, false}});
    variants.push_back({CaseRuns("wick_trainer_no_logs"), {false, false, false, false}});
    variants.push_back({CaseRuns("wick_trainer_no_logs_slices"), {false, false, true, false}});
    variants.push_back({CaseRuns("wick_trainer_callbacks"), {true, true, false, true}});
  }
  std::vector<std::function<void()>> cases = {[&] { trainer.add(run_trainer(o, data), o.steps); },
                                              [&] { raw.add(run_raw(o, data), o.steps); }};
  for (auto& v : variants)
    cases.emplace_back([&] { v.runs.add(run_trainer(o, data, false, v.variant), o.steps); });

  int rounds = 0;
  RatioCI wall, cpu;
  for (int r = 0; r < o.max_repeats; ++r) {
    // Rotate which C++ case goes first, so none always follows another.
    for (size_t k = 0; k < cases.size(); ++k) cases[(k + static_cast<size_t>(r)) % cases.size()]();
    if (o.fused_adam) {
      fused.add(run_raw_fused_adam(o, data), o.steps);
      trainer_fused.add(run_trainer(o, data, /*fused=*/true), o.steps);
    }
    if (r < o.repeats && !o.no_python && eager.error.empty()) {
      take_peer(run_peer(global, "trainer_peer.py", peer_args(o, 1)), eager);
    }
    rounds = r + 1;
    wall = paired_ratio(trainer.ms, raw.ms);
    cpu = paired_ratio(trainer.cpu_ms, raw.cpu_ms);
    if (rounds >= o.repeats && wall.half_width() <= o.ci_target && cpu.half_width() <= o.ci_target)
      break;
  }
  out.emit(case_line(trainer, o, threads));
  out.emit(case_line(raw, o, threads));
  for (const auto& v : variants) out.emit(case_line(v.runs, o, threads));
  if (o.fused_adam) {
    out.emit(case_line(fused, o, threads));
    out.emit(case_line(trainer_fused, o, threads));
  }
  if (!o.no_python) out.emit(case_line(eager, o, threads));
  if (!o.no_python && o.compile) {
    auto args = peer_args(o, o.compile_repeats);
    args.push_back("--compile");
    take_peer(run_peer(global, "trainer_peer.py", args), compiled);
    out.emit(case_line(compiled, o, threads));
  }

  Json s;
  s["bench"] = "trainer";
  s["summary"] = true;
  const double t = trainer.median_ms(), b = raw.median_ms();
  s["trainer_ms_per_step"] = t;
  s["raw_ms_per_step"] = b;
  s["trainer_cpu_ms_per_step"] = trainer.median_cpu_ms();
  s["raw_cpu_ms_per_step"] = raw.median_cpu_ms();
  s["python_ms_per_step"] = eager.measured() ? Json(eager.median_ms()) : Json(nullptr);
  // trainer / raw: the median of the rounds' paired ratios, with its 95%
  // interval, from wall and from process CPU time.
  s["overhead_ratio"] = wall.ratio;
  s["overhead_ratio_ci95"] = wall.json();
  s["overhead_ratio_cpu"] = cpu.ratio;
  s["overhead_ratio_cpu_ci95"] = cpu.json();
  s["overhead_ratio_of_medians"] = t / b;
  s["rounds"] = rounds;
  s["ci_target"] = o.ci_target;
  s["ci_target_met"] = wall.half_width() <= o.ci_target && cpu.half_width() <= o.ci_target;
  s["overhead_verdict"] = verdict(wall, kOverheadGoal);
  s["overhead_verdict_cpu"] = verdict(cpu, kOverheadGoal);
  // Met when CPU time's interval is within the goal and wall time does not say it missed.
  s["overhead_goal_met"] =
      verdict(cpu, kOverheadGoal) == "met" && verdict(wall, kOverheadGoal) != "missed";
  s["python_ratio"] = eager.measured() ? Json(eager.median_ms() / t) : Json(nullptr);
  if (!o.no_python && o.compile) {
    s["python_compile_ms_per_step"] =
        compiled.measured() ? Json(compiled.median_ms()) : Json(nullptr);
    if (!compiled.error.empty()) s["python_compile_error"] = compiled.error;
  }
  if (o.fused_adam) {
    s["raw_fused_adam_ms_per_step"] = fused.median_ms();
    s["trainer_fused_adam_ms_per_step"] = trainer_fused.median_ms();
    s["python_ratio_fused"] =
        eager.measured() ? Json(eager.median_ms() / trainer_fused.median_ms()) : Json(nullptr);
  }
  if (eager.measured()) s["python_ratio_cpu"] = eager.median_cpu_ms() / trainer.median_cpu_ms();
  if (!eager.error.empty()) s["python_error"] = eager.error;
  if (eager.measured()) s["python_goal_met"] = eager.median_ms() / t >= kPythonGoal;
  if (o.breakdown) {
    // Where the Trainer's step goes, as paired differences of the rounds
    // (us/step, median and 95% interval), wall and CPU; the first four
    // telescope from trainer to raw.
    const auto& no_meters = variants[0].runs;
    const auto& no_logs = variants[1].runs;
    const auto& slices = variants[2].runs;
    const auto& callbacks = variants[3].runs;
    const auto part = [](const CaseRuns& with, const CaseRuns& without) {
      Json j;
      j["wall"] = paired_diff_us(with.ms, without.ms);
      j["cpu"] = paired_diff_us(with.cpu_ms, without.cpu_ms);
      return j;
    };
    Json d;
    d["meters"] = part(trainer, no_meters);     // log_system_metrics on logging steps
    d["logging"] = part(no_meters, no_logs);    // on_log every 50 steps (loss sums read)
    d["batch_source"] = part(no_logs, slices);  // TensorBatchSource vs views
    d["loop"] = part(slices, raw);              // the rest: accumulation, autocast, sums
    d["callbacks"] = part(callbacks, trainer);  // + ProgressBar, MetricLogger
    s["breakdown_us_per_step"] = d;
    s["trainer_extra_ops"] = extra_ops_per_step(o, data);
    s["callbacks_ratio_cpu_ci95"] = paired_ratio(callbacks.cpu_ms, raw.cpu_ms).json();
  }
  s["threads"] = threads;
  s["batch"] = o.batch;
  s["steps"] = o.steps;
  s["warmup"] = o.warmup;
  s["repeats"] = o.repeats;
  s["trainer_source"] = o.trainer_source;
  add_run_environment(s, load_start);
  out.emit(s);
}

}  // namespace

void add_trainer_command(CLI::App& app, std::shared_ptr<GlobalOptions> global) {
  auto o = std::make_shared<TrainerBenchOptions>();
  CLI::App* sub = app.add_subcommand(
      "trainer",
      "wick::Trainer vs a hand-written LibTorch loop vs PyTorch eager: MLP 784-512-256-10, Adam");
  sub->add_option("--threads", o->threads, "intra-op threads for torch here and in the peer")
      ->capture_default_str();
  sub->add_option("--steps", o->steps, "timed optimizer steps per run")->capture_default_str();
  sub->add_option("--warmup", o->warmup, "untimed steps before each run's timed ones")
      ->capture_default_str();
  sub->add_option("--repeats", o->repeats,
                  "rounds at least (each runs every case once; the peer runs in these)")
      ->capture_default_str();
  sub->add_option("--max-repeats", o->max_repeats,
                  "rounds at most: past --repeats, rounds go on until the overhead ratio's 95% "
                  "intervals (wall and CPU) are within +-ci-target")
      ->capture_default_str();
  sub->add_option("--ci-target", o->ci_target,
                  "relative half-width the overhead ratio's intervals must reach (0.01: +-1%)")
      ->capture_default_str();
  sub->add_flag("--breakdown", o->breakdown,
                "also run the Trainer without its meters, logs, TensorBatchSource, and with "
                "callbacks, in every round, and report what each costs per step");
  sub->add_option("--batch", o->batch, "samples per batch")->capture_default_str();
  sub->add_option("--lr", o->lr, "Adam's learning rate")->capture_default_str();
  sub->add_option("--seed", o->seed, "seed of the model's initialization and of the data")
      ->capture_default_str();
  sub->add_flag("--no-python", o->no_python, "skip the Python peer");
  sub->add_flag("--compile", o->compile,
                "also time the peer under torch.compile (case python_compile)");
  sub->add_option("--compile-repeats", o->compile_repeats, "runs of the torch.compile case")
      ->capture_default_str();
  sub->add_option(
         "--trainer-source", o->trainer_source,
         "the Trainer's batches: tensor (TensorBatchSource, gathers a copy) or slices (views)")
      ->capture_default_str();
  sub->add_flag("--fused-adam", o->fused_adam,
                "also time the raw loop with at::_fused_adam_ instead of torch::optim::Adam (case "
                "raw_fused_adam) "
                "and the Trainer with wick::FusedAdam (case wick_trainer_fused_adam)");
  sub->callback([o, global] { run_trainer_bench(*o, *global); });
}

}  // namespace wick_bench
