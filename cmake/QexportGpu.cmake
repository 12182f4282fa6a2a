# GPU parts of the qexport build (docs/gpu.md), included by the top-level CMakeLists.txt after
# the qexport_ops target exists:
#   QEXPORT_BUILD_CUDA  CUDA kernels (plugins/*/bml_cuda.cu) + the CUDAExecutionProvider ops,
#                       compiled into libqexport_ops.so (static CUDA runtime).
#                       Default: $ENV{QEXPORT_BUILD_CUDA} if set; OFF under pip/scikit-build-core
#                       (the default `pip install` stays CPU-only and fast); else ON when
#                       check_language(CUDA) finds a compiler.
#   QEXPORT_BUILD_TRT   libqexport_trt.so, the TensorRT IPluginV3 library. AUTO (default): with
#                       CUDA, when the TensorRT headers are found or fetched; ON: required.
#   QEXPORT_BUILD_TESTS C++ test programs of tests/cpp (run by tests/test_gpu_build.py).
# Architectures: CMAKE_CUDA_ARCHITECTURES, else $ENV{QEXPORT_CUDA_ARCHS}, else "80;86;89;90".
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

# The kernels once, as PIC objects shared by the ORT op library and the TensorRT plugins.
add_library(qexport_bml_cuda OBJECT plugins/binary_mixed_linear/bml_cuda.cu)
target_include_directories(qexport_bml_cuda PRIVATE
  "${CMAKE_CURRENT_SOURCE_DIR}/plugins" "${CMAKE_CURRENT_SOURCE_DIR}/plugins/common")
set_target_properties(qexport_bml_cuda PROPERTIES
  CUDA_STANDARD 17 CUDA_STANDARD_REQUIRED ON POSITION_INDEPENDENT_CODE ON
  CUDA_VISIBILITY_PRESET hidden)
target_compile_options(qexport_bml_cuda PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra --expt-relaxed-constexpr>)

target_sources(qexport_ops PRIVATE plugins/binary_mixed_linear/ort_cuda_op.cpp
                                   $<TARGET_OBJECTS:qexport_bml_cuda>)
target_compile_definitions(qexport_ops PRIVATE QEXPORT_WITH_CUDA)
# qexport_ops was created before CMAKE_CUDA_ARCHITECTURES was set here.
set_target_properties(qexport_ops PROPERTIES CUDA_ARCHITECTURES "${CMAKE_CUDA_ARCHITECTURES}")
target_link_libraries(qexport_ops PRIVATE CUDA::cudart_static)

# ---- TensorRT plugin library
set(_qexport_trt_build OFF)
if(QEXPORT_BUILD_TRT STREQUAL "ON" OR QEXPORT_BUILD_TRT STREQUAL "AUTO")
  include(TensorRTHeaders)
  if(QEXPORT_TRT_HEADERS_FOUND)
    set(_qexport_trt_build ON)
  elseif(QEXPORT_BUILD_TRT STREQUAL "ON")
    message(FATAL_ERROR "qexport: QEXPORT_BUILD_TRT=ON but no TensorRT headers were found or "
                        "fetched; set TensorRT_INCLUDE_DIR or TensorRT_ROOT")
  else()
    message(STATUS "qexport: TensorRT headers not found: libqexport_trt.so is not built")
  endif()
endif()
if(_qexport_trt_build)
  add_library(qexport_trt SHARED
    plugins/trt/trt_register.cpp
    plugins/binary_mixed_linear/trt_plugin.cpp
    $<TARGET_OBJECTS:qexport_bml_cuda>)
  target_include_directories(qexport_trt PRIVATE
    "${CMAKE_CURRENT_SOURCE_DIR}/plugins" "${CMAKE_CURRENT_SOURCE_DIR}/plugins/common")
  # No libnvinfer: the library talks to TensorRT only through the interfaces it hands over.
  target_link_libraries(qexport_trt PRIVATE qexport::tensorrt_headers CUDA::cudart_static)
  qexport_plugin_library(qexport_trt "${CMAKE_CURRENT_SOURCE_DIR}/plugins/trt/qexport_trt.map")
  install(TARGETS qexport_trt LIBRARY DESTINATION qexport/lib RUNTIME DESTINATION qexport/lib)
endif()

# ---- C++ tests (tests/cpp): no GPU needed except where a program says so
if(QEXPORT_BUILD_TESTS)
  # ctypes entry points into the CUDA launchers (tests/test_gpu_kernels.py; needs a GPU to run).
  add_library(qexport_cuda_testlib SHARED tests/cpp/bml_cuda_capi.cpp
              $<TARGET_OBJECTS:qexport_bml_cuda>)
  target_include_directories(qexport_cuda_testlib PRIVATE
    "${CMAKE_CURRENT_SOURCE_DIR}/plugins" "${CMAKE_CURRENT_SOURCE_DIR}/plugins/common")
  target_link_libraries(qexport_cuda_testlib PRIVATE CUDA::cudart_static)
  if(_qexport_trt_build)
    # Loads libqexport_trt.so with dlopen and drives the plugin through TensorRT's interfaces.
    add_executable(qexport_test_trt_plugin tests/cpp/test_trt_plugin.cpp)
    target_include_directories(qexport_test_trt_plugin PRIVATE
      "${CMAKE_CURRENT_SOURCE_DIR}/plugins/common")
    target_link_libraries(qexport_test_trt_plugin PRIVATE qexport::tensorrt_headers
                          CUDA::toolkit ${CMAKE_DL_LIBS})
    add_dependencies(qexport_test_trt_plugin qexport_trt)
  endif()
endif()
