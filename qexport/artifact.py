"""Reading an export back: the packed weights of every qexport node, by layer name."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import contract as C
from . import ops
from .errors import QexportError


def read_export(onnx_path: str | Path) -> tuple[dict, dict[str, str], dict[str, torch.Tensor]]:
    """(layer name -> packed weights (of the op registry's classes), metadata_props, OS+-folded
    tensors: original tensor name -> value, {} without OS+) of a qexport model.onnx."""
    import onnx
    from onnx import numpy_helper

    path = Path(onnx_path)
    if not path.is_file():
        raise QexportError(f"no such file: {path}")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure is the user's file
        raise QexportError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    meta = {p.key: p.value for p in model.metadata_props}
    if C.META_CONTRACT not in meta:
        raise QexportError(f"{path} was not written by qexport (no {C.META_CONTRACT} metadata)")
    if meta[C.META_CONTRACT] != str(C.CONTRACT_VERSION):
        raise QexportError(f"{path} uses op contract {meta[C.META_CONTRACT]}, this qexport reads "
                           f"{C.CONTRACT_VERSION}")
    inits = {t.name: t for t in model.graph.initializer}
    packed = {}
    for node in map(ops.raised, model.graph.node):
        spec = ops.spec_of_onnx_node(node)
        if spec is None:
            continue
        tensors = [torch.from_numpy(numpy_helper.to_array(inits[name]).copy())
                   if name else None for name in node.input[1:]]
        attrs = {a.name: a.i for a in node.attribute}
        try:
            w = spec.weights.from_inputs(tensors, attrs)
            w.validate()
        except (KeyError, ValueError, TypeError) as e:
            raise QexportError(f"{path}: node {node.name} ({spec.name}) is damaged: "
                               f"{type(e).__name__}: {e}") from e
        node_meta = {p.key: p.value for p in node.metadata_props}
        if C.META_NODE_LAYERS not in node_meta:
            packed[node.name] = w
            continue
        start = 0  # a stacked node (passes.fuse_shared_input): one entry per layer
        for layer, rows in json.loads(node_meta[C.META_NODE_LAYERS]):
            packed[layer] = w.rows(start, start + rows)
            start += rows
        if start != w.out_features:
            raise QexportError(f"{path}: node {node.name} stacks {start} rows in its "
                               f"{C.META_NODE_LAYERS} metadata but has {w.out_features}")
    names = json.loads(meta.get(C.META_OS_FOLDED, "{}"))
    missing = [i for i in names.values() if i not in inits]
    if missing:
        raise QexportError(f"{path}: OS+ metadata names initializers it lacks: {missing[0]}")
    folded = {k: torch.from_numpy(numpy_helper.to_array(inits[i]).copy())
              for k, i in names.items()}
    return packed, meta, folded


def export_config(meta: dict[str, str]) -> dict:
    return json.loads(meta.get(C.META_CONFIG, "{}"))

