"""A process group for weight sync that lives beside each process's own torch.distributed world.

The learner's rank 0 is already in DeepSpeed's default group, and each rollout engine's TP workers are
in vLLM's; `torch.distributed.new_group` cannot join processes of different worlds. So the sync group
is built directly from a TCPStore rendezvous: `ProcessGroupGloo` on CPU, `ProcessGroupNCCL` on GPU.
Ranks: 0 = the learner's rank 0; engine e's TP worker t is 1 + e * tp + t (`worker_rank`), so every
TP worker of every engine receives each broadcast itself (cppo_rl/sync/receiver.py).

Every collective of the group has a timeout (`timeout_s`, default `DEFAULT_SYNC_TIMEOUT_S`): on gloo
a broadcast whose peer is gone or never comes raises RuntimeError after it; on NCCL the watchdog
aborts the stuck collective after it and, with TORCH_NCCL_ASYNC_ERROR_HANDLING at its default,
tears the process down (docs/reliability.md, "A failed weight sync", says what the run does then).
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

DEFAULT_SYNC_TIMEOUT_S = 300.0


def worker_rank(engine_index: int, tensor_parallel_size: int, tp_rank: int) -> int:
    """The sync-group rank of TP worker `tp_rank` of engine `engine_index` (rank 0 is the learner)."""
    return 1 + engine_index * tensor_parallel_size + tp_rank


def join_sync_group(
    address: str,
    port: int,
    rank: int,
    world_size: int,
    backend: str = "gloo",
    timeout_s: float = DEFAULT_SYNC_TIMEOUT_S,
) -> dist.ProcessGroup:
    """Join the weight-sync group (every member calls this at the same time; rank 0 hosts the store).

    `timeout_s` bounds the rendezvous (a member that never shows up fails the others' join) and every
    collective of the group afterwards."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"join_sync_group: `backend` must be gloo or nccl, got {backend!r}")
    if not timeout_s > 0:
        raise ValueError(f"join_sync_group: `timeout_s` must be > 0, got {timeout_s}")
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout)
    store = dist.PrefixStore("cppo_weight_sync", store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    # GPU only (this CPU build of torch has no NCCL). As torch 2.13 builds a NCCL group itself in
    # torch/distributed/distributed_c10d.py `_new_process_group_helper`: a `ProcessGroupNCCL.Options()`
    # with `is_high_priority_stream = False` and `_timeout = timeout`, then
    # `ProcessGroupNCCL(store, rank, size, options)`. `_timeout` is the watchdog's limit per collective.
    options = dist.ProcessGroupNCCL.Options()
    options.is_high_priority_stream = False
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, world_size, options)
