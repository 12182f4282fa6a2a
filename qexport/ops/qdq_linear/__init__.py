"""qexport::QDQLinear: a Linear with static per-tensor activation quantization and int8
per-channel weights (w8a8, w6a6), lowered to standard QDQ ops at export (contract.py), so its
exports run on any ONNX Runtime (and TensorRT) without the op library.

contract.py · packing.py (`QDQWeights`, `quantize_qdq`) · op.py (reference, torch op, schema,
translation, lowering to QDQ and back).
"""
from __future__ import annotations

from . import contract
from .op import (fake_quant, lower, op_run_class, qdq_linear, qdq_linear_reference, raise_node,
                 register_onnx_schema, translate)
from .packing import QDQWeights, quantize_qdq
from ...contract import DOMAIN
from .. import OpSpec, register

SPEC = register(OpSpec(
    name=contract.OP_NAME, domain=DOMAIN, torch_name="qdq_linear",
    input_names=contract.INPUT_NAMES, attributes=contract.ATTRIBUTES,
    register_schema=register_onnx_schema, translate=translate, op_run=op_run_class,
    reference=qdq_linear_reference, weights=QDQWeights, library=False,
    lower=lower, raise_node=raise_node))

__all__ = ["SPEC", "contract", "QDQWeights", "fake_quant", "qdq_linear",
           "qdq_linear_reference", "quantize_qdq"]
