"""Packed weights of qexport::BinaryMixedLinear (layout 1, docs/format.md).

`MixedLinearWeights` is the one in-memory form of a packed Linear: quantizers produce it,
the graph pass turns it into buffers of the custom op, the exporter writes it as initializers
and the report counts its bytes.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .. import check_tensors
from . import contract as C


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """[N, Kb] bool (True = +1) or ±1 values -> uint8 [N, ceil(Kb/8)], LSB first."""
    bits = (signs > 0) if signs.dtype != torch.bool else signs
    n, kb = bits.shape
    pad = (-kb) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(n, pad)], dim=1)
    weights = (1 << torch.arange(8, dtype=torch.int32))
    grouped = bits.reshape(n, -1, 8).to(torch.int32)
    return (grouped * weights).sum(-1).to(torch.uint8)


def unpack_signs(packed: torch.Tensor, kb: int) -> torch.Tensor:
    """uint8 [N, ceil(Kb/8)] -> float32 ±1 [N, Kb]."""
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    bits = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    bits = bits.reshape(packed.shape[0], -1)[:, :kb]
    return bits.to(torch.float32) * 2 - 1


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15], [N, S] -> uint8 [N, ceil(S/2)]; even column in the low nibble."""
    n, s = codes.shape
    c = codes.to(torch.int32)
    if s % 2:
        c = torch.cat([c, c.new_zeros(n, 1)], dim=1)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor, s: int) -> torch.Tensor:
    """uint8 [N, ceil(S/2)] -> int32 codes [N, S]."""
    p = packed.to(torch.int32)
    both = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(packed.shape[0], -1)
    return both[:, :s]


def num_groups(num_salient: int, group_size: int) -> int:
    if num_salient == 0:
        return 0
    g = group_size if group_size > 0 else num_salient
    return math.ceil(num_salient / g)


def binary_channels(in_features: int, salient_idx: torch.Tensor) -> torch.Tensor:
    """Input channels not in salient_idx, ascending (int64)."""
    keep = torch.ones(in_features, dtype=torch.bool)
    keep[salient_idx.long()] = False
    return torch.nonzero(keep).flatten()


@dataclasses.dataclass
class MixedLinearWeights:
    in_features: int
    out_features: int
    salient_group_size: int
    sign_packed: torch.Tensor  # uint8 [N, ceil(Kb/8)]
    row_scale: torch.Tensor  # float16 [N]
    row_offset: torch.Tensor  # float16 [N]
    salient_idx: torch.Tensor  # int32 [S]
    salient_packed: torch.Tensor  # uint8 [N, ceil(S/2)]
    salient_scale: torch.Tensor  # float16 [N, G]
    salient_zero: torch.Tensor  # uint8 [N, G]
    r2: torch.Tensor | None = None  # float16 [Kb]
    bias: torch.Tensor | None = None  # float32 [N]
    layout: int = C.LAYOUT_ROW_MAJOR

    @property
    def num_salient(self) -> int:
        return int(self.salient_idx.numel())

    @property
    def num_binary(self) -> int:
        return self.in_features - self.num_salient

    def tensors(self) -> list[torch.Tensor | None]:
        """Weight inputs 1..9 of the op, in contract order."""
        return [self.sign_packed, self.row_scale, self.row_offset, self.salient_idx,
                self.salient_packed, self.salient_scale, self.salient_zero, self.r2, self.bias]

    @classmethod
    def from_inputs(cls, tensors: list, attributes: dict[str, int]) -> "MixedLinearWeights":
        """The inverse of `tensors()` + `attributes()` (missing trailing optionals: None)."""
        tensors = list(tensors) + [None] * (C.NUM_INPUTS - 1 - len(tensors))
        return cls(attributes[C.ATTR_IN_FEATURES], attributes[C.ATTR_OUT_FEATURES],
                   attributes[C.ATTR_SALIENT_GROUP_SIZE], *tensors,
                   layout=attributes[C.ATTR_LAYOUT])

    def attributes(self) -> dict[str, int]:
        return {C.ATTR_IN_FEATURES: self.in_features, C.ATTR_OUT_FEATURES: self.out_features,
                C.ATTR_SALIENT_GROUP_SIZE: self.salient_group_size, C.ATTR_LAYOUT: self.layout}

    def weight_nbytes(self) -> int:
        """Every stored byte of the weight (bias excluded: it is not a weight)."""
        return sum(t.numel() * t.element_size() for t in self.tensors()[:-1] if t is not None)

    def bits_per_weight(self) -> float:
        return 8.0 * self.weight_nbytes() / (self.in_features * self.out_features)

    def validate(self) -> None:
        """Raise ValueError if the tensors disagree with the contract (docs/format.md)."""
        n, k, s = self.out_features, self.in_features, self.num_salient
        kb, g = k - s, num_groups(s, self.salient_group_size)
        expect = {
            "sign_packed": (self.sign_packed, torch.uint8, (n, math.ceil(kb / 8))),
            "row_scale": (self.row_scale, torch.float16, (n,)),
            "row_offset": (self.row_offset, torch.float16, (n,)),
            "salient_idx": (self.salient_idx, torch.int32, (s,)),
            "salient_packed": (self.salient_packed, torch.uint8, (n, math.ceil(s / 2))),
            "salient_scale": (self.salient_scale, torch.float16, (n, g)),
            "salient_zero": (self.salient_zero, torch.uint8, (n, g)),
        }
        if self.r2 is not None:
            expect["r2"] = (self.r2, torch.float16, (kb,))
        if self.bias is not None:
            expect["bias"] = (self.bias, torch.float32, (n,))
        check_tensors(expect)
        if self.layout not in C.SUPPORTED_LAYOUTS:
            raise ValueError(f"unknown layout {self.layout}; supported: {C.SUPPORTED_LAYOUTS}")
        idx = self.salient_idx.long()
        if s and (idx.min() < 0 or idx.max() >= k or (s > 1 and not bool((idx[1:] > idx[:-1]).all()))):
            raise ValueError("salient_idx must be strictly increasing and within [0, in_features)")
        if g and int(self.salient_zero.max()) > C.SALIENT_QMAX:
            raise ValueError("salient_zero above 15")

    # Inputs indexed by output row (stacked / sliced along dim 0); the others are per input
    # channel (salient_idx, r2) and must be equal across stacked weights.
    _ROW_FIELDS = ("sign_packed", "row_scale", "row_offset", "salient_packed", "salient_scale",
                   "salient_zero", "bias")

    def stacks_with(self, other: MixedLinearWeights) -> bool:
        """Whether `other`'s rows can go under this one's in one op: same K, salient channels,
        group size, layout and r2, and both with or both without a bias."""
        def same(a, b):
            return (a is None) == (b is None) and (a is None or torch.equal(a, b))
        return (self.in_features == other.in_features
                and self.salient_group_size == other.salient_group_size
                and self.layout == other.layout
                and (self.bias is None) == (other.bias is None)
                and same(self.salient_idx, other.salient_idx) and same(self.r2, other.r2))

    @staticmethod
    def stack(parts: list[MixedLinearWeights]) -> MixedLinearWeights:
        """One op computing every part's outputs, in order (rows concatenated); the parts
        must stack_with the first."""
        first = parts[0]
        if not all(first.stacks_with(p) for p in parts[1:]):
            raise ValueError("these weights do not share K, salient channels, groups and r2")
        rows = {f: torch.cat([getattr(p, f) for p in parts]) if getattr(first, f) is not None
                else None for f in MixedLinearWeights._ROW_FIELDS}
        return dataclasses.replace(first, out_features=sum(p.out_features for p in parts),
                                   **rows)

    def rows(self, start: int, stop: int) -> MixedLinearWeights:
        """The op restricted to output rows [start, stop) (the inverse of stack)."""
        rows = {f: getattr(self, f)[start:stop].clone() if getattr(self, f) is not None
                else None for f in MixedLinearWeights._ROW_FIELDS}
        return dataclasses.replace(self, out_features=stop - start, **rows)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [N, K] these bytes stand for."""
        n, k = self.out_features, self.in_features
        w = torch.zeros(n, k, dtype=torch.float32)
        if self.num_binary:
            signs = unpack_signs(self.sign_packed, self.num_binary)
            wb = self.row_scale.float()[:, None] * signs + self.row_offset.float()[:, None]
            if self.r2 is not None:
                wb = wb * self.r2.float()[None, :]
            w[:, binary_channels(k, self.salient_idx)] = wb
        if self.num_salient:
            w[:, self.salient_idx.long()] = self._salient_dequant()
        return w

    def _salient_dequant(self) -> torch.Tensor:
        s = self.num_salient
        codes = unpack_nibbles(self.salient_packed, s).float()
        gs = self.salient_group_size if self.salient_group_size > 0 else s
        group_of = torch.arange(s) // gs
        scale = self.salient_scale.float()[:, group_of]
        zero = self.salient_zero.float()[:, group_of]
        return (codes - zero) * scale
