// wick-bench safetensors: loading a large safetensors file with wick against
// Python's safetensors (safetensors.torch.load_file), the same file, in the
// same run.
//
// The file: float32 tensors of a GPT-like model's shapes (`--mb` MiB in all,
// default 512), written by wick::save_safetensors into `--dir`, then read once
// whole so that the page cache holds it for every case of both sides (the
// figures are warm-cache loads; a cold read is the disk's speed for both).
// Cases, each run once per round, wick's and Python's rounds alternating:
//   open    load_safetensors(path) / load_file(path): every tensor available
//           (wick maps the file; a tensor's pages are read when touched);
//   read    open, then every tensor summed in float64 (every byte read);
//   module  load_safetensors(path, module) / model.load_state_dict(load_file(path)):
//           into a module with one parameter per tensor.
// Figures: medians over rounds; vs_python_* = Python ms / wick ms (goal >= 1
// for read and module, the cases that move the data).

#include "bench_common.h"

#include <wick/safetensors.h>

#include <torch/torch.h>
#include <CLI/CLI.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace wick_bench {

namespace {

struct SafetensorsBenchOptions {
  int64_t mb = 512;
  int repeats = 5;
  int threads = 1;
  std::string dir = "/tmp";
  bool keep = false;
};

// GPT-2-small-like blocks (768 wide, 4x MLP) until `mb` MiB are reached.
wick::NamedTensors make_tensors(int64_t mb) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
  wick::NamedTensors out;
  const int64_t target = mb * 1024 * 1024;
  int64_t bytes = 0;
  for (int block = 0; bytes < target; ++block) {
    const std::string p = "h" + std::to_string(block) + "_";
    for (const auto& [name, shape] :
         std::vector<std::pair<std::string, std::vector<int64_t>>>{{"attn_qkv_w", {2304, 768}},
                                                                   {"attn_qkv_b", {2304}},
                                                                   {"attn_proj_w", {768, 768}},
                                                                   {"ln_w", {768}},
                                                                   {"mlp_fc_w", {3072, 768}},
                                                                   {"mlp_fc_b", {3072}},
                                                                   {"mlp_proj_w", {768, 3072}}}) {
      out.emplace_back(p + name, torch::randn(shape, gen));
      bytes += out.back().second.numel() * 4;
    }
  }
  return out;
}

// Reads the whole file (into the page cache).
void read_through(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("wick-bench safetensors: cannot open " + path);
  std::vector<char> buf(1 << 20);
  while (::read(fd, buf.data(), buf.size()) > 0) {
  }
  ::close(fd);
}

double sum_all(const wick::SafetensorsFile& f) {
  double s = 0;
  for (const auto& nt : f.tensors) s += nt.second.sum(torch::kFloat64).item<double>();
  return s;
}

void run_safetensors_bench(const SafetensorsBenchOptions& o, const GlobalOptions& global) {
  const double load_start = load_average_1m();
  const int threads = set_torch_threads(o.threads);
  JsonOut out(global.jsonl);
  const std::string path = o.dir + "/wick-bench-" + std::to_string(::getpid()) + ".safetensors";
  const wick::NamedTensors tensors = make_tensors(o.mb);
  Stopwatch write_sw;
  wick::save_safetensors(path, tensors);
  const double write_s = write_sw.wall_s();
  int64_t file_bytes = 0;
  for (const auto& nt : tensors) file_bytes += nt.second.numel() * 4;
  read_through(path);

  torch::nn::Module module;
  for (const auto& [name, t] : tensors) module.register_parameter(name, torch::zeros_like(t));

  std::vector<double> open_ms, read_ms, module_ms, py_open, py_read, py_module;
  double check = 0, py_check = 0;
  std::string peer_error;
  for (int round = 0; round < o.repeats; ++round) {
    auto wick_round = [&] {
      {
        Stopwatch sw;
        const auto f = wick::load_safetensors(path);
        open_ms.push_back(sw.wall_s() * 1e3);
      }
      {
        Stopwatch sw;
        check = sum_all(wick::load_safetensors(path));
        read_ms.push_back(sw.wall_s() * 1e3);
      }
      Stopwatch sw;
      wick::load_safetensors(path, module);
      module_ms.push_back(sw.wall_s() * 1e3);
    };
    auto python_round = [&] {
      const PeerResult r = run_peer(global, "safetensors_peer.py",
                                    {"--path", path, "--threads", std::to_string(threads)});
      if (!r.ok()) {
        peer_error = r.error;
        return;
      }
      const Json& j = r.lines.back();
      py_open.push_back(j["open_ms"].get<double>());
      py_read.push_back(j["read_ms"].get<double>());
      py_module.push_back(j["module_ms"].get<double>());
      py_check = j["check"].get<double>();
    };
    if (round % 2) {
      python_round();
      wick_round();
    } else {
      wick_round();
      python_round();
    }
  }
  if (!o.keep) ::unlink(path.c_str());

  const double gib = static_cast<double>(file_bytes) / (1 << 30);
  Json line;
  line["bench"] = "safetensors";
  line["side"] = "wick";
  line["open_ms"] = median(open_ms);
  line["read_ms"] = median(read_ms);
  line["module_ms"] = median(module_ms);
  line["runs_read_ms"] = read_ms;
  line["runs_module_ms"] = module_ms;
  line["write_s"] = write_s;
  out.emit(line);
  Json s;
  s["bench"] = "safetensors";
  s["summary"] = true;
  s["file_mb"] = static_cast<double>(file_bytes) / (1 << 20);
  s["tensors"] = tensors.size();
  s["wick_open_ms"] = median(open_ms);
  s["wick_read_ms"] = median(read_ms);
  s["wick_module_ms"] = median(module_ms);
  s["wick_read_gib_per_s"] = gib / (median(read_ms) / 1e3);
  s["wick_module_gib_per_s"] = gib / (median(module_ms) / 1e3);
  if (!py_read.empty()) {
    s["python_open_ms"] = median(py_open);
    s["python_read_ms"] = median(py_read);
    s["python_module_ms"] = median(py_module);
    s["vs_python_open"] = median(py_open) / median(open_ms);
    s["vs_python_read"] = median(py_read) / median(read_ms);
    s["vs_python_module"] = median(py_module) / median(module_ms);
    s["same_values_as_python"] = std::abs(check - py_check) <= 1e-9 * std::abs(check) + 1e-6;
    s["goal_met"] =
        s["vs_python_read"].get<double>() >= 1.0 && s["vs_python_module"].get<double>() >= 1.0;
  } else {
    s["python_error"] = peer_error;
  }
  s["check"] = check;
  s["repeats"] = o.repeats;
  s["threads"] = threads;
  add_run_environment(s, load_start);
  out.emit(s);
}

}  // namespace

void add_safetensors_command(CLI::App& app, std::shared_ptr<GlobalOptions> global) {
  auto o = std::make_shared<SafetensorsBenchOptions>();
  CLI::App* sub = app.add_subcommand(
      "safetensors", "loading a large safetensors file: wick vs Python's safetensors");
  sub->add_option("--mb", o->mb, "file size in MiB (float32 tensors)")->capture_default_str();
  sub->add_option("--repeats", o->repeats, "rounds (each side once per round)")
      ->capture_default_str();
  sub->add_option("--threads", o->threads, "torch intra-op threads, both sides")
      ->capture_default_str();
  sub->add_option("--dir", o->dir, "where the file is written")->capture_default_str();
  sub->add_flag("--keep", o->keep, "keep the file");
  sub->callback([o, global] { run_safetensors_bench(*o, *global); });
}

}  // namespace wick_bench
