"""`QDQWeights`: a QDQLinear's weight and activation quantization parameters."""
from __future__ import annotations

import dataclasses

import torch

from .. import check_tensors
from . import contract as C


@dataclasses.dataclass
class QDQWeights:
    rounds_activations = True  # (class attribute) the parity rule of pipeline._check
    in_features: int  # K
    out_features: int  # N
    act_qmin: int
    act_qmax: int
    w_q: torch.Tensor  # int8 [K, N]
    w_scale: torch.Tensor  # float32 [N]
    x_scale: torch.Tensor  # float32 []
    x_zero: torch.Tensor  # uint8 []
    bias: torch.Tensor | None = None  # float32 [N]

    def tensors(self) -> list[torch.Tensor | None]:
        return [self.w_q, self.w_scale, self.x_scale, self.x_zero, self.bias]

    @classmethod
    def from_inputs(cls, tensors: list, attributes: dict[str, int]) -> "QDQWeights":
        tensors = list(tensors) + [None] * (C.NUM_INPUTS - 1 - len(tensors))
        return cls(attributes[C.ATTR_IN_FEATURES], attributes[C.ATTR_OUT_FEATURES],
                   attributes[C.ATTR_ACT_QMIN], attributes[C.ATTR_ACT_QMAX], *tensors)

    def attributes(self) -> dict[str, int]:
        return {C.ATTR_IN_FEATURES: self.in_features, C.ATTR_OUT_FEATURES: self.out_features,
                C.ATTR_ACT_QMIN: self.act_qmin, C.ATTR_ACT_QMAX: self.act_qmax}

    def weight_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w_q, self.w_scale))

    def bits_per_weight(self) -> float:
        return 8.0 * self.weight_nbytes() / (self.in_features * self.out_features)

    def validate(self) -> None:
        k, n = self.in_features, self.out_features
        expect = {"w_q": (self.w_q, torch.int8, (k, n)),
                  "w_scale": (self.w_scale, torch.float32, (n,)),
                  "x_scale": (self.x_scale, torch.float32, ()),
                  "x_zero": (self.x_zero, torch.uint8, ())}
        if self.bias is not None:
            expect["bias"] = (self.bias, torch.float32, (n,))
        check_tensors(expect)
        if not 0 <= self.act_qmin < self.act_qmax <= 255:
            raise ValueError(f"activation range [{self.act_qmin}, {self.act_qmax}] not within "
                             "uint8's")
        if not self.act_qmin <= int(self.x_zero) <= self.act_qmax:
            raise ValueError("x_zero outside the activation range")
        if not float(self.x_scale) > 0:
            raise ValueError("x_scale must be positive")

    def _same_input(self, other) -> bool:
        return (isinstance(other, QDQWeights) and self.in_features == other.in_features
                and (self.act_qmin, self.act_qmax) == (other.act_qmin, other.act_qmax)
                and torch.equal(self.x_scale, other.x_scale)
                and torch.equal(self.x_zero, other.x_zero))

    def stacks_with(self, other: "QDQWeights") -> bool:
        """Same input quantization (q/k/v share their input's), both with or without bias."""
        return self._same_input(other) and (self.bias is None) == (other.bias is None)

    @staticmethod
    def stack(parts: list["QDQWeights"]) -> "QDQWeights":
        first = parts[0]
        if not all(first.stacks_with(p) for p in parts[1:]):
            raise ValueError("these weights do not share their input quantization")
        return dataclasses.replace(
            first, out_features=sum(p.out_features for p in parts),
            w_q=torch.cat([p.w_q for p in parts], dim=1),
            w_scale=torch.cat([p.w_scale for p in parts]),
            bias=None if first.bias is None else torch.cat([p.bias for p in parts]))

    def rows(self, start: int, stop: int) -> "QDQWeights":
        return dataclasses.replace(
            self, out_features=stop - start, w_q=self.w_q[:, start:stop].clone(),
            w_scale=self.w_scale[start:stop].clone(),
            bias=None if self.bias is None else self.bias[start:stop].clone())

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight [N, K] (the activation quantization is not part of it)."""
        return (self.w_q.float() * self.w_scale[None, :]).T.contiguous()


def quantize_qdq(weight: torch.Tensor, bias: torch.Tensor | None, act_min: float,
                 act_max: float, weight_bits: int, act_bits: int) -> QDQWeights:
    """Symmetric per-output-channel weight codes within ±(2^(weight_bits−1) − 1), and the
    asymmetric per-tensor activation quantizer of the range [act_min, act_max] (0 included)
    with 2^act_bits levels."""
    w = weight.detach().float()
    n, k = w.shape
    wmax = (1 << (weight_bits - 1)) - 1
    w_scale = (w.abs().amax(1) / wmax).clamp(min=1e-12)
    w_q = torch.round(w / w_scale[:, None]).clamp(-wmax, wmax).to(torch.int8)
    qmax = (1 << act_bits) - 1
    lo, hi = min(float(act_min), 0.0), max(float(act_max), 0.0)
    x_scale = torch.tensor(max((hi - lo) / qmax, 1e-12), dtype=torch.float32)
    x_zero = torch.tensor(int(min(max(round(-lo / float(x_scale)), 0), qmax)), dtype=torch.uint8)
    packed = QDQWeights(k, n, 0, qmax, w_q.T.contiguous(), w_scale.float().contiguous(),
                        x_scale, x_zero, None if bias is None else bias.detach().float().clone())
    packed.validate()
    return packed
