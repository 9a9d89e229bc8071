# Compile through ccache when present. The sloppiness settings let ccache
# cache translation units built with the precompiled torch header.
if(WICK_USE_CCACHE AND NOT CMAKE_CXX_COMPILER_LAUNCHER)
  find_program(WICK_CCACHE ccache)
  if(WICK_CCACHE)
    set(CMAKE_CXX_COMPILER_LAUNCHER
        "${CMAKE_COMMAND}" -E env
        "CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime"
        "${WICK_CCACHE}")
    message(STATUS "wick: compiling through ${WICK_CCACHE}")
  endif()
endif()

# clang stamps a precompiled header with its inputs' mtimes, so a PCH rebuilt
# from the same inputs (a fresh build tree, a fresh clone) differs from the
# cached one and every TU that uses it misses the cache. Without the stamp, a
# second fresh tree of the same checkout hits every TU (hash_test and what it
# needs: 77.6 s cold, 5.0 s from the cache). CMake rebuilds the PCH when a
# header changes, so nothing relies on the stamp.
if(WICK_USE_PCH AND CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
  add_compile_options("SHELL:-Xclang -fno-pch-timestamp")
endif()
