"""`NBitsWeights`: the packed weights of a MatMulNBits node, and their conversions."""
from __future__ import annotations

import dataclasses
import math

import torch

from .. import check_tensors
from . import contract as C


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., L] in [0, 2^bits) -> uint8 [..., ceil(L·bits/8)], low bits first."""
    per = 8 // bits
    c = codes.to(torch.int32)
    pad = -c.shape[-1] % per
    if pad:
        c = torch.cat([c, c.new_zeros(*c.shape[:-1], pad)], dim=-1)
    c = c.reshape(*c.shape[:-1], -1, per)
    out = torch.zeros(c.shape[:-1], dtype=torch.int32)
    for j in range(per):
        out |= c[..., j] << (bits * j)
    return out.to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """The inverse of pack_bits: int32 codes [..., length]."""
    per, mask = 8 // bits, (1 << bits) - 1
    p = packed.to(torch.int32)
    codes = torch.stack([(p >> (bits * j)) & mask for j in range(per)], dim=-1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :length]


@dataclasses.dataclass
class NBitsWeights:
    in_features: int  # K
    out_features: int  # N
    bits: int
    block_size: int
    packed: torch.Tensor  # uint8 [N, k_blocks, block_size·bits/8]
    scales: torch.Tensor  # float32 [N · k_blocks]
    zero_points: torch.Tensor  # uint8 [N · ceil(k_blocks·bits/8)]
    bias: torch.Tensor | None = None  # float32 [N]
    accuracy_level: int = 0

    @property
    def k_blocks(self) -> int:
        return math.ceil(self.in_features / self.block_size)

    def tensors(self) -> list[torch.Tensor | None]:
        return [self.packed, self.scales, self.zero_points, None, self.bias]

    @classmethod
    def from_inputs(cls, tensors: list, attributes: dict[str, int]) -> "NBitsWeights":
        tensors = list(tensors) + [None] * (C.NUM_INPUTS - 1 - len(tensors))
        packed, scales, zero_points, g_idx, bias = tensors
        if g_idx is not None:
            raise ValueError("MatMulNBits with g_idx is not read by qexport")
        return cls(attributes[C.ATTR_K], attributes[C.ATTR_N], attributes[C.ATTR_BITS],
                   attributes[C.ATTR_BLOCK_SIZE], packed, scales, zero_points, bias,
                   attributes.get(C.ATTR_ACCURACY_LEVEL, 0))

    def attributes(self) -> dict[str, int]:
        return {C.ATTR_K: self.in_features, C.ATTR_N: self.out_features, C.ATTR_BITS: self.bits,
                C.ATTR_BLOCK_SIZE: self.block_size, C.ATTR_ACCURACY_LEVEL: self.accuracy_level}

    def weight_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors()[:3])

    def bits_per_weight(self) -> float:
        return 8.0 * self.weight_nbytes() / (self.in_features * self.out_features)

    def validate(self) -> None:
        n, kb, bs = self.out_features, self.k_blocks, self.block_size
        if self.bits not in C.SUPPORTED_BITS:
            raise ValueError(f"bits {self.bits} not in {C.SUPPORTED_BITS}")
        if bs < C.MIN_BLOCK_SIZE or bs & (bs - 1):
            raise ValueError(f"block_size {bs} is not a power of two >= {C.MIN_BLOCK_SIZE}")
        expect = {"packed": (self.packed, torch.uint8, (n, kb, bs * self.bits // 8)),
                  "scales": (self.scales, torch.float32, (n * kb,)),
                  "zero_points": (self.zero_points, torch.uint8,
                                  (n * math.ceil(kb * self.bits / 8),))}
        if self.bias is not None:
            expect["bias"] = (self.bias, torch.float32, (n,))
        check_tensors(expect)

    def stacks_with(self, other: "NBitsWeights") -> bool:
        return (isinstance(other, NBitsWeights) and self.in_features == other.in_features
                and self.bits == other.bits and self.block_size == other.block_size
                and (self.bias is None) == (other.bias is None))

    def _row_view(self) -> dict:
        n = self.out_features
        return {"packed": self.packed, "scales": self.scales.view(n, -1),
                "zero_points": self.zero_points.view(n, -1), "bias": self.bias}

    @staticmethod
    def stack(parts: list["NBitsWeights"]) -> "NBitsWeights":
        first = parts[0]
        if not all(first.stacks_with(p) for p in parts[1:]):
            raise ValueError("these weights do not share K, bits, block size and bias")
        views = [p._row_view() for p in parts]
        rows = {f: None if views[0][f] is None else torch.cat([v[f] for v in views])
                for f in views[0]}
        return dataclasses.replace(first, out_features=sum(p.out_features for p in parts),
                                   packed=rows["packed"], scales=rows["scales"].reshape(-1),
                                   zero_points=rows["zero_points"].reshape(-1), bias=rows["bias"])

    def rows(self, start: int, stop: int) -> "NBitsWeights":
        v = self._row_view()
        return dataclasses.replace(
            self, out_features=stop - start, packed=v["packed"][start:stop].clone(),
            scales=v["scales"][start:stop].reshape(-1).clone(),
            zero_points=v["zero_points"][start:stop].reshape(-1).clone(),
            bias=None if self.bias is None else self.bias[start:stop].clone())

    def codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes int32 [N, k_blocks, block_size], zero points int32 [N, k_blocks])."""
        n, kb = self.out_features, self.k_blocks
        codes = unpack_bits(self.packed, self.bits, self.block_size)
        zeros = unpack_bits(self.zero_points.view(n, -1), self.bits, kb)
        return codes, zeros

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [N, K]."""
        n, kb = self.out_features, self.k_blocks
        codes, zeros = self.codes()
        w = (codes - zeros[..., None]).float() * self.scales.view(n, kb, 1)
        return w.reshape(n, -1)[:, :self.in_features]


def quantize_nbits(weight: torch.Tensor, bias: torch.Tensor | None, bits: int,
                   block_size: int) -> NBitsWeights:
    """Asymmetric round-to-nearest per block of `block_size` along K (min/max range with 0
    inside it, as rtn4 does for qexport's 4-bit codes)."""
    w = weight.detach().float()
    n, k = w.shape
    kb, qmax = math.ceil(k / block_size), (1 << bits) - 1
    pad = kb * block_size - k
    wp = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1) if pad else w
    wg = wp.reshape(n, kb, block_size)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    zero = torch.round(-lo / scale).clamp(0, qmax)
    codes = torch.round(wg / scale[..., None] + zero[..., None]).clamp(0, qmax)
    return from_codes(codes.to(torch.uint8), scale, zero.to(torch.uint8), k, bits, bias)


def from_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, k: int, bits: int,
               bias: torch.Tensor | None) -> NBitsWeights:
    """NBitsWeights from codes [N, k_blocks, block_size], scales and zero points [N, k_blocks]."""
    n, kb, block_size = codes.shape
    packed = NBitsWeights(
        in_features=k, out_features=n, bits=bits, block_size=block_size,
        packed=pack_bits(codes, bits).contiguous(),
        scales=scale.float().reshape(-1).contiguous(),
        zero_points=pack_bits(zero.reshape(n, kb), bits).reshape(-1).contiguous(),
        bias=None if bias is None else bias.detach().float().clone())
    packed.validate()
    return packed


def from_mixed(mixed) -> NBitsWeights:
    """The same 4-bit codes, scales and zero points as an all-4-bit BinaryMixedLinear weight
    (w4a16: every input channel salient, in order), as MatMulNBits: the same numbers, the
    scales widened from fp16 to fp32. Raises ValueError where MatMulNBits cannot hold them."""
    from ..binary_mixed_linear.packing import unpack_nibbles

    n, k, gs = mixed.out_features, mixed.in_features, mixed.salient_group_size
    if mixed.num_binary or not torch.equal(mixed.salient_idx.long(), torch.arange(k)):
        raise ValueError("only an all-4-bit weight (every channel salient) converts")
    if gs < C.MIN_BLOCK_SIZE or gs & (gs - 1):
        raise ValueError(f"its group size {gs} is not a power of two >= {C.MIN_BLOCK_SIZE}")
    kb = math.ceil(k / gs)
    codes = unpack_nibbles(mixed.salient_packed, k)
    pad = kb * gs - k
    if pad:
        codes = torch.cat([codes, codes.new_zeros(n, pad)], dim=1)
    return from_codes(codes.reshape(n, kb, gs).to(torch.uint8), mixed.salient_scale.float(),
                      mixed.salient_zero, k, 4, mixed.bias)
