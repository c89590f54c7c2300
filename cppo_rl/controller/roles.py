"""The actors of one run, started and released in one place: the placement group, the rollout engines,
the learner ranks, the weight sync between them and the reward pool.

`Roles.start(config, model_path, loss_config)` places and starts them, each a named start-up phase with a
deadline (cppo_rl/controller/startup.py); whatever started before a failure is released before the error
leaves (a learner that fails in set-up does not leak the engines nor the placement group). `Roles` is a
context manager: leaving it releases everything, on success or failure.

Self-healing lives here too:
- `generate` / `collect`: a rollout engine that dies or hangs while the learner holds the engines'
  weights is replaced at once, synced those weights, and its chunks are generated again (same per-prompt
  seeds and weights: the batch is the same). While the learner trains ahead of the engines
  (asynchronous rollouts) it no longer holds the weights that sample the batch, so the lost chunks go to
  the surviving engines instead and the dead engine is replaced at the next sync; with no survivor the
  batch is generated again after that sync, at the new version (`collect` returns None).
- `launch` / `wait` / `receive`: one generate call on one engine, for free-running rollouts
  (cppo_rl/controller/free_pipeline.py), which heal their own lost calls through `lost_engines`.
- `sync`: a failed weight sync replaces the engines, or raises ActorFailure when the learner is gone
  (`run_with_restarts` starts the run again from its latest checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cppo_rl.config import TrainConfig, engine_config, learner_config
from cppo_rl.controller.startup import Startup
from cppo_rl.data_plane import ChunkRef, RolloutChunk, RolloutRefs
from cppo_rl.rollout.sampling import SamplingConfig


class EngineLost(RuntimeError):
    """An engine died during a `Roles.launch` call."""


@dataclass(frozen=True)
class EngineCall:
    """One generate call running on an engine (`Roles.launch`): `ready` resolves to its light part
    (RolloutChunk), `tensors` is its heavy part's ref; `worker` the actor that runs it."""

    engine: int
    worker: object
    ready: object
    tensors: object


class Roles:
    """The started actors of one run (see the module docstring); build with `Roles.start`."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.placed = self.rollout = self.learner = self.sync_channel = self.rewards = None
        self.version = 0  # the policy version the engines hold
        self.engine_restarts = 0
        self.lost_engines: set[int] = set()  # dead engines to replace at the next sync

    @classmethod
    def start(cls, config: TrainConfig, model_path: str, loss_config, startup: Startup | None = None) -> Roles:
        """Place and start every role (engines first, then the learner ranks, the weight sync and the reward
        pool), each a named start-up phase with a deadline (`startup`; default: `cluster.startup_timeout_s`);
        on any failure, release what had started and re-raise."""
        roles = cls(config)
        try:
            roles._start(model_path, loss_config, startup or Startup(config.cluster.startup_timeout_s))
        except BaseException:
            roles.close()
            raise
        return roles

    def _start(self, model_path: str, loss_config, startup: Startup) -> None:
        from cppo_rl.controller.placement import place, placement_layout
        from cppo_rl.learner.worker import LearnerGroup
        from cppo_rl.rewards import RewardPool
        from cppo_rl.rollout.worker import RolloutGroup, WorkerLauncher

        config = self.config
        c, r, lrn, rw = config.cluster, config.rollout, config.learner, config.reward
        use_gpu = c.num_gpus > 0
        layout = placement_layout(config)
        # one placement group for every engine and learner rank: the run starts only when all of them fit
        with startup.phase(
            f"placement ({len(layout.engines)} engines, {len(layout.learners)} learner ranks)",
            f"the cluster to free {layout.cpus:g} CPUs and {layout.gpus} GPUs in {len(layout.bundles)} bundles",
            "see the message above; `ray status` shows what the cluster has and what other jobs hold",
            c.placement_timeout_s,
        ) as remaining:
            self.placed = place(layout, remaining())
        engines, ranks = self.placed.layout.engines, self.placed.layout.learners
        launcher = WorkerLauncher(
            engine_config(config, model_path),
            c.cpus_per_engine,
            use_gpu,
            [self.placed.strategy(slot) for slot in engines],
            slots=engines,
            placed=self.placed,
        )
        with startup.phase(
            "rollout engines",
            f"{r.num_engines} vLLM engines to load {model_path} and allocate their KV cache",
            "read the engines' logs (`ray logs`, the RolloutWorker actors): a model too large for the KV cache "
            "budget (rollout.gpu_memory_utilization / rollout.cpu_kv_cache_gib), a slow filesystem for model.path, "
            "or raise cluster.startup_timeout_s",
        ) as remaining:
            self.rollout = RolloutGroup.start(launcher, r.num_engines, remaining())
        with startup.phase(
            "learner set-up",
            f"{lrn.world_size} DeepSpeed ranks to load the model, join their process group and build their ops "
            "(the first run on a machine JIT-builds them: minutes)",
            "read the LearnerWorker actors' logs (`ray logs`); a build lock the driver named above, a rank that "
            "cannot reach rank 0 (firewall between nodes), or raise cluster.startup_timeout_s",
        ) as remaining:
            self.learner = LearnerGroup(
                learner_config(config, model_path),
                config.algorithm.name,
                loss_config,
                lrn.world_size,
                num_cpus_per_rank=c.cpus_per_learner,
                use_gpu=use_gpu,
                scheduling_strategies=[self.placed.strategy(slot) for slot in ranks],
                timeout_s=lrn.call_timeout_s,
                threads_per_rank=lrn.threads_per_rank,
                setup_timeout_s=remaining(),
            )
        with startup.phase(
            "weight-sync group",
            "learner rank 0 and every engine worker to join the weight-sync process group",
            "the engines' nodes must reach learner rank 0's node on a free TCP port (firewall, NCCL_SOCKET_IFNAME "
            "on GPU); learner.sync_timeout_s bounds the join",
            lrn.sync_timeout_s + 60,
        ):
            self.sync_channel = self._weight_sync()
        self.rewards = RewardPool(rw.num_workers, rw.timeout_s, rw.memory_limit_mb, grader=rw.grader)

    @property
    def placement(self) -> dict:
        """Where each role was placed (summary.json's `placement`)."""
        return self.placed.summary

    def close(self) -> None:
        """Release everything that started (each part once, whatever state the others are in)."""
        import ray

        if self.rewards is not None:
            self.rewards.close()
        if self.rollout is not None:
            self.rollout.shutdown()
        if self.learner is not None:
            self.learner.shutdown()
        if self.placed is not None:
            ray.util.remove_placement_group(self.placed.group)  # the next run of a --multirun needs it
        self.placed = self.rollout = self.learner = self.sync_channel = self.rewards = None

    def __enter__(self) -> Roles:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- generation ---------------------------------------------------------------------------------

    def submit(self, prompt_ids: list[list[int]], sampling: SamplingConfig):
        """Start generating `prompt_ids` on the engines (a PendingRollout; `collect` waits for it)."""
        return self.rollout.submit(prompt_ids, sampling)

    def collect(
        self,
        pending,
        same_weights: bool = True,
        on_chunk: Callable[[int, RolloutChunk], None] | None = None,
    ) -> RolloutRefs | None:
        """The batch `pending` generates, healing lost engines (see the module docstring); `on_chunk(index,
        chunk)` on each chunk as it arrives. `same_weights`: the learner still holds the weights the engines
        generate with (False while it trains ahead of them: a replacement could not get those weights).
        None when every engine was lost without the same weights: generate the batch again after the next
        sync."""
        from cppo_rl.rollout.worker import RolloutWorkersLost

        while True:
            try:
                return pending.collect(self.config.rollout.generate_timeout_s, on_chunk)
            except RolloutWorkersLost as lost:
                cause = "; ".join(lost.causes)
                missing = pending.missing_chunks()
                if same_weights:
                    self.replace_engines(lost.workers, cause)
                    self.sync(self.version)
                    for chunk in missing:
                        pending.start_chunk(chunk, chunk)
                    continue
                self.lost_engines.update(lost.workers)
                survivors = [i for i in range(len(self.rollout.workers)) if i not in self.lost_engines]
                if not survivors:
                    print(f"warning: {cause}: no engine left; the batch is generated again after the sync", flush=True)
                    return None
                print(
                    f"warning: {cause}: engines {survivors} generate their chunks; the lost engines are "
                    "replaced at the next weight sync",
                    flush=True,
                )
                for position, chunk in enumerate(missing):
                    pending.start_chunk(chunk, survivors[position % len(survivors)])

    def launch(self, engine: int, prompt_ids: list[list[int]], sampling: SamplingConfig) -> EngineCall:
        """Start one generate call on engine `engine` (its prompts seeded sampling.seed + i) and return at
        once; `wait` for its `ready` ref, then `receive` it. Free-running rollouts' unit of work."""
        worker = self.rollout.workers[engine]
        light, heavy = worker.generate.remote(prompt_ids, sampling, 0)
        return EngineCall(engine, worker, light, heavy)

    @staticmethod
    def wait(refs: list, num_returns: int = 1, timeout_s: float | None = None) -> list:
        """The refs among `refs` that are ready (failed ones too) once `num_returns` are, or `timeout_s` passed
        (ray.wait)."""
        import ray

        return ray.wait(list(refs), num_returns=min(num_returns, len(refs)), timeout=timeout_s)[0] if refs else []

    def receive(self, call: EngineCall) -> ChunkRef:
        """The finished chunk of `call` (its light part here, its heavy part by reference); EngineLost when
        its engine died."""
        import ray

        from cppo_rl.remote import ACTOR_GONE

        try:
            return ChunkRef(ray.get(call.ready), call.tensors)
        except ACTOR_GONE as error:
            raise EngineLost(f"worker {call.engine} died ({type(error).__name__})") from error

    def is_current(self, call: EngineCall) -> bool:
        """Whether `call`'s engine still holds its slot (not replaced since the call started)."""
        return self.rollout.workers[call.engine] is call.worker

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig) -> RolloutRefs:
        """`collect(submit(...))` with the learner idle (evaluation; synchronous steps)."""
        return self.collect(self.submit(prompt_ids, sampling))

    # -- weight sync --------------------------------------------------------------------------------

    def _weight_sync(self):
        """A weight-sync channel between the current learner and engines (rebuilt when engines are replaced).
        Building it needs the learner's rank 0: if that actor is gone, ActorFailure (the run restarts
        from its latest checkpoint, `run_with_restarts`)."""
        import ray

        from cppo_rl.remote import ActorFailure
        from cppo_rl.sync.weight_sync import WeightSync

        lrn = self.config.learner
        try:
            return WeightSync(
                self.learner, self.rollout, lrn.sync_transport, lrn.sync_bucket_mb << 20, lrn.sync_timeout_s
            )
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as error:
            raise ActorFailure(f"building the weight sync: an actor died ({type(error).__name__}: {error})") from error

    def sync(self, version: int):
        """Sync the learner's weights to the engines as `version` (engines lost meanwhile are replaced
        first); returns the sync's stats.

        If that fails: with a learner rank gone (or not answering; on NCCL rank 0's watchdog tears its
        process down when a broadcast outlives the sync group's timeout), ActorFailure, and
        `run_with_restarts` starts the run again from its latest checkpoint. Otherwise, if an engine is
        gone, every engine is replaced (the survivors may be blocked in the broken collective until its
        timeout) and the weights are synced afresh over a new group."""
        import ray

        from cppo_rl.remote import ACTOR_GONE, ActorFailure, get_all

        if self.lost_engines:
            self.replace_engines(sorted(self.lost_engines), "engines lost during generation")
        try:
            stats = self.sync_channel.sync(version)
        except (ActorFailure, ray.exceptions.RayError) as error:
            try:  # is the learner still there? (a failed broadcast leaves its ranks free once it raised)
                get_all([w.learning_rate.remote() for w in self.learner.workers], "probing the learner", 60.0)
            except (ActorFailure, *ACTOR_GONE) as learner_gone:
                raise ActorFailure(f"weight sync failed ({error}); the learner is gone: {learner_gone}") from error
            gone = self.rollout.unreachable_workers()
            if not gone:
                raise
            self.replace_engines(
                list(range(len(self.rollout.workers))),
                f"weight sync failed ({error.__class__.__name__}) with workers {gone} gone",
            )
            return self.sync(version)
        self.version = version
        return stats

    def replace_engines(self, indices: list[int], cause: str) -> None:
        """Start fresh engines in slots `indices` and rebuild the weight-sync group (sync weights next)."""
        from cppo_rl.remote import ActorFailure

        limit = self.config.rollout.max_engine_restarts
        if self.engine_restarts + len(indices) > limit:
            raise ActorFailure(
                f"rollout engines lost ({cause}) after {self.engine_restarts} restarts this run; "
                f"rollout.max_engine_restarts={limit} allows no more. Look at the workers' logs (ray logs) for why"
            )
        print(f"warning: {cause}: restarting rollout engines {indices}", flush=True)
        for index in indices:
            self.rollout.replace(index)
        self.engine_restarts += len(indices)
        self.lost_engines.difference_update(indices)
        self.sync_channel = self._weight_sync()
