# WICK_SANITIZE: build the library, tests, examples and bench of this build
# tree under a sanitizer (docs/sanitizers.md; scripts/sanitize runs them).
#   ""         none (default)
#   address    AddressSanitizer + UndefinedBehaviorSanitizer (LeakSanitizer too)
#   thread     ThreadSanitizer
# LibTorch, libgomp and libstdc++ come prebuilt and stay uninstrumented: only
# wick's own code and the torch/std headers it compiles are checked.
set(WICK_SANITIZE "" CACHE STRING "Sanitizer for this build: empty, address (ASan+UBSan) or thread (TSan)")
set_property(CACHE WICK_SANITIZE PROPERTY STRINGS "" address thread)

if(WICK_SANITIZE STREQUAL "")
  return()
elseif(WICK_SANITIZE STREQUAL "address")
  # UB is an error: the first report aborts the test instead of printing and going on.
  set(_wick_san_flags -fsanitize=address,undefined -fno-sanitize-recover=undefined)
elseif(WICK_SANITIZE STREQUAL "thread")
  set(_wick_san_flags -fsanitize=thread)
else()
  message(FATAL_ERROR "wick: WICK_SANITIZE must be empty, address or thread, got '${WICK_SANITIZE}'")
endif()

# Directory-wide, so every target below (library, its precompiled header,
# tests, examples, bench) gets the same flags: a precompiled header is only
# reused under the flags it was built with. -O1 comes after the build type's
# -O2/-O3 and wins: quick enough, and stack traces stay readable. -g1: line
# tables, all a report's stack trace needs (file:line per frame); full -g
# made each TU ~25% slower to build (trainer_test 37.6 s against 29.3 s).
add_compile_options(${_wick_san_flags} -O1 -g1 -fno-omit-frame-pointer)
add_link_options(${_wick_san_flags})
message(STATUS "wick: sanitizer build (${WICK_SANITIZE}): ${_wick_san_flags}")

# gtest_discover_tests lists each binary's tests when ctest starts, not after
# the link: the listing then runs under the sanitizer options that the caller
# gives ctest (scripts/sanitize sets them), and a build never fails on a report.
set(CMAKE_GTEST_DISCOVER_TESTS_DISCOVERY_MODE PRE_TEST)
