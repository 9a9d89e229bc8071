// wick-bench export: a model exported from Python and served by wick against
// the same model as a C++ torch::nn module and against Python.
//
// Models: wick-fmnist's mlp (784-512-256-10) and cnn (conv32-conv64-fc128-fc10)
// on [N, 1, 28, 28] images; batches 1 and 64; intra-op threads set
// explicitly (--threads, default 1) on both sides. The peer
// (bench/peers/export_peer.py) builds each model after torch.manual_seed(seed),
// saves it as TorchScript and exports it with torch.export +
// aoti_compile_and_package once per thread count (AOTInductor bakes the count
// into its kernels). The C++ side then
//   - loads the .pt2 with wick::InferenceSession::load (aoti_runners 1),
//   - builds the same torch::nn::Sequential and copies the TorchScript file's
//     weights into it (same_weights: its output agrees with Python's eager
//     output, check),
// and times InferenceSession::run and the module's forward under
// c10::InferenceMode. The peer times Python eager and Python's own AOTInductor
// runner (torch._inductor.aoti_load_package) on the same files.
//
// A figure is milliseconds per call: calls repeated until --min-time seconds
// have passed, after --warmup calls; the median over --repeats rounds. Each
// round runs the C++ cases (alternating their order), then the peer, so slow
// phases of the machine hit every side.

#include "bench_common.h"
#include "models.h"  // examples/fmnist: wick-fmnist's models

#include <wick/inference.h>

#include <torch/script.h>
#include <torch/torch.h>
#include <CLI/CLI.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace wick_bench {

namespace {

struct ExportBenchOptions {
  std::vector<int> threads{1};
  std::vector<int64_t> batches{1, 64};
  std::vector<std::string> models{"mlp", "cnn"};
  int repeats = 3;
  int warmup = 10;
  double min_time = 0.3;
  uint64_t seed = 0;
  std::string export_dir;  // "": <tmp>/wick-bench-export
  bool no_python = false;
};

// The TorchScript file's parameters copied into `module` by name (both are
// Sequentials of the same layers, so the names are "1.weight" and the like).
void copy_weights(const std::string& path, torch::nn::Module& module) {
  auto scripted = torch::jit::load(path);
  std::map<std::string, torch::Tensor> saved;
  for (const auto& p : scripted.named_parameters()) saved[p.name] = p.value;
  torch::NoGradGuard no_grad;
  for (auto& p : module.named_parameters()) {
    auto it = saved.find(p.key());
    TORCH_CHECK(it != saved.end(), "wick-bench export: '", path, "' has no parameter '", p.key(),
                "'");
    TORCH_CHECK(it->second.sizes() == p.value().sizes(), "wick-bench export: '", p.key(),
                "' has shape ", it->second.sizes(), " in '", path, "' but ", p.value().sizes(),
                " in the C++ model");
    p.value().copy_(it->second);
    saved.erase(it);
  }
  TORCH_CHECK(saved.empty(), "wick-bench export: '", path, "' has parameters the C++ model lacks");
}

std::string join(const std::vector<std::string>& v) {
  std::ostringstream s;
  for (size_t i = 0; i < v.size(); ++i) s << (i ? "," : "") << v[i];
  return s.str();
}
template <class T>
std::string join_numbers(const std::vector<T>& v) {
  std::vector<std::string> s;
  for (auto x : v) s.push_back(std::to_string(x));
  return join(s);
}

using Key = std::tuple<std::string, int64_t, int>;  // model, batch, threads

struct Case {
  std::vector<double> aoti, module, py_eager, py_aoti;
  double check_aoti = 0, check_module = 0, py_check = NAN;
};

void run_export_bench(const ExportBenchOptions& o, const GlobalOptions& global) {
  TORCH_CHECK(o.repeats >= 1, "wick-bench export: --repeats must be >= 1, got ", o.repeats);
  TORCH_CHECK(o.min_time > 0, "wick-bench export: --min-time must be > 0, got ", o.min_time);
  for (int t : o.threads) TORCH_CHECK(t >= 1, "wick-bench export: --threads must be >= 1, got ", t);
  for (auto b : o.batches)
    TORCH_CHECK(b >= 1, "wick-bench export: --batches must be >= 1, got ", b);
  JsonOut out(global.jsonl);
  const double load_start = load_average_1m();

  std::string dir = o.export_dir;
  if (dir.empty()) {
    const char* tmp = std::getenv("TMPDIR");
    dir = std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/wick-bench-export";
  }
  // The peer exports (or finds its earlier export of the same models, seed,
  // thread counts and torch version in `dir`).
  auto exported = run_peer(global, "export_peer.py",
                           {"export", "--out", dir, "--models", join(o.models), "--threads",
                            join_numbers(o.threads), "--seed", std::to_string(o.seed)});
  TORCH_CHECK(exported.ok(), "wick-bench export: the peer could not export the models into '", dir,
              "': ", exported.error.empty() ? "it printed nothing" : exported.error);
  const Json export_info = exported.lines.back();

  std::map<Key, Case> cases;
  std::string peer_error;
  for (int threads : o.threads) {
    set_torch_threads(threads);
    // Loaded once per thread count; the rounds reuse them.
    std::map<std::string, std::pair<wick::InferenceSession, torch::nn::Sequential>> models;
    for (const auto& name : o.models) {
      auto session = wick::InferenceSession::load(
          dir + "/" + name + "_t" + std::to_string(threads) + ".pt2",
          wick::InferenceSessionOptions().num_threads(threads).aoti_runners(1));
      auto module = fmnist::make_model(name);
      copy_weights(dir + "/" + name + ".pt", *module);
      module->eval();
      models.emplace(name, std::make_pair(std::move(session), module));
    }
    for (int r = 0; r < o.repeats; ++r) {
      {
        c10::InferenceMode guard;
        for (const auto& name : o.models) {
          auto& [session, module] = models.at(name);
          for (int64_t batch : o.batches) {
            auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed + 1);
            const torch::Tensor x = torch::randn({batch, 1, 28, 28}, gen);
            Case& c = cases[Key{name, batch, threads}];
            c.check_aoti = session.run(x).to(torch::kDouble).sum().item<double>();
            c.check_module = module->forward(x).to(torch::kDouble).sum().item<double>();
            auto a = [&, &session = session] { return session.run(x); };
            auto m = [&, &module = module] { return module->forward(x); };
            if (r % 2 == 0) {
              c.aoti.push_back(per_call_ms(a, o.warmup, o.min_time));
              c.module.push_back(per_call_ms(m, o.warmup, o.min_time));
            } else {
              c.module.push_back(per_call_ms(m, o.warmup, o.min_time));
              c.aoti.push_back(per_call_ms(a, o.warmup, o.min_time));
            }
          }
        }
      }
      if (o.no_python || !peer_error.empty()) continue;
      auto peer = run_peer(
          global, "export_peer.py",
          {"time", "--out", dir, "--models", join(o.models), "--threads", std::to_string(threads),
           "--seed", std::to_string(o.seed), "--batches", join_numbers(o.batches), "--warmup",
           std::to_string(o.warmup), "--min-time", std::to_string(o.min_time)});
      if (!peer.ok()) {
        peer_error = peer.error.empty() ? "the peer printed nothing" : peer.error;
        continue;
      }
      for (const auto& line : peer.lines) {
        Case& c = cases[Key{line.at("model").get<std::string>(), line.at("batch").get<int64_t>(),
                            threads}];
        c.py_eager.push_back(line.at("eager_ms").get<double>());
        c.py_aoti.push_back(line.at("aoti_ms").get<double>());
        c.py_check = line.at("check").get<double>();
      }
    }
  }

  std::fprintf(stderr, "%-5s %7s %5s %12s %12s %12s %12s %10s %10s\n", "model", "threads", "batch",
               "wick aoti ms", "c++ nn ms", "py eager ms", "py aoti ms", "vs c++ nn", "vs eager");
  double min_vs_module = INFINITY, min_vs_eager = INFINITY, min_vs_py_aoti = INFINITY;
  bool same_weights = true;
  for (const auto& [key, c] : cases) {
    const auto& [name, batch, threads] = key;
    Json line;
    line["bench"] = "export";
    line["model"] = name;
    line["batch"] = batch;
    line["threads"] = threads;
    const double a = median(c.aoti), m = median(c.module);
    line["wick_aoti_ms"] = a;
    line["cpp_module_ms"] = m;
    line["aoti_vs_cpp_module"] = m / a;  // > 1: the exported model is faster
    min_vs_module = std::min(min_vs_module, m / a);
    std::string eager = "-", vs_eager = "-", py_aoti = "-";
    if (!c.py_eager.empty()) {
      const double pe = median(c.py_eager), pa = median(c.py_aoti);
      line["python_eager_ms"] = pe;
      line["python_aoti_ms"] = pa;
      line["aoti_vs_python_eager"] = pe / a;
      line["aoti_vs_python_aoti"] = pa / a;
      min_vs_eager = std::min(min_vs_eager, pe / a);
      min_vs_py_aoti = std::min(min_vs_py_aoti, pa / a);
      eager = c10::str(pe);
      py_aoti = c10::str(pa);
      vs_eager = c10::str(pe / a, "x");
      // The module and Python eager hold the same weights when their outputs agree.
      const bool same =
          std::abs(c.py_check - c.check_module) <= 1e-3 * std::max(1.0, std::abs(c.py_check));
      line["same_weights"] = same;
      same_weights = same_weights && same;
    }
    line["check_aoti"] = c.check_aoti;
    line["check_module"] = c.check_module;
    line["aoti_runs_ms"] = Json(c.aoti);
    line["module_runs_ms"] = Json(c.module);
    std::fprintf(stderr, "%-5s %7d %5lld %12.4f %12.4f %12s %12s %9.2fx %10s\n", name.c_str(),
                 threads, static_cast<long long>(batch), a, m, eager.c_str(), py_aoti.c_str(),
                 m / a, vs_eager.c_str());
    out.emit(line);
  }

  Json s;
  s["bench"] = "export";
  s["summary"] = true;
  s["min_aoti_vs_cpp_module"] = min_vs_module;
  s["min_aoti_vs_python_eager"] = std::isfinite(min_vs_eager) ? Json(min_vs_eager) : Json(nullptr);
  s["min_aoti_vs_python_aoti"] =
      std::isfinite(min_vs_py_aoti) ? Json(min_vs_py_aoti) : Json(nullptr);
  if (!o.no_python) s["same_weights_as_python"] = same_weights;
  if (!peer_error.empty()) s["python_error"] = peer_error;
  s["export_dir"] = dir;
  s["exported_now"] = export_info.value("exported", false);
  if (export_info.contains("export_s")) s["export_s"] = export_info["export_s"];
  s["repeats"] = o.repeats;
  s["min_time_s"] = o.min_time;
  add_run_environment(s, load_start);
  out.emit(s);
}

}  // namespace

void add_export_command(CLI::App& app, std::shared_ptr<GlobalOptions> global) {
  auto o = std::make_shared<ExportBenchOptions>();
  CLI::App* sub = app.add_subcommand(
      "export",
      "an AOTInductor model exported from Python, served by wick, vs the same model as a C++ "
      "torch::nn module vs Python eager (and Python's AOTInductor runner)");
  sub->add_option("--threads", o->threads,
                  "intra-op thread counts (each gets its own .pt2: AOTInductor bakes the count in)")
      ->delimiter(',')
      ->capture_default_str();
  sub->add_option("--batches", o->batches, "batch sizes")->delimiter(',')->capture_default_str();
  sub->add_option("--models", o->models, "mlp, cnn (wick-fmnist's)")
      ->delimiter(',')
      ->capture_default_str();
  sub->add_option("--repeats", o->repeats, "rounds; figures are medians")->capture_default_str();
  sub->add_option("--warmup", o->warmup, "untimed calls before each timing")->capture_default_str();
  sub->add_option("--min-time", o->min_time, "seconds each timing lasts at least")
      ->capture_default_str();
  sub->add_option("--seed", o->seed, "seed of the weights and inputs")->capture_default_str();
  sub->add_option("--export-dir", o->export_dir,
                  "where the peer exports the models, reused when it holds the same export "
                  "(default $TMPDIR/wick-bench-export)");
  sub->add_flag("--no-python", o->no_python, "skip the Python timings (the export still runs)");
  sub->callback([o, global] { run_export_bench(*o, *global); });
}

}  // namespace wick_bench
