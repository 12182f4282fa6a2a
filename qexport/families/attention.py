"""Attention blocks of Hugging Face decoders as one ONNX Runtime node each (com.microsoft
GroupQueryAttention), and the KV-cache decoder `WithPast`, for every family whose attention
that op can express: Llama, Mistral, Qwen2/3, Phi-3, Gemma 1/2/3 (rotary), OPT and GPT-2
(learned positions: no rotary).

Exported as traced, an attention block is ~30 small ONNX nodes (reshapes and transposes of
q/k/v, rotary embedding, the repeat of the kv heads, the causal mask, two MatMuls and a
softmax). At decoding each node costs ONNX Runtime about a microsecond of dispatch whatever
its size, which on SmolLM2-135M was ~1 ms of a ~3 ms token (docs/performance.md). While
tracing, `fused_attention(module)` swaps the forward of each supported attention module
(`unsupported` says which are not, and why) for one that keeps its projections (so the
Linear passes still see them) and computes the rest with
`torch.ops.qexport.group_query_attention`, which the exporter writes as one
GroupQueryAttention node. Its PyTorch implementation is the reference semantics, so the
traced graph still runs (calibration, parity checks).

What the op covers, per module: q/k/v projections (or one fused projection, split: Phi-3's
qkv_proj, GPT-2's c_attn), an RMSNorm over each head of q and k (Qwen3, Gemma 3), rotate-half
rotary embedding over whole heads (from the model's own rotary module, so rotary scalings
and Gemma 3's per-layer bases hold), grouped kv heads, the module's softmax scale (Gemma's
query_pre_attn_scalar, GPT-2's per-layer scaling), tanh soft-capping of the logits (Gemma 2:
ONNX Runtime's softcap), a sliding window (ONNX Runtime's local_window_size), causal masking,
and the output projection.

The exported graph attends causally over positions 0..S-1 of its input, as the traced graph
without a KV cache does; it takes no attention mask (qexport's exports take input_ids only).
Under `WithPast` the op also reads and writes the cache: its lengths come from the attention
mask, so the cache may be a buffer longer than what it holds, which ONNX Runtime then
updates in place (docs/design.md, "KV cache").
"""
from __future__ import annotations

import contextlib
import inspect
import types

import torch

from ..ops import group_query_attention as _gqa  # noqa: F401  (torch.ops.qexport.group_query_attention)

# Attention classes the op can express -> whether they take rotary position embeddings
# (position_embeddings = (cos, sin)); the others add learned positions to the embeddings.
ATTENTION_CLASSES = {
    "LlamaAttention": True, "MistralAttention": True, "Qwen2Attention": True,
    "Qwen3Attention": True, "Phi3Attention": True, "GemmaAttention": True,
    "Gemma2Attention": True, "Gemma3Attention": True,
    "OPTAttention": False, "GPT2Attention": False,
}
FUSED_PROJECTIONS = ("qkv_proj", "c_attn")  # one projection of q, k and v (Phi-3, GPT-2)
OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "c_proj")


def _linear(m) -> torch.nn.Linear | None:
    return m if isinstance(m, torch.nn.Linear) else None


def _fused_projection(attn) -> torch.nn.Linear | None:
    return next((_linear(getattr(attn, n, None)) for n in FUSED_PROJECTIONS
                 if _linear(getattr(attn, n, None)) is not None), None)


def _output_projection(attn) -> torch.nn.Linear | None:
    return next((_linear(getattr(attn, n, None)) for n in OUTPUT_PROJECTIONS
                 if _linear(getattr(attn, n, None)) is not None), None)


def heads(attn) -> tuple[int, int]:
    """(query heads, key/value heads) of an attention module."""
    cfg = attn.config
    n = cfg.num_attention_heads
    return n, getattr(cfg, "num_key_value_heads", None) or n


def _window(attn):
    """The module's sliding window W (each token attends to the W last positions, itself
    included: Hugging Face's sliding_window) or None: the module's own (per-layer in Qwen2/3
    and Gemma 2/3), else its config's (Mistral, Phi-3)."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(getattr(attn, "config", None), "sliding_window", None)


def _softcap(attn) -> float:
    """Gemma 2's attention-logit soft-capping (tanh(x / c) * c), 0 for none."""
    return float(getattr(attn, "attn_logit_softcapping", None) or 0.0)


def unsupported(attn: torch.nn.Module) -> str | None:
    """Why the fused op cannot compute `attn`'s attention, or None when it can."""
    name = type(attn).__name__
    if name not in ATTENTION_CLASSES:
        return f"{name} is not an attention class the fused op knows"
    cfg = getattr(attn, "config", None)
    if cfg is None or not isinstance(getattr(attn, "head_dim", None), int):
        return f"{name} has no config or head_dim"
    if _fused_projection(attn) is None and not all(
            _linear(getattr(attn, n, None)) for n in ("q_proj", "k_proj", "v_proj")):
        return f"{name}'s q/k/v projections are not nn.Linear"
    if _output_projection(attn) is None:
        return f"{name}'s output projection is not an nn.Linear"
    if getattr(attn, "is_cross_attention", False) or not getattr(attn, "is_causal", True):
        return f"{name} is cross or bidirectional attention (the fused op is causal)"
    window = _window(attn)
    if window is not None and not (isinstance(window, int) and window >= 1):
        return f"{name}'s sliding window {window!r} is not a positive int"
    if ATTENTION_CLASSES[name]:
        if attn.head_dim % 16:
            return (f"head size {attn.head_dim} is not a multiple of 16 (ONNX Runtime's "
                    "rotary embedding)")
        partial = getattr(cfg, "partial_rotary_factor", 1.0)
        if partial not in (None, 1.0):
            return f"rotary over part of each head (partial_rotary_factor {partial})"
    return None


def _qkv(self, hidden_states) -> tuple:
    """q, k, v [B, S, heads * D] as the module computes them before the rotary embedding."""
    fused = _fused_projection(self)
    if fused is not None:  # Phi-3, GPT-2: one projection, split
        qkv = fused(hidden_states)
        num_heads, kv_heads = heads(self)
        nq, nk = num_heads * self.head_dim, kv_heads * self.head_dim
        q, k, v = qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:]
    else:
        q, k, v = (self.q_proj(hidden_states), self.k_proj(hidden_states),
                   self.v_proj(hidden_states))
    if getattr(self, "q_norm", None) is not None:  # Qwen3, Gemma 3: RMSNorm over each head
        q = self.q_norm(q.unflatten(-1, (-1, self.head_dim))).flatten(-2)
        k = self.k_norm(k.unflatten(-1, (-1, self.head_dim))).flatten(-2)
    return q, k, v


def _call_values(self, hidden_states, position_embeddings, past) -> tuple:
    """seqlens_k, the total length (as a tensor and as an int) and the half-width rotary
    angles (None, None without rotary), computed once per call of the model (by its first
    layer; Gemma 3: once per kind of layer) and reused by the others: one set of nodes per
    graph instead of one per layer. Without past: S each, and the model's own angles for
    positions 0..S-1. With past (WithPast): the lengths from its attention mask [B, T] (row
    sums - 1, and T), and the angles of positions 0..T-1 from the model's rotary module
    (ONNX Runtime wants no more rows than the total length, however long the cache buffer)."""
    shared = self._qexport_shared
    call = shared.get("call")
    if call is None:  # a layer called outside a forward of the swapped module: no sharing
        call = {}
    if "lengths" not in call:
        b, s = hidden_states.shape[0], hidden_states.shape[1]
        if past is None:
            total = s
            seqlens = torch.full((), s - 1, dtype=torch.int32).expand(b)
        else:
            mask = shared["mask"]
            total = mask.shape[1]
            seqlens = (mask.sum(1) - 1).to(torch.int32)
        call["lengths"] = (seqlens, torch.full((), total, dtype=torch.int32), total)
    if not ATTENTION_CLASSES[type(self).__name__]:
        return (*call["lengths"], None, None)
    layer_type = getattr(self, "layer_type", None)
    key = ("past", layer_type) if past is not None else (
        "own", id(position_embeddings[0]), id(position_embeddings[1]))
    if key not in call:
        if past is None:
            cos, sin = position_embeddings  # [B, S, D], the angles duplicated over the halves
        else:
            rotary = shared.get("rotary")
            if rotary is None:
                raise RuntimeError("fused attention with past needs the model's rotary_emb")
            total = call["lengths"][2]
            positions = torch.arange(total, device=hidden_states.device).unsqueeze(0)
            by_layer = "layer_type" in inspect.signature(rotary.forward).parameters
            cos, sin = (rotary(hidden_states, positions, layer_type) if by_layer
                        else rotary(hidden_states, positions))
        half = self.head_dim // 2
        # Keep the model's cos/sin alive with the key, so that their ids stay unique.
        call[key] = (cos[0, :, :half], sin[0, :, :half], position_embeddings)
    return (*call["lengths"], *call[key][:2])


def _forward(self, hidden_states, *args, **kwargs):
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    position_embeddings = kwargs.get("position_embeddings",
                                     args[0] if args and isinstance(args[0], tuple) else None)
    rotary = ATTENTION_CLASSES[type(self).__name__]
    if cache is not None or (rotary and (position_embeddings is None or
                                         position_embeddings[0].shape[-1] != self.head_dim)):
        # a Hugging Face cache, or rotary over part of the head: not this op's contract
        return self._qexport_original_forward(hidden_states, *args, **kwargs)
    past = self._qexport_past  # (keys, values) [B, kv heads, P, D] under WithPast, else None
    seqlens_k, total_length, total, cos, sin = _call_values(self, hidden_states,
                                                            position_embeddings, past)
    num_heads, kv_heads = heads(self)
    out, present_k, present_v = torch.ops.qexport.group_query_attention(
        *_qkv(self, hidden_states), *(past if past is not None else (None, None)), seqlens_k,
        total_length, cos, sin, num_heads, kv_heads, float(self.scaling), total,
        _window(self) or -1, _softcap(self))
    self._qexport_present = (present_k, present_v)
    return _output_projection(self)(out), None


def attention_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention modules of `module` (its classes named *Attention with a config),
    supported or not, in layer order."""
    return [m for m in module.modules()
            if type(m).__name__.endswith("Attention") and hasattr(m, "config")]


class WithPast(torch.nn.Module):
    """`forward(input_ids [B, S], attention_mask [B, T], k_0, v_0, k_1, v_1, ...) -> (logits,
    k_0', v_0', ...)` around a Hugging Face causal LM (its base model, the decoder stack, and
    its output embeddings), for tracing under `fused_attention`. attention_mask: per row, a 1
    for each of its tokens so far, cached and new, then 0s (T = the longest row). Rows of a
    batch may differ in length: a prompt batch (S = T) is padded on the right, and in each
    later call row b's new token goes at its own position L_b - 1 (L_b its count of ones),
    which is also the position a learned position table (OPT, GPT-2) is read at. k_i/v_i
    [B, kv heads, P, D] are layer i's cache: row b's first L_b - S positions hold its past
    keys (rotated) and values; P = T - S (each call returns the cache one token longer), or
    P >= T (a buffer of the maximum length, which ONNX Runtime updates in place when the
    presents are bound to the pasts' memory). The outputs are the logits [B, 1, V] of each
    row's last token (in a prompt, its last real one: the next token's distribution, all a
    generation loop reads; skipping the head for the rest of a 128-token prompt takes ~20 %
    off it; Gemma 2's final soft-capping applied) and each layer's present keys/values
    [B, kv heads, max(T, P), D]. The attribute path of the HF model is `model`, as in
    qexport.models.CausalLMLogits, so the layer names match a quantization of that wrapper."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.attention = [m for m in attention_modules(model) if unsupported(m) is None]

    @property
    def cache_shape(self) -> tuple[int, int]:
        """(kv heads, head size) of each layer's cache."""
        return heads(self.attention[0])[1], self.attention[0].head_dim

    def forward(self, input_ids, attention_mask, *past):
        if len(past) != 2 * len(self.attention):
            raise ValueError(f"expected {2 * len(self.attention)} past tensors, got {len(past)}")
        t, s = attention_mask.shape[1], input_ids.shape[1]
        for i, attn in enumerate(self.attention):
            attn._qexport_past = (past[2 * i], past[2 * i + 1])
            attn._qexport_shared["mask"] = attention_mask
        try:
            # Row b's new tokens are at L_b - S .. L_b - 1; a prompt (S = T) starts at 0, so
            # that rows padded on the right get their own positions.
            lengths = attention_mask.sum(1)
            prompt = torch.full((), s, device=lengths.device) == torch.full((), t)
            start = torch.where(prompt, torch.zeros_like(lengths), lengths - s)
            positions = start.unsqueeze(1) + torch.arange(s, device=input_ids.device)
            hidden = self.model.base_model(input_ids=input_ids, position_ids=positions,
                                           use_cache=False).last_hidden_state
            # Each row's last real token: in a prompt the row's length - 1, otherwise the last
            # new token.
            last = torch.where(prompt, lengths - 1, torch.full_like(lengths, s - 1))
            hidden = hidden.gather(1, last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1]))
            logits = self.model.get_output_embeddings()(hidden)
            cap = getattr(self.model.config, "final_logit_softcapping", None)
            if cap:  # Gemma 2
                logits = torch.tanh(logits / cap) * cap
            return (logits, *(t for attn in self.attention for t in attn._qexport_present))
        finally:
            for attn in self.attention:
                attn._qexport_past = None
                attn._qexport_shared.pop("mask", None)


@contextlib.contextmanager
def fused_attention(module: torch.nn.Module):
    """Within the context, the supported attention modules of `module` compute their attention
    with qexport::group_query_attention. Yields how many were swapped."""
    swapped = [m for m in attention_modules(module) if unsupported(m) is None]
    own = {id(m): m.__dict__["forward"] for m in swapped if "forward" in m.__dict__}
    rotary = [m for name, m in module.named_modules() if name.endswith("rotary_emb")]
    shared: dict = {"rotary": rotary[0] if len(rotary) == 1 else None}
    for m in swapped:
        m._qexport_original_forward, m._qexport_shared = m.forward, shared
        m._qexport_past = m._qexport_present = None
        m.forward = types.MethodType(_forward, m)

    # Each forward of `module` computes its lengths and angles afresh, once for all layers.
    def begin(*_):
        shared["call"] = {}

    def end(*_):
        shared.pop("call", None)

    hooks = [module.register_forward_pre_hook(begin), module.register_forward_hook(end)]
    try:
        yield len(swapped)
    finally:
        for hook in hooks:
            hook.remove()
        for m in swapped:
            del m.forward, m._qexport_original_forward, m._qexport_shared
            del m._qexport_past, m._qexport_present
            if id(m) in own:  # an instance-level forward (e.g. a hook wrapper) it had before
                m.forward = own[id(m)]


def kv_cache_unsupported(module: torch.nn.Module) -> str | None:
    """Why `WithPast` cannot wrap `module` (qexport's causal-LM wrapper), or None."""
    hf = getattr(module, "model", None)
    cfg = getattr(hf, "config", None)
    if cfg is None or not hasattr(hf, "base_model") or \
            not callable(getattr(hf, "get_output_embeddings", None)) or \
            hf.get_output_embeddings() is None:
        return "it needs a Hugging Face causal LM (a base model and an output head)"
    blocks = attention_modules(hf)
    reasons = [r for r in map(unsupported, blocks) if r]
    if reasons or len(blocks) != getattr(cfg, "num_hidden_layers", -1):
        why = reasons[0] if reasons else (f"{len(blocks)} attention modules for "
                                          f"{getattr(cfg, 'num_hidden_layers', '?')} layers")
        return (f"{len(blocks) - len(reasons)} of its {len(blocks)} attention blocks can be "
                f"fused and it needs all of them: {why}")
    return None


def why_not_fused(module: torch.nn.Module) -> str | None:
    """Why the first attention module of `module` that the swap leaves traced is left, or
    None when there is none (for the report)."""
    return next((r for r in map(unsupported, attention_modules(module)) if r), None)
