#!/usr/bin/env bash
# Builds the op library with AddressSanitizer + UndefinedBehaviorSanitizer (CMake option
# QEXPORT_SANITIZE) into build/sanitize and runs the kernel, fuzz and reliability tests against
# it on every CPU path this machine has (the tests force each path through QEXPORT_CPU_ISA).
# Any report fails the run: UBSan aborts on its first finding, ASan always does.
# Usage: bash scripts/sanitizers.sh [pytest args...]   (CI runs it after the test suite)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUILD=build/sanitize
start=$(date +%s)
mkdir -p build
GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S . -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DQEXPORT_SANITIZE=ON \
  -DQEXPORT_BUILD_CUDA=OFF -DQEXPORT_BUILD_TRT=OFF >"$BUILD.configure.log" 2>&1 \
  || { cat "$BUILD.configure.log"; exit 1; }
cmake --build "$BUILD" --target qexport_ops
LIB="$PWD/$BUILD/libqexport_ops.so"
# Python itself is not instrumented: the sanitizer runtimes the library links (whichever
# compiler CMake chose: libasan/libubsan for GCC, libclang_rt.* for Clang) are preloaded.
# Leak checking is off (CPython and ONNX Runtime keep allocations until exit by design);
# everything else is on.
RUNTIMES=$(ldd "$LIB" | awk '/(asan|ubsan|clang_rt)/ {print $3}' | paste -sd: -)
case "$RUNTIMES" in
  *asan*) ;;
  *) echo "sanitizers.sh: $LIB links no AddressSanitizer runtime (ldd: $RUNTIMES)" >&2; exit 1 ;;
esac
export QEXPORT_OPS_LIBRARY="$LIB"
export LD_PRELOAD="$RUNTIMES"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export QEXPORT_EXPECT_SANITIZED=1
# --capture=sys: a sanitizer writes its report to file descriptor 2 and aborts, which pytest's
# default fd capture would swallow with the process.
"$PY" -m pytest -q -p no:cacheprovider --capture=sys tests/test_kernel_cpu.py tests/test_fuzz.py \
  tests/test_reliability.py "$@"
echo "sanitizers.sh: clean in $(( $(date +%s) - start )) s (library $LIB)"
