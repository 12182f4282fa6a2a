"""Locating and loading the compiled op library, libqexport_ops.so.

The library holds the ONNX Runtime kernels of the qexport ops (plugins/). Nothing here runs at
import time: the library is found and loaded only when a function is called, and onnxruntime
is imported lazily.

Search order of `library_path()`:
1. the environment variable ``QEXPORT_OPS_LIBRARY`` (a path to the .so);
2. ``qexport/lib/libqexport_ops.so`` inside the imported package (a wheel install, or the
   install tree of a scikit-build-core editable install, which is one of ``qexport.__path__``);
3. the same file of the installed ``qexport`` distribution (when a source checkout on
   ``sys.path`` shadows the installed package, e.g. running tests from the repository root).
"""
from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterable, Sequence

from . import contract
from .errors import QexportError

ENV_LIBRARY = "QEXPORT_OPS_LIBRARY"
LIBRARY_NAME = "libqexport_ops.so"
_BUILD_HINT = ("build it with `pip install .` (or `pip install -e . --no-build-isolation`) "
               f"from the qexport source tree, or point {ENV_LIBRARY} at a built {LIBRARY_NAME}")


def _candidates() -> list[pathlib.Path]:
    import qexport

    found: list[pathlib.Path] = []
    for entry in getattr(qexport, "__path__", []):
        found.append(pathlib.Path(entry) / "lib" / LIBRARY_NAME)
    try:
        from importlib import metadata

        dist = metadata.distribution("qexport")
        found.append(pathlib.Path(str(dist.locate_file(f"qexport/lib/{LIBRARY_NAME}"))))
    except Exception:  # not installed, or a metadata backend without locate_file
        pass
    return found


def find_library(env_var: str, candidates: Callable[[], Iterable[pathlib.Path]],
                 missing: str, hint: str) -> pathlib.Path:
    """The file $env_var names, else the first of `candidates()` that is a file (resolved).

    QexportError (one line) when $env_var is set but not a file, or when no candidate is:
    `missing` says what is not built, `hint` how to build it. `candidates` is called only when
    $env_var is unset."""
    env = os.environ.get(env_var)
    if env:
        path = pathlib.Path(env).expanduser()
        if not path.is_file():
            raise QexportError(f"{env_var}={env} is not a file; unset it or {hint}")
        return path.resolve()
    for path in candidates():
        if path.is_file():
            return path.resolve()
    raise QexportError(f"{missing}; {hint}")


def library_path() -> pathlib.Path:
    """Path of libqexport_ops.so; QexportError (one line, how to build) if there is none."""
    return find_library(ENV_LIBRARY, _candidates,
                        f"the qexport op library {LIBRARY_NAME} is not built", _BUILD_HINT)


def library_version(path: str | os.PathLike | None = None) -> int:
    """The contract version compiled into the library (its `qexport_contract_version()`)."""
    import ctypes

    path = pathlib.Path(path) if path is not None else library_path()
    try:
        lib = ctypes.CDLL(str(path))
        fn = lib.qexport_contract_version
    except (OSError, AttributeError) as e:
        raise QexportError(f"cannot load the qexport op library {path}: {e}") from None
    fn.restype = ctypes.c_int
    fn.argtypes = []
    return int(fn())


def check_contract(path: str | os.PathLike | None = None) -> pathlib.Path:
    """Load the library and check it speaks this package's contract version; returns its path."""
    path = pathlib.Path(path) if path is not None else library_path()
    version = library_version(path)
    if version != contract.CONTRACT_VERSION:
        raise QexportError(
            f"{path} implements qexport contract version {version} but this qexport package "
            f"expects {contract.CONTRACT_VERSION}; rebuild the library from the same source tree")
    return path


def session_options(path: str | os.PathLike | None = None):
    """onnxruntime.SessionOptions with the qexport ops registered (library checked first)."""
    import onnxruntime as ort

    lib = check_contract(path)
    options = ort.SessionOptions()
    try:
        options.register_custom_ops_library(str(lib))
    except Exception as e:  # onnxruntime raises its own exception types
        raise QexportError(f"onnxruntime could not register {lib}: {e}") from None
    return options


def make_session(model_path: str | os.PathLike,
                 providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int | None = None,
                 library: str | os.PathLike | None = None):
    """An onnxruntime.InferenceSession of `model_path` (a path, or the model's bytes) with
    the qexport op library registered when the model has a node only it runs; a model of
    ONNX Runtime's own ops (standard QDQ, MatMulNBits) gets a plain session, so every check of
    it shows that it runs without the library."""
    import onnxruntime as ort

    from . import ops

    proto = _header(model_path)
    options = session_options(library) if proto is None or ops.needs_library(proto) \
        else ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(model_path), sess_options=options, providers=list(providers))


def _header(model):
    """The onnx ModelProto of a path or bytes, without external data; None if unreadable (ONNX
    Runtime then reports the file's problem)."""
    import onnx

    try:
        return onnx.load_from_string(model) if isinstance(model, bytes) else \
            onnx.load(str(model), load_external_data=False)
    except Exception:  # noqa: BLE001
        return None
