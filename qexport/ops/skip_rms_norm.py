"""ONNX Runtime's com.microsoft SkipSimplifiedLayerNormalization, as a qexport torch op.

A residual add followed by an RMSNorm of the sum (every pre-norm decoder block, twice) is
one node instead of two: `passes.fuse_skip_norm` writes `torch.ops.qexport.skip_rms_norm`
into the traced graph, this module's PyTorch body is its reference, and the exporter writes
it as one SkipSimplifiedLayerNormalization, which ONNX Runtime runs itself (CPU and CUDA; no
qexport library needed). ONNX Runtime fuses a lone RMSNorm into SimplifiedLayerNormalization
on its own, but not one whose input, a residual sum, is read again by the next residual add.
"""
from __future__ import annotations

import torch

from . import OpSpec, has_schema, register
from .group_query_attention import MS_DOMAIN


@torch.library.custom_op("qexport::skip_rms_norm", mutates_args=())
def skip_rms_norm(x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """s = x + skip (same shape, [..., H]); returns (weight * s / sqrt(mean(s^2, -1) + eps),
    s): the normed sum and the sum, which the next residual add reads. weight [H]. The math
    of Llama's RMSNorm after a residual add, in x's dtype (float32)."""
    s = x + skip
    y = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y, s


@skip_rms_norm.register_fake
def _(x, skip, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


def register_onnx_schema() -> None:
    """Declare the part of ONNX Runtime's com.microsoft SkipSimplifiedLayerNormalization
    (contrib opset 1) the translation uses, for onnx's exporter and checker, which have no
    schema for it. Outputs: the normed sum; mean and inverse std (written, unread); the sum
    (input_skip_bias_sum)."""
    import onnx
    from onnx.defs import OpSchema

    if has_schema("SkipSimplifiedLayerNormalization", 1, MS_DOMAIN):
        return
    single, optional = OpSchema.FormalParameterOption.Single, OpSchema.FormalParameterOption.Optional
    onnx.defs.register_schema(OpSchema(
        "SkipSimplifiedLayerNormalization", MS_DOMAIN, 1,
        doc="ONNX Runtime contrib op (declared by qexport for export; ORT runs it)",
        inputs=[OpSchema.FormalParameter(name, "T", param_option=opt) for name, opt in (
            ("input", single), ("skip", single), ("gamma", single), ("bias", optional))],
        outputs=[OpSchema.FormalParameter(name, ty, param_option=opt) for name, ty, opt in (
            ("output", "T", single), ("mean", "U", optional), ("inv_std_var", "U", optional),
            ("input_skip_bias_sum", "T", optional))],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "activations"),
                          ("U", ["tensor(float)"], "statistics")],
        attributes=[OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT,
                                       "added to the mean square")]))


def translate(x, skip, weight, eps):
    """torch.onnx custom translation: one com.microsoft SkipSimplifiedLayerNormalization with
    outputs (normed sum, -, -, sum); ONNX Runtime computes the mean square in float32."""
    from onnxscript.values import Opset

    y, _, _, s = Opset(MS_DOMAIN, 1).SkipSimplifiedLayerNormalization(
        x, skip, weight, epsilon=eps, _outputs=4)
    return y, s


SPEC = register(OpSpec(
    name="SkipSimplifiedLayerNormalization", domain=MS_DOMAIN, torch_name="skip_rms_norm",
    input_names=("input", "skip", "gamma"), attributes=("epsilon",),
    register_schema=register_onnx_schema, translate=translate, reference=skip_rms_norm))
