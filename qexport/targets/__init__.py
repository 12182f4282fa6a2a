"""Backend targets: what an export is made for, one row each.

Every target gets the same out/ folder core (model.onnx with qexport-domain nodes, report,
reference); a target adds what its runtime needs: the files it copies in (the ONNX Runtime
op library), its default for the attention swap (ONNX Runtime's contrib ops or standard
ops), and a step after the folder is written (a TensorRT engine build). `get(name)` is the
one lookup; the CLI's --target choices are `names()`. docs/extending.md lists what adding a
target touches.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Callable

from ..errors import QexportError
from ..registry import Registry


@dataclasses.dataclass(frozen=True)
class Finish:
    """The outcome of a target's step after out/ is written."""
    status: str  # "done" | "unavailable" (prerequisites missing) | "parity_failed"
    message: str
    metrics: dict = dataclasses.field(default_factory=dict)


def copy_op_library(out: Path) -> list[Path]:
    """libqexport_ops.so into out/, so the folder deploys on its own; nothing when the export
    is made of ONNX Runtime's own ops only."""
    import onnx

    from .. import native, ops

    models = [p for p in (out / "model.onnx", out / "model_with_past.onnx") if p.is_file()]
    if not any(ops.needs_library(onnx.load(str(p), load_external_data=False)) for p in models):
        return []
    lib = native.library_path()
    shutil.copy2(lib, out / lib.name)
    return [out / lib.name]


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    help: str
    # whether the runtime runs ONNX Runtime's contrib ops (the fused attention's
    # GroupQueryAttention): the default of QuantizeConfig.fused_attention, and without them
    # neither fused attention nor the KV-cache decoder (which needs it) is allowed
    contrib_ops: bool = True
    runtime_files: Callable[[Path], list[Path]] = copy_op_library  # out -> files written
    # only ops the runtime has built in (QuantizeConfig.standard_ops): no op library
    standard_ops: bool = False
    # (out, progress) -> Finish, after out/ is committed; None: nothing more to do
    finish: Callable[[Path, Callable[[str], None]], Finish] | None = None


# The target modules, imported (and so registered) on first use; one line per module.
_REGISTRY: Registry[Target] = Registry(__name__, ("ort", "ort_std", "trt"), "target")


def register(target: Target) -> Target:
    return _REGISTRY.add(target.name, target)


def names() -> list[str]:
    return _REGISTRY.keys()


def get(name: str) -> Target:
    target = _REGISTRY.get(name)
    if target is None:
        raise QexportError(f"unknown target {name!r}; choose from {', '.join(names())}")
    return target
