"""com.microsoft::MatMulNBits in qexport's graphs: the reference semantics (a torch custom op,
so a quantized model keeps one node per Linear through torch.export), an ONNX schema for the
exporter and checker (onnx itself knows no com.microsoft ops) and the translation."""
from __future__ import annotations

import torch

from . import contract as C
from .packing import NBitsWeights


def matmul_nbits_reference(a, packed, scales, zero_points, g_idx, bias, K: int, N: int,
                           bits: int, block_size: int, accuracy_level: int) -> torch.Tensor:
    if a.shape[-1] != K:
        raise ValueError(f"MatMulNBits: A has {a.shape[-1]} features, expected {K}")
    w = NBitsWeights(K, N, bits, block_size, packed, scales, zero_points, bias,
                     accuracy_level).dequantize()
    y = a.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(a.dtype)


@torch.library.custom_op("qexport::matmul_nbits", mutates_args=())
def matmul_nbits(a: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                 zero_points: torch.Tensor, g_idx: torch.Tensor | None,
                 bias: torch.Tensor | None, K: int, N: int, bits: int, block_size: int,
                 accuracy_level: int) -> torch.Tensor:
    return matmul_nbits_reference(a, packed, scales, zero_points, g_idx, bias, K, N, bits,
                                  block_size, accuracy_level)


@matmul_nbits.register_fake
def _(a, packed, scales, zero_points, g_idx, bias, K, N, bits, block_size, accuracy_level):
    return a.new_empty(*a.shape[:-1], N)


def register_onnx_schema() -> None:
    """Declare com.microsoft::MatMulNBits to onnx (ONNX Runtime registers its own)."""
    from .. import register_linear_schema

    register_linear_schema(
        C.OP_NAME, C.DOMAIN, C.OPSET_VERSION, "ONNX Runtime's block-quantized MatMul (contrib op)",
        C.INPUT_NAMES, C.OPTIONAL_INPUTS,
        {"A": "T1", "B": "T2", "scales": "T1", "zero_points": "T3", "g_idx": "T4", "bias": "T1"},
        "T1", [("T1", ["tensor(float)", "tensor(float16)"], "activations"),
               ("T2", ["tensor(uint8)"], "packed codes"),
               ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], "zero points"),
               ("T4", ["tensor(int32)"], "group index")], C.ATTRIBUTES)


def translate(a, packed, scales, zero_points, g_idx, bias, K, N, bits, block_size,
              accuracy_level):
    """torch.onnx custom translation: one com.microsoft::MatMulNBits node."""
    from onnxscript.values import Opset

    return getattr(Opset(C.DOMAIN, C.OPSET_VERSION), C.OP_NAME)(
        a, packed, scales, zero_points, g_idx, bias, K=K, N=N, bits=bits,
        block_size=block_size, accuracy_level=accuracy_level)


def op_run_class() -> type:
    from onnx.reference.op_run import OpRun

    class MatMulNBits(OpRun):
        op_domain = C.DOMAIN

        def _run(self, a, packed, scales, zero_points=None, g_idx=None, bias=None, K=None,
                 N=None, bits=4, block_size=None, accuracy_level=0):
            def t(x):
                return None if x is None else torch.from_numpy(x.copy())
            return (matmul_nbits_reference(t(a), t(packed), t(scales), t(zero_points), None,
                                           t(bias), K, N, bits, block_size,
                                           accuracy_level).numpy(),)

    return MatMulNBits
