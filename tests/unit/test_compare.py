"""The comparison driver without training: cells and their overrides, resumability, the table and plots."""

from __future__ import annotations

import json
import math

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import cppo_rl.train  # noqa: F401  (registers the schema)
from cppo_rl.config import validate
from cppo_rl.experiments.compare import (
    METHODS,
    Cell,
    archive,
    finished,
    load_runs,
    main,
    paired_p_value,
    plot,
    report_markers,
    run_overrides,
    seed_table,
    table,
    write_report,
)
from cppo_rl.train import CONF_DIR


def _write_run(out, cell, start, end, best, masked, steps=4):
    run = out / cell.name
    run.mkdir(parents=True)
    summary = {"steps": steps, "eval_accuracy_start": start, "eval_accuracy_end": end, "eval_accuracy_best": best}
    (run / "summary.json").write_text(json.dumps(summary))
    lines = [{"step": 0, "eval/accuracy": start}]
    for step in range(1, steps + 1):
        line = {"step": step, "actor/masked_frac": masked, "actor/masked_by_prefix_frac": masked / 2}
        line["actor/divergence_mean"] = masked / 2
        line.update({f"actor/divergence_mean_decile_{d}": 0.01 * d for d in range(10)})
        if step == steps:
            line["eval/accuracy"] = end
        lines.append(line)
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_a_cell_sets_the_minibatch_from_the_off_policy_degree(tmp_path):
    overrides = run_overrides(Cell("dppo", 8, 2), tmp_path, "offpolicy_stress", prompts=16, steps=40, eval_every=10)
    assert "algorithm=dppo" in overrides and "trainer.minibatch_prompts=2" in overrides
    assert "trainer.seed=2" in overrides and "trainer.resume=auto" in overrides
    assert "trainer.run_name=dppo-u8-s2" in overrides
    with pytest.raises(ValueError, match="not a multiple of 3 updates"):
        run_overrides(Cell("cppo", 3, 0), tmp_path, "offpolicy_stress", prompts=16, steps=40, eval_every=10)


def test_finished_runs_are_found_and_tabulated_with_collapse(tmp_path):
    _write_run(tmp_path, Cell("cppo", 8, 0), 0.40, 0.60, 0.62, 0.010)
    _write_run(tmp_path, Cell("cppo", 8, 1), 0.40, 0.50, 0.55, 0.030)
    _write_run(tmp_path, Cell("grpo", 8, 0), 0.40, 0.20, 0.45, 0.0)  # collapsed: 20 points below its start
    _write_run(tmp_path, Cell("grpo", 8, 1), 0.40, 0.30, 0.41, 0.0, steps=2)  # unfinished for a 4-step budget
    _write_run(tmp_path, Cell("dppo", 8, 0), 0.40, 0.65, 0.65, 0.005)  # above cppo's seed 0, below its seed 1
    _write_run(tmp_path, Cell("dppo", 8, 1), 0.40, 0.45, 0.50, 0.005)
    assert finished(tmp_path / "cppo-u8-s0", 4) and not finished(tmp_path / "grpo-u8-s1", 4)
    runs = [r for r in load_runs(tmp_path) if r["summary"]["steps"] >= 4]
    rows = table(runs)
    assert (
        rows[2]
        == "| cppo | 8 | 2 | 0.550 ± 0.071 | 0.150 ± 0.071 | 0.585 ± 0.049 | - | - | - | 0/2 | 0.0200 | 0.0100 |"
    )
    # dppo: +0.05 and -0.05 against cppo's same seed, below it in one seed of two
    assert rows[3] == (
        "| dppo | 8 | 2 | 0.550 ± 0.141 | 0.150 ± 0.141 | 0.575 ± 0.106 | 0.000 ± 0.071 | 1/2 | 1.000 | 0/2 | 0.0050 "
        "| 0.0025 |"
    )
    # grpo seed 0: 0.20 - 0.40 from its start, 0.20 - 0.60 against cppo seed 0
    assert rows[4] == (
        "| grpo | 8 | 1 | 0.200 ± 0.000 | -0.200 ± 0.000 | 0.450 ± 0.000 | -0.400 ± 0.000 | 1/1 | - | 1/1 | 0.0000 "
        "| 0.0000 |"
    )
    images = plot(runs, tmp_path / "img")
    assert all(image.is_file() and image.stat().st_size > 1000 for image in images) and len(images) == 3
    assert seed_table(runs, 8) == [
        "| 8 updates / rollout | seed 0 | seed 1 |",
        "|---|---|---|",
        "| start (all methods) | 0.400 | 0.400 |",
        "| cppo | 0.600 | 0.500 |",
        "| dppo | 0.650 | 0.450 |",
        "| grpo | 0.200 | - |",  # its seed 1 is unfinished
    ]


@pytest.mark.parametrize("updates", [2, 8])
@pytest.mark.parametrize("method", METHODS)
def test_every_cell_of_the_default_grid_composes_and_validates(tmp_path, method, updates):
    """The stress preset with each method and degree is a valid main-job config: the long task, one
    mini-batch per update that splits over two ranks, the method's own algorithm section."""
    overrides = run_overrides(Cell(method, updates, 0), tmp_path, "offpolicy_stress", prompts=8, steps=20, eval_every=5)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        config = OmegaConf.to_object(compose(config_name="config", overrides=overrides))
    validate(config)
    assert config.algorithm.name == method
    assert (config.data.task.min_operations, config.data.task.max_operations) == (4, 8)
    assert config.rollout.max_response_length == 128
    assert config.trainer.prompts_per_step // config.trainer.minibatch_prompts == updates


def test_archived_runs_rebuild_the_same_table(tmp_path):
    out, kept = tmp_path / "runs", tmp_path / "archive"
    _write_run(out, Cell("cppo", 8, 0), 0.40, 0.60, 0.62, 0.010)
    _write_run(out, Cell("dppo", 2, 1), 0.40, 0.30, 0.45, 0.020)
    (out / "cppo-u8-s0" / "checkpoints").mkdir()  # not archived
    (out / "cppo-u8-s0" / ".hydra").mkdir()
    (out / "cppo-u8-s0" / ".hydra" / "config.yaml").write_text("algorithm:\n  delta: 0.04\n")
    runs = load_runs(out)
    archive(runs, out, kept)
    assert sorted(p.name for p in (kept / "cppo-u8-s0").iterdir()) == ["config.yaml", "metrics.jsonl", "summary.json"]
    assert (kept / "cppo-u8-s0" / "config.yaml").read_text() == "algorithm:\n  delta: 0.04\n"
    assert sorted(p.name for p in (kept / "dppo-u2-s1").iterdir()) == ["metrics.jsonl", "summary.json"]
    assert table(load_runs(kept)) == table(runs)


def test_the_report_keeps_its_hand_written_text_around_the_generated_part(tmp_path):
    report = tmp_path / "results.md"
    begin, end = report_markers("compare")
    write_report(report, "compare", ["| table v1 |"])
    report.write_text(report.read_text().replace(begin, "Analysis above.\n" + begin) + "Notes below.\n")
    write_report(report, "compare", ["| table v2 |"])
    text = report.read_text()
    assert "Analysis above.\n" + begin + "\n| table v2 |\n" + end + "\nNotes below." in text
    assert "v1" not in text
    with pytest.raises(ValueError, match="expected one"):  # a second study needs its own markers first
        write_report(report, "compare_scaled", ["| table |"])
    report.write_text(text + "\n".join(report_markers("compare_scaled")) + "\n")
    write_report(report, "compare_scaled", ["| scaled |"])
    assert "| table v2 |" in report.read_text() and "| scaled |" in report.read_text()


def test_report_only_writes_the_tables_and_plots_from_finished_runs(tmp_path):
    out, report = tmp_path / "compare", tmp_path / "docs" / "results.md"
    _write_run(out, Cell("cppo", 8, 0), 0.40, 0.60, 0.62, 0.010)
    _write_run(out, Cell("dppo", 8, 0), 0.40, 0.50, 0.55, 0.005)
    assert main(["--report-only", "--steps", "4", "--out", str(out), "--report", str(report)]) == 0
    text = report.read_text()
    assert "| dppo | 8 | 1 | 0.500 ± 0.000 | 0.100 ± 0.000 | 0.550 ± 0.000 | -0.100 ± 0.000 | 1/1 | - |" in text
    assert "| start (all methods) | 0.400 |\n| cppo | 0.600 |\n| dppo | 0.500 |" in text
    assert all((report.parent / "img" / f"compare_{name}.png").is_file() for name in ("accuracy", "masked_by_cause"))


@pytest.mark.parametrize(
    ("t", "n", "p"), [(2.776, 5, 0.05), (4.604, 5, 0.01), (2.228, 11, 0.05), (12.706, 2, 0.05), (1.0, 31, 0.3253)]
)
def test_the_paired_p_value_matches_students_t_tables(t, n, p):
    """Differences with mean t * s / sqrt(n) and standard deviation s give t; the p-values are the
    two-sided tail of Student's t with n - 1 degrees of freedom (table values to 3-4 digits)."""
    spread = [(-1) ** i for i in range(n)]  # zero mean for even n; centred below for odd n
    centred = [value - sum(spread) / n for value in spread]
    scale = 1 / (sum(value * value for value in centred) / (n - 1)) ** 0.5  # unit standard deviation
    differences = [value * scale + t / n**0.5 for value in centred]
    assert paired_p_value(differences) == pytest.approx(p, abs=2e-4)
    assert paired_p_value([-d for d in differences]) == pytest.approx(p, abs=2e-4)  # two-sided
    assert math.isnan(paired_p_value(differences[:1]))  # one seed
    assert math.isnan(paired_p_value([0.1] * n))  # no spread
