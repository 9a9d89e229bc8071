#pragma once
// Private to wick: fmt (https://fmt.dev), for the text wick formats (op and
// report tables, numbers with units, the progress bar, hex digests).
//
// Which fmt: the headers LibTorch ships (the torch wheel has fmt 12 in
// torch/include/fmt, ahead of any system fmt on the include path, so Debian's
// libfmt 9 cannot be linked against them). wick compiles fmt's non-inline
// part once, in src/fmt.cpp, and puts all of it in an inline namespace of its
// own: `fmt::` works as usual inside wick, while the symbols in libwick.a
// (fmt::wick_private::...) cannot collide with another fmt a program links,
// header-only or compiled, of any version. Public headers never include fmt,
// so programs that link wick::wick neither need fmt nor see wick's.
//
// Include this header, never <fmt/...> directly: the namespace must be set
// before fmt's first header is read.

#if defined(FMT_VERSION) && !defined(WICK_FMT_NAMESPACE)
#error "src/format.h must come before any other inclusion of fmt's headers"
#endif
#define WICK_FMT_NAMESPACE 1
#define FMT_BEGIN_NAMESPACE \
  namespace fmt {           \
  inline namespace wick_private {
#define FMT_END_NAMESPACE \
  }                       \
  }

#include <fmt/format.h>

static_assert(FMT_VERSION >= 100000,
              "wick needs fmt >= 10 (LibTorch 2.11 ships 12): an older fmt's headers, e.g. "
              "Debian's libfmt-dev, were found before LibTorch's");
