"""Run in its own process (a fresh local Ray cluster declaring 8 GPUs): place a run's layout and start
stand-in actors (not vLLM) with exactly the options the real launcher / learner group use; a TP engine's
stand-in starts one worker per VLLM_RAY_BUNDLE_INDICES bundle as vLLM's RayExecutorV2 does (num_cpus=0,
num_gpus=VLLM_RAY_PER_WORKER_GPUS, in the engine's placement group). Prints one JSON line per layout.

    python placement_probe.py OVERRIDE...   (Hydra overrides of the layout; one layout per argument, ';'-separated)
"""

from __future__ import annotations

import json
import os
import sys
import time

import ray
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

import cppo_rl.train  # noqa: F401
from cppo_rl.controller.placement import place, placement_layout
from cppo_rl.rollout.engine import EngineConfig
from cppo_rl.rollout.worker import RolloutGroup, WorkerLauncher
from cppo_rl.train import CONF_DIR


def report() -> dict:
    context = ray.get_runtime_context()
    return {
        "resources": context.get_assigned_resources(),
        "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
        "bundle_indices": os.environ.get("VLLM_RAY_BUNDLE_INDICES"),
        "per_worker_gpus": os.environ.get("VLLM_RAY_PER_WORKER_GPUS"),
    }


class TPWorker:
    def report(self) -> dict:
        return report()


class EngineStandIn:
    """Stands in for RolloutWorker: same constructor arguments, a `ready` probe, vLLM's worker start-up."""

    def __init__(self, config, bundle_indices=None) -> None:
        self.workers = []
        if os.environ.get("VLLM_RAY_BUNDLE_INDICES"):
            group = ray.util.get_current_placement_group()
            gpus = float(os.environ.get("VLLM_RAY_PER_WORKER_GPUS", "1"))
            for index in map(int, os.environ["VLLM_RAY_BUNDLE_INDICES"].split(",")):
                strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)
                self.workers.append(
                    ray.remote(TPWorker).options(num_cpus=0, num_gpus=gpus, scheduling_strategy=strategy).remote()
                )

    def ready(self) -> int:
        return 0

    def report(self) -> dict:
        return {**report(), "workers": ray.get([w.report.remote() for w in self.workers], timeout=30)}


class LearnerStandIn:
    def report(self) -> dict:
        return report()


class StandInLauncher(WorkerLauncher):
    """The real launcher's options, the stand-in's class; records whether the slot's bundles were free."""

    def __call__(self, index: int):
        options, bundle_indices = self.actor_options(index)
        freed.append(self.placed.released(self.slots[index].bundles))
        return ray.remote(EngineStandIn).options(**options).remote(self.config, bundle_indices)


freed: list[bool] = []


def probe(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        config = OmegaConf.to_object(compose(config_name="config", overrides=overrides))
    placed = place(placement_layout(config), timeout_s=30)
    layout = placed.layout
    engine = EngineConfig("/none", tensor_parallel_size=config.rollout.tensor_parallel_size)
    launcher = StandInLauncher(
        engine, config.cluster.cpus_per_engine, True, [placed.strategy(s) for s in layout.engines],
        slots=layout.engines, placed=placed,
    )  # fmt: skip
    group = RolloutGroup.start(launcher, len(layout.engines))
    learners = [
        ray.remote(LearnerStandIn)
        .options(num_cpus=slot.num_cpus, num_gpus=slot.num_gpus, scheduling_strategy=placed.strategy(slot))
        .remote()
        for slot in layout.learners
    ]
    result = {
        "bundles": layout.bundles,
        "engines": ray.get([w.report.remote() for w in group.workers], timeout=60),
        "learners": ray.get([w.report.remote() for w in learners], timeout=60),
    }
    held = placed.released(layout.engines[0].bundles)
    started = time.monotonic()
    group.replace(0)
    result["replace"] = {
        "released_before_kill": held,
        "released_when_relaunched": freed[-1],
        "seconds": time.monotonic() - started,
        "after": ray.get(group.workers[0].report.remote(), timeout=60),
    }
    for actor in [*group.workers, *learners]:
        ray.kill(actor)
    ray.util.remove_placement_group(placed.group)
    return result


def main() -> None:
    ray.init(num_cpus=4, num_gpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        for argument in sys.argv[1:]:
            print(json.dumps(probe(argument.split(";"))), flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
