"""The run report: charts drawn from metrics.jsonl hold the logged numbers; bad histories are named."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from cppo_rl import report


def _history(steps: int = 12, deciles: bool = True) -> list[dict]:
    records = [{"step": 0, "eval/accuracy": 0.25}]
    for step in range(1, steps + 1):
        record = {
            "step": step,
            "train/reward": step / 20,
            "actor/masked_frac": 0.01 * step,
            "actor/masked_by_token_frac": 0.004 * step,
            "actor/masked_by_prefix_frac": 0.006 * step,
            "actor/entropy": 2.0 - step / 10,
            "train/response_length_mean": 30.0 + step,
            **{f"time/{phase}_s": 0.5 for phase in report.PHASES},
        }
        if deciles:
            record |= {f"actor/divergence_mean_decile_{d}": d * 0.1 + step for d in report.DECILES}
            record |= {f"actor/masked_frac_decile_{d}": d * 0.01 for d in report.DECILES}
        if step % 5 == 0:
            record["eval/accuracy"] = 0.25 + step / 100
        records.append(record)
    return records


def _write(run_dir, records) -> None:
    run_dir.mkdir(exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_every_chart_is_a_png_and_plots_the_logged_values(tmp_path):
    _write(tmp_path, _history())
    paths = report.render_report(tmp_path, log=lambda _: None)
    assert [p.name for p in paths] == list(report.CHARTS)
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    history = report.load_history(tmp_path)
    _, axis = report.chart_reward_accuracy(history)
    reward, accuracy = axis.lines
    assert list(reward.get_xdata()) == list(range(1, 13))
    assert list(reward.get_ydata()) == pytest.approx([s / 20 for s in range(1, 13)])
    assert list(accuracy.get_xdata()) == [0, 5, 10] and list(accuracy.get_ydata()) == pytest.approx([0.25, 0.3, 0.35])

    _, (divergence, _) = report.chart_divergence_by_position(history)
    grid = np.asarray(divergence.images[0].get_array())
    assert grid.shape == (10, 12)  # decile x step
    assert grid[3, 4] == pytest.approx(0.3 + 5)  # decile 3 at step 5

    _, axes = report.chart_training_health(history)
    assert [a.get_title() for a in axes] == ["entropy (nats)", "response length (tokens)"]  # only what was logged


def test_charts_without_their_metrics_are_skipped(tmp_path):
    _write(tmp_path, _history(deciles=False))
    notes = []
    paths = report.render_report(tmp_path, tmp_path / "out", log=notes.append)
    assert "divergence_by_position.png" not in {p.name for p in paths}
    assert notes == ["skipped divergence_by_position.png: the run logged none of its metrics"]
    assert all(p.parent == tmp_path / "out" for p in paths)


def test_bad_histories_name_the_file_and_line(tmp_path):
    with pytest.raises(ValueError, match=r"metrics.jsonl: no such file"):
        report.load_history(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, "train/reward": \n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not JSON"):
        report.load_history(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": "one"}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: each line must be an object with an integer 'step'"):
        report.load_history(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        report.load_history(tmp_path)


def test_the_command_line_prints_the_paths_or_the_error(tmp_path):
    _write(tmp_path / "run", _history(steps=3))
    command = [sys.executable, "-m", "cppo_rl.report"]
    done = subprocess.run([*command, str(tmp_path / "run")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(tmp_path / "run" / "report" / name) for name in report.CHARTS]
    failed = subprocess.run([*command, str(tmp_path)], capture_output=True, text=True)
    assert failed.returncode == 1 and "metrics.jsonl: no such file" in failed.stderr
