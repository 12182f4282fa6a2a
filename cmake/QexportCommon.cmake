# Small helpers shared by the qexport CMake files.
#   qexport_plugin_code(<target>)                       compile settings of plugin code
#   qexport_plugin_library(<target> <version-script>)  settings of a shared plugin library
#   qexport_cache_root(<out-var>)                       where fetched third-party headers go
include_guard(GLOBAL)

# Code that ends up in a plugin library (the library itself, or an object or static library
# linked into one): hidden visibility, PIC, -Wall -Wextra. Include paths: plugins/ (headers of
# an op: "binary_mixed_linear/bml_cpu.h") and plugins/common/ ("qexport_status.h").
function(qexport_plugin_code target)
  set_target_properties(${target} PROPERTIES
    CXX_VISIBILITY_PRESET hidden
    VISIBILITY_INLINES_HIDDEN ON
    POSITION_INDEPENDENT_CODE ON)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE "$<$<COMPILE_LANGUAGE:CXX>:-Wall;-Wextra>")
  endif()
  target_include_directories(${target} PRIVATE
    "${PROJECT_SOURCE_DIR}/plugins" "${PROJECT_SOURCE_DIR}/plugins/common")
endfunction()

# A plugin library loaded with dlopen: qexport_plugin_code and, on ELF platforms, nothing left
# unresolved at link time and only the symbols the version script names exported (std::
# template instances would otherwise escape hidden visibility).
function(qexport_plugin_library target version_script)
  qexport_plugin_code(${target})
  if(NOT APPLE AND NOT WIN32)
    target_link_options(${target} PRIVATE
      "LINKER:--no-undefined" "LINKER:--version-script=${version_script}")
    set_property(TARGET ${target} APPEND PROPERTY LINK_DEPENDS "${version_script}")
  endif()
endfunction()

# The folder fetched headers are cached in, outside the source tree: $QEXPORT_CACHE, else
# $XDG_CACHE_HOME/qexport, else ~/.cache/qexport.
function(qexport_cache_root out_var)
  if(DEFINED ENV{QEXPORT_CACHE} AND NOT "$ENV{QEXPORT_CACHE}" STREQUAL "")
    set(cache_root "$ENV{QEXPORT_CACHE}")
  elseif(DEFINED ENV{XDG_CACHE_HOME} AND NOT "$ENV{XDG_CACHE_HOME}" STREQUAL "")
    set(cache_root "$ENV{XDG_CACHE_HOME}/qexport")
  else()
    set(cache_root "$ENV{HOME}/.cache/qexport")
  endif()
  file(TO_CMAKE_PATH "${cache_root}" cache_root)
  set(${out_var} "${cache_root}" PARENT_SCOPE)
endfunction()
