"""Packing round trips are exact; bits/weight counts every stored byte; quantizer sanity."""
import pytest
import torch

from qexport import ops
from qexport.errors import QexportError
from qexport.ops.binary_mixed_linear.packing import (MixedLinearWeights, pack_nibbles, pack_signs, unpack_nibbles,
                             unpack_signs)
from qexport.quantizers import expected_bits_per_weight, quantize_mixed, rtn4, select_salient
from qexport.schemes import parse_scheme
from qexport.testing import random_mixed_linear


@pytest.mark.parametrize("kb", [0, 1, 7, 8, 13, 461, 1000])
def test_sign_round_trip(kb):
    signs = torch.randint(0, 2, (5, kb), generator=torch.Generator().manual_seed(kb)).bool()
    packed = pack_signs(signs)
    assert packed.shape == (5, (kb + 7) // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_signs(packed, kb) > 0, signs)
    if kb % 8:  # padding bits are zero
        assert int((packed[:, -1] >> (kb % 8)).max()) == 0


def test_sign_bit_order_is_lsb_first():
    signs = torch.zeros(1, 9, dtype=torch.bool)
    signs[0, 0] = signs[0, 3] = signs[0, 8] = True
    assert pack_signs(signs).tolist() == [[0b00001001, 0b00000001]]


@pytest.mark.parametrize("s", [0, 1, 2, 13, 115])
def test_nibble_round_trip(s):
    codes = torch.randint(0, 16, (4, s), generator=torch.Generator().manual_seed(s)).to(torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (4, (s + 1) // 2)
    assert torch.equal(unpack_nibbles(packed, s), codes.to(torch.int32))


def test_nibble_order_even_low():
    assert pack_nibbles(torch.tensor([[1, 2, 3]], dtype=torch.uint8)).tolist() == [[0x21, 0x03]]


@pytest.mark.parametrize("n,k,ratio,group", [(576, 576, 0.2, 0), (192, 576, 0.2, 0),
                                             (576, 1536, 0.2, 0), (64, 13, 0.2, 0),
                                             (64, 100, 1.0, 64), (16, 100, 0.0, 0)])
def test_bits_per_weight_counts_every_byte(n, k, ratio, group):
    w = torch.randn(n, k)
    p = quantize_mixed(w, None, select_salient(torch.rand(k), ratio), group)
    manual = sum(t.numel() * t.element_size() for t in p.tensors()[:-1] if t is not None)
    assert p.weight_nbytes() == manual
    assert p.bits_per_weight() == pytest.approx(expected_bits_per_weight(n, k, ratio, group))


def test_4096_square_is_at_most_1_62_bits():
    assert expected_bits_per_weight(4096, 4096, 0.2) <= 1.62


def test_rtn4_error_bound_and_exact_scale():
    w = torch.randn(8, 70)
    codes, scale, zero = rtn4(w, 32)
    assert codes.max() <= 15 and zero.max() <= 15
    g = torch.arange(70) // 32
    deq = (codes.float() - zero.float()[:, g]) * scale.float()[:, g]
    assert float(((deq - w).abs() / scale.float()[:, g]).max()) <= 0.5 + 1e-3


def test_binary_part_is_closed_form():
    w = torch.randn(4, 20)
    p = quantize_mixed(w, None, torch.zeros(0, dtype=torch.int32), 0)
    mu = w.mean(1, keepdim=True)
    alpha = (w - mu).abs().mean(1, keepdim=True)
    expected = alpha * torch.where(w >= mu, 1.0, -1.0) + mu
    torch.testing.assert_close(p.dequantize(), expected, rtol=2e-3, atol=2e-3)


def test_salient_columns_are_the_most_active():
    imp = torch.tensor([0.1, 5.0, 0.2, 3.0, 0.05])
    assert select_salient(imp, 0.4).tolist() == [1, 3]
    assert select_salient(imp, 0.0).numel() == 0
    assert select_salient(imp, 1.0).tolist() == [0, 1, 2, 3, 4]


def test_validate_rejects_bad_tensors():
    w = random_mixed_linear(8, 20, 4, with_bias=True)
    w.salient_idx = torch.tensor([3, 2, 5, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="strictly increasing"):
        w.validate()
    w = random_mixed_linear(8, 20, 4)
    w.row_scale = w.row_scale.float()
    with pytest.raises(ValueError, match="row_scale"):
        w.validate()


@pytest.mark.parametrize("s", [0, 6, 20])
def test_reference_op_equals_dequantized_matmul(s):
    w = random_mixed_linear(9, 20, s, salient_group_size=4 if s else 0, with_r2=True,
                            with_bias=True, seed=s)
    x = torch.randn(2, 3, 20)
    torch.testing.assert_close(ops.apply(x, w), x @ w.dequantize().T + w.bias,
                               rtol=1e-5, atol=1e-5)


def test_scheme_grammar():
    assert parse_scheme("w1.61a16").salient_ratio == 0.2
    assert parse_scheme("W4A16-g128").salient_group_size == 128
    assert parse_scheme("w1a16").salient_ratio == 0.0
    with pytest.raises(QexportError, match="supported: w1.61a16, w1a16, w4a16"):
        parse_scheme("w3a8")
    with pytest.raises(QexportError, match="no weight groups"):
        parse_scheme("w1a16-g64")
    assert (parse_scheme("w8a8").kind, parse_scheme("w6a6").act_bits) == ("qdq", 6)
    assert parse_scheme("w2a16-g32").salient_group_size == 32
    with pytest.raises(QexportError, match="power of two"):
        parse_scheme("w2a16-g48")  # MatMulNBits' block size
    with pytest.raises(QexportError, match="no weight groups"):
        parse_scheme("w8a8-g64")


@pytest.mark.parametrize("r2,bias", [(False, False), (True, True)], ids=["plain", "r2-bias"])
def test_stack_and_rows_round_trip(r2, bias):
    """stack puts parts' rows under each other (the op on the stack = the parts' outputs
    concatenated); rows cuts them out again."""
    base = random_mixed_linear(40, 70, 14, 8, with_r2=r2, with_bias=bias, seed=1)
    other = random_mixed_linear(24, 70, 14, 8, with_r2=r2, with_bias=bias, seed=2)
    other.salient_idx, other.r2 = base.salient_idx, base.r2
    assert base.stacks_with(other)
    stacked = MixedLinearWeights.stack([base, other])
    stacked.validate()
    x = torch.randn(3, 70)
    torch.testing.assert_close(ops.apply(x, stacked),
                               torch.cat([ops.apply(x, base), ops.apply(x, other)], -1))
    for part, (lo, hi) in ((base, (0, 40)), (other, (40, 64))):
        back = stacked.rows(lo, hi)
        for a, b in zip(back.tensors(), part.tensors()):
            assert (a is None and b is None) or torch.equal(a, b)


def test_stack_refuses_other_salient_channels_or_r2():
    base = random_mixed_linear(16, 50, 10, 0, with_r2=True, seed=3)
    other = random_mixed_linear(16, 50, 10, 0, with_r2=True, seed=4)
    assert not base.stacks_with(other)  # other salient channels
    other.salient_idx = base.salient_idx
    assert not base.stacks_with(other)  # same channels, other r2
    with pytest.raises(ValueError, match="do not share"):
        MixedLinearWeights.stack([base, other])
