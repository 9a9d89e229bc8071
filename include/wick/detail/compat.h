#pragma once
// Version shims for LibTorch. wick targets LibTorch 2.11; everything that
// depends on the LibTorch version lives here and nowhere else.
// Private to wick: users do not include it.

#include <torch/version.h>

#define WICK_TORCH_GE(M, m) \
  (TORCH_VERSION_MAJOR > (M) || (TORCH_VERSION_MAJOR == (M) && TORCH_VERSION_MINOR >= (m)))

#if !WICK_TORCH_GE(2, 4)
#error "wick needs LibTorch >= 2.4 (it targets 2.11)"
#endif
