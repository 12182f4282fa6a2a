# Locates the ONNX Runtime C/C++ API headers (onnxruntime_c_api.h, onnxruntime_cxx_api.h, ...)
# and defines the INTERFACE target `qexport::onnxruntime_headers`.
#
# Search order:
#   1. ONNXRUNTIME_INCLUDE_DIR (CMake cache variable or environment variable): the folder
#      that holds onnxruntime_cxx_api.h.
#   2. ONNXRUNTIME_ROOT (cache or environment): an ONNX Runtime release/install tree
#      (include/, include/onnxruntime/, include/onnxruntime/core/session/).
#   3. System include paths.
#   4. Fetch: `npm pack com.github.asus4.onnxruntime@0.4.9` into a cache folder outside the
#      source tree ($QEXPORT_CACHE, default ~/.cache/qexport), keep only the Headers/ folder
#      of the iOS framework (MIT), delete the tarball. Later configures reuse the cache.
# No header is ever written into the source tree.
include_guard(GLOBAL)
include(${CMAKE_CURRENT_LIST_DIR}/QexportCommon.cmake)

set(QEXPORT_ORT_NPM_PACKAGE "com.github.asus4.onnxruntime" CACHE STRING
    "npm package the ONNX Runtime headers are fetched from when none are found")
set(QEXPORT_ORT_NPM_VERSION "0.4.9" CACHE STRING "version of QEXPORT_ORT_NPM_PACKAGE")
set(_qexport_ort_member
    "package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64/onnxruntime.framework/Headers")
# Minimum ORT_API_VERSION the op library source needs (KernelComputeV2, optional inputs).
set(_qexport_ort_min_api 17)

set(ONNXRUNTIME_INCLUDE_DIR "$ENV{ONNXRUNTIME_INCLUDE_DIR}" CACHE PATH
    "Folder holding onnxruntime_cxx_api.h (empty: search, then fetch)")
set(ONNXRUNTIME_ROOT "$ENV{ONNXRUNTIME_ROOT}" CACHE PATH
    "ONNX Runtime install/release tree to take headers from (empty: search, then fetch)")

function(_qexport_ort_fetch_headers out_dir)
  qexport_cache_root(cache_root)
  set(dest "${cache_root}/onnxruntime-headers-${QEXPORT_ORT_NPM_VERSION}")
  set(headers "${dest}/include")

  if(NOT EXISTS "${headers}/onnxruntime_cxx_api.h")
    file(MAKE_DIRECTORY "${cache_root}")
    # Serialize concurrent builds that share the cache.
    file(LOCK "${cache_root}/onnxruntime-headers-${QEXPORT_ORT_NPM_VERSION}.lock"
         GUARD FUNCTION TIMEOUT 1800 RESULT_VARIABLE lock_result)
    if(NOT lock_result EQUAL 0)
      message(FATAL_ERROR "qexport: cannot lock the header cache ${cache_root}: ${lock_result}")
    endif()
  endif()

  if(NOT EXISTS "${headers}/onnxruntime_cxx_api.h")
    find_program(QEXPORT_NPM_EXECUTABLE NAMES npm npm.cmd)
    find_program(QEXPORT_TAR_EXECUTABLE NAMES tar gtar)
    if(NOT QEXPORT_NPM_EXECUTABLE)
      message(FATAL_ERROR
        "qexport: ONNX Runtime C/C++ headers not found and npm is not installed to fetch them; "
        "install npm, or set ONNXRUNTIME_INCLUDE_DIR (folder of onnxruntime_cxx_api.h) "
        "or ONNXRUNTIME_ROOT")
    endif()
    if(NOT QEXPORT_TAR_EXECUTABLE)
      message(FATAL_ERROR "qexport: `tar` is needed to unpack the ONNX Runtime headers")
    endif()
    set(work "${dest}.partial")
    file(REMOVE_RECURSE "${work}")
    file(MAKE_DIRECTORY "${work}")
    message(STATUS "qexport: fetching ONNX Runtime headers: npm pack "
                   "${QEXPORT_ORT_NPM_PACKAGE}@${QEXPORT_ORT_NPM_VERSION} (into ${dest})")
    execute_process(
      COMMAND "${QEXPORT_NPM_EXECUTABLE}" pack
              "${QEXPORT_ORT_NPM_PACKAGE}@${QEXPORT_ORT_NPM_VERSION}" --silent
      WORKING_DIRECTORY "${work}"
      RESULT_VARIABLE rc OUTPUT_VARIABLE tgz ERROR_VARIABLE err
      OUTPUT_STRIP_TRAILING_WHITESPACE)
    if(NOT rc EQUAL 0)
      file(REMOVE_RECURSE "${work}")
      message(FATAL_ERROR "qexport: `npm pack ${QEXPORT_ORT_NPM_PACKAGE}@${QEXPORT_ORT_NPM_VERSION}` "
                          "failed (${rc}): ${err}")
    endif()
    # npm prints the tarball name last.
    string(REGEX REPLACE ".*\n" "" tgz "${tgz}")
    if(NOT tgz OR NOT EXISTS "${work}/${tgz}")
      set(tgz "${QEXPORT_ORT_NPM_PACKAGE}-${QEXPORT_ORT_NPM_VERSION}.tgz")
    endif()
    execute_process(
      COMMAND "${QEXPORT_TAR_EXECUTABLE}" -xzf "${tgz}" --no-same-owner
              "--exclude=onnxruntime_experimental_*" "${_qexport_ort_member}/"
      WORKING_DIRECTORY "${work}"
      RESULT_VARIABLE rc ERROR_VARIABLE err)
    file(REMOVE "${work}/${tgz}")
    if(NOT rc EQUAL 0 OR NOT EXISTS "${work}/${_qexport_ort_member}/onnxruntime_cxx_api.h")
      file(REMOVE_RECURSE "${work}")
      message(FATAL_ERROR "qexport: could not extract ${_qexport_ort_member} from the npm "
                          "tarball (${rc}): ${err}")
    endif()
    file(REMOVE_RECURSE "${dest}")
    file(MAKE_DIRECTORY "${dest}")
    file(RENAME "${work}/${_qexport_ort_member}" "${headers}")
    file(REMOVE_RECURSE "${work}")
    file(WRITE "${dest}/SOURCE.txt"
         "ONNX Runtime C/C++ API headers (MIT license), from npm "
         "${QEXPORT_ORT_NPM_PACKAGE}@${QEXPORT_ORT_NPM_VERSION}, ${_qexport_ort_member}\n")
  endif()
  set(${out_dir} "${headers}" PARENT_SCOPE)
endfunction()

if(NOT TARGET qexport::onnxruntime_headers)
  set(_qexport_ort_inc "")
  if(ONNXRUNTIME_INCLUDE_DIR)
    if(NOT EXISTS "${ONNXRUNTIME_INCLUDE_DIR}/onnxruntime_cxx_api.h")
      message(FATAL_ERROR "qexport: ONNXRUNTIME_INCLUDE_DIR=${ONNXRUNTIME_INCLUDE_DIR} "
                          "has no onnxruntime_cxx_api.h")
    endif()
    set(_qexport_ort_inc "${ONNXRUNTIME_INCLUDE_DIR}")
  elseif(ONNXRUNTIME_ROOT)
    find_path(QEXPORT_ORT_ROOT_INCLUDE onnxruntime_cxx_api.h
      PATHS "${ONNXRUNTIME_ROOT}"
      PATH_SUFFIXES include include/onnxruntime include/onnxruntime/core/session
      NO_DEFAULT_PATH NO_CMAKE_FIND_ROOT_PATH)
    if(NOT QEXPORT_ORT_ROOT_INCLUDE)
      message(FATAL_ERROR "qexport: ONNXRUNTIME_ROOT=${ONNXRUNTIME_ROOT} has no "
                          "onnxruntime_cxx_api.h under include/")
    endif()
    set(_qexport_ort_inc "${QEXPORT_ORT_ROOT_INCLUDE}")
  else()
    find_path(QEXPORT_ORT_SYSTEM_INCLUDE onnxruntime_cxx_api.h
      PATH_SUFFIXES onnxruntime onnxruntime/core/session)
    if(QEXPORT_ORT_SYSTEM_INCLUDE)
      set(_qexport_ort_inc "${QEXPORT_ORT_SYSTEM_INCLUDE}")
    else()
      _qexport_ort_fetch_headers(_qexport_ort_inc)
    endif()
  endif()

  file(STRINGS "${_qexport_ort_inc}/onnxruntime_c_api.h" _qexport_ort_api_line
       REGEX "^#define ORT_API_VERSION [0-9]+")
  string(REGEX REPLACE "^#define ORT_API_VERSION ([0-9]+).*" "\\1"
         QEXPORT_ORT_API_VERSION "${_qexport_ort_api_line}")
  if(NOT QEXPORT_ORT_API_VERSION OR QEXPORT_ORT_API_VERSION LESS _qexport_ort_min_api)
    message(FATAL_ERROR "qexport: ONNX Runtime headers in ${_qexport_ort_inc} have "
                        "ORT_API_VERSION '${QEXPORT_ORT_API_VERSION}', need >= ${_qexport_ort_min_api}")
  endif()
  message(STATUS "qexport: ONNX Runtime headers: ${_qexport_ort_inc} "
                 "(ORT_API_VERSION ${QEXPORT_ORT_API_VERSION}; the op library needs a runtime "
                 "at least that new)")

  add_library(qexport_onnxruntime_headers INTERFACE)
  add_library(qexport::onnxruntime_headers ALIAS qexport_onnxruntime_headers)
  # SYSTEM: no -Wall/-Wextra noise from third-party headers.
  target_include_directories(qexport_onnxruntime_headers SYSTEM INTERFACE "${_qexport_ort_inc}")
  set(QEXPORT_ORT_INCLUDE_DIR "${_qexport_ort_inc}")
endif()
