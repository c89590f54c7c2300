"""Placement of engines and learner ranks, and the arguments each engine hands vLLM, on GPU and CPU.

vLLM 0.32's Ray executor (used by a TP > 1 engine) refuses placement-group bundles with more than one GPU
(vllm/v1/executor/ray_utils.py `initialize_ray_cluster`), takes the bundles of its TP ranks from
`VLLM_RAY_BUNDLE_INDICES` (else the group's first GPU bundles: other engines' and learner ranks'), and starts
one worker actor of `VLLM_RAY_PER_WORKER_GPUS` GPUs per bundle, so the engine actor must hold none.
Pure: no Ray, no vLLM engine.
"""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import cppo_rl.train  # noqa: F401  (registers the schema)
from cppo_rl.config import TrainConfig, config_problems, engine_config
from cppo_rl.controller.placement import ActorSlot, bundles_released, placement_layout, split_engines
from cppo_rl.rollout.engine import EngineConfig, vllm_arguments
from cppo_rl.train import CONF_DIR


def _compose(*overrides: str) -> TrainConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return OmegaConf.to_object(compose(config_name="config", overrides=list(overrides)))


def _vllm_limits(bundles):
    """What vLLM's initialize_ray_cluster checks of a placement group it runs in: no bundle over one GPU."""
    return all(bundle.get("GPU", 0) <= 1 for bundle in bundles)


# -- bundles and actor options ---------------------------------------------------------------------------


def test_cpu_layout_is_one_cpu_bundle_per_engine_and_rank():
    layout = placement_layout(_compose())
    assert layout.bundles == [{"CPU": 0.5}, {"CPU": 0.5}]
    assert layout.engines == [ActorSlot(0, 0.5, 0, (0,), None)]
    assert layout.learners == [ActorSlot(1, 0.5, 0, (1,), None)]
    assert not layout.engines[0].capture_child_tasks


def test_qwen3_1p7b_four_tp1_engines_and_four_ranks_hold_one_gpu_each():
    layout = placement_layout(_compose("experiment=qwen3_1p7b"))
    assert layout.bundles == [{"CPU": 0.25, "GPU": 1}] * 8
    assert layout.engines == [ActorSlot(i, 0.25, 1, (i,), None) for i in range(4)]
    assert layout.learners == [ActorSlot(4 + r, 0.25, 1, (4 + r,), None) for r in range(4)]
    assert layout.gpus == 8 and _vllm_limits(layout.bundles)


def test_tp2_engines_get_one_gpu_bundle_per_rank_and_their_actor_holds_no_gpu():
    layout = placement_layout(
        _compose("experiment=qwen3_1p7b", "rollout.num_engines=2", "rollout.tensor_parallel_size=2")
    )
    engine = [{"CPU": 0.25, "GPU": 1}, {"GPU": 1}]
    assert layout.bundles == engine + engine + [{"CPU": 0.25, "GPU": 1}] * 4
    assert _vllm_limits(layout.bundles)
    assert layout.engines == [ActorSlot(0, 0.25, 0, (0, 1), (0, 1)), ActorSlot(2, 0.25, 0, (2, 3), (2, 3))]
    assert all(slot.capture_child_tasks for slot in layout.engines)
    assert [slot.bundle_index for slot in layout.learners] == [4, 5, 6, 7]
    assert all(slot.num_gpus == 1 for slot in layout.learners)


def test_qwen3_30b_layout_fills_32_one_gpu_bundles_and_custom_resources_reach_every_bundle():
    layout = placement_layout(_compose("experiment=qwen3_30b_a3b_base", "+cluster.engine_resources={rollout: 1}"))
    assert len(layout.bundles) == 32 and layout.gpus == 32 and _vllm_limits(layout.bundles)
    assert all(layout.bundles[i]["rollout"] == 1 for slot in layout.engines for i in slot.bundles)
    assert [slot.vllm_bundle_indices for slot in layout.engines] == [(2 * e, 2 * e + 1) for e in range(8)]
    assert layout.cpus == 8 * 0.25 + 16 * 0.25  # one CPU ask per engine, not per TP rank


def test_split_engines_and_released_bundles():
    layout = placement_layout(
        _compose("experiment=qwen3_1p7b", "rollout.num_engines=2", "rollout.tensor_parallel_size=2")
    )
    nodes = {0: "a", 1: "b", 2: "a", 3: "a", 4: "a", 5: "a", 6: "b", 7: "b"}
    assert split_engines(layout, nodes) == [0]
    free = {"CPU_group_2_ff": 0.25, "GPU_group_2_ff": 1.0, "GPU_group_3_ff": 1.0}
    assert bundles_released(free, layout, (2, 3), "ff")
    assert not bundles_released({**free, "GPU_group_3_ff": 0.0}, layout, (2, 3), "ff")


# -- what each engine hands vLLM -------------------------------------------------------------------------


def test_vllm_arguments_on_cpu_are_todays():
    kwargs, env = vllm_arguments(EngineConfig("/m", max_model_len=256, seed=3), on_cpu=True)
    assert kwargs == {
        "model": "/m",
        "dtype": "float32",
        "max_model_len": 256,
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": 0.6,
        "max_logprobs": 20,
        "seed": 3,
        "enforce_eager": True,
        "enable_prefix_caching": True,
        "logprobs_mode": "processed_logprobs",
        "worker_extension_cls": "cppo_rl.sync.receiver.WeightReceiver",
        "enable_chunked_prefill": False,
    }
    assert env == {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "auto",
    }


def test_vllm_arguments_on_gpu_tp1_use_cuda_graphs_and_the_uni_executor():
    kwargs, env = vllm_arguments(EngineConfig("/m"), on_cpu=False)
    assert kwargs["enforce_eager"] is False and kwargs["dtype"] == "bfloat16"
    assert kwargs["distributed_executor_backend"] == "uni" and kwargs["enable_chunked_prefill"] is True
    assert kwargs["worker_extension_cls"] == "cppo_rl.sync.receiver.WeightReceiver"
    assert env == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def test_vllm_arguments_on_gpu_tp2_use_the_ray_executor_on_the_engines_bundles():
    kwargs, env = vllm_arguments(EngineConfig("/m", tensor_parallel_size=2), on_cpu=False, bundle_indices=(2, 3))
    assert kwargs["distributed_executor_backend"] == "ray" and kwargs["tensor_parallel_size"] == 2
    assert env == {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
        "VLLM_RAY_BUNDLE_INDICES": "2,3",
        "VLLM_RAY_PER_WORKER_GPUS": "1",
    }
    with pytest.raises(ValueError, match="one bundle per TP rank"):
        vllm_arguments(EngineConfig("/m", tensor_parallel_size=2), on_cpu=False, bundle_indices=(2,))


@pytest.mark.parametrize(("overrides", "cpu", "gpu"), [([], True, False), (["rollout.enforce_eager=true"], True, True)])
def test_rollout_enforce_eager_reaches_the_engine(overrides, cpu, gpu):
    config = engine_config(_compose(*overrides), "/m")
    assert vllm_arguments(config, on_cpu=True)[0]["enforce_eager"] is cpu
    assert vllm_arguments(config, on_cpu=False)[0]["enforce_eager"] is gpu


def test_launcher_options_are_the_slots(monkeypatch):
    from cppo_rl.rollout.worker import WorkerLauncher

    layout = placement_layout(
        _compose("experiment=qwen3_1p7b", "rollout.num_engines=2", "rollout.tensor_parallel_size=2")
    )
    config = EngineConfig("/m", tensor_parallel_size=2)
    launcher = WorkerLauncher(config, 0.5, True, ["s0", "s1"], slots=layout.engines)
    options, bundles = launcher.actor_options(1)
    assert bundles == (2, 3)
    assert options == {
        "num_cpus": 0.25,
        "num_gpus": 0,
        "runtime_env": {"env_vars": vllm_arguments(config, False, (2, 3))[1]},
        "scheduling_strategy": "s1",
    }
    cpu_options, _ = WorkerLauncher(EngineConfig("/m"), 0.5).actor_options(0)
    assert cpu_options == {
        "num_cpus": 0.5,
        "num_gpus": 0,
        "runtime_env": {"env_vars": EngineConfig("/m").engine_environment()},
    }


# -- the CPUs of a local cluster -------------------------------------------------------------------------


def test_local_cluster_cpus_default_to_the_machines(monkeypatch):
    import cppo_rl.config as config_module

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(config_module, "local_cpu_count", lambda: 64)
    assert _compose().cluster.num_cpus is None
    gpu = _compose("experiment=qwen3_1p7b")
    assert not [p for p in config_problems(gpu) if "CPUs" in p]


def test_local_cluster_cpus_are_checked_on_gpu_too(monkeypatch):
    import cppo_rl.config as config_module

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(config_module, "local_cpu_count", lambda: 1)
    gpu = _compose("experiment=qwen3_1p7b")
    problems = [p for p in config_problems(gpu) if "CPUs" in p]
    assert problems and "cluster.cpus_per_engine=0.25" in problems[0] and "cluster.num_cpus=1 (null" in problems[0]
    pinned = _compose("experiment=qwen3_1p7b", "cluster.num_cpus=1", "cluster.cpus_per_learner=0.5")
    assert [p for p in config_problems(pinned) if "3 CPUs > cluster.num_cpus=1;" in p]
    joined = _compose("experiment=qwen3_1p7b", "cluster=existing")
    assert not [p for p in config_problems(joined) if "CPUs" in p]  # another cluster's CPUs are not known here
