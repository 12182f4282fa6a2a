"""Tracing to torch.fx and export of the rewritten graph to ONNX (qexport domain)."""
from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import logging
import warnings
from pathlib import Path

import torch

from . import contract as C
from . import ops
from .graph import layers_of

# Above this many initializer bytes, weights go to an external data file `<model>.data`
# (save_external_aligned): ONNX Runtime then maps that file instead of copying the weights out
# of the protobuf, which keeps the peak RSS of a session near the weights' own size
# (docs/performance.md). Small models (tests) stay in one file.
EXTERNAL_DATA_THRESHOLD = 16 << 20
# Offsets in the external data file are multiples of this (a page): each tensor starts on its
# own page, so pages a kernel no longer needs can be given back without touching a neighbour.
EXTERNAL_DATA_ALIGN = 4096
# Tensors below this many bytes stay inside the protobuf.
EXTERNAL_DATA_MIN_BYTES = 1024


def dynamic_shapes_for(example_inputs: tuple, module: torch.nn.Module | None = None) -> tuple:
    """Every dim of every tensor input may vary (torch.export keeps the ones that can). With
    `module`, inputs bound to a `*args` parameter of its forward are grouped as torch.export
    sees them (e.g. families.attention.WithPast's past tensors)."""
    import inspect

    auto = torch.export.Dim.AUTO
    specs = tuple({d: auto for d in range(t.dim())} if isinstance(t, torch.Tensor) else None
                  for t in example_inputs)
    if module is not None and not isinstance(module, torch.fx.GraphModule):
        kinds = [p.kind for p in inspect.signature(module.forward).parameters.values()]
        if inspect.Parameter.VAR_POSITIONAL in kinds:
            fixed = kinds.index(inspect.Parameter.VAR_POSITIONAL)
            return specs[:fixed] + (specs[fixed:],)
    return specs


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


def trace(module: torch.nn.Module, example_inputs: tuple,
          swap=None) -> torch.fx.GraphModule:
    """torch.export the module and return the unlifted GraphModule (weights as get_attr).
    swap: module -> a context manager within which the module is traced, e.g. a family's
    attention swap (qexport/families/: supported attention blocks become one
    qexport::group_query_attention node each, exported as ONNX Runtime's
    GroupQueryAttention)."""
    if isinstance(module, torch.fx.GraphModule) and getattr(module, "_qexport_traced", False):
        return module
    with _quiet(), torch.no_grad(), \
            (swap(module) if swap is not None else contextlib.nullcontext()):
        ep = torch.export.export(module, example_inputs,
                                 dynamic_shapes=dynamic_shapes_for(example_inputs, module))
    gm = ep.module()
    gm._qexport_traced = True
    return gm


def export_onnx(gm: torch.fx.GraphModule, example_inputs: tuple, path: Path,
                metadata: dict[str, str], input_names: list[str] | None = None,
                output_names: list[str] | None = None,
                share_data_with: str | Path | None = None,
                dynamic_shapes: tuple | None = None,
                dim_names: dict[str, list[str | None]] | None = None) -> list[Path]:
    """Write `gm` to `path` as ONNX with qexport nodes; returns the files written.
    Each qexport node is named after its layer (e.g. model.model.layers.0.mlp.up_proj).
    share_data_with: another model in the same folder whose external data holds tensors of
    this one (same bytes): those are referenced there instead of written again.
    dynamic_shapes: torch.export's, per input [default: every dim may vary].
    dim_names: per input name, a name for each of its dynamic dims (None: keep), in place of
    torch.export's symbols (s0, s1, ...) throughout the graph."""
    import onnx

    ops.register_onnx_schemas()
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(
            gm, example_inputs, dynamo=True, verbose=False,
            dynamic_shapes=dynamic_shapes or dynamic_shapes_for(example_inputs),
            custom_translation_table=ops.onnx_translation_table(),
            input_names=input_names, output_names=output_names, optimize=True)
    model = program.model_proto
    _name_layer_nodes(model, gm)
    ops.lower_model(model)  # ops that exist only until export (QDQLinear -> QDQ)
    if dim_names:
        _name_dims(model, dim_names)
    _divide_by_sqrt(model)
    model.ir_version = min(model.ir_version, 10)  # onnxruntime >= 1.29 reads IR <= 10 safely
    model.producer_name = "qexport"
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    nbytes = sum(len(t.raw_data) for t in model.graph.initializer)
    files = [path]
    if nbytes > EXTERNAL_DATA_THRESHOLD:
        data = save_external_aligned(model, path, share_data_with=share_data_with)
        files += [data] if data is not None else []
        onnx.checker.check_model(str(path), full_check=True)
    else:
        onnx.checker.check_model(model, full_check=True)
        onnx.save_model(model, path)
    return files


def _name_dims(model, dim_names: dict[str, list[str | None]]) -> None:
    """Rename the symbolic dims of the named graph inputs, and the same symbols wherever else
    they appear (outputs, value_info, expressions such as "Max(s53, s91)")."""
    import re

    rename = {}
    for value in model.graph.input:
        for dim, name in zip(value.type.tensor_type.shape.dim, dim_names.get(value.name, [])):
            if name and dim.dim_param:
                rename[dim.dim_param] = name
    if not rename:
        return
    symbol = re.compile(r"\b(" + "|".join(map(re.escape, rename)) + r")\b")
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = symbol.sub(lambda m: rename[m[1]], dim.dim_param)


def save_external_aligned(model, path: Path, align: int = EXTERNAL_DATA_ALIGN,
                          min_bytes: int = EXTERNAL_DATA_MIN_BYTES,
                          share_data_with: str | Path | None = None) -> Path | None:
    """Save `model` (an onnx.ModelProto; modified: its large initializers become external) to
    `path`, with the raw data of every initializer of at least `min_bytes` in one file
    `<path>.data` at offsets that are multiples of `align`. Returns the data file's path
    (None when every such tensor is in `share_data_with`'s external data, a model in the same
    folder, and referenced there). Loading is plain ONNX external data (onnx.load,
    onnxruntime from a path)."""
    import onnx
    from onnx import external_data_helper as ext

    path = Path(path)
    known = _external_tensors(Path(share_data_with)) if share_data_with else {}
    data_path = path.with_name(path.name + ".data")
    data_path.write_bytes(b"")
    offset = 0
    for tensor in model.graph.initializer:
        if not tensor.HasField("raw_data") or len(tensor.raw_data) < min_bytes:
            continue
        there = known.get(hashlib.sha1(tensor.raw_data).digest())
        if there is not None:
            ext.set_external_data(tensor, *there)
        else:
            offset = (offset + align - 1) // align * align
            ext.set_external_data(tensor, data_path.name, offset)
            ext.save_external_data(tensor, str(path.parent))  # pads to `offset`, then writes
            offset += len(tensor.raw_data)
        tensor.ClearField("raw_data")
    onnx.save_model(model, path)
    if offset == 0:
        data_path.unlink()
        return None
    return data_path


def _external_tensors(model_path: Path) -> dict[bytes, tuple[str, int, int]]:
    """sha1 of the bytes -> (location, offset, length) of each external initializer of the
    ONNX file `model_path` (locations relative to its folder)."""
    import onnx

    found = {}
    for tensor in onnx.load(model_path, load_external_data=False).graph.initializer:
        info = {e.key: e.value for e in tensor.external_data}
        if "location" not in info:
            continue
        offset, length = int(info.get("offset", 0)), int(info["length"])
        with open(model_path.parent / info["location"], "rb") as f:
            f.seek(offset)
            found[hashlib.sha1(f.read(length)).digest()] = (info["location"], offset, length)
    return found


def _divide_by_sqrt(model) -> int:
    """Rewrite x * Reciprocal(Sqrt(v)) (torch.rsqrt as exported) as x / Sqrt(v), the form of
    RMSNorm that ONNX Runtime's SimplifiedLayerNormalization fusion recognises: one node per
    norm instead of seven, which matters at decoding (~1,300 nodes per SmolLM2 token). Same
    math, rounding aside. Returns the number of rewrites."""
    from onnx import helper

    graph = model.graph
    producer = {out: n for n in graph.node for out in n.output}
    consumers = collections.defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    graph_outputs = {o.name for o in graph.output}
    dropped, replaced = set(), {}
    for n in graph.node:
        if n.op_type != "Reciprocal" or n.output[0] in graph_outputs:
            continue
        users, src = consumers[n.output[0]], producer.get(n.input[0])
        if src is None or src.op_type != "Sqrt" or len(users) != 1 or users[0].op_type != "Mul":
            continue
        mul = users[0]
        x = mul.input[1] if mul.input[0] == n.output[0] else mul.input[0]
        if x == n.output[0]:  # r * r
            continue
        replaced[id(mul)] = helper.make_node("Div", [x, n.input[0]], list(mul.output),
                                             name=mul.name)
        dropped.add(id(n))
    nodes = [replaced.get(id(n), n) for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    return len(dropped)


def _name_layer_nodes(model, gm: torch.fx.GraphModule) -> None:
    """Name each qexport node after its layer. Its weight initializers are named after the layer
    (replace_linear), but the exporter merges identical ones (e.g. empty or all-zero tensors),
    so each node takes the layer most of its unshared inputs point to, once. A node stacking several
    layers (fuse_shared_input) is named 'a.q_proj+k_proj' and lists them with their rows in
    its metadata (C.META_NODE_LAYERS)."""
    layer_of, stacked = {}, {}
    for n in gm.graph.nodes:
        if ops.spec_of_node(n) is not None:
            if len(layers_of(n)) > 1:
                stacked[n.meta["qexport_layer"]] = layers_of(n)
            for arg in n.args[1:]:
                if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
                    layer_of[str(arg.target)] = n.meta["qexport_layer"]
    ours = [node for node in model.graph.node if ops.spec_of_onnx_node(node) is not None]
    # A merged initializer (e.g. the empty binary part of every all-4-bit layer) carries one
    # layer's name but is read by several nodes: only the inputs one node reads may vote.
    readers = collections.Counter(i for node in ours for i in set(node.input[1:]))
    taken = set()
    for node in ours:
        own = [i for i in node.input[1:] if i in layer_of and readers[i] == 1]
        votes = collections.Counter(layer_of[i] for i in own or
                                    [i for i in node.input[1:] if i in layer_of])
        for layer, _ in votes.most_common():
            if layer not in taken:
                node.name = layer
                taken.add(layer)
                if layer in stacked:
                    node.metadata_props.add(key=C.META_NODE_LAYERS,
                                            value=json.dumps(stacked[layer]))
                break


def metadata(scheme_label: str, config: dict) -> dict[str, str]:
    from . import __version__
    return {C.META_VERSION: __version__, C.META_SCHEME: scheme_label,
            C.META_CONFIG: json.dumps(config, sort_keys=True),
            C.META_CONTRACT: str(C.CONTRACT_VERSION)}
