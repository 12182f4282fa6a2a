"""qexport.targets.trt: the prerequisites check and its one-line errors run everywhere; building and
running an engine needs TensorRT and a CUDA GPU and skips, saying which is missing."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from qexport.targets import trt
from qexport.errors import QexportError


def test_import_loads_nothing():
    code = ("import sys, qexport.targets.trt\n"
            "assert 'tensorrt' not in sys.modules\n"
            "assert 'libqexport_trt' not in open('/proc/self/maps').read()\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_prerequisites_one_line():
    reason = trt.engine_prerequisites()
    if reason is None:
        return  # a TensorRT + GPU machine: nothing to report
    assert "\n" not in reason and reason
    try:
        import tensorrt  # noqa: F401
    except Exception:
        assert reason.startswith("TensorRT Python package")


def test_build_engine_missing_prerequisites_is_one_line(tmp_path):
    reason = trt.engine_prerequisites()
    if reason is None:
        pytest.skip(reason="TensorRT and a GPU are present: no missing prerequisite to report")
    with pytest.raises(QexportError) as info:
        trt.build_engine(tmp_path / "model.onnx", None, tmp_path / "model.engine")
    assert "\n" not in str(info.value) and reason in str(info.value)


def test_missing_plugin_library_env(monkeypatch, tmp_path):
    monkeypatch.setenv(trt.ENV_TRT_LIBRARY, str(tmp_path / "nope.so"))
    with pytest.raises(QexportError, match=trt.ENV_TRT_LIBRARY):
        trt.trt_library_path()


def test_plugin_namespace_added(tmp_path):
    import onnx

    from native_helpers import bml_model
    from qexport.testing import random_mixed_linear

    w = random_mixed_linear(8, 16, 3, 0, seed=0)
    path = tmp_path / "m.onnx"
    onnx.save(bml_model(w, ["M", 16]), str(path))
    patched = onnx.load_from_string(trt._with_plugin_namespace(path))
    node = patched.graph.node[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_namespace"] == b"qexport"
    assert attrs["in_features"] == 16
    assert not any(a.name == "plugin_namespace" for a in onnx.load(str(path)).graph.node[0].attribute)


def test_engine_build_and_run(tmp_path):
    """Build an fp16 engine of one BinaryMixedLinear and compare with the PyTorch reference."""
    reason = trt.engine_prerequisites()
    if reason:
        pytest.skip(reason=f"TensorRT engine build not possible here: {reason}")
    import onnx
    import tensorrt
    import torch

    from native_helpers import bml_model
    from qexport.ops.binary_mixed_linear import binary_mixed_linear_reference
    from qexport.testing import random_mixed_linear

    w = random_mixed_linear(64, 256, 51, 32, with_r2=True, with_bias=True, seed=3)
    path = tmp_path / "m.onnx"
    onnx.save(bml_model(w, ["M", 256], np.float16), str(path))
    engine_path = trt.build_engine(path, None, tmp_path / "m.engine", fp16=True)
    runtime = tensorrt.Runtime(tensorrt.Logger(tensorrt.Logger.WARNING))
    runtime.get_plugin_registry().load_library(str(trt.trt_library_path()))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    ctx = engine.create_execution_context()
    x = torch.randn(3, 256, dtype=torch.float16, device="cuda")
    y = torch.empty(3, 64, dtype=torch.float16, device="cuda")
    ctx.set_input_shape("X", tuple(x.shape))
    ctx.set_tensor_address("X", x.data_ptr())
    ctx.set_tensor_address("Y", y.data_ptr())
    assert ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    ref = binary_mixed_linear_reference(x.cpu(), *w.tensors(), **w.attributes()).float()
    err = (y.cpu().float() - ref).abs().max().item()
    assert err <= 2.0 ** -9 * ref.abs().max().item()


def test_sample_03_configures(tmp_path):
    """samples/03_cpp_trt configures everywhere: it builds where TensorRT is installed and
    otherwise says what is missing (running it needs an engine, i.e. TensorRT and a GPU)."""
    import pathlib
    import shutil

    if not shutil.which("cmake"):
        pytest.skip(reason="cmake not found")
    src = pathlib.Path(__file__).resolve().parents[1] / "samples" / "03_cpp_trt"
    proc = subprocess.run(["cmake", "-S", str(src), "-B", str(tmp_path / "b")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if "not built" in proc.stdout:
        assert "libnvinfer" in proc.stdout
        return
    build = subprocess.run(["cmake", "--build", str(tmp_path / "b")], capture_output=True,
                           text=True)
    assert build.returncode == 0, build.stdout + build.stderr
