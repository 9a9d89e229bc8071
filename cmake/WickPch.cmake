# The torch headers take ~30 s to parse, CLI11's and nlohmann::json's another
# ~20 s; precompile them once for all executables (tests, examples, bench). The library has its own precompiled
# header: it is compiled with -fPIC, executables without, and GCC refuses a
# header precompiled under other code-model flags.
if(WICK_USE_PCH)
  add_library(wick_pch OBJECT "${PROJECT_SOURCE_DIR}/cmake/pch.cpp")
  target_link_libraries(wick_pch PRIVATE wick::wick)
  find_package(CLI11 CONFIG REQUIRED)
  target_link_libraries(wick_pch PRIVATE CLI11::CLI11 nlohmann_json::nlohmann_json)
  target_precompile_headers(wick_pch PRIVATE <torch/torch.h> <CLI/CLI.hpp> <nlohmann/json.hpp>)
endif()

# Makes `target` reuse the executables' precompiled torch header.
function(wick_use_pch target)
  if(WICK_USE_PCH AND TARGET wick_pch)
    target_precompile_headers(${target} REUSE_FROM wick_pch)
  endif()
endfunction()
