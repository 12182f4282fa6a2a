"""qexport::QDQLinear: the reference semantics (a torch custom op, one node per Linear
through torch.export), its ONNX schema and translation (one qexport node), and `lower`, which
turns that node into the standard QDQ pattern of contract.py in the exported file, and
`raise_node`, its inverse (reading an export back)."""
from __future__ import annotations

import json

import torch

from ...contract import DOMAIN, OPSET_VERSION
from . import contract as C


def fake_quant(x: torch.Tensor, scale, zero, qmin: int, qmax: int) -> torch.Tensor:
    """QuantizeLinear then DequantizeLinear (uint8 codes within [qmin, qmax]), in fp32 as
    ONNX defines them: round half to even of x / scale, plus the zero point, saturated."""
    s, z = scale.float(), zero.float()
    q = torch.clamp(torch.round(x.float() / s) + z, qmin, qmax)
    return (q - z) * s


def qdq_linear_reference(x, w_q, w_scale, x_scale, x_zero, bias, in_features: int,
                         out_features: int, act_qmin: int, act_qmax: int) -> torch.Tensor:
    if x.shape[-1] != in_features:
        raise ValueError(f"QDQLinear: X has {x.shape[-1]} features, expected {in_features}")
    xq = fake_quant(x, x_scale, x_zero, act_qmin, act_qmax)
    y = xq @ (w_q.float() * w_scale.float())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@torch.library.custom_op("qexport::qdq_linear", mutates_args=())
def qdq_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
               x_scale: torch.Tensor, x_zero: torch.Tensor, bias: torch.Tensor | None,
               in_features: int, out_features: int, act_qmin: int,
               act_qmax: int) -> torch.Tensor:
    return qdq_linear_reference(x, w_q, w_scale, x_scale, x_zero, bias, in_features,
                                out_features, act_qmin, act_qmax)


@qdq_linear.register_fake
def _(x, w_q, w_scale, x_scale, x_zero, bias, in_features, out_features, act_qmin, act_qmax):
    return x.new_empty(*x.shape[:-1], out_features)


def register_onnx_schema() -> None:
    from .. import register_linear_schema

    register_linear_schema(
        C.OP_NAME, DOMAIN, OPSET_VERSION,
        "Linear with static activation quantization; lowered to QDQ at export",
        C.INPUT_NAMES, C.OPTIONAL_INPUTS,
        {"X": "T", "w_q": "TI8", "w_scale": "TF", "x_scale": "TF", "x_zero": "TU8", "bias": "TF"},
        "T", [("T", ["tensor(float)", "tensor(float16)"], "activations"),
              ("TI8", ["tensor(int8)"], "weight codes"),
              ("TF", ["tensor(float)"], "scales, bias"),
              ("TU8", ["tensor(uint8)"], "activation zero point")], C.ATTRIBUTES)


def translate(x, w_q, w_scale, x_scale, x_zero, bias, in_features, out_features, act_qmin,
              act_qmax):
    from onnxscript.values import Opset

    return getattr(Opset(DOMAIN, OPSET_VERSION), C.OP_NAME)(
        x, w_q, w_scale, x_scale, x_zero, bias, in_features=in_features,
        out_features=out_features, act_qmin=act_qmin, act_qmax=act_qmax)


def op_run_class() -> type:
    from onnx.reference.op_run import OpRun

    class QDQLinear(OpRun):
        op_domain = DOMAIN

        def _run(self, x, w_q, w_scale, x_scale, x_zero, bias=None, in_features=None,
                 out_features=None, act_qmin=None, act_qmax=None):
            def t(a):
                return None if a is None else torch.from_numpy(a.copy())
            return (qdq_linear_reference(t(x), t(w_q), t(w_scale), t(x_scale), t(x_zero),
                                         t(bias), in_features, out_features, act_qmin,
                                         act_qmax).numpy(),)

    return QDQLinear


# ------------------------------------------------------------------- lowering to QDQ
def lower(node, value, add_initializer) -> list:
    """The standard nodes replacing one QDQLinear node. `value(name)` reads an initializer
    (numpy); `add_initializer(name, array)` adds one. The MatMul (or the bias Add, the last
    node) keeps the node's outputs; the MatMul carries its name, metadata and META_LOWERED."""
    import numpy as np
    from onnx import helper

    ins = list(node.input) + [""] * (C.NUM_INPUTS - len(node.input))
    x, w_q, w_scale, x_scale, x_zero, bias = ins
    attrs = {a.name: a.i for a in node.attribute}
    qmin, qmax = attrs[C.ATTR_ACT_QMIN], attrs[C.ATTR_ACT_QMAX]
    p = node.name
    nodes, src = [], x
    if (qmin, qmax) != (0, 255):  # a narrower range than uint8's: clip first
        s, z = float(value(x_scale)), float(value(x_zero))
        lo, hi = p + "/clip_min", p + "/clip_max"
        add_initializer(lo, np.array((qmin - z) * s, np.float32))
        add_initializer(hi, np.array((qmax - z) * s, np.float32))
        nodes.append(helper.make_node("Clip", [x, lo, hi], [p + "/clipped"], name=p + "/clip"))
        src = p + "/clipped"
    w_zero = p + "/w_zero"
    add_initializer(w_zero, np.zeros(value(w_scale).shape, np.int8))
    nodes += [
        helper.make_node("QuantizeLinear", [src, x_scale, x_zero], [p + "/x_q"],
                         name=p + "/quantize"),
        helper.make_node("DequantizeLinear", [p + "/x_q", x_scale, x_zero], [p + "/x_dq"],
                         name=p + "/dequantize_x"),
        helper.make_node("DequantizeLinear", [w_q, w_scale, w_zero], [p + "/w_dq"],
                         name=p + "/dequantize_w", axis=1)]
    matmul = helper.make_node("MatMul", [p + "/x_dq", p + "/w_dq"],
                              [p + "/matmul"] if bias else list(node.output), name=p)
    for prop in node.metadata_props:
        matmul.metadata_props.add(key=prop.key, value=prop.value)
    matmul.metadata_props.add(key=C.META_LOWERED, value=json.dumps(
        {"op": C.OP_NAME, "inputs": list(node.input), "attributes": attrs}))
    nodes.append(matmul)
    if bias:
        nodes.append(helper.make_node("Add", [p + "/matmul", bias], list(node.output),
                                      name=p + "/bias"))
    return nodes


def raise_node(node):
    """The QDQLinear node a lowered MatMul stands for (its name and metadata), or None."""
    from onnx import helper

    meta = {p.key: p.value for p in node.metadata_props}
    if node.op_type != "MatMul" or C.META_LOWERED not in meta:
        return None
    info = json.loads(meta[C.META_LOWERED])
    out = helper.make_node(info["op"], info["inputs"], list(node.output), name=node.name,
                           domain=DOMAIN, **info["attributes"])
    for key, value in meta.items():
        if key != C.META_LOWERED:
            out.metadata_props.add(key=key, value=value)
    return out
