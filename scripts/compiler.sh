# Sourced by scripts/demo and scripts/test: the C++ compiler wick's own build
# trees use. clang++-14 (scripts/setup installs it) unless the caller names
# one in CXX: with LibTorch precompiled, clang builds wick about 3.5x faster
# than GCC 12 on two cores (docs/development.md has the figures). A tree keeps
# the compiler it was configured with; delete it to switch.
# WICK_CXX_DEFAULTED=1 says the choice was made here (scripts/test then builds
# the installed-package consumer with the system's default compiler, as a user would).
if [ -z "${CXX:-}" ] && command -v clang++-14 >/dev/null 2>&1; then
  export CXX=clang++-14 CC=clang-14 WICK_CXX_DEFAULTED=1
fi
