"""Bit packing, byte views and the piece layout of taciturn.wire."""
from __future__ import annotations

import pytest
import torch

from taciturn.wire import ALIGN, Pieces, as_bytes, from_bytes, pack_signs, packed_len, padded, unpack_signs

LENGTHS = [1, 7, 8, 9, 1000, 10 ** 6 + 3]


def plain_pack(x: torch.Tensor) -> list:
    """Byte b holds elements 8b..8b+7, element i on bit i % 8, 1 = non-negative."""
    bits = (x >= 0).tolist()
    return [sum(1 << k for k, bit in enumerate(bits[b:b + 8]) if bit) for b in range(0, len(bits), 8)]


@pytest.mark.parametrize("n", LENGTHS, ids=lambda n: f"n{n}")
def test_pack_unpack_round_trip(n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    x[::3] = 0.0
    packed = pack_signs(x)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_len(n) == -(-n // 8)
    bits = unpack_signs(packed, n)
    assert bits.dtype == torch.bool and bits.numel() == n
    assert torch.equal(bits, x >= 0)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000], ids=lambda n: f"n{n}")
def test_pack_bit_order_and_zero_padding(n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(7 + n))
    assert pack_signs(x).tolist() == plain_pack(x)
    # the unused high bits of the last byte are zero, so equal signs give equal bytes
    ones = pack_signs(torch.ones(n))
    assert ones[-1].item() == (1 << (n % 8 or 8)) - 1


def test_sign_of_zero_is_plus_one():
    x = torch.tensor([0.0, -0.0, -1e-30, 1e-30, -3.0, 2.0, 0.0, -0.0, 5.0])
    assert unpack_signs(pack_signs(x), x.numel()).tolist() == [True, True, False, True, False, True, True, True, True]


def test_pack_accepts_low_precision_and_shaped_inputs():
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(3))
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(pack_signs(x.to(dtype)), pack_signs(x.reshape(-1)))


def test_padding_and_byte_views():
    assert [padded(n) for n in (0, 1, 7, 8, 9, 16)] == [0, 8, 8, 8, 16, 16]
    assert ALIGN == 8
    values = torch.tensor([1.5, -2.0, 3.25])
    buf = torch.zeros(3 + 12, dtype=torch.uint8)
    buf[3:] = as_bytes(values)
    assert torch.equal(from_bytes(buf, 3, 3, torch.float32), values)  # unaligned offset: copied
    view = from_bytes(as_bytes(values), 4, 2, torch.float32)
    assert torch.equal(view, values[1:]) and view.data_ptr() == values[1:].data_ptr()  # aligned: a view


def test_pieces_runs_group_equal_lengths():
    p = Pieces.from_lengths([4, 4, 4, 2, 0, 3, 3])
    assert p.numel == 20 and p.count == 6
    assert p.runs == ((0, 3, 4), (12, 1, 2), (14, 2, 3))
    assert p.lengths() == [4, 4, 4, 2, 3, 3]
    empty = Pieces.from_lengths([])
    assert empty.numel == 0 and empty.count == 0 and empty.reduce(torch.zeros(0), lambda v: v.sum(1)).numel() == 0


def test_pieces_reduce_and_expand_are_per_piece():
    p = Pieces.from_lengths([4, 4, 4, 2, 3, 3])
    x = torch.arange(20, dtype=torch.float32)
    sums = p.reduce(x, lambda v: v.sum(dim=1))
    assert sums.tolist() == [6.0, 22.0, 38.0, 25.0, 45.0, 54.0]
    out = torch.zeros(20)
    p.expand_into(out, sums, lambda view, val: view.copy_(val.expand_as(view)))
    assert out.tolist() == [v for v, n in zip(sums.tolist(), p.lengths()) for _ in range(n)]
