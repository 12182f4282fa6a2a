"""com.microsoft::MatMulNBits: ONNX Runtime's own 2/4-bit block-quantized MatMul, written for
w4a16 on the library-free target and for w2a16 (docs/format.md). No op library runs it.

contract.py (inputs, attributes) · packing.py (`NBitsWeights`, RTN, conversion from the
qexport 4-bit codes) · op.py (reference, torch op, ONNX schema and translation, OpRun).
"""
from __future__ import annotations

from . import contract
from .op import matmul_nbits, matmul_nbits_reference, op_run_class, register_onnx_schema, translate
from .packing import NBitsWeights, from_mixed, quantize_nbits
from .. import OpSpec, register

SPEC = register(OpSpec(
    name=contract.OP_NAME, domain=contract.DOMAIN, torch_name="matmul_nbits",
    input_names=contract.INPUT_NAMES, attributes=contract.ATTRIBUTES,
    register_schema=register_onnx_schema, translate=translate, op_run=op_run_class,
    reference=matmul_nbits_reference, weights=NBitsWeights, library=False))

__all__ = ["SPEC", "contract", "NBitsWeights", "from_mixed", "matmul_nbits",
           "matmul_nbits_reference", "quantize_nbits"]
