"""Gemma 1/2/3 (text): blocks under model.layers (Gemma 3's multimodal class: under
model.language_model.layers). Attention fused with the KV cache (families/attention.py):
query_pre_attn_scalar as the op's scale, Gemma 2's logit soft-capping as its softcap,
sliding-window layers as its local window, Gemma 3's (1 + w) q/k norms and per-layer rotary
bases through the model's own modules; Gemma 2's final soft-capping in the decoder's head."""
from .llama import decoder_family

FAMILY = decoder_family("gemma", ("gemma", "gemma2", "gemma3", "gemma3_text"),
                        block_paths=("model.layers", "model.language_model.layers", "layers"))
