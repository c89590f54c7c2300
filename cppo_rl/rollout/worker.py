"""Rollout workers on Ray: one vLLM engine per actor, and a group that shares a batch among them.

`RolloutWorker` is a Ray actor around `RolloutEngine`. Its runtime environment carries the
engine's start-up variables (in-process engine core when TP = 1, KV-cache size and thread binding
on CPU; the TP ranks' placement-group bundles on GPU: `cppo_rl.rollout.engine.vllm_arguments`), because
vLLM reads them when the engine starts inside the actor process. On GPU a TP = 1 actor asks Ray for its
GPU; a TP > 1 actor asks for none and vLLM's Ray executor starts one worker actor of one GPU per TP rank
in the engine's bundles (cppo_rl/controller/placement.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import ray
import torch

from cppo_rl.batch import RolloutBatch
from cppo_rl.data_plane import ChunkRef, ChunkTensors, RolloutChunk, RolloutRefs
from cppo_rl.remote import ACTOR_GONE, ActorFailure
from cppo_rl.rollout.engine import EngineConfig, RolloutEngine
from cppo_rl.rollout.sampling import SamplingConfig
from cppo_rl.sync.buckets import BucketPlan
from cppo_rl.sync.transport import DEFAULT_SYNC_TIMEOUT_S

# how long `RolloutGroup.replace` waits for a killed worker to die and free its bundles (vLLM's TP workers
# die after it: Ray kills the actors a dead process owned)
RELEASE_TIMEOUT_S = 120.0


class RolloutWorker(RolloutEngine):
    """The Ray actor class (see `start_rollout_workers`); adds a readiness probe to the engine."""

    def ready(self) -> int:
        """The engine's policy version; returns once the engine has started."""
        return self.policy_version

    @ray.method(num_returns=2)
    def generate(
        self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig, prompt_offset: int = 0
    ) -> tuple[RolloutChunk, ChunkTensors]:
        """The data plane's generate (cppo_rl/data_plane.py): two return objects, both owned by the caller.
        The caller `ray.get`s the first (the light RolloutChunk) and leaves the second (the ChunkTensors:
        token sets, int32 ids) in the object store for the learner ranks; it outlives this actor."""
        return self.generate_parts(prompt_ids, sampling, prompt_offset)

    def join_weight_sync(
        self,
        address: str,
        port: int,
        rank_offset: int,
        world_size: int,
        plan: BucketPlan,
        timeout_s: float = DEFAULT_SYNC_TIMEOUT_S,
    ) -> list[int]:
        """Join the weight-sync group from inside each of the engine's TP workers (TP rank t joins as
        `rank_offset` + t; the learner's rank 0 is rank 0), which keep `plan` for every later sync;
        returns the workers' ranks."""
        return self.llm.collective_rpc(
            "cppo_join_weight_sync", args=(address, port, rank_offset, world_size, plan, timeout_s)
        )

    def receive_weights(self, version: int) -> None:
        """Receive one sync from the learner in every TP worker, bucket by bucket, and load it in place."""
        self.update_weights(None, version)


def start_rollout_workers(
    config: EngineConfig,
    num_workers: int,
    *,
    num_cpus: float = 1.0,
    use_gpu: bool = False,
    scheduling_strategies: Sequence[object] | None = None,
) -> list[ray.actor.ActorHandle]:
    """Start `num_workers` RolloutWorker actors and wait until their engines are up.

    `scheduling_strategies` (one per worker, e.g. placement-group bundles) pin them. On GPU a TP = 1 worker
    asks Ray for one GPU, a TP > 1 worker for none (vLLM's Ray executor then makes its own placement group
    of one GPU per TP rank). The controller uses a `WorkerLauncher` with its placement group's slots instead.
    """
    return RolloutGroup.start(WorkerLauncher(config, num_cpus, use_gpu, scheduling_strategies), num_workers).workers


@dataclass(frozen=True)
class WorkerLauncher:
    """Starts the RolloutWorker of slot `index` (its resources and placement); `RolloutGroup.replace` reuses it.

    `slots` (cppo_rl.controller.placement.ActorSlot, one per worker) say what each asks Ray for and, for a
    TP > 1 engine on GPU, the bundles of its TP ranks; without them every worker gets `engine_slot(...)`
    outside any placement group. `placed` (a PlacedGroup) lets `RolloutGroup.replace` wait until a dead
    worker's bundles are free again."""

    config: EngineConfig
    num_cpus: float = 1.0
    use_gpu: bool = False
    scheduling_strategies: Sequence[object] | None = None
    slots: Sequence[object] | None = None
    placed: object | None = None

    def slot(self, index: int):
        from cppo_rl.controller.placement import engine_slot

        if self.slots is not None:
            return self.slots[index]
        return engine_slot(self.config.tensor_parallel_size, self.use_gpu, self.num_cpus)

    def actor_options(self, index: int) -> tuple[dict[str, object], tuple[int, ...] | None]:
        """The Ray actor options of worker `index` and the bundle indices its engine gives vLLM (None: TP = 1,
        CPU, or no placement group)."""
        from cppo_rl.rollout.engine import vllm_arguments

        slot = self.slot(index)
        _, env = vllm_arguments(self.config, not self.use_gpu, slot.vllm_bundle_indices)
        options = {"num_cpus": slot.num_cpus, "num_gpus": slot.num_gpus, "runtime_env": {"env_vars": env}}
        if self.scheduling_strategies is not None:
            options["scheduling_strategy"] = self.scheduling_strategies[index]
        return options, slot.vllm_bundle_indices

    def __call__(self, index: int) -> ray.actor.ActorHandle:
        options, bundle_indices = self.actor_options(index)
        return ray.remote(RolloutWorker).options(**options).remote(self.config, bundle_indices)

    def wait_released(self, index: int, timeout_s: float) -> bool:
        """Wait (at most `timeout_s` s) until Ray reports every bundle of worker `index` free (its actor and
        vLLM's worker actors gone, their GPUs released); True when they are, or when there is no group."""
        if self.placed is None or self.slots is None:
            return True
        bundles = self.slots[index].bundles
        deadline = time.monotonic() + timeout_s
        while not self.placed.released(bundles):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True


class RolloutWorkersLost(RuntimeError):
    """Some workers died or hung during `generate`: `workers` are their indices, `finished` the chunks
    (by chunk index: a batch's chunk c first runs on worker c) the others completed, to pass back to
    `generate` once the workers are replaced, or kept by the PendingRollout that ran them. A finished
    chunk's heavy part stays valid when its worker dies: the driver owns it (a return value)."""

    def __init__(self, workers: list[int], finished: dict[int, ChunkRef], causes: list[str]) -> None:
        super().__init__(f"rollout workers {workers} lost: {'; '.join(causes)}")
        self.workers, self.finished, self.causes = workers, finished, causes


class PendingRollout:
    """A batch being generated (`RolloutGroup.submit`): chunk `c` covers prompts `chunks[c]` and runs on a
    worker; `collect` waits for the chunks and joins them in prompt order."""

    def __init__(
        self, group: RolloutGroup, prompt_ids: list[list[int]], sampling: SamplingConfig, finished: dict[int, ChunkRef]
    ) -> None:
        self.group, self.prompt_ids, self.sampling, self.finished = group, prompt_ids, sampling, finished
        self.chunks = _balanced_chunks(len(prompt_ids), len(group.workers))
        self.running: dict[int, tuple[int, object, object]] = {}  # chunk -> (worker, light ref, heavy ref)
        self.submitted_at = time.monotonic()
        self.arrived_at: dict[int, float] = {}  # chunk -> when its light part arrived (time.monotonic)

    def start_chunk(self, chunk: int, worker: int) -> None:
        """Generate chunk `chunk` on worker `worker` (its seeds are its prompts', wherever it runs)."""
        start, stop = self.chunks[chunk]
        light, heavy = self.group.workers[worker].generate.remote(self.prompt_ids[start:stop], self.sampling, start)
        self.running[chunk] = (worker, light, heavy)

    def collect(
        self, timeout_s: float | None = None, on_chunk: Callable[[int, RolloutChunk], None] | None = None
    ) -> RolloutRefs:
        """Wait for every running chunk (in the order they finish; `on_chunk(index, chunk)` is called on each
        as it arrives) and join them. A worker that dies, or has not answered within `timeout_s` seconds of
        this call, raises RolloutWorkersLost once the others are done; the finished chunks stay in
        `finished` and the lost ones can be started again on other workers (`start_chunk`)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        waiting = {light: chunk for chunk, (_, light, _) in self.running.items()}
        lost, causes = [], []
        while waiting:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = ray.wait(list(waiting), num_returns=1, timeout=remaining)
            if not done:
                for chunk in waiting.values():
                    worker = self.running.pop(chunk)[0]
                    lost.append(worker)
                    causes.append(f"worker {worker} did not answer within {timeout_s:.0f} s")
                break
            chunk = waiting.pop(done[0])
            worker, light, heavy = self.running.pop(chunk)
            try:
                self.finished[chunk] = ChunkRef(ray.get(light), heavy)
            except ACTOR_GONE as error:
                lost.append(worker)
                causes.append(f"worker {worker} died ({type(error).__name__})")
                continue
            self.arrived_at[chunk] = time.monotonic()
            if on_chunk is not None:
                on_chunk(chunk, self.finished[chunk].chunk)
        if lost:
            raise RolloutWorkersLost(sorted(set(lost)), self.finished, causes)
        return RolloutRefs([self.finished[index] for index in sorted(self.finished)])

    def missing_chunks(self) -> list[int]:
        """The chunks with prompts that are neither finished nor running."""
        settled = self.finished.keys() | self.running.keys()
        return [c for c, (start, stop) in enumerate(self.chunks) if stop > start and c not in settled]


class RolloutGroup:
    """Shares each batch of prompts among rollout workers and reassembles the results in prompt order.

    With a `launcher` (the controller's case) a dead or hung worker can be replaced in its slot.
    """

    def __init__(self, workers: Sequence[ray.actor.ActorHandle], launcher: WorkerLauncher | None = None) -> None:
        if not workers:
            raise ValueError("RolloutGroup: no workers given; start at least one with start_rollout_workers")
        self.workers, self.launcher = list(workers), launcher

    @classmethod
    def start(cls, launcher: WorkerLauncher, num_workers: int, timeout_s: float | None = None) -> RolloutGroup:
        """`num_workers` workers started by `launcher` (slots 0..n-1), once their engines are up (GetTimeoutError
        after `timeout_s` seconds, the workers killed)."""
        workers = [launcher(index) for index in range(num_workers)]
        try:
            ray.get([w.ready.remote() for w in workers], timeout=timeout_s)
        except BaseException:
            for worker in workers:
                ray.kill(worker)
            raise
        return cls(workers, launcher)

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        timeout_s: float | None = None,
        finished: dict[int, ChunkRef] | None = None,
    ) -> RolloutBatch:
        """`generate_refs(...).fetch()`: the whole batch in this process (tests, diagnostics; the training
        loop keeps the tensors in the object store with `generate_refs`)."""
        return self.generate_refs(prompt_ids, sampling, timeout_s, finished).fetch()

    def generate_refs(
        self,
        prompt_ids: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        timeout_s: float | None = None,
        finished: dict[int, ChunkRef] | None = None,
    ) -> RolloutRefs:
        """`submit(...).collect(timeout_s)`: generate and wait (see `submit`). A worker that dies, or does not
        answer within `timeout_s` seconds (for the whole call), raises RolloutWorkersLost once the others
        are done."""
        return self.submit(prompt_ids, sampling, finished).collect(timeout_s)

    def submit(
        self,
        prompt_ids: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        finished: dict[int, ChunkRef] | None = None,
    ) -> PendingRollout:
        """Start generating and return at once. Prompts are split into contiguous, balanced chunks (one per
        worker); `PendingRollout.collect` joins them by reference: this process receives each chunk's light
        part only (texts, lengths, finish reasons); the token sets stay in the object store, owned by this
        process (cppo_rl/data_plane.py).

        The `sampling.n` samples of a prompt stay on one worker and stay adjacent; group ids are the
        prompt's index in `prompt_ids`. Seeds are per prompt, so the result does not depend on the
        number of workers, nor on which worker (or replacement) generates a chunk. Chunks in `finished`
        (by chunk index) are reused.
        """
        pending = PendingRollout(self, [list(p) for p in prompt_ids], sampling, dict(finished or {}))
        for index, (start, stop) in enumerate(pending.chunks):
            if stop > start and index not in pending.finished:
                pending.start_chunk(index, index)
        return pending

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
        old = self.workers[index]
        ray.kill(old, no_restart=True)
        # ray.kill returns at once: wait until the old engine is gone and its GPUs are free, or the new one
        # starts beside it and finds the GPU memory still taken
        wait_until_dead(old, RELEASE_TIMEOUT_S)
        if not self.launcher.wait_released(index, RELEASE_TIMEOUT_S):
            raise ActorFailure(
                f"rollout worker {index} was killed but its placement-group bundles were not free after "
                f"{RELEASE_TIMEOUT_S:.0f} s; not starting a replacement beside it"
            )
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


def wait_until_dead(actor: ray.actor.ActorHandle, timeout_s: float) -> None:
    """Return once a call to `actor` fails because it is dead (after `ray.kill`); ActorFailure if it still
    answers, or does not fail, within `timeout_s` seconds."""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ActorFailure(f"a killed rollout worker was not reported dead within {timeout_s:.0f} s")
        try:
            ray.get(actor.ready.remote(), timeout=min(5.0, remaining))
        except ACTOR_GONE:
            return
        except ray.exceptions.GetTimeoutError:
            continue
        time.sleep(0.2)


def _balanced_chunks(total: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous (start, stop) ranges covering range(total), sizes differing by at most 1."""
    base, extra = divmod(total, parts)
    bounds, start = [], 0
    for index in range(parts):
        stop = start + base + (1 if index < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds
