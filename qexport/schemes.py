"""Quantization schemes: the one place the scheme grammar is parsed.

Grammar: ``NAME[-gGROUP]``, NAME one of ``SCHEMES``; ``-gGROUP`` sets the group size of the
4-bit part (0 = one group per row). Examples: ``w1.61a16``, ``w1a16``, ``w4a16``, ``w4a16-g128``.
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
}

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
    if base.salient_ratio == 0.0:
        raise QexportError(f"scheme {base.name} has no 4-bit part, so -g does not apply")
    return dataclasses.replace(base, salient_group_size=int(m.group("group")))
