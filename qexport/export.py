"""Tracing to torch.fx and export of the rewritten graph to ONNX (qexport domain)."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import torch

from . import contract as C
from . import ops

# Above this many initializer bytes, weights go to an external data file (protobuf caps at 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 30


def dynamic_shapes_for(example_inputs: tuple) -> tuple:
    """Every dim of every tensor input may vary (torch.export keeps the ones that can)."""
    auto = torch.export.Dim.AUTO
    return tuple({d: auto for d in range(t.dim())} if isinstance(t, torch.Tensor) else None
                 for t in example_inputs)


@contextlib.contextmanager
def _quiet():
    """torch.export / torch.onnx print progress and warnings meant for their developers."""
    level = logging.getLogger("torch").level
    logging.getLogger("torch").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logging.getLogger("torch").setLevel(level)


def trace(module: torch.nn.Module, example_inputs: tuple) -> torch.fx.GraphModule:
    """torch.export the module and return the unlifted GraphModule (weights as get_attr)."""
    if isinstance(module, torch.fx.GraphModule) and getattr(module, "_qexport_traced", False):
        return module
    with _quiet(), torch.no_grad():
        ep = torch.export.export(module, example_inputs,
                                 dynamic_shapes=dynamic_shapes_for(example_inputs))
    gm = ep.module()
    gm._qexport_traced = True
    return gm


def export_onnx(gm: torch.fx.GraphModule, example_inputs: tuple, path: Path,
                metadata: dict[str, str], input_names: list[str] | None = None,
                output_names: list[str] | None = None) -> list[Path]:
    """Write `gm` to `path` as ONNX with qexport nodes; returns the files written.
    Each qexport node is named after its layer (e.g. model.model.layers.0.mlp.up_proj)."""
    import onnx

    ops.register_onnx_schema()
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(
            gm, example_inputs, dynamo=True, verbose=False,
            dynamic_shapes=dynamic_shapes_for(example_inputs),
            custom_translation_table=ops.onnx_translation_table(),
            input_names=input_names, output_names=output_names, optimize=True)
    model = program.model_proto
    layer_of = {str(n.args[1].target): n.meta["qexport_layer"] for n in gm.graph.nodes
                if n.op == "call_function" and "qexport_layer" in n.meta}
    for node in model.graph.node:
        if node.domain == C.DOMAIN and len(node.input) > 1 and node.input[1] in layer_of:
            node.name = layer_of[node.input[1]]
    model.ir_version = min(model.ir_version, 10)  # onnxruntime >= 1.29 reads IR <= 10 safely
    model.producer_name = "qexport"
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    nbytes = sum(len(t.raw_data) for t in model.graph.initializer)
    files = [path]
    if nbytes > EXTERNAL_DATA_THRESHOLD:
        data_name = path.name + ".data"
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        files.append(path.with_name(data_name))
        onnx.checker.check_model(str(path), full_check=True)
    else:
        onnx.checker.check_model(model, full_check=True)
        onnx.save_model(model, path)
    return files


def metadata(scheme_label: str, config: dict) -> dict[str, str]:
    from . import __version__
    return {C.META_VERSION: __version__, C.META_SCHEME: scheme_label,
            C.META_CONFIG: json.dumps(config, sort_keys=True),
            C.META_CONTRACT: str(C.CONTRACT_VERSION)}
