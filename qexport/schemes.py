"""Quantization schemes: the one place the scheme grammar is parsed.

Grammar: ``NAME[-gGROUP]``, NAME one of ``SCHEMES``; ``-gGROUP`` sets the group size of the
4-bit part (0 = one group per row), or the block size of a MatMulNBits scheme. Examples:
``w1.61a16``, ``w1a16``, ``w4a16``, ``w4a16-g128``, ``w2a16``, ``w8a8``, ``w6a6``.

A scheme's `kind` says which op carries it (docs/format.md):
- "mixed": qexport::BinaryMixedLinear (binary + 4-bit channels; the qexport op library). An
  all-4-bit one (w4a16) can also be written as ONNX Runtime's MatMulNBits, with the same
  codes (QuantizeConfig.standard_ops, the library-free target);
- "nbits": com.microsoft::MatMulNBits (ONNX Runtime's own op): `weight_bits`-bit codes in
  blocks of `salient_group_size` along K;
- "qdq": static activation quantization, lowered to standard QuantizeLinear /
  DequantizeLinear around each MatMul: int8 containers holding `weight_bits`-bit weights and
  `act_bits`-bit activations (W6A6 as the OS+ paper runs it).
"""
from __future__ import annotations

import dataclasses
import re

from .errors import QexportError


@dataclasses.dataclass(frozen=True)
class Scheme:
    name: str
    salient_ratio: float  # fraction of input channels kept at 4 bits (0: w1, 1: w4)
    salient_group_size: int  # 4-bit group size along the salient columns; 0: per row
    description: str
    kind: str = "mixed"  # "mixed" | "nbits" | "qdq" (the module docstring)
    weight_bits: int = 4  # of the 4-bit part (mixed), or of every weight (nbits, qdq)
    act_bits: int = 16  # < 16: activations quantized (qdq)

    @property
    def standard(self) -> bool:
        """Whether ONNX Runtime's own ops can carry it (no op library)."""
        return self.kind != "mixed" or self.salient_ratio >= 1.0

    @property
    def label(self) -> str:
        return self.name if self.salient_group_size == SCHEMES[self.name].salient_group_size \
            else f"{self.name}-g{self.salient_group_size}"

    def with_overrides(self, salient_ratio: float | None = None) -> "Scheme":
        if salient_ratio is None:
            return self
        if not 0.0 <= salient_ratio <= 1.0:
            raise QexportError(f"--salient-ratio must be within [0, 1], got {salient_ratio}")
        return dataclasses.replace(self, salient_ratio=salient_ratio)


SCHEMES: dict[str, Scheme] = {
    "w1.61a16": Scheme("w1.61a16", 0.2, 0,
                       "PTQ1.61: 20% salient input channels at 4 bits, the rest binarized"),
    "w1a16": Scheme("w1a16", 0.0, 0, "per-row binarization (sign, scale, offset)"),
    "w4a16": Scheme("w4a16", 1.0, 64, "4-bit group-wise RTN (group 64)"),
    "w2a16": Scheme("w2a16", 1.0, 64, "2-bit block-wise RTN (block 64) as ONNX Runtime's "
                    "MatMulNBits", kind="nbits", weight_bits=2),
    "w8a8": Scheme("w8a8", 1.0, 0, "int8 per-channel weights, uint8 per-tensor static "
                   "activations, as standard QDQ ops (OS+ on)", kind="qdq", weight_bits=8,
                   act_bits=8),
    "w6a6": Scheme("w6a6", 1.0, 0, "6-bit ranges in int8 containers: weights in [-31, 31] per "
                   "channel, activations in 64 levels per tensor, as QDQ ops (OS+ on)",
                   kind="qdq", weight_bits=6, act_bits=6),
}


def default_head_scheme(scheme: Scheme) -> Scheme:
    """The scheme of the output head when none is asked for: the main one for activation
    quantization (an int8 model throughout), else 4-bit weights (GPTQ codes)."""
    return scheme if scheme.kind == "qdq" else SCHEMES["w4a16"]

_GRAMMAR = re.compile(r"^(?P<name>[a-z0-9.]+?)(?:-g(?P<group>\d+))?$")


def supported() -> str:
    return ", ".join(SCHEMES)


def parse_scheme(text: str) -> Scheme:
    m = _GRAMMAR.match(text.strip().lower())
    base = SCHEMES.get(m.group("name")) if m else None
    if base is None:
        raise QexportError(f"unknown scheme {text!r}; supported: {supported()} "
                           "(optionally with -gGROUP for the 4-bit group size, e.g. w4a16-g128)")
    if m.group("group") is None:
        return base
    if base.salient_ratio == 0.0 or base.kind == "qdq":
        raise QexportError(f"scheme {base.name} has no weight groups, so -g does not apply")
    group = int(m.group("group"))
    if base.kind == "nbits" and (group < 16 or group & (group - 1)):
        raise QexportError(f"{base.name}'s block size must be a power of two >= 16 "
                           f"(MatMulNBits), got {group}")
    return dataclasses.replace(base, salient_group_size=group)
