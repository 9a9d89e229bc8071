#include "module_state.h"

#include <c10/util/Exception.h>

#include <set>
#include <sstream>
#include <utility>
#include <vector>

namespace wick::detail {

std::string shape_str(c10::IntArrayRef sizes) {
  std::ostringstream s;
  s << sizes;
  return s.str();
}

// Not only c10::Error: LibTorch's archive reader throws std::runtime_error
// (torch::jit::ErrorReport) for a corrupt code/ entry, found by
// fuzz/checkpoint_fuzz.cpp.
std::string message_of(const std::exception& e) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&e))
    return c10_error->what_without_backtrace();
  return e.what();
}

void restore_module_state(torch::nn::Module& module,
                          const std::map<std::string, torch::Tensor>& saved, const std::string& who,
                          const std::string& source) {
  std::vector<std::pair<torch::Tensor, torch::Tensor>> copies;  // (module's, saved)
  std::vector<std::string> problems;
  std::set<std::string> expected;
  auto check = [&](const std::string& name, const torch::Tensor& mine, const char* what) {
    if (!mine.defined()) return;
    expected.insert(name);
    auto s = saved.find(name);
    if (s == saved.end()) {
      problems.push_back(c10::str(what, " '", name, "' (shape ", shape_str(mine.sizes()),
                                  ") is missing from ", source));
    } else if (s->second.sizes() != mine.sizes()) {
      problems.push_back(c10::str(what, " '", name, "' has shape ", shape_str(s->second.sizes()),
                                  " in ", source, " but ", shape_str(mine.sizes()),
                                  " in the module"));
    } else {
      // Converted here, not in copy_, so a dtype that cannot become the
      // module's (a sub-byte or quantized one from a foreign or corrupt file)
      // is reported with the rest and the module stays untouched.
      torch::Tensor src = s->second;
      if (src.scalar_type() != mine.scalar_type()) {
        try {
          src = src.to(mine.scalar_type());
        } catch (const std::exception& e) {
          problems.push_back(c10::str(what, " '", name, "' has dtype ", s->second.scalar_type(),
                                      " in ", source, ", which cannot be converted to the ",
                                      "module's ", mine.scalar_type(), " (", message_of(e), ")"));
          return;
        }
      }
      copies.emplace_back(mine, src);
    }
  };
  for (const auto& p : module.named_parameters(/*recurse=*/true))
    check(p.key(), p.value(), "parameter");
  for (const auto& b : module.named_buffers(/*recurse=*/true)) check(b.key(), b.value(), "buffer");
  for (const auto& [name, t] : saved) {
    if (!expected.count(name)) {
      problems.push_back(c10::str(source, " has '", name, "' (shape ", shape_str(t.sizes()),
                                  ") which the module lacks"));
    }
  }
  if (!problems.empty()) {
    std::string msg = who + " does not fit the module: ";
    for (size_t i = 0; i < problems.size(); ++i) msg += (i ? "; " : "") + problems[i];
    C10_THROW_ERROR(Error, msg + " (the module is unchanged)");
  }

  torch::NoGradGuard no_grad;
  try {
    for (auto& [mine, src] : copies) mine.copy_(src);  // keeps the module's device
  } catch (const std::exception& e) {
    // Only the device can refuse now (out of memory on a GPU, say).
    C10_THROW_ERROR(Error, c10::str(who, " was checked but copying it into the module failed, ",
                                    "which may be partly restored: ", message_of(e)));
  }
}

}  // namespace wick::detail
