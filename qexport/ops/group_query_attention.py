"""ONNX Runtime's com.microsoft GroupQueryAttention, as a qexport torch op.

`torch.ops.qexport.group_query_attention` is the reference (PyTorch) semantics of the part of
ONNX Runtime's op that qexport uses; a family adapter's attention swap
(qexport/families/) calls it while tracing, and the exporter writes it as one
GroupQueryAttention node, which ONNX Runtime runs itself (no qexport library needed).
"""
from __future__ import annotations

import torch

from . import OpSpec, has_schema, register

MS_DOMAIN = "com.microsoft"


@torch.library.custom_op("qexport::group_query_attention", mutates_args=())
def group_query_attention(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                          past_k: torch.Tensor | None, past_v: torch.Tensor | None,
                          seqlens_k: torch.Tensor, total_length: torch.Tensor,
                          cos: torch.Tensor | None, sin: torch.Tensor | None,
                          num_heads: int, kv_num_heads: int, scale: float, total: int,
                          local_window: int = -1, softcap: float = 0.0
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX Runtime's GroupQueryAttention (the part qexport uses). q [B, S, num_heads*D], k
    and v [B, S, kv_num_heads*D], or k and v None and q packed [B, S, (num_heads +
    2*kv_num_heads)*D], the three side by side (passes.pack_qkv: one stacked projection
    feeds the op without a split); past_k and past_v [B, kv_num_heads, P, D] or None (P = 0):
    a cache buffer whose first L_b - S positions hold row b's cached keys (rotated) and
    values; seqlens_k int32 [B], L_b - 1, L_b being row b's length after this call (cached +
    new tokens); total_length int32 scalar, the longest (`total` as an int, for the output
    shapes); cos and sin [>= total, D/2], the rotary angles of positions 0, 1, ... (None:
    no rotary embedding, ONNX Runtime's do_rotary = 0, for learned position tables).
    Returns the attention [B, S, num_heads*D] and the present keys and values
    [B, kv_num_heads, max(total, P), D]: the past buffer with row b's new tokens written at
    positions L_b - S .. L_b - 1 (0 .. S-1 when S = total: a prompt). The new tokens get
    rotary embedding on q and k (halves rotated, not interleaved), and each group of
    num_heads/kv_num_heads query heads attends to one kv head over positions up to its own,
    softmax(q k^T * scale) v, the logits soft-capped to softcap * tanh(x / softcap) when
    softcap > 0 (Gemma 2); with local_window > 0 (ONNX Runtime's local_window_size) only
    over the last local_window positions, its own included (Hugging Face's sliding_window;
    checked against ONNX Runtime in tests/test_attention.py). With P >= total the present has the past's shape, and ONNX
    Runtime writes it into the past buffer itself when both are bound to the same memory."""
    if k is None:
        q, k, v = _unpack(q, num_heads, kv_num_heads)
    b, s, _ = q.shape
    d = q.shape[-1] // num_heads
    p = 0 if past_k is None else past_k.shape[2]
    groups = num_heads // kv_num_heads
    present_k = q.new_zeros(b, kv_num_heads, max(total, p), d)
    present_v = torch.zeros_like(present_k)
    if past_k is not None:
        present_k[:, :, :p], present_v[:, :, :p] = past_k, past_v
    out = q.new_empty(b, s, num_heads * d)
    for i in range(b):
        start = 0 if s == total else int(seqlens_k[i]) + 1 - s  # the row's first new position
        if cos is not None:
            cos2 = torch.cat([cos[start:start + s]] * 2, -1).to(q.dtype)
            sin2 = torch.cat([sin[start:start + s]] * 2, -1).to(q.dtype)

        def rotary(x):
            if cos is None:
                return x
            rotated = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
            return x * cos2 + rotated * sin2

        def heads(x, n):
            return x[i].view(s, n, d).transpose(0, 1)

        present_k[i, :, start:start + s] = rotary(heads(k, kv_num_heads))
        present_v[i, :, start:start + s] = heads(v, kv_num_heads)
        keys = present_k[i, :, :start + s].repeat_interleave(groups, 0)
        values = present_v[i, :, :start + s].repeat_interleave(groups, 0)
        mask = torch.ones(s, start + s, dtype=torch.bool, device=q.device).tril(start)
        if local_window > 0:
            mask &= ~torch.ones_like(mask).tril(start - local_window)
        logits = rotary(heads(q, num_heads)) @ keys.transpose(-1, -2) * scale
        if softcap > 0:
            logits = torch.tanh(logits / softcap) * softcap
        att = logits.masked_fill(~mask, float("-inf")).softmax(-1) @ values
        out[i] = att.transpose(0, 1).reshape(s, num_heads * d)
    return out, present_k, present_v


def _unpack(qkv: torch.Tensor, num_heads: int, kv_num_heads: int):
    """q, k, v of a packed query [B, S, (num_heads + 2*kv_num_heads)*D]."""
    d = qkv.shape[-1] // (num_heads + 2 * kv_num_heads)
    return qkv.split([num_heads * d, kv_num_heads * d, kv_num_heads * d], -1)


@group_query_attention.register_fake
def _(q, k, v, past_k, past_v, seqlens_k, total_length, cos, sin, num_heads, kv_num_heads,
      scale, total, local_window=-1, softcap=0.0):
    if k is None:
        q, k, v = _unpack(q, num_heads, kv_num_heads)
    b, s, _ = q.shape
    d = q.shape[-1] // num_heads
    length = total if past_k is None else torch.sym_max(total, past_k.shape[2])
    return q.new_empty(q.shape), k.new_empty(b, kv_num_heads, length, d), \
        k.new_empty(b, kv_num_heads, length, d)


def register_onnx_schema() -> None:
    """Declare the part of ONNX Runtime's com.microsoft GroupQueryAttention (contrib opset 1)
    that the translation uses to onnx, which has no schema for it (the exporter and the
    checker need one). Outputs: the attention, present key, present value."""
    import onnx
    from onnx.defs import OpSchema

    if has_schema("GroupQueryAttention", 1, MS_DOMAIN):
        return
    single, optional = OpSchema.FormalParameterOption.Single, OpSchema.FormalParameterOption.Optional
    inputs = [OpSchema.FormalParameter(name, ty, param_option=opt) for name, ty, opt in (
        ("query", "T", single), ("key", "T", optional), ("value", "T", optional),
        ("past_key", "T", optional), ("past_value", "T", optional),
        ("seqlens_k", "M", single), ("total_sequence_length", "M", single),
        ("cos_cache", "T", optional), ("sin_cache", "T", optional))]
    attr = OpSchema.Attribute
    onnx.defs.register_schema(OpSchema(
        "GroupQueryAttention", MS_DOMAIN, 1,
        doc="ONNX Runtime contrib op (declared by qexport for export; ORT runs it)",
        inputs=inputs,
        outputs=[OpSchema.FormalParameter(n, "T") for n in ("output", "present_key",
                                                              "present_value")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "activations"),
                          ("M", ["tensor(int32)"], "lengths")],
        attributes=[attr("num_heads", OpSchema.AttrType.INT, "query heads"),
                    attr("kv_num_heads", OpSchema.AttrType.INT, "key/value heads"),
                    attr("scale", OpSchema.AttrType.FLOAT, "softmax scale"),
                    attr("do_rotary", OpSchema.AttrType.INT, "rotary on q and k"),
                    attr("rotary_interleaved", OpSchema.AttrType.INT, "0: halves rotated"),
                    attr("local_window_size", OpSchema.AttrType.INT,
                         "sliding window: positions attended, own included (-1: all)"),
                    attr("softcap", OpSchema.AttrType.FLOAT,
                         "logits soft-capped to softcap * tanh(x / softcap) (0: none)")]))


def translate(q, k, v, past_k, past_v, seqlens_k, total_length, cos, sin, num_heads,
              kv_num_heads, scale, total, local_window=-1, softcap=0.0):  # total: shapes only
    """torch.onnx custom translation: one com.microsoft GroupQueryAttention (past inputs and
    present outputs as the op has them; no cos/sin inputs without rotary)."""
    from onnxscript.values import Opset

    return Opset(MS_DOMAIN, 1).GroupQueryAttention(
        q, k, v, past_k, past_v, seqlens_k, total_length, cos, sin, num_heads=num_heads,
        kv_num_heads=kv_num_heads, scale=scale, do_rotary=int(cos is not None),
        rotary_interleaved=0, local_window_size=local_window, softcap=softcap, _outputs=3)


SPEC = register(OpSpec(
    name="GroupQueryAttention", domain=MS_DOMAIN, torch_name="group_query_attention",
    input_names=("query", "key", "value", "past_key", "past_value", "seqlens_k",
                 "total_sequence_length", "cos_cache", "sin_cache"),
    attributes=("num_heads", "kv_num_heads", "scale", "total", "local_window", "softcap"),
    register_schema=register_onnx_schema, translate=translate,
    reference=group_query_attention))
