// fmt's compiled part (what fmt's own src/format.cc builds into libfmt), from
// the headers LibTorch ships, in wick's namespace for it (src/format.h says why).

#include "format.h"

#include <fmt/format-inl.h>

FMT_BEGIN_NAMESPACE
namespace detail {
// format.h declares these `extern template` outside header-only mode; wick
// formats char strings only.
template FMT_API auto thousands_sep_impl<char>(locale_ref) -> thousands_sep_result<char>;
template FMT_API auto decimal_point_impl(locale_ref) -> char;
}  // namespace detail
FMT_END_NAMESPACE
