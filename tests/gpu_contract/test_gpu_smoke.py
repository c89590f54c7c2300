"""`make gpu-smoke` (cppo_rl.experiments.gpu_smoke): the four checks pass on the CPU stack, so the command a
user runs first on a GPU node is the code CI runs; without two GPUs it says so instead of starting anything."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cppo_rl.experiments import gpu_smoke


def test_without_two_gpus_it_fails_with_the_device_count_and_the_fix(capsys):
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has two GPUs")
    assert gpu_smoke.main([]) == 1
    out = capsys.readouterr().out
    assert "FAIL  devices" in out and "CUDA_VISIBLE_DEVICES" in out and "--cpu" in out


def test_the_smoke_config_is_one_engine_and_one_rank_with_a_gpu_each():
    from cppo_rl.config import config_problems
    from cppo_rl.controller.placement import placement_layout

    config = gpu_smoke.smoke_config(on_gpu=True)
    layout = placement_layout(config)
    assert [slot.num_gpus for slot in layout.engines + layout.learners] == [1, 1]
    assert layout.gpus == config.cluster.num_gpus == 2
    assert config_problems(config) == []


@pytest.mark.integration
@pytest.mark.own_cluster
@pytest.mark.slow
def test_all_four_checks_pass_on_the_cpu_stack():
    result = subprocess.run(
        [sys.executable, "-m", "cppo_rl.experiments.gpu_smoke", "--cpu"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RAY_DEDUP_LOGS": "0"},
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert [line.split()[0] for line in lines] == ["PASS"] * 4, result.stdout
    assert [line[6:21].strip() for line in lines] == list(gpu_smoke.CHECK_NAMES)
    assert "all 4 checks passed (CPU stack)" in result.stdout
