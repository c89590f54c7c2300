"""The run report: charts drawn from metrics.jsonl hold the logged numbers; bad histories are named."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from cppo_rl import report

PHASE_SECONDS = {"generate": 1.0, "reward": 0.1, "learner": 2.0, "sync": 0.2}


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
            **{f"time/{phase}_s": seconds for phase, seconds in PHASE_SECONDS.items()},
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
    assert paths == [tmp_path / "report" / name for name in report.CHARTS]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    history = report.load_history(tmp_path)
    reward, accuracy = report.chart_reward_accuracy(history).axes[0].lines
    assert list(reward.get_xdata()) == list(range(1, 13))
    assert list(reward.get_ydata()) == pytest.approx([s / 20 for s in range(1, 13)])
    assert list(accuracy.get_xdata()) == [0, 5, 10] and list(accuracy.get_ydata()) == pytest.approx([0.25, 0.3, 0.35])

    total, by_token, by_prefix = report.chart_masked_fraction(history).axes[0].lines
    assert list(total.get_ydata()) == pytest.approx([0.01 * s for s in range(1, 13)])
    assert list(by_token.get_ydata()) == pytest.approx([0.004 * s for s in range(1, 13)])
    assert list(by_prefix.get_ydata()) == pytest.approx([0.006 * s for s in range(1, 13)])

    divergence, masked = report.chart_divergence_by_position(history).axes[:2]
    grid = np.asarray(divergence.collections[0].get_array())
    assert grid.shape == (10, 12)  # decile x step
    assert grid[3, 4] == pytest.approx(0.3 + 5)  # decile 3 at step 5
    assert np.asarray(masked.collections[0].get_array())[7, 0] == pytest.approx(0.07)

    stack = report.chart_step_time(history).axes[0].collections
    assert len(stack) == 4  # one layer per phase; the top of the last is the whole step
    assert stack[-1].get_paths()[0].vertices[:, 1].max() == pytest.approx(sum(PHASE_SECONDS.values()))

    axes = report.chart_training_health(history).axes
    assert [a.get_title() for a in axes] == ["policy entropy", "response length"]  # only what was logged
    assert list(axes[0].lines[0].get_ydata()) == pytest.approx([2.0 - s / 10 for s in range(1, 13)])


def test_charts_without_their_metrics_are_skipped(tmp_path):
    _write(tmp_path, _history(deciles=False))
    notes = []
    paths = report.render_report(tmp_path, tmp_path / "out", log=notes.append)
    assert [p.name for p in paths] == [name for name in report.CHARTS if name != "divergence_by_position.png"]
    assert notes == ["skipped divergence_by_position.png: its metrics are not in the run's history"]
    assert all(p.parent == tmp_path / "out" for p in paths)

    divergence = {f"actor/divergence_mean_decile_{d}": 0.1 for d in report.DECILES}
    only_divergence = [record | divergence for record in _history(3, deciles=False)]
    figure = report.chart_divergence_by_position(only_divergence)
    assert [a.get_title() for a in figure.axes[:1]] == ["mean divergence D_t by position decile"]
    assert len(figure.axes) == 2  # one panel and its colorbar


def test_bad_histories_name_the_file_and_line(tmp_path):
    with pytest.raises(ValueError, match=r"nowhere: no such run directory"):
        report.load_history(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"metrics.jsonl: no such file"):
        report.load_history(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, "train/reward": \n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not JSON"):
        report.load_history(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": "one"}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: each line must be an object with an integer 'step'"):
        report.load_history(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl: empty"):
        report.load_history(tmp_path)


def test_a_last_line_cut_short_by_a_crash_is_skipped_with_a_note(tmp_path):
    complete = "".join(json.dumps(r) + "\n" for r in _history(steps=3))
    (tmp_path / "metrics.jsonl").write_text(complete + '{"step": 4, "train/rew')  # died mid-write: no newline
    notes = []
    assert report.load_history(tmp_path, log=notes.append) == _history(steps=3)
    assert notes == [f"{tmp_path}/metrics.jsonl:5: skipped a truncated last line (the run stopped mid-write)"]
    # a bad line before it is still refused, by its own line number
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1,\n{"step": 2}\n{"step": 3, "x"')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not JSON"):
        report.load_history(tmp_path, log=notes.append)
    # a complete (newline-terminated) bad last line was written whole: not a crash, refused
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, "x"\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not JSON"):
        report.load_history(tmp_path, log=notes.append)
    # a last record complete but for its newline is kept
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}')
    assert [r["step"] for r in report.load_history(tmp_path, log=notes.append)] == [0, 1]
    assert len(notes) == 1


def test_the_command_line_prints_the_paths_or_the_error(tmp_path):
    _write(tmp_path / "run", _history(steps=3))
    command = [sys.executable, "-m", "cppo_rl.report"]
    done = subprocess.run([*command, str(tmp_path / "run")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(tmp_path / "run" / "report" / name) for name in report.CHARTS]
    failed = subprocess.run([*command, str(tmp_path)], capture_output=True, text=True)
    assert failed.returncode == 1 and f"{tmp_path}/metrics.jsonl: no such file" in failed.stderr
    with (tmp_path / "run" / "metrics.jsonl").open("a") as history:
        history.write('{"step": 4, "train/re')
    done = subprocess.run([*command, str(tmp_path / "run")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(tmp_path / "run" / "report" / name) for name in report.CHARTS]
    assert f"{tmp_path}/run/metrics.jsonl:5: skipped a truncated last line" in done.stderr
