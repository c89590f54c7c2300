"""Where each rollout engine and learner rank runs: one Ray placement group holding all of them.

`placement_layout(config)` is pure (no Ray): the bundle list of the group and, per engine and per learner
rank, the bundle it is scheduled on and what it asks Ray for (`ActorSlot`). `place(layout, timeout_s)` creates the
group and waits until it is placed (the thin Ray part).

Bundles, in order: the engines' (engine i's `tensor_parallel_size` bundles are contiguous), then one per
learner rank. On GPU every bundle holds one GPU, because vLLM's Ray executor refuses a placement-group
bundle with more than one (vllm/v1/executor/ray_utils.py `initialize_ray_cluster`) and starts one Ray
worker actor of one GPU per tensor-parallel rank (`RayExecutorV2._init_executor`):

- engine, TP = 1, GPU: bundle `{CPU: c, GPU: 1}`; the actor asks for `c` CPUs and 1 GPU; vLLM's `uni`
  executor runs the model in the actor.
- engine, TP = t > 1, GPU: `t` bundles, `{CPU: c, GPU: 1}` then `{GPU: 1}` x (t-1); the actor, on the first,
  asks for `c` CPUs and no GPU; vLLM gets `distributed_executor_backend="ray"` and
  `VLLM_RAY_BUNDLE_INDICES` = its `t` bundles, and starts one worker actor of one GPU on each.
- learner rank, GPU: bundle `{CPU: c, GPU: 1}`; the rank asks for `c` CPUs and 1 GPU.
- engine or rank on CPU: bundle `{CPU: c}`; the actor asks for `c` CPUs.

`c` is `cluster.cpus_per_engine` / `cluster.cpus_per_learner`; `cluster.engine_resources` /
`learner_resources` are added to every bundle of an engine / rank. The engine actor of a TP engine holds no
GPU (its workers need the bundles' GPUs) and is scheduled with `placement_group_capture_child_tasks` so
anything it starts stays in the group (OpenRLHF's `create_vllm_engines` does the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ActorSlot:
    """One actor's place: the bundle it is scheduled on (None: no placement group), the CPUs / GPUs it asks
    Ray for, every bundle whose resources it and its vLLM workers hold (`bundles`), and for a
    tensor-parallel engine the bundles vLLM puts its TP ranks on (`vllm_bundle_indices`, else None)."""

    bundle_index: int | None
    num_cpus: float
    num_gpus: float
    bundles: tuple[int, ...] = ()
    vllm_bundle_indices: tuple[int, ...] | None = None

    @property
    def capture_child_tasks(self) -> bool:
        """Whether what the actor starts (vLLM's worker actors) is kept in the group by default."""
        return self.vllm_bundle_indices is not None


@dataclass(frozen=True)
class PlacementLayout:
    """The placement group of a run: `bundles` (Ray resource dicts), its `strategy`, and a slot per engine
    and per learner rank."""

    bundles: list[dict[str, float]]
    strategy: str
    engines: list[ActorSlot] = field(default_factory=list)
    learners: list[ActorSlot] = field(default_factory=list)

    @property
    def gpus(self) -> int:
        return int(sum(bundle.get("GPU", 0) for bundle in self.bundles))

    @property
    def cpus(self) -> float:
        return sum(bundle.get("CPU", 0) for bundle in self.bundles)


def engine_slot(
    tensor_parallel_size: int, use_gpu: bool, num_cpus: float, first_bundle: int | None = None
) -> ActorSlot:
    """The slot of an engine whose bundles start at `first_bundle` (None: not in a placement group; vLLM
    then makes its own group for its TP workers)."""
    tp = tensor_parallel_size
    bundles = () if first_bundle is None else tuple(range(first_bundle, first_bundle + (tp if use_gpu else 1)))
    if use_gpu and tp > 1:
        vllm_bundles = bundles or None
        return ActorSlot(first_bundle, num_cpus, 0, bundles, vllm_bundles)
    return ActorSlot(first_bundle, num_cpus, 1 if use_gpu else 0, bundles)


def placement_layout(config) -> PlacementLayout:
    """The bundles and actor slots of `config` (a cppo_rl.config.TrainConfig); see the module docstring."""
    c, r, lrn = config.cluster, config.rollout, config.learner
    gpu = c.num_gpus > 0
    tp = r.tensor_parallel_size
    bundles: list[dict[str, float]] = []
    engines, learners = [], []
    for _ in range(r.num_engines):
        first = len(bundles)
        if gpu:
            bundles.append({"CPU": c.cpus_per_engine, "GPU": 1, **c.engine_resources})
            bundles += [{"GPU": 1, **c.engine_resources} for _ in range(tp - 1)]
        else:
            bundles.append({"CPU": c.cpus_per_engine, **c.engine_resources})
        engines.append(engine_slot(tp, gpu, c.cpus_per_engine, first))
    for _ in range(lrn.world_size):
        index = len(bundles)
        bundles.append({"CPU": c.cpus_per_learner, **({"GPU": 1} if gpu else {}), **c.learner_resources})
        learners.append(ActorSlot(index, c.cpus_per_learner, 1 if gpu else 0, (index,)))
    # Ray refuses an all-zero bundle: a CPU ask of 0 (cluster.cpus_per_engine=0) is left out of the dict
    bundles = [{key: amount for key, amount in bundle.items() if amount} for bundle in bundles]
    return PlacementLayout(bundles, c.placement_strategy, engines, learners)


def split_engines(layout: PlacementLayout, bundle_nodes: dict[int, str]) -> list[int]:
    """Indices of the engines whose TP bundles were placed on more than one node (vLLM then runs TP over
    the network: it works, slowly)."""
    return [
        index for index, slot in enumerate(layout.engines) if len({bundle_nodes[bundle] for bundle in slot.bundles}) > 1
    ]


def bundles_released(
    available: dict[str, float], layout: PlacementLayout, bundles: Sequence[int], group_id_hex: str
) -> bool:
    """Whether Ray reports every resource of `bundles` free again (`available`: ray.available_resources();
    a placed bundle's resources are named `<resource>_group_<index>_<group id>`)."""
    for index in bundles:
        for resource, amount in layout.bundles[index].items():
            if available.get(f"{resource}_group_{index}_{group_id_hex}", 0.0) + 1e-9 < amount:
                return False
    return True


# ------------------------------------------------------------------------------------------------
# The Ray part
# ------------------------------------------------------------------------------------------------


@dataclass
class PlacedGroup:
    """A placement group made from `layout` and placed: `bundle_nodes` maps bundle index -> Ray node id."""

    group: object
    layout: PlacementLayout
    bundle_nodes: dict[int, str]

    def strategy(self, slot: ActorSlot):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(
            self.group,
            placement_group_bundle_index=slot.bundle_index,
            placement_group_capture_child_tasks=slot.capture_child_tasks,
        )

    @property
    def summary(self) -> dict[str, list]:
        """Ray node ids: each engine's (its first bundle's) and each learner rank's."""
        return {
            "engine_nodes": [self.bundle_nodes[slot.bundle_index] for slot in self.layout.engines],
            "learner_nodes": [self.bundle_nodes[slot.bundle_index] for slot in self.layout.learners],
        }

    def released(self, bundles: Sequence[int]) -> bool:
        """Whether every resource of `bundles` is free again (no live actor holds any of it)."""
        import ray

        return bundles_released(ray.available_resources(), self.layout, bundles, self.group.id.hex())


def place(layout: PlacementLayout, timeout_s: float) -> PlacedGroup:
    """Create the placement group of `layout` and wait until it is placed; RuntimeError naming the keys
    when the cluster cannot place it within `timeout_s` seconds."""
    import ray
    from ray.util.placement_group import placement_group

    group = placement_group(layout.bundles, strategy=layout.strategy)
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(group)
        raise RuntimeError(
            f"the cluster cannot place {len(layout.engines)} rollout engines and {len(layout.learners)} learner "
            f"ranks ({layout.cpus:g} CPUs, {layout.gpus} GPUs in {len(layout.bundles)} bundles: {layout.bundles}) "
            f"with strategy {layout.strategy} within {timeout_s:.0f} s (cluster has {ray.cluster_resources()}); "
            "lower rollout.num_engines / learner.world_size or the cluster.cpus_per_engine / cluster.cpus_per_learner"
            " / rollout.tensor_parallel_size / cluster.*_resources they ask for, or give the cluster more "
            "(cluster.num_cpus / cluster.num_gpus for a local cluster)"
        ) from None
    table = ray.util.placement_group_table(group)["bundles_to_node_id"]
    placed = PlacedGroup(group, layout, {int(index): node for index, node in table.items()})
    split = split_engines(layout, placed.bundle_nodes)
    if split:
        print(
            f"warning: the tensor-parallel ranks of rollout engines {split} were placed on more than one node; "
            "they run, but over the network (use cluster.placement_strategy=STRICT_PACK on one node, or nodes "
            "whose GPU count is a multiple of rollout.tensor_parallel_size)",
            flush=True,
        )
    return placed
