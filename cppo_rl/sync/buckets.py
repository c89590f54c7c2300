"""Packing named tensors into flat buckets of a byte budget, and unpacking them.

A `BucketPlan` is the metadata of one weight sync (names, shapes, dtypes, offsets), computed once
from the parameter list and shared by sender and receivers; each bucket then travels as one flat
buffer in one collective. A bucket holds one dtype; a tensor larger than the budget gets a bucket of
its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor lives in its bucket's flat buffer (offset and numel in elements)."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


@dataclass(frozen=True)
class Bucket:
    """One flat buffer: its dtype, element count and the tensors in it, in order."""

    dtype: torch.dtype
    numel: int
    slots: tuple[TensorSlot, ...]

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    def empty(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """An uninitialised flat buffer for this bucket (the receiving side)."""
        return torch.empty(self.numel, dtype=self.dtype, device=device)

    def pack(self, tensors: Sequence[torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
        """One flat buffer holding `tensors` (in slot order; shapes and dtype must match the plan)."""
        flat = self.empty(device)
        for slot, tensor in zip(self.slots, tensors, strict=True):
            if tuple(tensor.shape) != slot.shape or tensor.dtype != self.dtype:
                raise ValueError(
                    f"Bucket.pack: `{slot.name}` is {tensor.dtype} {tuple(tensor.shape)}, the plan says "
                    f"{self.dtype} {slot.shape}; the sender's parameters changed since the plan was made"
                )
            flat[slot.offset : slot.offset + slot.numel].copy_(tensor.reshape(-1))
        return flat

    def unpack(self, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) views into `flat`, one per slot."""
        return [(s.name, flat[s.offset : s.offset + s.numel].view(s.shape)) for s in self.slots]


@dataclass(frozen=True)
class BucketPlan:
    """The buckets of one sync, in send order."""

    buckets: tuple[Bucket, ...]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    @property
    def names(self) -> list[str]:
        return [slot.name for bucket in self.buckets for slot in bucket.slots]


def plan_buckets(specs: Iterable[tuple[str, Sequence[int], torch.dtype]], budget_bytes: int) -> BucketPlan:
    """Group (name, shape, dtype) specs, in order, into buckets of at most `budget_bytes` each."""
    if budget_bytes < 1:
        raise ValueError(f"plan_buckets: `budget_bytes` must be >= 1, got {budget_bytes}")
    buckets: list[Bucket] = []
    slots: list[TensorSlot] = []
    dtype, numel = None, 0

    def close() -> None:
        if slots:
            buckets.append(Bucket(dtype=dtype, numel=numel, slots=tuple(slots)))

    for name, shape, tensor_dtype in specs:
        size = 1
        for dim in shape:
            size *= int(dim)
        item = torch.empty((), dtype=tensor_dtype).element_size()
        if slots and (tensor_dtype != dtype or (numel + size) * item > budget_bytes):
            close()
            slots, numel = [], 0
        dtype = tensor_dtype
        slots.append(TensorSlot(name=name, shape=tuple(int(d) for d in shape), offset=numel, numel=size))
        numel += size
    close()
    return BucketPlan(buckets=tuple(buckets))
