"""Random packed weights for kernel tests and benchmarks (not quantized from anything)."""
from __future__ import annotations

import torch

from .ops.binary_mixed_linear.packing import MixedLinearWeights, num_groups


def random_mixed_linear(out_features: int, in_features: int, num_salient: int,
                        salient_group_size: int = 0, with_r2: bool = False,
                        with_bias: bool = False, seed: int = 0) -> MixedLinearWeights:
    g = torch.Generator().manual_seed(seed)
    n, k, s = out_features, in_features, num_salient
    kb, groups = k - s, num_groups(s, salient_group_size)
    salient_idx = torch.randperm(k, generator=g)[:s].sort().values.to(torch.int32)
    w = MixedLinearWeights(
        in_features=k, out_features=n, salient_group_size=salient_group_size,
        sign_packed=torch.randint(0, 256, (n, (kb + 7) // 8), generator=g, dtype=torch.uint8),
        row_scale=(torch.rand(n, generator=g) * 0.05 + 0.01).half(),
        row_offset=(torch.randn(n, generator=g) * 0.005).half(),
        salient_idx=salient_idx,
        salient_packed=torch.randint(0, 256, (n, (s + 1) // 2), generator=g, dtype=torch.uint8),
        salient_scale=(torch.rand(n, groups, generator=g) * 0.02 + 0.001).half(),
        salient_zero=torch.randint(0, 16, (n, groups), generator=g, dtype=torch.uint8),
        r2=(torch.rand(kb, generator=g) + 0.5).half() if with_r2 else None,
        bias=torch.randn(n, generator=g) if with_bias else None,
    )
    # Padding bits/nibbles must be zero (docs/format.md).
    if kb % 8:
        w.sign_packed[:, -1] &= (1 << (kb % 8)) - 1
    if s % 2:
        w.salient_packed[:, -1] &= 0x0F
    w.validate()
    return w
