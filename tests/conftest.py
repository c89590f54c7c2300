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
