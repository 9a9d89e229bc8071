#include "wick/version.h"

namespace wick {
/// The library's version string, e.g. "0.1.0".
const char* version() { return WICK_VERSION; }
}  // namespace wick
