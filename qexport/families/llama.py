"""The Llama family and its copies (Llama, Mistral, Qwen2, Qwen3 with q/k norms, Phi-3 with
one qkv projection): blocks under model.layers; each attention block fused into one ONNX
Runtime GroupQueryAttention node, and the KV-cache decoder (families/attention.py)."""
from __future__ import annotations

from . import Family, register
from .attention import WithPast, fused_attention, kv_cache_unsupported


def decoder_family(name: str, model_types: tuple[str, ...], **fields) -> Family:
    """A decoder family with the fused attention and the KV-cache decoder of
    families/attention.py (blocks under model.layers unless `block_paths` says otherwise)."""
    return register(Family(
        name, model_types=model_types, **{"block_paths": ("model.layers", "layers"), **fields},
        attention_swap=fused_attention, with_past=lambda module: WithPast(module.model),
        kv_cache_unsupported=kv_cache_unsupported))


FAMILY = decoder_family("llama", ("llama", "mistral", "qwen2"))
QWEN3 = decoder_family("qwen3", ("qwen3",))  # q/k RMSNorm per head
PHI3 = decoder_family("phi3", ("phi3",))  # one qkv projection
