"""taciturn.segments: a bucket's tensors read as one flat fp32 vector without copying them:
element positions, slices across tensor edges (and of slices), and the flat copy.

(That the sign codecs read Segments in place exactly as their flat copy is in test_kernels.py.)"""
from __future__ import annotations

import pytest
import torch

from taciturn.segments import Segments

SIZES = [5, 1, 0, 7, 3]  # an empty tensor among them


def parts(dtypes=None):
    out, start = [], 0
    for i, n in enumerate(SIZES):
        t = torch.arange(start, start + n, dtype=torch.float32)
        out.append(t.to(dtypes[i]) if dtypes else t)
        start += n
    return out


def whole():
    return torch.arange(float(sum(SIZES)))


def test_starts_and_numel_of_consecutive_tensors():
    seg = Segments(parts())
    assert seg.starts == [0, 5, 6, 6, 13]
    assert seg.numel() == 16 and seg.device == torch.device("cpu")
    # element i of tensor k is element starts[k] + i
    for k, p in enumerate(seg.parts):
        for i in range(p.numel()):
            assert p[i].item() == seg.starts[k] + i


def test_parts_are_the_tensors_themselves():
    ps = parts()
    seg = Segments(ps)
    assert all(a is b for a, b in zip(seg.parts, ps))
    ps[3][0] = -1.0
    assert seg.flat()[6] == -1.0  # read when flat() runs, not when built


@pytest.mark.parametrize("lo,hi", [(0, 16), (0, 5), (3, 8), (5, 6), (6, 13), (4, 14), (12, 16), (7, 7), (15, 16)])
def test_slices_across_tensor_edges(lo, hi):
    seg = Segments(parts())
    sub = seg[lo:hi]
    assert sub.numel() == hi - lo
    assert torch.equal(sub.flat(), whole()[lo:hi])
    # the slice keeps only the tensors it touches, as views into them, its starts from 0
    assert all(p.numel() > 0 for p in sub.parts)
    assert sub.starts == sorted(sub.starts) and (not sub.parts or sub.starts[0] == 0)
    for p, start in zip(sub.parts, sub.starts):
        assert torch.equal(p, whole()[lo + start:lo + start + p.numel()])
        assert any(p.data_ptr() >= q.data_ptr() and p.data_ptr() < q.data_ptr() + 4 * q.numel()
                   for q in seg.parts if q.numel())
    assert sub.device == seg.device


def test_slice_of_a_slice_and_python_slice_rules():
    seg = Segments(parts())
    assert torch.equal(seg[2:14][3:9].flat(), whole()[5:11])
    assert torch.equal(seg[-4:].flat(), whole()[-4:])
    assert torch.equal(seg[:100].flat(), whole())  # clipped to the length
    assert seg[10:3].numel() == 0 and seg[10:3].flat().numel() == 0


def test_flat_is_fp32_and_writes_into_out():
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.float32]
    seg = Segments(parts(dtypes))
    got = seg.flat()
    assert got.dtype == torch.float32 and torch.equal(got, whole())  # small integers: exact in every dtype
    out = torch.full((16,), 7.0)
    assert seg.flat(out) is out and torch.equal(out, whole())
    one = Segments([torch.arange(4.0).half()])
    assert one.flat().dtype == torch.float32 and torch.equal(one.flat(), torch.arange(4.0))
    into = torch.zeros(4)
    assert one.flat(into) is into and torch.equal(into, torch.arange(4.0))
    # a copy: writing to the flat vector leaves the tensors alone
    got[0] = 99.0
    assert seg.parts[0][0] == 0.0


def test_explicit_starts_and_an_empty_vector():
    a, b = torch.ones(2), torch.zeros(3)
    seg = Segments([a, b], starts=[0, 2])
    assert seg.numel() == 5 and torch.equal(seg[1:3].flat(), torch.tensor([1.0, 0.0]))
    empty = Segments([], device=torch.device("cpu"))
    assert empty.numel() == 0 and empty.parts == []
    flat = empty.flat()
    assert flat.numel() == 0 and flat.dtype == torch.float32
    assert Segments([torch.zeros(0)]).numel() == 0
