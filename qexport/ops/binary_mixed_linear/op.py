"""The reference semantics of qexport::BinaryMixedLinear, in three forms sharing one
implementation:

- `torch.ops.qexport.binary_mixed_linear`: a torch.library custom op, so a quantized model keeps
  one node per Linear through torch.fx / torch.export;
- an ONNX schema + a translation for torch.onnx.export(dynamo=True);
- an onnx.reference OpRun (`op_run_class`), so exported graphs run in ReferenceEvaluator.

The math is `binary_mixed_linear_reference`; docs/format.md states it in words.
"""
from __future__ import annotations

import torch

from ...contract import DOMAIN, OPSET_VERSION
from . import contract as C
from .packing import binary_channels, unpack_nibbles, unpack_signs


def binary_mixed_linear_reference(x, sign_packed, row_scale, row_offset, salient_idx,
                                  salient_packed, salient_scale, salient_zero, r2, bias,
                                  in_features: int, out_features: int,
                                  salient_group_size: int, layout: int) -> torch.Tensor:
    if layout != C.LAYOUT_ROW_MAJOR:
        raise ValueError(f"BinaryMixedLinear: unknown layout {layout}")
    if x.shape[-1] != in_features:
        raise ValueError(f"BinaryMixedLinear: X has {x.shape[-1]} features, expected {in_features}")
    xf = x.float()
    s = salient_idx.numel()
    kb = in_features - s
    y = xf.new_zeros(*x.shape[:-1], out_features)
    if kb:
        xb = xf[..., binary_channels(in_features, salient_idx.cpu()).to(x.device)]
        if r2 is not None:
            xb = xb * r2.float()
        signs = unpack_signs(sign_packed, kb)
        y = y + row_scale.float() * (xb @ signs.T) + row_offset.float() * xb.sum(-1, keepdim=True)
    if s:
        codes = unpack_nibbles(salient_packed, s).float()
        gs = salient_group_size if salient_group_size > 0 else s
        group_of = torch.arange(s, device=x.device) // gs
        w_sal = (codes - salient_zero.float()[:, group_of]) * salient_scale.float()[:, group_of]
        y = y + xf[..., salient_idx.long()] @ w_sal.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@torch.library.custom_op("qexport::binary_mixed_linear", mutates_args=())
def binary_mixed_linear(x: torch.Tensor, sign_packed: torch.Tensor, row_scale: torch.Tensor,
                        row_offset: torch.Tensor, salient_idx: torch.Tensor,
                        salient_packed: torch.Tensor, salient_scale: torch.Tensor,
                        salient_zero: torch.Tensor, r2: torch.Tensor | None,
                        bias: torch.Tensor | None, in_features: int, out_features: int,
                        salient_group_size: int, layout: int) -> torch.Tensor:
    return binary_mixed_linear_reference(x, sign_packed, row_scale, row_offset, salient_idx,
                                         salient_packed, salient_scale, salient_zero, r2, bias,
                                         in_features, out_features, salient_group_size, layout)


@binary_mixed_linear.register_fake
def _(x, sign_packed, row_scale, row_offset, salient_idx, salient_packed, salient_scale,
      salient_zero, r2, bias, in_features, out_features, salient_group_size, layout):
    return x.new_empty(*x.shape[:-1], out_features)


# ---------------------------------------------------------------- ONNX schema and export
def register_onnx_schema() -> None:
    """Declare qexport::BinaryMixedLinear to onnx (checker, shape inference, exporter)."""
    from .. import register_linear_schema

    register_linear_schema(
        C.OP_NAME, DOMAIN, OPSET_VERSION,
        "PTQ1.61 mixed binary / 4-bit linear; see qexport docs/format.md",
        C.INPUT_NAMES, C.OPTIONAL_INPUTS,
        {"X": "T", "sign_packed": "TU8", "row_scale": "TH", "row_offset": "TH",
         "salient_idx": "TI", "salient_packed": "TU8", "salient_scale": "TH",
         "salient_zero": "TU8", "r2": "TH", "bias": "TF"},
        "T", [("T", ["tensor(float)", "tensor(float16)"], "activations"),
              ("TU8", ["tensor(uint8)"], "packed codes"),
              ("TH", ["tensor(float16)"], "scales"),
              ("TI", ["tensor(int32)"], "indices"),
              ("TF", ["tensor(float)"], "bias")], C.ATTRIBUTES,
        {C.ATTR_IN_FEATURES: "K", C.ATTR_OUT_FEATURES: "N",
         C.ATTR_SALIENT_GROUP_SIZE: "G (0: per row)", C.ATTR_LAYOUT: "packed layout version"})


def translate(x, sign_packed, row_scale, row_offset, salient_idx, salient_packed,
              salient_scale, salient_zero, r2, bias, in_features, out_features,
              salient_group_size, layout):
    """torch.onnx custom translation: one qexport::BinaryMixedLinear node."""
    from onnxscript.values import Opset

    return getattr(Opset(DOMAIN, OPSET_VERSION), C.OP_NAME)(
        x, sign_packed, row_scale, row_offset, salient_idx, salient_packed, salient_scale,
        salient_zero, r2, bias, in_features=in_features, out_features=out_features,
        salient_group_size=salient_group_size, layout=layout)


def op_run_class() -> type:
    """An onnx.reference OpRun, for ReferenceEvaluator(model, new_ops=[...])."""
    from onnx.reference.op_run import OpRun

    class BinaryMixedLinear(OpRun):
        op_domain = DOMAIN

        def _run(self, x, sign_packed, row_scale, row_offset, salient_idx, salient_packed,
                 salient_scale, salient_zero, r2=None, bias=None, in_features=None,
                 out_features=None, salient_group_size=None, layout=None):
            def t(a):
                return None if a is None else torch.from_numpy(a.copy())
            y = binary_mixed_linear_reference(
                t(x), t(sign_packed), t(row_scale), t(row_offset), t(salient_idx),
                t(salient_packed), t(salient_scale), t(salient_zero), t(r2), t(bias),
                in_features, out_features, salient_group_size, layout)
            return (y.numpy(),)

    return BinaryMixedLinear
