#pragma once
// Private to wick: restoring a module's parameters and buffers from named
// tensors read from a file (a checkpoint section, a safetensors file), with
// every mismatch found before anything is copied.

#include <torch/torch.h>

#include <map>
#include <string>

namespace wick::detail {

/// Copies `saved` into `module`'s parameters and buffers by dotted name, each
/// converted to the module's dtype and kept on the module's device. First
/// checks every name (missing, unexpected), shape and dtype conversion; any
/// problem throws one c10::Error listing all of them as "<who>: <problems>
/// (the module is unchanged)". `source` names the file kind in the messages
/// ("the checkpoint", "the file").
void restore_module_state(torch::nn::Module& module,
                          const std::map<std::string, torch::Tensor>& saved, const std::string& who,
                          const std::string& source);

/// "[2, 3]".
std::string shape_str(c10::IntArrayRef sizes);

/// A c10::Error's message without its backtrace, else what().
std::string message_of(const std::exception& e);

}  // namespace wick::detail
