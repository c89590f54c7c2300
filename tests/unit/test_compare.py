"""The comparison driver without training: cells and their overrides, resumability, the table and plots."""

from __future__ import annotations

import json

import pytest

from cppo_rl.experiments.compare import Cell, finished, load_runs, plot, run_overrides, table


def _write_run(out, cell, start, end, best, masked, steps=4):
    run = out / cell.name
    run.mkdir(parents=True)
    summary = {"steps": steps, "eval_accuracy_start": start, "eval_accuracy_end": end, "eval_accuracy_best": best}
    (run / "summary.json").write_text(json.dumps(summary))
    lines = [{"step": 0, "eval/accuracy": start}]
    for step in range(1, steps + 1):
        line = {"step": step, "actor/masked_frac": masked, "actor/masked_by_prefix_frac": masked / 2}
        line.update({f"actor/divergence_mean_decile_{d}": 0.01 * d for d in range(10)})
        if step == steps:
            line["eval/accuracy"] = end
        lines.append(line)
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_a_cell_sets_the_minibatch_from_the_off_policy_degree(tmp_path):
    overrides = run_overrides(Cell("dppo", 8, 2), tmp_path, prompts=16, steps=40, eval_every=10)
    assert "algorithm=dppo" in overrides and "trainer.minibatch_prompts=2" in overrides
    assert "trainer.seed=2" in overrides and "trainer.resume=auto" in overrides
    assert "trainer.run_name=dppo-u8-s2" in overrides
    with pytest.raises(ValueError, match="not a multiple of 3 updates"):
        run_overrides(Cell("cppo", 3, 0), tmp_path, prompts=16, steps=40, eval_every=10)


def test_finished_runs_are_found_and_tabulated_with_collapse(tmp_path):
    _write_run(tmp_path, Cell("cppo", 8, 0), 0.40, 0.60, 0.62, 0.010)
    _write_run(tmp_path, Cell("cppo", 8, 1), 0.40, 0.50, 0.55, 0.030)
    _write_run(tmp_path, Cell("grpo", 8, 0), 0.40, 0.20, 0.45, 0.0)  # collapsed: 20 points below its start
    _write_run(tmp_path, Cell("grpo", 8, 1), 0.40, 0.30, 0.41, 0.0, steps=2)  # unfinished for a 4-step budget
    assert finished(tmp_path / "cppo-u8-s0", 4) and not finished(tmp_path / "grpo-u8-s1", 4)
    runs = [r for r in load_runs(tmp_path) if r["summary"]["steps"] >= 4]
    rows = table(runs)
    assert rows[2] == "| cppo | 8 | 2 | 0.550 ± 0.071 | 0.585 ± 0.049 | 0/2 | 0.0200 |"
    assert rows[3] == "| grpo | 8 | 1 | 0.200 ± 0.000 | 0.450 ± 0.000 | 1/1 | 0.0000 |"
    images = plot(runs, tmp_path / "img")
    assert all(image.is_file() and image.stat().st_size > 1000 for image in images) and len(images) == 4
