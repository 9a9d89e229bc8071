# Finds LibTorch. Order: Torch_DIR / CMAKE_PREFIX_PATH as the user gave them;
# else the virtual environment that scripts/setup makes ($WICK_VENV, default
# ~/.cache/wick/venv), asking its torch for torch.utils.cmake_prefix_path.
# Sets WICK_WITH_CUDA (default ON when the Torch build has CUDA).

find_package(Torch QUIET CONFIG)   # the caller's own Torch_DIR / prefix path
if(NOT Torch_FOUND)
  if(DEFINED ENV{WICK_VENV})
    set(_wick_venv "$ENV{WICK_VENV}")
  else()
    set(_wick_venv "$ENV{HOME}/.cache/wick/venv")
  endif()
  set(WICK_PYTHON "${_wick_venv}/bin/python" CACHE FILEPATH "Python with torch, used to locate LibTorch")
  if(NOT EXISTS "${WICK_PYTHON}")
    message(FATAL_ERROR
      "wick: LibTorch not found. Run scripts/setup (it installs torch==2.11.0 into ${_wick_venv}), "
      "or pass -DTorch_DIR=<libtorch>/share/cmake/Torch or -DCMAKE_PREFIX_PATH=<libtorch>.")
  endif()
  execute_process(
    COMMAND "${WICK_PYTHON}" -c "import torch.utils, sys; sys.stdout.write(torch.utils.cmake_prefix_path)"
    OUTPUT_VARIABLE _wick_torch_prefix RESULT_VARIABLE _rc ERROR_QUIET)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "wick: ${WICK_PYTHON} cannot import torch; run scripts/setup")
  endif()
  list(APPEND CMAKE_PREFIX_PATH "${_wick_torch_prefix}")
endif()

# A CUDA-enabled Torch looks for the toolkit; point it at the usual place.
if(NOT DEFINED CUDAToolkit_ROOT AND EXISTS /usr/local/cuda/bin/nvcc)
  set(CUDAToolkit_ROOT /usr/local/cuda)
  if(NOT CMAKE_CUDA_COMPILER)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
endif()
if(NOT DEFINED TORCH_CUDA_ARCH_LIST AND NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
  set(TORCH_CUDA_ARCH_LIST "9.0")   # the H200; wick itself ships no .cu files yet
endif()
find_package(Torch REQUIRED CONFIG)
message(STATUS "wick: Torch ${Torch_VERSION} from ${Torch_DIR}")

if(Torch_VERSION VERSION_LESS 2.11)
  message(WARNING "wick targets LibTorch 2.11; found ${Torch_VERSION}")
endif()

set(_wick_torch_has_cuda OFF)
if(TARGET torch_cuda OR TORCH_LIBRARIES MATCHES "torch_cuda|c10_cuda")
  set(_wick_torch_has_cuda ON)
endif()
option(WICK_WITH_CUDA "Compile wick's CUDA code paths" ${_wick_torch_has_cuda})
if(WICK_WITH_CUDA AND NOT _wick_torch_has_cuda)
  message(FATAL_ERROR "wick: WICK_WITH_CUDA=ON but this Torch build has no CUDA")
endif()
message(STATUS "wick: CUDA code paths ${WICK_WITH_CUDA}")

# TORCH_LIBRARIES names the imported target `torch` (its include dirs and
# TORCH_CXX_FLAGS ride on it) plus c10 / CUDA libraries by path; wick links
# them publicly, and wickConfig.cmake finds Torch again for consumers.
