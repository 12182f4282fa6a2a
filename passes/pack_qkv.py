"""Feed a stacked q/k/v projection to the fused attention whole, without its split.

After fuse_shared_input, q_proj+k_proj+v_proj is one op whose output a split cuts into q, k
and v for GroupQueryAttention. That op also takes the three side by side in its query input
(k and v empty: ONNX Runtime's packed QKV, which its GroupQueryAttention input checks
accept; run here on the CPU provider only, docs/gpu.md), so the split goes: one node fewer
per layer at every decoded token, the same numbers (the attention reads the same values). The pass rewrites only the exact pattern: a split along the last axis into
[num_heads*D, kv_num_heads*D, kv_num_heads*D] whose three parts are the attention's q, k, v
and nothing else's.
"""
from __future__ import annotations

import operator

import torch
import torch.fx

from qexport import ops

from .manager import PassResult

_SPLIT = torch.ops.aten.split_with_sizes.default


def pack_qkv(gm: torch.fx.GraphModule) -> PassResult:
    """Point each GroupQueryAttention whose q, k, v are the three parts of one split at the
    split's input (packed QKV), dropping the split."""
    spec = ops.get("GroupQueryAttention")
    packed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != spec.torch_op:
            continue
        split = _split_of(spec, node)
        if split is None:
            continue
        args = list(node.args)
        args[0], args[1], args[2] = split.args[0], None, None
        node.args = tuple(args)
        for part in list(split.users):
            gm.graph.erase_node(part)
        gm.graph.erase_node(split)
        packed += 1
    notes = [f"packed q/k/v into {packed} attention op{'s' if packed > 1 else ''}"] if packed \
        else []
    return PassResult(gm, packed > 0, notes)


def _split_of(spec: ops.OpSpec, node: torch.fx.Node) -> torch.fx.Node | None:
    """The split whose parts 0, 1, 2 are exactly `node`'s q, k, v (and used by it alone),
    with the sizes packed QKV has, or None."""
    q, k, v = node.args[:3]
    parts = (q, k, v)
    if not all(isinstance(p, torch.fx.Node) and p.op == "call_function"
               and p.target == operator.getitem for p in parts):
        return None
    split = q.args[0]
    if not (isinstance(split, torch.fx.Node) and split.target == _SPLIT
            and all(p.args[0] is split for p in parts)
            and [p.args[1] for p in parts] == [0, 1, 2]):
        return None
    sizes = list(split.args[1])
    dim = split.args[2] if len(split.args) > 2 else 0
    first = len(spec.input_names)  # the attributes follow the tensor arguments
    num_heads, kv_heads = (node.args[first + spec.attributes.index(a)]
                           for a in ("num_heads", "kv_num_heads"))
    val = split.args[0].meta.get("val")  # absent on a node a pass made (fuse_shared_input)
    if len(sizes) != 3 or not (dim == -1 or (val is not None and dim == val.dim() - 1)):
        return None
    d = sizes[1] // kv_heads if kv_heads else 0
    if d == 0 or sizes != [num_heads * d, kv_heads * d, kv_heads * d]:
        return None
    if len(split.users) != 3 or any(set(p.users) != {node} for p in parts):
        return None
    return split
