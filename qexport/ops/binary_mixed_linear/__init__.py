"""qexport::BinaryMixedLinear: the PTQ1.61 mixed binary / 4-bit linear (docs/format.md).

contract.py (inputs, attributes, layout; mirrored by plugins/binary_mixed_linear/
bml_contract.h) · packing.py (`MixedLinearWeights`, the packed form) · op.py (reference, torch
op, ONNX schema and translation, OpRun) · kernels in plugins/binary_mixed_linear/.
"""
from __future__ import annotations

from . import contract
from .op import (binary_mixed_linear, binary_mixed_linear_reference, op_run_class,
                 register_onnx_schema, translate)
from .packing import MixedLinearWeights, binary_channels, num_groups, pack_nibbles, pack_signs
from ...contract import DOMAIN
from .. import OpSpec, register

SPEC = register(OpSpec(
    name=contract.OP_NAME, domain=DOMAIN, torch_name="binary_mixed_linear",
    input_names=contract.INPUT_NAMES, attributes=contract.ATTRIBUTES,
    register_schema=register_onnx_schema, translate=translate, op_run=op_run_class,
    reference=binary_mixed_linear_reference, weights=MixedLinearWeights, library=True))

__all__ = ["SPEC", "contract", "MixedLinearWeights", "binary_mixed_linear",
           "binary_mixed_linear_reference", "binary_channels", "num_groups", "pack_nibbles",
           "pack_signs"]
