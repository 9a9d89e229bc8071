#include "corpus.h"

#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>
#include <vector>

namespace gpt {

Corpus load_fortunes(const std::string& dir, int64_t val_every) {
  TORCH_CHECK(val_every >= 2, "load_fortunes: val_every must be >= 2, got ", val_every);
  DIR* d = ::opendir(dir.c_str());
  TORCH_CHECK(d != nullptr, "load_fortunes: cannot open ", dir, ": ", std::strerror(errno),
              " (Debian's `fortunes` package installs the corpus there; scripts/setup does)");
  std::vector<std::string> names;
  while (auto* e = ::readdir(d)) {
    std::string name = e->d_name;
    if (name == "." || name == ".." ||
        name.size() > 4 && name.compare(name.size() - 4, 4, ".dat") == 0)
      continue;
    struct stat st;
    if (::lstat((dir + "/" + name).c_str(), &st) == 0 && S_ISREG(st.st_mode)) names.push_back(name);
  }
  ::closedir(d);
  std::sort(names.begin(), names.end());
  TORCH_CHECK(!names.empty(), "load_fortunes: no fortune files in ", dir);

  std::string train, val;
  Corpus c;
  int64_t index = 0;
  for (const auto& name : names) {
    std::ifstream in(dir + "/" + name, std::ios::binary);
    TORCH_CHECK(in, "load_fortunes: cannot read ", dir, "/", name);
    std::string line, fortune;
    auto flush = [&] {
      if (fortune.find_first_not_of(" \t\n") == std::string::npos) {
        fortune.clear();
        return;
      }
      if (index++ % val_every == 0) {
        val += fortune + "\n";
        ++c.val_fortunes;
      } else {
        train += fortune + "\n";
        ++c.train_fortunes;
      }
      fortune.clear();
    };
    while (std::getline(in, line)) {
      if (line == "%") {
        flush();
      } else {
        fortune += line + "\n";
      }
    }
    flush();
    ++c.files;
  }
  auto to_tensor = [](const std::string& s) {
    auto t = torch::empty({static_cast<int64_t>(s.size())}, torch::kUInt8);
    // An empty tensor's data_ptr() is null, and memcpy from/to null is undefined
    // even for 0 bytes (UBSan flagged it under fuzz/corpus_fuzz.cpp).
    if (!s.empty()) std::memcpy(t.data_ptr(), s.data(), s.size());
    return t.to(torch::kLong);
  };
  c.train = to_tensor(train);
  c.val = to_tensor(val);
  return c;
}

torch::Tensor make_windows(const torch::Tensor& tokens, int64_t length, int64_t stride) {
  TORCH_CHECK(tokens.dim() == 1 && tokens.size(0) >= length, "make_windows: need at least ", length,
              " tokens, got ", tokens.sizes());
  return tokens.unfold(0, length, stride).contiguous();
}

LanguageModelTask::LanguageModelTask(std::shared_ptr<torch::nn::Module> module,
                                     std::function<torch::Tensor(const torch::Tensor&)> forward,
                                     std::function<torch::Tensor()> aux_loss, double aux_weight)
    : module_(std::move(module)),
      forward_(std::move(forward)),
      aux_loss_(std::move(aux_loss)),
      aux_weight_(aux_weight) {}

torch::Tensor LanguageModelTask::cross_entropy(const torch::Tensor& windows) {
  const int64_t T = windows.size(1) - 1;
  auto logits = forward_(windows.narrow(1, 0, T));
  return torch::nn::functional::cross_entropy(
      logits.reshape({-1, logits.size(-1)}).to(torch::kFloat),
      windows.narrow(1, 1, T).reshape({-1}));
}

wick::StepOutput LanguageModelTask::training_step(const wick::Batch& batch) {
  auto ce = cross_entropy(batch.data);
  if (aux_weight_ == 0 || !aux_loss_) return wick::StepOutput(ce);
  auto aux = aux_loss_().to(ce.device());
  return wick::StepOutput(ce + aux_weight_ * aux, {{"ce", ce.detach()}, {"moe_aux", aux.detach()}});
}

std::map<std::string, torch::Tensor> LanguageModelTask::validation_step(const wick::Batch& batch) {
  auto ce = cross_entropy(batch.data);
  return {{"loss", ce}, {"bits_per_byte", ce / std::log(2.0)}};
}

}  // namespace gpt
