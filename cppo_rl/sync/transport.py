"""A process group for weight sync that lives beside each process's own torch.distributed world.

The learner's rank 0 is already in DeepSpeed's default group, and each rollout engine may have
its own; `torch.distributed.new_group` cannot join processes of different worlds. So the sync group
is built directly from a TCPStore rendezvous: `ProcessGroupGloo` on CPU, `ProcessGroupNCCL` on GPU
(ranks: 0 = the learner's rank 0, 1..E = the rollout workers). Nothing here touches the default group.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from cppo_rl.sync.buckets import BucketPlan


def join_sync_group(
    address: str, port: int, rank: int, world_size: int, backend: str = "gloo", timeout_s: float = 300.0
) -> dist.ProcessGroup:
    """Join the weight-sync group (every member calls this at the same time; rank 0 hosts the store)."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"join_sync_group: `backend` must be gloo or nccl, got {backend!r}")
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout)
    store = dist.PrefixStore("cppo_weight_sync", store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    return dist.ProcessGroupNCCL(store, rank, world_size)  # GPU only


def receive_buckets(group: dist.ProcessGroup, plan: BucketPlan, device: str = "cpu") -> list[tuple[str, torch.Tensor]]:
    """Receive every bucket of `plan` from rank 0 (one broadcast each) and unpack them."""
    received = []
    for bucket in plan.buckets:
        flat = bucket.empty(device)
        group.broadcast(flat, 0).wait()
        received.extend(bucket.unpack(flat))
    return received
