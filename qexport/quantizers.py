"""Closed-form quantizers: `quantize_linear` packs one Linear under a scheme, in the format of
the scheme's kind (schemes.py): `MixedLinearWeights` (salient channels chosen by calibration
activation magnitude, 4-bit asymmetric RTN for them, per-row binarization W ≈ α·sign(W − μ) + μ
for the rest), `NBitsWeights` (block-wise RTN) or `QDQWeights` (per-channel int weights, the
activation range from calibration).
"""
from __future__ import annotations

import math

import torch

from .ops.binary_mixed_linear import contract as C
from .ops.binary_mixed_linear.packing import MixedLinearWeights, num_groups, pack_nibbles, pack_signs


def select_salient(importance: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices (int32, ascending) of the round(ratio·K) most important input channels."""
    k = importance.numel()
    s = min(k, max(0, int(round(ratio * k))))
    if s == 0:
        return torch.zeros(0, dtype=torch.int32)
    if s == k:
        return torch.arange(k, dtype=torch.int32)
    top = torch.topk(importance.float(), s).indices
    return top.sort().values.to(torch.int32)


def rtn4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit RTN of w [N, S] in groups along S -> (codes uint8, scale fp16, zero uint8).

    The fp16-rounded scale is the one used to compute the codes, so the stored scale is exact.
    """
    n, s = w.shape
    gs = group_size if group_size > 0 else s
    g = num_groups(s, group_size)
    pad = g * gs - s
    wp = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1) if pad else w
    wg = wp.reshape(n, g, gs).float()
    lo = wg.amin(-1).clamp(max=0)
    hi = wg.amax(-1).clamp(min=0)
    scale = ((hi - lo) / C.SALIENT_QMAX).clamp(min=1e-8).half().float()
    zero = torch.round(-lo / scale).clamp(0, C.SALIENT_QMAX)
    codes = torch.round(wg / scale[..., None] + zero[..., None]).clamp(0, C.SALIENT_QMAX)
    codes = codes.reshape(n, g * gs)[:, :s].to(torch.uint8)
    return codes, scale.half(), zero.to(torch.uint8)


def quantize_mixed(weight: torch.Tensor, bias: torch.Tensor | None, salient_idx: torch.Tensor,
                   salient_group_size: int) -> MixedLinearWeights:
    """Closed-form w1.61 quantization of one Linear weight [N, K] given its salient channels."""
    w = weight.detach().float()
    n, k = w.shape
    is_salient = torch.zeros(k, dtype=torch.bool)
    is_salient[salient_idx.long()] = True
    wb = w[:, ~is_salient]
    if wb.shape[1]:
        mu = wb.mean(1, keepdim=True)
        alpha = (wb - mu).abs().mean(1)
        signs = wb >= mu
        row_offset = mu.flatten()
    else:
        alpha = row_offset = torch.zeros(n)
        signs = torch.zeros(n, 0, dtype=torch.bool)
    codes, scale, zero = rtn4(w[:, is_salient], salient_group_size) if is_salient.any() else (
        torch.zeros(n, 0, dtype=torch.uint8), torch.zeros(n, 0, dtype=torch.float16),
        torch.zeros(n, 0, dtype=torch.uint8))
    packed = MixedLinearWeights(
        in_features=k, out_features=n, salient_group_size=salient_group_size,
        sign_packed=pack_signs(signs), row_scale=alpha.half(), row_offset=row_offset.half(),
        salient_idx=salient_idx.to(torch.int32).contiguous(), salient_packed=pack_nibbles(codes),
        salient_scale=scale, salient_zero=zero,
        bias=None if bias is None else bias.detach().float().clone())
    packed.validate()
    return packed


def quantize_linear(scheme, weight: torch.Tensor, bias: torch.Tensor | None, stats):
    """One Linear [N, K] packed under `scheme`, given the statistics of its input
    (outlier.OutlierStats: channel RMS for the salient channels, min/max for an activation
    range)."""
    if scheme.kind == "qdq":
        from .ops.qdq_linear import quantize_qdq
        return quantize_qdq(weight, bias, float(stats.min.min()), float(stats.max.max()),
                            scheme.weight_bits, scheme.act_bits)
    if scheme.kind == "nbits":
        from .ops.matmul_nbits import quantize_nbits
        return quantize_nbits(weight, bias, scheme.weight_bits, scheme.salient_group_size)
    salient = select_salient(stats.rms, scheme.salient_ratio)
    return quantize_mixed(weight, bias, salient, scheme.salient_group_size)


def expected_bits_per_weight(n: int, k: int, ratio: float, group_size: int = 0) -> float:
    """Bits per weight of `quantize_mixed` output, from the format alone (docs/format.md)."""
    s = min(k, max(0, int(round(ratio * k))))
    g = num_groups(s, group_size)
    row_bytes = math.ceil((k - s) / 8) + math.ceil(s / 2) + 2 + 2 + g * 3
    return 8 * (n * row_bytes + 4 * s) / (n * k)
