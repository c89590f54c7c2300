"""Weight sync, learner -> every rollout engine, after each training step.

Two transports, chosen by config:
- "collective" (default): a process group joins the learner's rank 0 and the E rollout workers
  (gloo on CPU, NCCL on GPU). Per sync, the learner gathers the ZeRO-3 parameters one bucket (a byte
  budget) at a time, packs each bucket into one flat buffer and broadcasts it: one collective per
  bucket, no Ray call per parameter. The bucket plan (names, shapes, dtypes, offsets) is computed once
  and handed to the receivers with each sync's single Ray call.
- "object_store": rank 0 gathers every parameter and puts one copy in Ray's object store, which each
  engine reads (for debugging, and clusters where the engines cannot join a process group).
Call `sync` only while the engines hold no running requests (between `generate` calls).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray

from cppo_rl.learner.worker import LearnerGroup
from cppo_rl.remote import get_all
from cppo_rl.rollout.worker import RolloutGroup

TRANSPORTS = ("collective", "object_store")


@dataclass(frozen=True)
class SyncStats:
    """One sync: wall seconds, bytes sent per engine, and their rate."""

    seconds: float
    nbytes: int

    @property
    def bytes_per_second(self) -> float:
        return self.nbytes / self.seconds if self.seconds > 0 else float("inf")


class WeightSync:
    """Moves the learner's current weights into every rollout engine; `sync(version)` per step."""

    def __init__(
        self,
        learner: LearnerGroup,
        rollout: RolloutGroup,
        transport: str = "collective",
        bucket_bytes: int = 256 << 20,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"WeightSync: `transport` must be one of {TRANSPORTS}, got {transport!r}")
        self.learner, self.rollout, self.transport = learner, rollout, transport
        self.plan = ray.get(learner.workers[0].weight_plan.remote(bucket_bytes))
        if transport == "collective":
            address, port = ray.get(learner.workers[0].free_address.remote())
            world_size = 1 + len(rollout.workers)
            ray.get(
                [learner.workers[0].join_weight_sync.remote(address, port, world_size)]
                + [w.join_weight_sync.remote(address, port, i + 1, world_size) for i, w in enumerate(rollout.workers)]
            )

    def sync(self, version: int) -> SyncStats:
        """Load the learner's weights into every engine, tagged `version`; returns time and bytes."""
        start = time.perf_counter()
        if self.transport == "collective":
            get_all(
                [w.broadcast_weights.remote(self.plan) for w in self.learner.workers]
                + [w.receive_weights.remote(self.plan, version) for w in self.rollout.workers],
                "weight sync",
                self.learner.timeout_s,
            )
        else:
            self.rollout.update_weights(self.learner.gather_weights(), version)
        return SyncStats(seconds=time.perf_counter() - start, nbytes=self.plan.nbytes)
