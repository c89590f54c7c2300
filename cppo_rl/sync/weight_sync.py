"""Weight sync, learner -> every rollout engine, after each training step.

Two transports, chosen by config:
- "collective" (default): a process group joins the learner's rank 0 and every tensor-parallel worker
  of every rollout engine (gloo on CPU, NCCL on GPU; engine e's TP worker t is rank 1 + e * tp + t).
  Per sync, the learner gathers the ZeRO-3 parameters one bucket (a byte budget) at a time, packs
  each bucket into one flat buffer and broadcasts it: one collective per bucket, no Ray call per
  parameter. Each TP worker receives every bucket itself and loads it with the model's own weight
  loaders (its shard only), holding one bucket at a time (cppo_rl/sync/receiver.py). The bucket plan
  (names, shapes, dtypes, offsets) is computed once and handed to the workers when they join.
- "object_store": rank 0 gathers every parameter and puts one copy in Ray's object store, which each
  engine reads (for debugging, and clusters where the engines cannot join a process group).
Call `sync` only while the engines hold no running requests (between `generate` calls). Every
collective of the group times out after `timeout_s` (cppo_rl/sync/transport.py; what a failed sync
leads to: docs/reliability.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import ray

from cppo_rl.learner.worker import LearnerGroup
from cppo_rl.remote import get_all
from cppo_rl.rollout.worker import RolloutGroup
from cppo_rl.sync.transport import DEFAULT_SYNC_TIMEOUT_S, worker_rank

TRANSPORTS = ("collective", "object_store")


@dataclass(frozen=True)
class SyncStats:
    """One sync: wall seconds, bytes sent per engine, and their rate."""

    seconds: float
    nbytes: int

    @property
    def bytes_per_second(self) -> float:
        return self.nbytes / self.seconds if self.seconds > 0 else float("inf")


def sync_ranks(tensor_parallel_sizes: Sequence[int]) -> tuple[list[int], int]:
    """Each engine's first sync-group rank (its TP worker t is that + t) and the group's world size,
    for engines of these TP sizes; rank 0 is the learner."""
    offsets, next_rank = [], 1
    for tp in tensor_parallel_sizes:
        offsets.append(next_rank)
        next_rank += tp
    return offsets, next_rank


def _tensor_parallel_size(engine) -> int:
    """Run inside a rollout actor (`__ray_call__`): its engine's TP size."""
    return engine.config.tensor_parallel_size


class WeightSync:
    """Moves the learner's current weights into every rollout engine; `sync(version)` per step."""

    def __init__(
        self,
        learner: LearnerGroup,
        rollout: RolloutGroup,
        transport: str = "collective",
        bucket_bytes: int = 256 << 20,
        timeout_s: float = DEFAULT_SYNC_TIMEOUT_S,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"WeightSync: `transport` must be one of {TRANSPORTS}, got {transport!r}")
        self.learner, self.rollout, self.transport = learner, rollout, transport
        self.plan = ray.get(learner.workers[0].weight_plan.remote(bucket_bytes), timeout=timeout_s)
        if transport == "collective":
            tp_sizes = ray.get(
                [w.__ray_call__.remote(_tensor_parallel_size) for w in rollout.workers], timeout=timeout_s
            )
            offsets, world_size = sync_ranks(tp_sizes)
            address, port = ray.get(learner.workers[0].free_address.remote(), timeout=timeout_s)
            ranks = get_all(
                [learner.workers[0].join_weight_sync.remote(address, port, world_size, timeout_s)]
                + [
                    w.join_weight_sync.remote(address, port, offset, world_size, self.plan, timeout_s)
                    for w, offset in zip(rollout.workers, offsets, strict=True)
                ],
                "joining the weight-sync group",
                timeout_s + 60,
            )[1:]
            expected = [[worker_rank(e, tp, t) for t in range(tp)] for e, tp in enumerate(tp_sizes)]
            if [sorted(r) for r in ranks] != expected:
                raise RuntimeError(f"WeightSync: the engines' TP workers joined as ranks {ranks}, expected {expected}")

    def sync(self, version: int) -> SyncStats:
        """Load the learner's weights into every engine, tagged `version`; returns time and bytes."""
        start = time.perf_counter()
        if self.transport == "collective":
            get_all(
                [w.broadcast_weights.remote(self.plan) for w in self.learner.workers]
                + [w.receive_weights.remote(version) for w in self.rollout.workers],
                "weight sync",
                self.learner.timeout_s,
            )
        else:
            self.rollout.update_weights(self.learner.gather_weights(), version)
        return SyncStats(seconds=time.perf_counter() - start, nbytes=self.plan.nbytes)
