"""Shared fixtures: a tiny Qwen3 model directory and a local Ray cluster, built once per session."""

from __future__ import annotations

import os

import pytest

TINY_TEST_MODEL = {
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 2,
    "num_kv_heads": 1,
    "head_dim": 32,  # vLLM-CPU attention supports head_dim 32 and up, not 16
    "intermediate_size": 128,
    "max_position_embeddings": 256,
}


def pytest_collection_modifyitems(config, items):
    """Tests that start their own Ray cluster run first: once the session's shared cluster and its
    rollout engines exist, a second cluster beside them doubles the memory in use (CI saw Ray's
    memory monitor kill an engine that way)."""
    items.sort(key=lambda item: item.get_closest_marker("own_cluster") is None)


@pytest.fixture(scope="session")
def tiny_model_shape():
    """The shape of the session's tiny test model (a TinyModelConfig without the seed)."""
    return dict(TINY_TEST_MODEL)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-init tiny Qwen3 with its tokenizer, saved like a hub model."""
    from cppo_rl.data.tiny_model import TinyModelConfig, build_tiny_model

    return build_tiny_model(TinyModelConfig(**TINY_TEST_MODEL, seed=0), tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance for the session (2 CPUs, no dashboard); shut down at the end."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def rollout_workers(ray_local, tiny_model_dir):
    """Two RolloutWorker actors (vLLM-CPU) on the tiny model, shared by the session's tests.

    A test that changes their weights restores the originals before it ends.
    """
    from cppo_rl.rollout.engine import EngineConfig
    from cppo_rl.rollout.worker import RolloutGroup, start_rollout_workers

    handles = start_rollout_workers(EngineConfig(str(tiny_model_dir), max_model_len=256, seed=0), 2, num_cpus=0.5)
    yield handles
    RolloutGroup(handles).shutdown()


@pytest.fixture(scope="session")
def chat_prompt_ids(tiny_model_dir):
    """Token ids of five chat-templated arithmetic prompts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = ["Compute 2+3.", "Compute 41-17.", "Compute 9+9.", "Compute 30-4.", "Compute 7+12."]
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)["input_ids"]
        for p in prompts
    ]
