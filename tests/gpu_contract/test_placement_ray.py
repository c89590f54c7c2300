"""The placement of a GPU run on a real Ray cluster declaring 8 GPUs (none needed): the qwen3_1p7b layout
(4 engines TP 1 + 4 learner ranks) and a TP 2 one (2 engines x 2 + 4 ranks) place, and stand-in actors
started with the real launcher's options hold what vLLM and DeepSpeed need: a TP 1 engine and each learner
rank one GPU; a TP 2 engine none, its two vLLM-style workers (one per VLLM_RAY_BUNDLE_INDICES bundle) one
each. `RolloutGroup.replace` starts a replacement only once the killed engine's bundles are free."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.own_cluster]

PROBE = Path(__file__).resolve().parent / "support" / "placement_probe.py"


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    layouts = ["experiment=qwen3_1p7b", "experiment=qwen3_1p7b;rollout.num_engines=2;rollout.tensor_parallel_size=2"]
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local cluster
    environment["RAY_TMPDIR"] = str(tmp_path_factory.mktemp("ray"))
    result = subprocess.run(
        [sys.executable, str(PROBE), *layouts], env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 2, result.stdout[-2000:]
    return lines


def _gpus(report):
    return report["resources"].get("GPU", 0), len(report["gpu_ids"])


def test_four_tp1_engines_and_four_ranks_hold_one_gpu_each(probes):
    tp1 = probes[0]
    assert len(tp1["bundles"]) == 8
    assert [_gpus(engine) for engine in tp1["engines"]] == [(1, 1)] * 4
    assert all(engine["workers"] == [] and engine["bundle_indices"] is None for engine in tp1["engines"])
    assert [_gpus(rank) for rank in tp1["learners"]] == [(1, 1)] * 4
    ids = [engine["gpu_ids"][0] for engine in tp1["engines"]] + [rank["gpu_ids"][0] for rank in tp1["learners"]]
    assert len(set(ids)) == 8


def test_tp2_engine_actors_hold_no_gpu_and_their_workers_one_per_bundle(probes):
    tp2 = probes[1]
    assert max(bundle.get("GPU", 0) for bundle in tp2["bundles"]) == 1  # vLLM refuses bundles of 2+ GPUs
    for index, engine in enumerate(tp2["engines"]):
        assert _gpus(engine) == (0, 0) and engine["resources"] == {"CPU": 0.25}
        assert engine["bundle_indices"] == f"{2 * index},{2 * index + 1}" and engine["per_worker_gpus"] == "1"
        assert [_gpus(worker) for worker in engine["workers"]] == [(1, 1), (1, 1)]
    ids = [w["gpu_ids"][0] for e in tp2["engines"] for w in e["workers"]] + [r["gpu_ids"][0] for r in tp2["learners"]]
    assert len(set(ids)) == 8
    assert [_gpus(rank) for rank in tp2["learners"]] == [(1, 1)] * 4


@pytest.mark.parametrize("layout", [0, 1])
def test_replace_starts_the_new_engine_once_the_old_ones_bundles_are_free(probes, layout):
    replace = probes[layout]["replace"]
    assert replace["released_before_kill"] is False  # the live engine (or its workers) held the bundles
    assert replace["released_when_relaunched"] is True
    assert [_gpus(worker) for worker in replace["after"]["workers"]] == ([(1, 1)] * 2 if layout else [])
