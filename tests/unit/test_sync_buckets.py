"""Bucket planning and packing for the weight sync."""

from __future__ import annotations

import pytest
import torch

from cppo_rl.sync.buckets import plan_buckets


def _named(shapes_and_dtypes):
    generator = torch.Generator().manual_seed(0)
    return [
        (f"p{i}", torch.randn(shape, generator=generator).to(dtype))
        for i, (shape, dtype) in enumerate(shapes_and_dtypes)
    ]


def test_buckets_respect_the_budget_and_the_order():
    named = _named([((4, 4), torch.float32)] * 5)  # 64 bytes each
    plan = plan_buckets([(n, t.shape, t.dtype) for n, t in named], budget_bytes=130)
    assert [len(b.slots) for b in plan.buckets] == [2, 2, 1]
    assert all(b.nbytes <= 130 for b in plan.buckets)
    assert plan.names == [n for n, _ in named]
    assert plan.nbytes == 5 * 64


def test_a_dtype_change_or_an_oversized_tensor_starts_a_bucket():
    named = _named([((2,), torch.float32), ((2,), torch.bfloat16), ((100,), torch.bfloat16), ((2,), torch.bfloat16)])
    plan = plan_buckets([(n, t.shape, t.dtype) for n, t in named], budget_bytes=64)
    assert [[s.name for s in b.slots] for b in plan.buckets] == [["p0"], ["p1"], ["p2"], ["p3"]]
    assert [b.dtype for b in plan.buckets] == [torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16]


def test_pack_then_unpack_round_trips_exactly():
    named = _named([((3, 5), torch.float32), ((7,), torch.float32), ((2, 2, 2), torch.float32), ((), torch.float32)])
    plan = plan_buckets([(n, t.shape, t.dtype) for n, t in named], budget_bytes=1 << 20)
    (bucket,) = plan.buckets
    flat = bucket.pack([t for _, t in named])
    assert flat.numel() == 15 + 7 + 8 + 1
    for (name, original), (got_name, got) in zip(named, bucket.unpack(flat), strict=True):
        assert name == got_name and torch.equal(original, got)


def test_pack_refuses_tensors_that_do_not_match_the_plan():
    named = _named([((3,), torch.float32)])
    (bucket,) = plan_buckets([(n, t.shape, t.dtype) for n, t in named], budget_bytes=64).buckets
    with pytest.raises(ValueError, match=r"`p0` is torch.float32 \(4,\)"):
        bucket.pack([torch.zeros(4)])
    with pytest.raises(ValueError, match="budget_bytes"):
        plan_buckets([], budget_bytes=0)
