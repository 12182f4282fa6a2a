"""Store embedding tables in fp16 and widen the gathered rows back to the model's dtype.

Halves the largest fp tensor of a small LM (SmolLM2-135M: 113 MB -> 57 MB). It is done on
the graph, so the PyTorch reference and the ONNX export (Gather on fp16 + Cast) compute the
same thing; the rounding is part of what the report's quantization error measures.
"""
from __future__ import annotations

import torch
import torch.fx

from qexport import graph as G
from .manager import PassResult

_EMBEDDING = torch.ops.aten.embedding.default


def embeddings_fp16(gm: torch.fx.GraphModule, min_elements: int = 1024) -> PassResult:
    notes, modified = [], False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != _EMBEDDING or not G.is_param(node.args[0]):
            continue
        table_node = node.args[0]
        table = G.get_tensor(gm, table_node)
        if table.dtype != torch.float32 or table.numel() < min_elements:
            continue
        half = G.new_attr(gm, f"qexport_fp16_{table_node.target}", table.detach().half(), node)
        node.args = (half, *node.args[1:])
        with gm.graph.inserting_after(node):
            widened = gm.graph.call_function(torch.ops.aten._to_copy.default, (node,),
                                             {"dtype": torch.float32})
        node.replace_all_uses_with(widened, delete_user_cb=lambda user: user is not widened)
        notes.append(f"{table_node.target}: {tuple(table.shape)} stored as fp16")
        modified = True
    return PassResult(gm, modified, notes)
