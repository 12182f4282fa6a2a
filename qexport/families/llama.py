"""The Llama family (Llama, Mistral, Qwen2): each attention block as one ONNX Runtime node
(com.microsoft GroupQueryAttention), and the KV-cache decoder `WithPast`.

Exported as traced, a Llama attention block is ~30 small ONNX nodes (reshapes and transposes
of q/k/v, rotary embedding, the repeat of the kv heads, the causal mask, two MatMuls and a
softmax). At decoding each node costs ONNX Runtime about a microsecond of dispatch whatever
its size, which on SmolLM2-135M was ~1 ms of a ~3 ms token (docs/performance.md). While
tracing, `fused_attention(module)` swaps the forward of each supported attention module (Llama,
Mistral and Qwen2 without a sliding window, head size a multiple of 16) for
one that keeps the q/k/v/o Linears (so the Linear passes still see them) and computes the
rest with `torch.ops.qexport.group_query_attention`, which the exporter writes as one
GroupQueryAttention node. Its PyTorch implementation is the reference semantics, so the
traced graph still runs (calibration, parity checks).

The exported graph attends causally over positions 0..S-1 of its input, as the traced graph
without a KV cache does; it takes no attention mask (qexport's exports take input_ids only).
Under `WithPast` (the KV-cache decoder) the op also reads and writes the cache: its lengths
come from the attention mask, so the cache may be a buffer longer than what it holds, which
ONNX Runtime then updates in place (docs/design.md, "KV cache").
"""
from __future__ import annotations

import contextlib
import types

import torch

from ..ops import group_query_attention as _gqa  # noqa: F401  (torch.ops.qexport.group_query_attention)
from . import Family, register

# Attention classes whose forward is q/k/v projections (Phi-3: one fused projection, split),
# optionally an RMSNorm over each head of q and k (Qwen3), rotate-half rotary embedding,
# grouped kv heads, causal softmax attention (optionally over a sliding window: ONNX Runtime's
# local_window_size) and o_proj: Llama's and its copies.
SUPPORTED = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention",
             "Phi3Attention")


def _is_linear(m) -> bool:
    return isinstance(m, torch.nn.Linear)


def _window(attn: torch.nn.Module):
    """The module's sliding window W (each token attends to the W last positions, itself
    included: Hugging Face's sliding_window) or None: the module's own (per-layer in Qwen2/3),
    else its config's (Mistral, Phi-3)."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(getattr(attn, "config", None), "sliding_window", None)


def _supported(attn: torch.nn.Module) -> bool:
    cfg = getattr(attn, "config", None)
    projections = _is_linear(getattr(attn, "qkv_proj", None)) or all(
        _is_linear(getattr(attn, n, None)) for n in ("q_proj", "k_proj", "v_proj"))
    window = _window(attn) if cfg is not None else None
    return (type(attn).__name__ in SUPPORTED and cfg is not None and projections
            and _is_linear(getattr(attn, "o_proj", None))
            and (window is None or (isinstance(window, int) and window >= 1))
            and attn.head_dim % 16 == 0)  # ONNX Runtime's rotary wants head dims of 16k


def _qkv(self, hidden_states) -> tuple:
    """q, k, v [B, S, heads * D] as the module computes them before the rotary embedding."""
    if getattr(self, "qkv_proj", None) is not None:  # Phi-3: one projection, split
        qkv = self.qkv_proj(hidden_states)
        nq = self.config.num_attention_heads * self.head_dim
        nk = self.config.num_key_value_heads * self.head_dim
        q, k, v = qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:]
    else:
        q, k, v = (self.q_proj(hidden_states), self.k_proj(hidden_states),
                   self.v_proj(hidden_states))
    if getattr(self, "q_norm", None) is not None:  # Qwen3: RMSNorm over each head
        q = self.q_norm(q.unflatten(-1, (-1, self.head_dim))).flatten(-2)
        k = self.k_norm(k.unflatten(-1, (-1, self.head_dim))).flatten(-2)
    return q, k, v


def _shared_inputs(self, hidden_states, cos, sin, past, shared: dict) -> tuple:
    """seqlens_k, the total length (as a tensor and as an int) and the half-width rotary
    angles, computed by the first layer and reused by the others (one set of nodes per graph
    instead of one per layer). Without past: S each, and the model's own angles for
    positions 0..S-1. With past (WithPast): the lengths from its attention mask [B, T] (row
    sums - 1, and T), and the angles of positions 0..T-1 from the model's rotary module
    (ONNX Runtime wants no more rows than the total length, however long the cache buffer)."""
    key = (id(cos), id(sin))
    if shared.get("key") != key:
        b, s = hidden_states.shape[0], hidden_states.shape[1]
        half = self.head_dim // 2
        if past is None:
            total = s
            seqlens = torch.full((), s - 1, dtype=torch.int32).expand(b)
        else:
            mask = shared["mask"]
            total = mask.shape[1]
            seqlens = (mask.sum(1) - 1).to(torch.int32)
            if shared.get("rotary") is None:
                raise RuntimeError("fused attention with past needs the model's rotary_emb")
            positions = torch.arange(total, device=hidden_states.device).unsqueeze(0)
            cos, sin = shared["rotary"](hidden_states, positions)
        # Keep cos/sin alive with the key, so that their ids stay unique.
        shared["key"], shared["values"] = key, (
            cos, sin, seqlens, torch.full((), total, dtype=torch.int32), total,
            cos[0, :, :half], sin[0, :, :half])
    return shared["values"][2:]


def _forward(self, hidden_states, position_embeddings=None, attention_mask=None,
             past_key_values=None, **kwargs):
    cos, sin = position_embeddings  # [B, S, D], the angles duplicated over the two halves
    if past_key_values is not None or cos.shape[-1] != self.head_dim:
        # a Hugging Face cache, or rotary over part of the head: not this op's contract
        return self._qexport_original_forward(hidden_states, position_embeddings,
                                              attention_mask, past_key_values, **kwargs)
    past = self._qexport_past  # (keys, values) [B, kv heads, P, D] under WithPast, else None
    seqlens_k, total_length, total, cos_half, sin_half = _shared_inputs(
        self, hidden_states, cos, sin, past, self._qexport_shared)
    out, present_k, present_v = torch.ops.qexport.group_query_attention(
        *_qkv(self, hidden_states), *(past if past is not None else (None, None)), seqlens_k, total_length, cos_half,
        sin_half, self.config.num_attention_heads, self.config.num_key_value_heads,
        float(self.scaling), total, _window(self) or -1)
    self._qexport_present = (present_k, present_v)
    return self.o_proj(out), None


class WithPast(torch.nn.Module):
    """`forward(input_ids [B, S], attention_mask [B, T], k_0, v_0, k_1, v_1, ...) -> (logits,
    k_0', v_0', ...)` around a Hugging Face causal LM (`.model`, the decoder stack, and
    `.lm_head`), for tracing under `fused_attention`. attention_mask: per row, a 1 for each of
    its tokens so far, cached and new, then 0s (T = the longest row). Rows of a batch may
    differ in length: a prompt batch (S = T) is padded on the right, and in each later call
    row b's new token goes at its own position L_b - 1 (L_b its count of ones). k_i/v_i
    [B, kv heads, P, D] are layer i's cache: row b's first L_b - S positions hold its past
    keys (rotated) and values; P = T - S (each call returns the cache one token longer), or
    P >= T (a buffer of the maximum length, which ONNX Runtime updates in place when the
    presents are bound to the pasts' memory). The outputs are the logits [B, 1, V] of each
    row's last token (in a prompt, its last real one: the next token's distribution, all a
    generation loop reads; skipping the head for the rest of a 128-token prompt takes ~20 %
    off it) and each layer's present keys/values [B, kv heads, max(T, P), D]. The attribute
    path of the HF model is `model`, as in qexport.models.CausalLMLogits, so the layer names
    match a quantization of that wrapper."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.attention = [m for m in model.modules() if _supported(m)]

    def forward(self, input_ids, attention_mask, *past):
        if len(past) != 2 * len(self.attention):
            raise ValueError(f"expected {2 * len(self.attention)} past tensors, got {len(past)}")
        t, s = attention_mask.shape[1], input_ids.shape[1]
        for i, attn in enumerate(self.attention):
            attn._qexport_past = (past[2 * i], past[2 * i + 1])
            attn._qexport_shared["mask"] = attention_mask
        try:
            positions = torch.arange(t - s, t, device=input_ids.device).unsqueeze(0)
            hidden = self.model.model(input_ids=input_ids, position_ids=positions,
                                      use_cache=False).last_hidden_state
            # Each row's last real token: in a prompt (S = T) the row's length - 1, so that
            # rows padded on the right get their own; otherwise the last new token.
            lengths = attention_mask.sum(1)
            prompt = torch.full((), s, device=lengths.device) == torch.full((), t)
            last = torch.where(prompt, lengths - 1, torch.full_like(lengths, s - 1))
            hidden = hidden.gather(1, last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1]))
            logits = self.model.lm_head(hidden)
            return (logits, *(t for attn in self.attention for t in attn._qexport_present))
        finally:
            for attn in self.attention:
                attn._qexport_past = None
                attn._qexport_shared.pop("mask", None)


@contextlib.contextmanager
def fused_attention(module: torch.nn.Module):
    """Within the context, the supported attention modules of `module` compute their attention
    with qexport::group_query_attention. Yields how many were swapped."""
    swapped = [m for m in module.modules() if _supported(m)]
    own = {id(m): m.__dict__["forward"] for m in swapped if "forward" in m.__dict__}
    rotary = [m for name, m in module.named_modules() if name.endswith("rotary_emb")]
    shared: dict = {"rotary": rotary[0] if len(rotary) == 1 else None}
    for m in swapped:
        m._qexport_original_forward, m._qexport_shared = m.forward, shared
        m._qexport_past = m._qexport_present = None
        m.forward = types.MethodType(_forward, m)
    try:
        yield len(swapped)
    finally:
        for m in swapped:
            del m.forward, m._qexport_original_forward, m._qexport_shared
            del m._qexport_past, m._qexport_present
            if id(m) in own:  # an instance-level forward (e.g. a hook wrapper) it had before
                m.forward = own[id(m)]


def kv_cache_unsupported(module: torch.nn.Module) -> str | None:
    """Why `WithPast` cannot wrap `module` (qexport's causal-LM wrapper), or None."""
    hf = getattr(module, "model", None)
    cfg = getattr(hf, "config", None)
    if hf is None or cfg is None or not all(hasattr(hf, a) for a in ("model", "lm_head")):
        return "it needs a Hugging Face causal LM (a decoder stack `.model` and `.lm_head`)"
    n = len(WithPast(hf).attention)
    if n == 0 or n != getattr(cfg, "num_hidden_layers", -1):
        return (f"{n} of its attention blocks are supported by the fused attention (Llama, "
                "Mistral, Qwen2, Qwen3, Phi-3 with head sizes a multiple of 16 and rotary "
                "over whole heads); it needs all of them")
    return None


def _family(name: str, model_types: tuple[str, ...]) -> Family:
    return register(Family(
        name, model_types=model_types, block_paths=("model.layers", "layers"),
        attention_swap=fused_attention, with_past=lambda module: WithPast(module.model),
        kv_cache_unsupported=kv_cache_unsupported))


FAMILY = _family("llama", ("llama", "mistral", "qwen2"))
QWEN3 = _family("qwen3", ("qwen3",))  # q/k RMSNorm per head
PHI3 = _family("phi3", ("phi3",))  # one qkv projection
