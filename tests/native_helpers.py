"""Helpers shared by the tests of the compiled op library (not a test module)."""
from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np
import pytest

# The CPU paths of the library (QEXPORT_CPU_ISA) and the flags each needs.
ISAS = ("portable", "avx2", "avx512")
_ISA_FLAGS = {"portable": (), "avx2": ("avx2", "fma"),
              "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512vbmi", "avx512_vnni", "fma")}


def _cpu_flags() -> set[str]:
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def missing_isa_flags(isa: str) -> list[str]:
    """The CPU flags (or architecture) the machine lacks for a CPU path of the library."""
    import platform

    if isa != "portable" and platform.machine().lower() not in ("x86_64", "amd64"):
        return [f"x86-64 (this is {platform.machine()})"]
    flags = _cpu_flags()
    return [f for f in _ISA_FLAGS[isa] if f not in flags]


def require_library() -> pathlib.Path:
    """Path of libqexport_ops.so. Skips when it is not built and qexport is not installed;
    fails when qexport is installed (a wheel or editable install must ship the library)."""
    from qexport import native
    from qexport.errors import QexportError

    try:
        return native.library_path()
    except QexportError as e:
        try:
            from importlib import metadata

            metadata.distribution("qexport")
            installed = True
        except Exception:
            installed = False
        if installed:
            pytest.fail(f"qexport is installed but its op library is missing: {e}")
        pytest.skip(reason=f"op library not built (qexport not installed): {e}")


def ort_errors() -> tuple[type[BaseException], ...]:
    """The exception types onnxruntime raises for a failed session creation or run."""
    from onnxruntime.capi import onnxruntime_pybind11_state as s

    return tuple(getattr(s, n) for n in ("Fail", "InvalidArgument", "RuntimeException",
                                         "InvalidGraph", "NotImplemented") if hasattr(s, n))


def bml_model(weights, x_shape: Sequence[int | str], act_dtype=np.float32,
              tensors: Sequence[np.ndarray | None] | None = None,
              attributes: dict | None = None, check: bool = True):
    """A model with one qexport::BinaryMixedLinear node; weights as initializers.

    `weights` is a MixedLinearWeights; `tensors` (inputs 1..9, None = omitted) and `attributes`
    override what it gives (bad-input tests). `x_shape` may hold symbolic dims (str)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from qexport import contract as C
    from qexport.ops.binary_mixed_linear import contract as B
    from qexport import ops

    ops.register_onnx_schemas()
    if tensors is None:
        tensors = [None if t is None else t.numpy() for t in weights.tensors()]
    attrs = dict(weights.attributes()) if attributes is None else attributes
    names = list(B.INPUT_NAMES)
    inits, node_inputs = [], [names[B.IN_X]]
    for i, t in enumerate(tensors, start=1):
        if t is None:
            node_inputs.append("")
        else:
            inits.append(numpy_helper.from_array(np.asarray(t), name=names[i]))
            node_inputs.append(names[i])
    while node_inputs[-1] == "":
        node_inputs.pop()
    elem = TensorProto.FLOAT if act_dtype == np.float32 else TensorProto.FLOAT16
    n = attrs.get(B.ATTR_OUT_FEATURES, weights.out_features)
    node = helper.make_node(B.OP_NAME, node_inputs, ["Y"], domain=C.DOMAIN,
                            name="bml0", **attrs)
    graph = helper.make_graph(
        [node], "bml",
        [helper.make_tensor_value_info("X", elem, list(x_shape))],
        [helper.make_tensor_value_info("Y", elem, list(x_shape[:-1]) + [n])],
        initializer=inits)
    model = helper.make_model(graph, ir_version=10,
                              opset_imports=[helper.make_opsetid("", 17),
                                             helper.make_opsetid(C.DOMAIN, C.OPSET_VERSION)])
    if check:
        onnx.checker.check_model(model)
    return model


def ort_session(model, library: pathlib.Path):
    import onnxruntime as ort

    from qexport import native

    options = native.session_options(library)
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), sess_options=options,
                                providers=["CPUExecutionProvider"])
