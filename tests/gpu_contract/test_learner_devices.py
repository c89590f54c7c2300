"""The learner keeps its work on its own device (issue 17): the real LearnerWorker (DeepSpeed ZeRO-3 over
gloo, world size 1 and 2) trains under `strict_device.py`, which raises where CUDA / NCCL would: an op
mixing host and device tensors, a host tensor handed to an all-reduce, host inputs to the engine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
CASES = ["cppo:rollout", "cppo:recompute", "grpo:rollout", "trm_avg:recompute"]


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory):
    from cppo_rl.data.tiny_model import TinyModelConfig, build_tiny_model

    config = TinyModelConfig(
        hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128,
        max_position_embeddings=256, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    )  # fmt: skip
    return build_tiny_model(config, tmp_path_factory.mktemp("tiny_moe_strict"))


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_ranks(model_dir, world: int, cases: list[str], timeout: float = 240) -> list[str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    port = _port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "strict_learner_run.py"),
                str(model_dir),
                str(rank),
                str(world),
                str(port),
                *cases,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        tail = "\n".join(out.splitlines()[-40:])
        assert proc.returncode == 0, f"rank {rank} failed:\n{tail}"
        assert sum(line.startswith("ok ") for line in out.splitlines()) == len(cases), tail
    return outputs


def test_dense_learner_keeps_its_work_on_the_device(tiny_model_dir):
    _run_ranks(tiny_model_dir, 1, CASES)


def test_moe_learner_keeps_its_work_on_the_device(tiny_moe_dir):
    (out,) = _run_ranks(tiny_moe_dir, 1, ["cppo:rollout", "grpo:recompute"])
    assert "moe_aux_loss" in out


def test_two_ranks_all_reduce_metrics_on_the_device(tiny_model_dir):
    # strict_learner_run asserts that the metrics' all-reduce ran and got a device tensor on each rank
    _run_ranks(tiny_model_dir, 2, ["cppo:recompute"])
