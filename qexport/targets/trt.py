"""TensorRT engine building for qexport exports (docs/gpu.md).

`build_engine(onnx_path, plugin_lib, engine_path, fp16=True)` parses an exported model.onnx
with TensorRT's ONNX parser, with the qexport plugins of libqexport_trt.so loaded, and writes a
serialized engine. `engine_prerequisites()` says in one line what is missing (None when a build
can be attempted). TensorRT is imported lazily: importing this module loads nothing.

How qexport nodes reach the plugin: TensorRT's ONNX parser maps a node of an unknown op to the
plugin creator named like the op type ("BinaryMixedLinear"), version from the node's
`plugin_version` attribute (default "1") and namespace from its `plugin_namespace` attribute
(default ""). `build_engine` parses an in-memory copy of the model in which every node of the
qexport domain carries plugin_namespace="qexport"; the exported file is not modified. (The
library also registers the same plugin under namespace "", so `trtexec --onnx=model.onnx
--staticPlugins=libqexport_trt.so` works on an unmodified export.)
"""
from __future__ import annotations

import os
import pathlib

from .. import contract as C
from ..errors import QexportError
from . import Finish, Target, register

ENV_TRT_LIBRARY = "QEXPORT_TRT_LIBRARY"
TRT_LIBRARY_NAME = "libqexport_trt.so"
PLUGIN_NAMESPACE = C.DOMAIN
_BUILD_HINT = ("build it with CUDA (`QEXPORT_BUILD_CUDA=ON pip install -e . --no-build-isolation`, "
               f"or cmake with -DQEXPORT_BUILD_CUDA=ON) or point {ENV_TRT_LIBRARY} at it")


def _cuda_gpu_count() -> tuple[int, str]:
    """(number of CUDA devices, reason when 0), asked of the CUDA driver through ctypes."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0, "no CUDA GPU (the CUDA driver libcuda.so.1 is not installed)"
    rc = cuda.cuInit(0)
    if rc != 0:
        return 0, f"no CUDA GPU (cuInit failed with CUDA driver error {rc})"
    count = ctypes.c_int(0)
    rc = cuda.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0 or count.value == 0:
        return 0, "no CUDA GPU (the CUDA driver reports no device)"
    return count.value, ""


def _trt_candidates() -> list[pathlib.Path]:
    from .. import native

    try:
        ops = native.library_path()
    except QexportError:
        ops = None
    candidates = [ops.parent / TRT_LIBRARY_NAME] if ops else []
    import qexport

    candidates += [pathlib.Path(p) / "lib" / TRT_LIBRARY_NAME for p in qexport.__path__]
    return candidates


def trt_library_path() -> pathlib.Path:
    """Path of libqexport_trt.so: $QEXPORT_TRT_LIBRARY, else beside libqexport_ops.so."""
    from .. import native

    return native.find_library(
        ENV_TRT_LIBRARY, _trt_candidates,
        f"the qexport TensorRT plugin library {TRT_LIBRARY_NAME} is not built", _BUILD_HINT)


def engine_prerequisites() -> str | None:
    """None when a TensorRT engine build can be attempted here, else the one-line reason."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        return f"TensorRT Python package is not installed ({e})"
    except Exception as e:  # the bindings wheel alone raises on import without the runtime
        return f"TensorRT Python package does not load ({type(e).__name__}: {e})"
    count, reason = _cuda_gpu_count()
    if count == 0:
        return reason
    try:
        trt_library_path()
    except QexportError as e:
        return str(e)
    return None


def _with_plugin_namespace(onnx_path: pathlib.Path) -> bytes:
    """model.onnx as bytes, each qexport-domain node given plugin_namespace="qexport"."""
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    for node in model.graph.node:
        if node.domain == C.DOMAIN and not any(a.name == "plugin_namespace" for a in node.attribute):
            node.attribute.append(helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE))
    return model.SerializeToString()


def check_parsable(onnx_path: pathlib.Path) -> None:
    """QexportError unless `onnx_path` is a file free of ONNX Runtime contrib ops (the fused
    attention's GroupQueryAttention, the fused norms' SkipSimplifiedLayerNormalization), which
    TensorRT's parser does not know."""
    import onnx
    if not onnx_path.is_file():
        raise QexportError(f"{onnx_path} is not a file")
    contrib = sorted({n.op_type for n in onnx.load(onnx_path, load_external_data=False).graph.node
                      if n.domain == "com.microsoft"})
    if contrib:
        raise QexportError(f"cannot build a TensorRT engine: {onnx_path} has ONNX Runtime "
                           f"contrib ops ({', '.join(contrib)}), which TensorRT cannot parse; "
                           "export with --no-fused-attention (or --target trt)")


def build_engine(onnx_path: str | os.PathLike, plugin_lib: str | os.PathLike | None,
                 engine_path: str | os.PathLike, fp16: bool = True,
                 workspace_bytes: int = 1 << 30) -> pathlib.Path:
    """Parse `onnx_path` with TensorRT (qexport plugins from `plugin_lib`, default
    trt_library_path()) and write the serialized engine to `engine_path`; returns its path.

    Dynamic input dims get one optimization profile: min 1, opt and max from the dim's value
    in the model when fixed, else 1 (min), 8 (opt), 64 (max) for the first dim and 128/512 for
    later ones. QexportError (one line) on anything missing or failing."""
    reason = engine_prerequisites() if plugin_lib is None else None
    if reason:
        raise QexportError(f"cannot build a TensorRT engine: {reason}")
    try:
        import tensorrt as trt
    except Exception as e:
        raise QexportError(f"cannot build a TensorRT engine: TensorRT Python package is not "
                           f"installed ({type(e).__name__}: {e})") from None
    count, why = _cuda_gpu_count()
    if count == 0:
        raise QexportError(f"cannot build a TensorRT engine: {why}")
    onnx_path = pathlib.Path(onnx_path)
    check_parsable(onnx_path)
    lib = pathlib.Path(plugin_lib) if plugin_lib is not None else trt_library_path()
    if not lib.is_file():
        raise QexportError(f"plugin library {lib} is not a file; {_BUILD_HINT}")

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    registry = builder.get_plugin_registry()
    handle = registry.load_library(str(lib))
    if handle is None:
        raise QexportError(f"TensorRT could not load the plugin library {lib}")
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    data = _with_plugin_namespace(onnx_path)
    if not parser.parse(data, str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise QexportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    needs_profile = False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if all(d >= 0 for d in shape):
            continue
        needs_profile = True
        lo = [d if d >= 0 else 1 for d in shape]
        opt = [d if d >= 0 else (8 if j == 0 else 128) for j, d in enumerate(shape)]
        hi = [d if d >= 0 else (64 if j == 0 else 512) for j, d in enumerate(shape)]
        profile.set_shape(tensor.name, lo, opt, hi)
    if needs_profile:
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise QexportError(f"TensorRT failed to build an engine from {onnx_path} "
                           "(see the TensorRT log above)")
    engine_path = pathlib.Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    return engine_path


def _device_buffers():
    """(to_device(np array) -> tensor, empty(shape, torch dtype) -> tensor, stream handle,
    synchronize()): the CUDA buffers run_engine uses, from torch (one place, so that host
    tests can stand in for the GPU)."""
    import torch

    return (lambda a: torch.from_numpy(a).cuda(),
            lambda shape, dtype: torch.empty(shape, dtype=dtype, device="cuda"),
            torch.cuda.current_stream().cuda_stream, torch.cuda.synchronize)


def run_engine(engine_path: str | os.PathLike, plugin_lib: str | os.PathLike | None,
               feeds: dict) -> list:
    """Run a serialized engine once on numpy `feeds` (name -> array); returns the outputs as
    numpy arrays in the engine's I/O order. Buffers live in torch CUDA tensors."""
    import numpy as np
    import tensorrt as trt
    import torch

    lib = pathlib.Path(plugin_lib) if plugin_lib is not None else trt_library_path()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    runtime.get_plugin_registry().load_library(str(lib))
    engine = runtime.deserialize_cuda_engine(pathlib.Path(engine_path).read_bytes())
    if engine is None:
        raise QexportError(f"TensorRT could not deserialize {engine_path}")
    to_device, empty, stream, synchronize = _device_buffers()
    ctx = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    missing = [n for n in inputs if n not in feeds]
    if missing:
        raise QexportError(f"the engine {engine_path} takes input(s) {', '.join(missing)}, "
                           f"which were not given (given: {', '.join(feeds) or 'none'})")
    keep, outputs = [], []
    for name in inputs:
        t = to_device(np.ascontiguousarray(feeds[name]))
        ctx.set_input_shape(name, tuple(t.shape))
        ctx.set_tensor_address(name, t.data_ptr())
        keep.append(t)
    for name in names:
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            dtype = torch.from_numpy(np.zeros(0, trt.nptype(engine.get_tensor_dtype(name)))).dtype
            t = empty(tuple(ctx.get_tensor_shape(name)), dtype)
            ctx.set_tensor_address(name, t.data_ptr())
            outputs.append(t)
    if not ctx.execute_async_v3(stream):
        raise QexportError(f"TensorRT failed to run {engine_path}")
    synchronize()
    return [t.cpu().numpy() for t in outputs]


def build_and_check(onnx_path: pathlib.Path, engine_path: pathlib.Path, fp16: bool = True
                    ) -> dict:
    """Build an engine beside an export and compare it with the export's reference.npz
    (PyTorch quantized logits); returns the comparison (qexport.check.compare)."""
    import numpy as np

    from ..check import compare
    build_engine(onnx_path, None, engine_path, fp16=fp16)
    ref_file = onnx_path.with_name("reference.npz")
    if not ref_file.exists():
        return {}
    ref = np.load(ref_file)
    got = run_engine(engine_path, None, {"input_ids": ref["input_ids"]})[0]
    return compare(got.astype(np.float32), ref["logits"], top1=True)


def engine_for(onnx_path: pathlib.Path, engine: pathlib.Path | None = None, fp16: bool = True,
               progress=None, unavailable: str = "cannot build a TensorRT engine") -> Finish:
    """Build `engine` (default: model.engine beside the model) from an export and check it
    against the export's reference.npz: `qexport build-engine` and the trt target's step.
    QexportError for a file that is missing or TensorRT cannot parse; a Finish otherwise
    ("unavailable" with `unavailable`: the reason, when TensorRT or a GPU is missing)."""
    say = progress or (lambda msg: None)
    if not onnx_path.is_file():
        raise QexportError(f"no such file: {onnx_path}")
    check_parsable(onnx_path)
    reason = engine_prerequisites()
    if reason:
        return Finish("unavailable", f"{unavailable}: {reason}")
    engine = engine or onnx_path.with_suffix(".engine")
    metrics = build_and_check(onnx_path, engine, fp16=fp16)
    say(f"wrote {engine}")
    if not metrics:
        return Finish("done", f"wrote {engine} (no reference.npz to check it against)")
    from ..check import parity_ok
    summary = (f"TensorRT vs PyTorch reference: cosine {metrics['cosine']:.6f}, "
               f"top-1 {metrics['top1_agreement']:.4f}")
    if not parity_ok(metrics):
        return Finish("parity_failed", f"TensorRT parity check failed ({summary})", metrics)
    return Finish("done", summary, metrics)


def finish(out: pathlib.Path, progress) -> Finish:
    """After out/ is written: out/model.engine, checked against reference.npz."""
    return engine_for(out / "model.onnx", progress=progress,
                      unavailable=f"no TensorRT engine built (the ONNX and ONNX Runtime outputs "
                                  f"in {out}/ are complete)")


TARGET = register(Target(
    "trt", "ONNX + op library, then a TensorRT engine (needs TensorRT and a GPU; attention "
    "exported as standard ops, which TensorRT's parser reads)",
    contrib_ops=False, finish=finish))
