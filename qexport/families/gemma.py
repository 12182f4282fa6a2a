"""Gemma 1/2/3 (text): blocks under model.layers (Gemma 3's multimodal class: under
model.language_model.layers). Their attention (logit soft-capping, query_pre_attn_scalar,
sliding-window layers, q/k norms) is not swapped for ONNX Runtime's GroupQueryAttention yet:
it exports as traced ops, and there is no KV-cache decoder."""
from . import Family, register

FAMILY = register(Family("gemma", model_types=("gemma", "gemma2", "gemma3", "gemma3_text"),
                         block_paths=("model.layers", "model.language_model.layers",
                                      "layers")))
