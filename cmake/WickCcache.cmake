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
