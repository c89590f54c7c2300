"""Rollout workers on Ray: one vLLM engine per actor, and a group that shares a batch among them.

`RolloutWorker` is a Ray actor around `RolloutEngine`. Its runtime environment carries the
engine's start-up variables (in-process engine core when TP = 1, KV-cache size and thread binding
on CPU), because vLLM reads them when the engine starts inside the actor process. On GPU each
actor asks Ray for `tensor_parallel_size` GPUs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import ray
import torch

from cppo_rl.batch import RolloutBatch
from cppo_rl.remote import ACTOR_GONE
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
    return RolloutGroup.start(WorkerLauncher(config, num_cpus, use_gpu, scheduling_strategies), num_workers).workers


@dataclass(frozen=True)
class WorkerLauncher:
    """Starts the RolloutWorker of slot `index` (its resources and placement); `RolloutGroup.replace` reuses it."""

    config: EngineConfig
    num_cpus: float = 1.0
    use_gpu: bool = False
    scheduling_strategies: Sequence[object] | None = None

    def __call__(self, index: int) -> ray.actor.ActorHandle:
        options = {
            "num_cpus": self.num_cpus,
            "num_gpus": self.config.tensor_parallel_size if self.use_gpu else 0,
            "runtime_env": {"env_vars": self.config.engine_environment()},
        }
        if self.scheduling_strategies is not None:
            options["scheduling_strategy"] = self.scheduling_strategies[index]
        return ray.remote(RolloutWorker).options(**options).remote(self.config)


class RolloutWorkersLost(RuntimeError):
    """Some workers died or hung during `generate`: `workers` are their indices, `finished` the chunks
    (by worker index) the others completed, to pass back to `generate` once the workers are replaced."""

    def __init__(self, workers: list[int], finished: dict[int, RolloutBatch], causes: list[str]) -> None:
        super().__init__(f"rollout workers {workers} lost: {'; '.join(causes)}")
        self.workers, self.finished, self.causes = workers, finished, causes


class RolloutGroup:
    """Shares each batch of prompts among rollout workers and reassembles the results in prompt order.

    With a `launcher` (the controller's case) a dead or hung worker can be replaced in its slot.
    """

    def __init__(self, workers: Sequence[ray.actor.ActorHandle], launcher: WorkerLauncher | None = None) -> None:
        if not workers:
            raise ValueError("RolloutGroup: no workers given; start at least one with start_rollout_workers")
        self.workers, self.launcher = list(workers), launcher

    @classmethod
    def start(cls, launcher: WorkerLauncher, num_workers: int) -> RolloutGroup:
        """`num_workers` workers started by `launcher` (slots 0..n-1), once their engines are up."""
        workers = [launcher(index) for index in range(num_workers)]
        ray.get([w.ready.remote() for w in workers])
        return cls(workers, launcher)

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        timeout_s: float | None = None,
        finished: dict[int, RolloutBatch] | None = None,
    ) -> RolloutBatch:
        """Split prompts into contiguous, balanced chunks (one per worker), generate, and join.

        The `sampling.n` samples of a prompt stay on one worker and stay adjacent; group ids are the
        prompt's index in `prompt_ids`. Seeds are per prompt, so the result does not depend on the
        number of workers, nor on which worker (or replacement) generates a chunk. Chunks in `finished`
        are reused. A worker that dies, or does not answer within `timeout_s` seconds (for the whole
        call), raises RolloutWorkersLost once the others are done.
        """
        chunks = _balanced_chunks(len(prompt_ids), len(self.workers))
        finished = dict(finished or {})
        pending = {
            index: worker.generate.remote([list(p) for p in prompt_ids[start:stop]], sampling, start)
            for index, (worker, (start, stop)) in enumerate(zip(self.workers, chunks, strict=True))
            if stop > start and index not in finished
        }
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        lost, causes = [], []
        for index, future in pending.items():
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                finished[index] = ray.get(future, timeout=remaining)
            except ray.exceptions.GetTimeoutError:
                lost.append(index)
                causes.append(f"worker {index} did not answer within {timeout_s:.0f} s")
            except ACTOR_GONE as error:
                lost.append(index)
                causes.append(f"worker {index} died ({type(error).__name__})")
        if lost:
            raise RolloutWorkersLost(lost, finished, causes)
        return RolloutBatch.concat([finished[index] for index in sorted(finished)])

    def unreachable_workers(self, timeout_s: float = 30.0) -> list[int]:
        """Indices of the workers that are dead or do not answer a probe within `timeout_s` seconds."""
        probes = [worker.ready.remote() for worker in self.workers]
        deadline, gone = time.monotonic() + timeout_s, []
        for index, probe in enumerate(probes):
            try:
                ray.get(probe, timeout=max(0.0, deadline - time.monotonic()))
            except (*ACTOR_GONE, ray.exceptions.GetTimeoutError):
                gone.append(index)
        return gone

    def replace(self, index: int) -> None:
        """Kill worker `index` (if it still runs) and start a fresh engine in its slot (initial weights,
        version 0: sync the current weights to it next)."""
        if self.launcher is None:
            raise RuntimeError("RolloutGroup.replace: this group has no launcher; build it with one")
        ray.kill(self.workers[index], no_restart=True)
        self.workers[index] = self.launcher(index)
        ray.get(self.workers[index].ready.remote())

    def update_weights(self, named_tensors: Sequence[tuple[str, torch.Tensor]], version: int) -> None:
        """Load the same new weights into every worker (one object-store copy shared by all)."""
        shared = ray.put(list(named_tensors))
        ray.get([worker.update_weights.remote(shared, version) for worker in self.workers])

    def shutdown(self) -> None:
        """Stop every engine, then the actors (engines first: vLLM leaves files behind otherwise; an
        engine that is already dead is just killed)."""
        stopping = [worker.shutdown.remote() for worker in self.workers]
        for future in stopping:
            with contextlib.suppress(*ACTOR_GONE, ray.exceptions.GetTimeoutError):
                ray.get(future, timeout=60)
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
