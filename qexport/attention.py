"""Each Llama attention block as one ONNX Runtime node (com.microsoft GroupQueryAttention).

Exported as traced, a Llama attention block is ~30 small ONNX nodes (reshapes and transposes
of q/k/v, rotary embedding, the repeat of the kv heads, the causal mask, two MatMuls and a
softmax). At decoding each node costs ONNX Runtime about a microsecond of dispatch whatever
its size, which on SmolLM2-135M was ~1 ms of a ~3 ms token (docs/performance.md). While
tracing, `fused_attention(module)` swaps the forward of each supported attention module (Llama,
Mistral and Qwen2 without a sliding window) for
one that keeps the q/k/v/o Linears (so the Linear passes still see them) and computes the
rest with `torch.ops.qexport.group_query_attention`, which the exporter writes as one
GroupQueryAttention node. Its PyTorch implementation is the reference semantics, so the
traced graph still runs (calibration, parity checks).

The exported graph attends causally over positions 0..S-1 of its input, as the traced graph
without a KV cache does; it takes no attention mask (qexport's exports take input_ids only).
"""
from __future__ import annotations

import contextlib
import types

import torch

# Attention classes whose forward is q/k/v projections, rotate-half rotary embedding, grouped
# kv heads, causal softmax attention (optionally over a sliding window: not swapped) and
# o_proj: Llama's and its copies.
SUPPORTED = ("LlamaAttention", "MistralAttention", "Qwen2Attention")


@torch.library.custom_op("qexport::group_query_attention", mutates_args=())
def group_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          seqlens_k: torch.Tensor, total_length: torch.Tensor,
                          cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                          kv_num_heads: int, scale: float) -> torch.Tensor:
    """q [B, S, num_heads*D], k and v [B, S, kv_num_heads*D], cos and sin [S, D/2] (the rotary
    angles of positions 0..S-1) -> [B, S, num_heads*D]: rotary embedding on q and k (halves
    rotated, not interleaved), each group of num_heads/kv_num_heads query heads attending to
    one kv head, causal, softmax(q k^T * scale) v. seqlens_k (int32 [B], S-1 each) and
    total_length (int32 scalar, S) are GroupQueryAttention's inputs for a call without past,
    built once per graph by the caller (`_shared_inputs`)."""
    b, s, _ = q.shape
    d = q.shape[-1] // num_heads

    def heads(x, n):
        return x.view(b, s, n, d).transpose(1, 2)

    cos2 = torch.cat([cos, cos], -1).to(q.dtype)
    sin2 = torch.cat([sin, sin], -1).to(q.dtype)

    def rotary(x):
        rotated = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
        return x * cos2 + rotated * sin2

    qh, kh, vh = rotary(heads(q, num_heads)), rotary(heads(k, kv_num_heads)), heads(v, kv_num_heads)
    groups = num_heads // kv_num_heads
    kh, vh = kh.repeat_interleave(groups, 1), vh.repeat_interleave(groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True,
                                                           scale=scale)
    return out.transpose(1, 2).reshape(b, s, num_heads * d)


@group_query_attention.register_fake
def _(q, k, v, seqlens_k, total_length, cos, sin, num_heads, kv_num_heads, scale):
    return q.new_empty(q.shape)


def _register_onnx_schema() -> None:
    """Declare the part of ONNX Runtime's com.microsoft GroupQueryAttention (contrib opset 1)
    that the translation uses to onnx, which has no schema for it (the exporter and the
    checker need one). Outputs: the attention, present key, present value."""
    import onnx
    from onnx.defs import OpSchema

    try:
        onnx.defs.get_schema("GroupQueryAttention", 1, "com.microsoft")
        return
    except onnx.defs.SchemaError:
        pass
    single, optional = OpSchema.FormalParameterOption.Single, OpSchema.FormalParameterOption.Optional
    inputs = [OpSchema.FormalParameter(name, ty, param_option=opt) for name, ty, opt in (
        ("query", "T", single), ("key", "T", single), ("value", "T", single),
        ("past_key", "T", optional), ("past_value", "T", optional),
        ("seqlens_k", "M", single), ("total_sequence_length", "M", single),
        ("cos_cache", "T", optional), ("sin_cache", "T", optional))]
    attr = OpSchema.Attribute
    onnx.defs.register_schema(OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
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
                    attr("rotary_interleaved", OpSchema.AttrType.INT, "0: halves rotated")]))


def onnx_translation() -> dict:
    """The torch.onnx custom_translation_table entry: one com.microsoft GroupQueryAttention,
    with no past and the rotary angles of positions 0..S-1 as its cos/sin caches."""
    from onnxscript.values import Opset

    _register_onnx_schema()
    ms = Opset("com.microsoft", 1)

    def translate(q, k, v, seqlens_k, total_length, cos, sin, num_heads, kv_num_heads, scale):
        out, _, _ = ms.GroupQueryAttention(
            q, k, v, None, None, seqlens_k, total_length, cos, sin, num_heads=num_heads,
            kv_num_heads=kv_num_heads, scale=scale, do_rotary=1, rotary_interleaved=0,
            _outputs=3)
        return out

    return {torch.ops.qexport.group_query_attention.default: translate}


def _supported(attn: torch.nn.Module) -> bool:
    cfg = getattr(attn, "config", None)
    return (type(attn).__name__ in SUPPORTED and cfg is not None
            and all(isinstance(getattr(attn, n, None), torch.nn.Linear)
                    for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
            and getattr(attn, "sliding_window", getattr(cfg, "sliding_window", None)) is None
            and attn.head_dim % 2 == 0)


def _shared_inputs(self, hidden_states, cos, sin, shared: dict) -> tuple:
    """seqlens_k, total length and the half-width rotary angles, computed by the first layer
    and reused by the others (one set of nodes per graph instead of one per layer)."""
    key = (id(cos), id(sin))
    if key not in shared:
        b, s = hidden_states.shape[0], hidden_states.shape[1]
        half = self.head_dim // 2
        total = torch.full((), s, dtype=torch.int32)
        shared.clear()
        shared[key] = (cos, sin, (total - 1).expand(b), total, cos[0, :, :half],
                       sin[0, :, :half])
    return shared[key][2:]


def _forward(self, hidden_states, position_embeddings=None, attention_mask=None,
             past_key_values=None, **kwargs):
    cos, sin = position_embeddings  # [B, S, D], the angles duplicated over the two halves
    if past_key_values is not None or cos.shape[-1] != self.head_dim:
        # a KV cache, or rotary over part of the head: not this op's contract
        return self._qexport_original_forward(hidden_states, position_embeddings,
                                              attention_mask, past_key_values, **kwargs)
    seqlens_k, total, cos_half, sin_half = _shared_inputs(self, hidden_states, cos, sin,
                                                          self._qexport_shared)
    out = torch.ops.qexport.group_query_attention(
        self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states),
        seqlens_k, total, cos_half, sin_half, self.config.num_attention_heads,
        self.config.num_key_value_heads, float(self.scaling))
    return self.o_proj(out), None


@contextlib.contextmanager
def fused_attention(module: torch.nn.Module):
    """Within the context, the supported attention modules of `module` compute their attention
    with qexport::group_query_attention. Yields how many were swapped."""
    swapped = [m for m in module.modules() if _supported(m)]
    own = {id(m): m.__dict__["forward"] for m in swapped if "forward" in m.__dict__}
    shared: dict = {}  # the tensors of one forward, kept alive so that ids stay unique
    for m in swapped:
        m._qexport_original_forward, m._qexport_shared = m.forward, shared
        m.forward = types.MethodType(_forward, m)
    try:
        yield len(swapped)
    finally:
        for m in swapped:
            del m.forward, m._qexport_original_forward, m._qexport_shared
            if id(m) in own:  # an instance-level forward (e.g. a hook wrapper) it had before
                m.forward = own[id(m)]
