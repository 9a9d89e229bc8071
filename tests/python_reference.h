#pragma once
// Expected values computed at test time by Python's PyTorch (the venv that
// scripts/setup installs, or $WICK_PYTHON): a test writes its inputs as JSON,
// runs one case of a script in tests/py/, and reads the script's JSON answer.
// Values whose bits depend on the machine's kernels (the CPU's vector units,
// the GPU) are then compared on the machine that runs the test.
//
//   auto ref = wick::testing::python_reference("reference.py", "fused_adam", input);
//
// Floats travel exactly: Python writes the shortest repr that round-trips a
// double, and a float32 widened to double is exact both ways.

#include "support.h"

#include <wick/optim.h>

#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#ifndef WICK_TEST_PYTHON
#define WICK_TEST_PYTHON "python3"
#endif
#ifndef WICK_TEST_SOURCE_DIR
#define WICK_TEST_SOURCE_DIR "tests"
#endif

namespace wick::testing {

/// The Python with torch: $WICK_PYTHON, else the one CMake found (WICK_PYTHON).
inline std::string python_executable() {
  const char* env = std::getenv("WICK_PYTHON");
  return env != nullptr && *env != '\0' ? env : WICK_TEST_PYTHON;
}

/// tests/py/: $WICK_TEST_SOURCE_DIR/py, else the source tree the test was built from.
inline std::string python_script_dir() {
  const char* env = std::getenv("WICK_TEST_SOURCE_DIR");
  return std::string(env != nullptr && *env != '\0' ? env : WICK_TEST_SOURCE_DIR) + "/py";
}

inline std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

/// Runs `python tests/py/<script> <case> in.json out.json` and returns out.json.
/// Throws std::runtime_error with the command and Python's stderr when it fails.
inline nlohmann::json python_reference(const std::string& script, const std::string& case_name,
                                       const nlohmann::json& input) {
  TempDir dir;
  const std::string in = dir.str() + "/in.json", out = dir.str() + "/out.json",
                    err = dir.str() + "/stderr.txt";
  std::ofstream(in) << input.dump();
  const std::string cmd = shell_quote(python_executable()) + " " +
                          shell_quote(python_script_dir() + "/" + script) + " " +
                          shell_quote(case_name) + " " + shell_quote(in) + " " + shell_quote(out) +
                          " 2> " + shell_quote(err);
  const int status = std::system(cmd.c_str());
  std::ifstream result(out);
  if (status != 0 || !result) {
    std::stringstream stderr_text;
    stderr_text << std::ifstream(err).rdbuf();
    throw std::runtime_error("python_reference: `" + cmd + "` failed (status " +
                             std::to_string(status) + "): " + stderr_text.str());
  }
  return nlohmann::json::parse(result);
}

/// A tensor's values as a flat JSON array of doubles (exact for float32 and bf16).
inline nlohmann::json to_json(const torch::Tensor& t) {
  auto flat = t.detach().to(torch::kCPU, torch::kFloat64).contiguous().flatten();
  const double* p = flat.data_ptr<double>();
  return nlohmann::json(std::vector<double>(p, p + flat.numel()));
}

/// A flat JSON array of numbers as a tensor of `like`'s shape, dtype and device.
inline torch::Tensor from_json(const nlohmann::json& values, const torch::Tensor& like) {
  auto v = values.get<std::vector<double>>();
  TORCH_CHECK(static_cast<int64_t>(v.size()) == like.numel(), "from_json: ", v.size(),
              " values for a tensor of shape ", like.sizes());
  return torch::tensor(v, torch::kFloat64).view(like.sizes()).to(like.options());
}

/// FusedAdam's options as reference.py's Adam / AdamW cases read them (lr included).
inline nlohmann::json to_json(const wick::FusedAdamOptions& o) {
  return {{"lr", o.lr()},
          {"betas", {std::get<0>(o.betas()), std::get<1>(o.betas())}},
          {"eps", o.eps()},
          {"weight_decay", o.weight_decay()},
          {"amsgrad", o.amsgrad()},
          {"maximize", o.maximize()},
          {"decoupled_weight_decay", o.decoupled_weight_decay()},
          {"tensor_lr", o.tensor_lr()}};
}

}  // namespace wick::testing
