# GPU options and toolchain of the qexport build (docs/gpu.md), included by the top-level
# CMakeLists.txt before the plugins/ folders, which add the GPU sources of each op:
#   QEXPORT_BUILD_CUDA  CUDA kernels + the CUDAExecutionProvider ops, compiled into
#                       libqexport_ops.so (static CUDA runtime).
#                       Default: $ENV{QEXPORT_BUILD_CUDA} if set; OFF under pip/scikit-build-core
#                       (the default `pip install` stays CPU-only and fast); else ON when
#                       check_language(CUDA) finds a compiler.
#   QEXPORT_BUILD_TRT   libqexport_trt.so, the TensorRT IPluginV3 library. AUTO (default): with
#                       CUDA, when the TensorRT headers are found or fetched; ON: required.
#   QEXPORT_BUILD_TESTS C++ test programs of tests/cpp (run by tests/test_gpu_build.py).
# Architectures: CMAKE_CUDA_ARCHITECTURES, else $ENV{QEXPORT_CUDA_ARCHS}, else "80;86;89;90".
# Sets QEXPORT_WITH_TRT (ON/OFF): whether libqexport_trt.so is built. With CUDA on, the CUDA
# language is enabled and CUDA::cudart_static / CUDA::toolkit exist; with TensorRT on, the
# INTERFACE target qexport::tensorrt_headers (cmake/TensorRTHeaders.cmake).
include_guard(GLOBAL)
include(CheckLanguage)
include(${CMAKE_CURRENT_LIST_DIR}/QexportCommon.cmake)

if(DEFINED ENV{QEXPORT_BUILD_CUDA} AND NOT "$ENV{QEXPORT_BUILD_CUDA}" STREQUAL "")
  set(_qexport_cuda_default "$ENV{QEXPORT_BUILD_CUDA}")
elseif(SKBUILD)
  set(_qexport_cuda_default OFF)
else()
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(_qexport_cuda_default ON)
  else()
    set(_qexport_cuda_default OFF)
  endif()
endif()
option(QEXPORT_BUILD_CUDA "Build the CUDA kernels and ORT CUDA ops" ${_qexport_cuda_default})
set(QEXPORT_BUILD_TRT "AUTO" CACHE STRING "Build libqexport_trt.so (ON, OFF, AUTO)")
set_property(CACHE QEXPORT_BUILD_TRT PROPERTY STRINGS ON OFF AUTO)
option(QEXPORT_BUILD_TESTS "Build the C++ test programs of tests/cpp" OFF)
set(QEXPORT_WITH_TRT OFF)

if(NOT QEXPORT_BUILD_CUDA)
  message(STATUS "qexport: CUDA kernels off (QEXPORT_BUILD_CUDA=OFF); CPU op library only")
  return()
endif()

if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR "${CMAKE_CUDA_ARCHITECTURES}" STREQUAL "")
  if(DEFINED ENV{QEXPORT_CUDA_ARCHS} AND NOT "$ENV{QEXPORT_CUDA_ARCHS}" STREQUAL "")
    set(CMAKE_CUDA_ARCHITECTURES "$ENV{QEXPORT_CUDA_ARCHS}")
  else()
    set(CMAKE_CUDA_ARCHITECTURES "80;86;89;90")
  endif()
endif()
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
message(STATUS "qexport: CUDA kernels on: nvcc ${CMAKE_CUDA_COMPILER_VERSION}, "
               "architectures ${CMAKE_CUDA_ARCHITECTURES}")

# CUDA code of the plugins (each op's kernels, an OBJECT library shared by libqexport_ops.so,
# libqexport_trt.so and the test library): PIC, hidden visibility, warnings, C++17.
function(qexport_cuda_code target)
  target_include_directories(${target} PRIVATE
    "${PROJECT_SOURCE_DIR}/plugins" "${PROJECT_SOURCE_DIR}/plugins/common")
  set_target_properties(${target} PROPERTIES
    CUDA_STANDARD 17 CUDA_STANDARD_REQUIRED ON POSITION_INDEPENDENT_CODE ON
    CUDA_VISIBILITY_PRESET hidden)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra --expt-relaxed-constexpr>)
endfunction()

# ---- TensorRT headers (libqexport_trt.so links no TensorRT library)
if(QEXPORT_BUILD_TRT STREQUAL "ON" OR QEXPORT_BUILD_TRT STREQUAL "AUTO")
  include(TensorRTHeaders)
  if(QEXPORT_TRT_HEADERS_FOUND)
    set(QEXPORT_WITH_TRT ON)
  elseif(QEXPORT_BUILD_TRT STREQUAL "ON")
    message(FATAL_ERROR "qexport: QEXPORT_BUILD_TRT=ON but no TensorRT headers were found or "
                        "fetched; set TensorRT_INCLUDE_DIR or TensorRT_ROOT")
  else()
    message(STATUS "qexport: TensorRT headers not found: libqexport_trt.so is not built")
  endif()
endif()
