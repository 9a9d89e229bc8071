# The torch headers take ~30 s to parse; precompile them once for all
# executables (tests, examples, bench). The library has its own precompiled
# header: it is compiled with -fPIC, executables without, and GCC refuses a
# header precompiled under other code-model flags.
if(WICK_USE_PCH)
  add_library(wick_pch OBJECT "${PROJECT_SOURCE_DIR}/cmake/pch.cpp")
  target_link_libraries(wick_pch PRIVATE wick::wick)
  target_precompile_headers(wick_pch PRIVATE <torch/torch.h>)
endif()

# Makes `target` reuse the executables' precompiled torch header.
function(wick_use_pch target)
  if(WICK_USE_PCH AND TARGET wick_pch)
    target_precompile_headers(${target} REUSE_FROM wick_pch)
  endif()
endfunction()
