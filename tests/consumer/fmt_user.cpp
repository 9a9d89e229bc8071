// The program's own use of fmt, header-only from the headers LibTorch ships,
// linked beside libwick's fmt (which lives in fmt::wick_private).
#include <fmt/format.h>

#include <string>

std::string program_fmt(double x) { return fmt::format("{:>8.3f}|{:x}", x, 255); }
