"""Rollout workers on Ray: one vLLM engine per actor, and a group that shares a batch among them.

`RolloutWorker` is a Ray actor around `RolloutEngine`. Its runtime environment carries the
engine's start-up variables (in-process engine core when TP = 1, KV-cache size and thread binding
on CPU), because vLLM reads them when the engine starts inside the actor process. On GPU each
actor asks Ray for `tensor_parallel_size` GPUs.
"""

from __future__ import annotations

from collections.abc import Sequence

import ray
import torch

from cppo_rl.batch import RolloutBatch
from cppo_rl.rollout.engine import EngineConfig, RolloutEngine
from cppo_rl.rollout.sampling import SamplingConfig
from cppo_rl.sync.buckets import BucketPlan
from cppo_rl.sync.transport import join_sync_group, receive_buckets


class RolloutWorker(RolloutEngine):
    """The Ray actor class (see `start_rollout_workers`); adds a readiness probe to the engine."""

    def ready(self) -> int:
        """The engine's policy version; returns once the engine has started."""
        return self.policy_version

    def join_weight_sync(self, address: str, port: int, rank: int, world_size: int) -> None:
        """Join the weight-sync group as `rank` (1..E; the learner's rank 0 is rank 0)."""
        backend = "gloo" if self.on_cpu else "nccl"
        self._sync_group = join_sync_group(address, port, rank, world_size, backend)

    def receive_weights(self, plan: BucketPlan, version: int) -> None:
        """Receive one sync's buckets from the learner and load them in place."""
        device = "cpu" if self.on_cpu else "cuda"
        self.update_weights(receive_buckets(self._sync_group, plan, device), version)


def start_rollout_workers(
    config: EngineConfig,
    num_workers: int,
    *,
    num_cpus: float = 1.0,
    use_gpu: bool = False,
    scheduling_strategies: Sequence[object] | None = None,
) -> list[ray.actor.ActorHandle]:
    """Start `num_workers` RolloutWorker actors and wait until their engines are up.

    `scheduling_strategies` (one per worker, e.g. placement-group bundles) pin them; the controller
    passes these. Each worker gets `config.tensor_parallel_size` GPUs when `use_gpu`.
    """
    actor_class = ray.remote(RolloutWorker)
    workers = []
    for index in range(num_workers):
        options = {
            "num_cpus": num_cpus,
            "num_gpus": config.tensor_parallel_size if use_gpu else 0,
            "runtime_env": {"env_vars": config.engine_environment()},
        }
        if scheduling_strategies is not None:
            options["scheduling_strategy"] = scheduling_strategies[index]
        workers.append(actor_class.options(**options).remote(config))
    ray.get([w.ready.remote() for w in workers])
    return workers


class RolloutGroup:
    """Shares each batch of prompts among rollout workers and reassembles the results in prompt order."""

    def __init__(self, workers: Sequence[ray.actor.ActorHandle]) -> None:
        if not workers:
            raise ValueError("RolloutGroup: no workers given; start at least one with start_rollout_workers")
        self.workers = list(workers)

    def generate(
        self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig, timeout_s: float | None = None
    ) -> RolloutBatch:
        """Split prompts into contiguous, balanced chunks (one per worker), generate, and join.

        The `sampling.n` samples of a prompt stay on one worker and stay adjacent; group ids are the
        prompt's index in `prompt_ids`. Seeds are per prompt, so the result does not depend on the
        number of workers.
        """
        chunks = _balanced_chunks(len(prompt_ids), len(self.workers))
        futures = [
            worker.generate.remote([list(p) for p in prompt_ids[start:stop]], sampling, start)
            for worker, (start, stop) in zip(self.workers, chunks, strict=False)
            if stop > start
        ]
        return RolloutBatch.concat(ray.get(futures, timeout=timeout_s))

    def update_weights(self, named_tensors: Sequence[tuple[str, torch.Tensor]], version: int) -> None:
        """Load the same new weights into every worker (one object-store copy shared by all)."""
        shared = ray.put(list(named_tensors))
        ray.get([worker.update_weights.remote(shared, version) for worker in self.workers])

    def shutdown(self) -> None:
        """Stop every engine, then the actors (engines first: vLLM leaves files behind otherwise)."""
        ray.get([worker.shutdown.remote() for worker in self.workers])
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []


def _balanced_chunks(total: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous (start, stop) ranges covering range(total), sizes differing by at most 1."""
    base, extra = divmod(total, parts)
    bounds, start = [], 0
    for index in range(parts):
        stop = start + base + (1 if index < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds
