"""GPT-2: blocks under transformer.h; a learned position table of n_positions. Its projections
are transformers' Conv1D modules (y = x W + b with W [in, out], traced as addmm): `normalize`
turns each into the nn.Linear with W transposed, which computes the same function and which
the passes quantize. Attention fused (c_attn split into q, k, v; no rotary) with the KV cache
(families/attention.py)."""
from __future__ import annotations

import torch

from .llama import decoder_family


def conv1d_to_linear(module: torch.nn.Module) -> int:
    """Replace every transformers Conv1D inside `module` by the equivalent nn.Linear, in
    place; returns how many."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ != "Conv1D" or not hasattr(child, "nf"):
                continue
            linear = torch.nn.Linear(child.weight.shape[0], child.nf, bias=child.bias is not None,
                                     dtype=child.weight.dtype, device=child.weight.device)
            with torch.no_grad():
                linear.weight.copy_(child.weight.T)
                if child.bias is not None:
                    linear.bias.copy_(child.bias)
            setattr(parent, name, linear)
            count += 1
    return count


FAMILY = decoder_family("gpt2", ("gpt2",), block_paths=("transformer.h", "h"),
                        context_attrs=("n_positions", "max_position_embeddings"),
                        normalize=conv1d_to_linear)
