#pragma once
// The safetensors writer without a destination of its own (private to src/).

#include "wick/safetensors.h"

#include <cstddef>
#include <functional>
#include <map>
#include <string>

namespace wick::detail {

/// Writes `tensors` as one safetensors file through `sink`: the header, then
/// each tensor's bytes in order, one tensor on the host at a time, so the
/// file is never whole in memory. Every check (names, dtypes, sizes) runs
/// before the first call of `sink`; errors start with `who`.
void write_safetensors(const NamedTensors& tensors,
                       const std::map<std::string, std::string>& metadata, const char* who,
                       const std::function<void(const void*, size_t)>& sink);

}  // namespace wick::detail
