"""The comparison driver without training: cells, their names and overrides, resumability, pairing, the
statistics, the tables and plots."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import cppo_rl.train  # noqa: F401  (registers the schema)
from cppo_rl.config import validate
from cppo_rl.experiments import compare
from cppo_rl.experiments.compare import (
    METHODS,
    Cell,
    archive,
    finished,
    holm_adjust,
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

ARCHIVE = Path(__file__).resolve().parents[2] / "results" / "compare"  # the first study's runs, old folder names


def _history(start, end, masked, steps, metrics=None):
    """A run's metrics.jsonl records: evaluation at step 0 and at the last step, the same actor metrics each step."""
    lines = [{"step": 0, "eval/accuracy": start}]
    for step in range(1, steps + 1):
        line = {"step": step, "actor/masked_frac": masked, "actor/masked_by_prefix_frac": masked / 2}
        line["actor/divergence_mean"] = masked / 2
        line.update({f"actor/divergence_mean_decile_{d}": 0.01 * d for d in range(10)})
        line.update({f"actor/masked_frac_decile_{d}": masked * d / 5 for d in range(10)})
        line.update(metrics or {})
        if step == steps:
            line["eval/accuracy"] = end
        lines.append(line)
    return lines


def _write_run(out, cell, start, end, best, masked, steps=4, metrics=None):
    run = out / cell.name
    run.mkdir(parents=True)
    summary = {"steps": steps, "eval_accuracy_start": start, "eval_accuracy_end": end, "eval_accuracy_best": best}
    (run / "summary.json").write_text(json.dumps(summary))
    lines = _history(start, end, masked, steps, metrics)
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def _run(cell, end, start=0.5, masked=0.01, metrics=None):
    """A finished run as load_runs gives it, without files."""
    summary = {"steps": 4, "eval_accuracy_start": start, "eval_accuracy_end": end, "eval_accuracy_best": end}
    return {"cell": cell, "summary": summary, "history": _history(start, end, masked, 4, metrics)}


def test_cells_are_named_with_variant_staleness_updates_and_seed_and_both_formats_parse():
    assert Cell("cppo_no_prefix_budget", 8, 3).name == "cppo_no_prefix_budget-k0-u8-s3"
    assert Cell("dppo", 1, 0, staleness=4, variant="cal").name == "dppo@cal-k4-u1-s0"
    for cell in (Cell("cppo_no_prefix_budget", 8, 3), Cell("dppo", 1, 0, 4, "cal"), Cell("trm_avg", 2, 12, 2)):
        assert Cell.parse(cell.name) == cell
    assert Cell.parse("cppo_no_prefix_budget-u8-s3") == Cell("cppo_no_prefix_budget", 8, 3)  # the first study's
    assert Cell.parse("cppo-u2-s1") == Cell("cppo", 2, 1, staleness=0, variant="")
    for other in ("img", "cppo-u8-s0.log", "cppo-k2-u1", "cppo@-k0-u1-s0", "cppo-k2-x-u1-s0"):
        assert Cell.parse(other) is None


def test_a_cell_sets_the_minibatch_from_the_off_policy_degree(tmp_path):
    overrides = run_overrides(Cell("dppo", 8, 2), tmp_path, "offpolicy_stress", prompts=16, steps=40, eval_every=10)
    assert "algorithm=dppo" in overrides and "trainer.minibatch_prompts=2" in overrides
    assert "trainer.seed=2" in overrides and "trainer.resume=auto" in overrides
    assert "trainer.run_name=dppo-k0-u8-s2" in overrides and "trainer.max_staleness=0" in overrides
    with pytest.raises(ValueError, match="not a multiple of 3 updates"):
        run_overrides(Cell("cppo", 3, 0), tmp_path, "offpolicy_stress", prompts=16, steps=40, eval_every=10)


def test_a_stale_cell_trains_k_versions_behind_in_lockstep(tmp_path):
    cell = Cell("cppo", 1, 0, staleness=4, variant="cal")
    overrides = run_overrides(cell, tmp_path, "offpolicy_stress", prompts=8, steps=40, eval_every=5)
    assert {"trainer.max_staleness=4", "trainer.rollout_mode=lockstep", "trainer.minibatch_prompts=8"} <= set(overrides)
    assert "trainer.run_name=cppo@cal-k4-u1-s0" in overrides
    assert "logging.tags=[compare,cppo,k4,u1,cal]" in overrides


@pytest.mark.parametrize(("updates", "staleness", "variant"), [(1, 0, ""), (1, 2, ""), (1, 4, "cal"), (8, 0, "")])
@pytest.mark.parametrize("method", METHODS)
def test_every_cell_of_the_grid_composes_and_validates(tmp_path, method, updates, staleness, variant):
    """The stress preset with each method, staleness and degree is a valid main-job config: the long task, one
    mini-batch per update that splits over two ranks, the method's own algorithm section, the lockstep schedule
    k versions behind, and a variant's name (with its '@') as the run's name."""
    cell = Cell(method, updates, 0, staleness, variant)
    overrides = run_overrides(cell, tmp_path, "offpolicy_stress", prompts=8, steps=40, eval_every=5)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        config = OmegaConf.to_object(compose(config_name="config", overrides=overrides))
    validate(config)
    assert config.algorithm.name == method
    assert (config.data.task.min_operations, config.data.task.max_operations) == (4, 8)
    assert config.rollout.max_response_length == 128
    assert config.trainer.prompts_per_step // config.trainer.minibatch_prompts == updates
    assert (config.trainer.max_staleness, config.trainer.rollout_mode) == (staleness, "lockstep")
    assert config.trainer.run_name == cell.name


def test_the_drift_study_preset_is_uncertain_and_every_method_validates_at_its_largest_staleness(tmp_path):
    """Issue 21's defaults: the drift_stress task's demonstrations carry 0.5 nats a token, and each method
    composes with it at k = 4 from one model directory."""
    from cppo_rl.data.arithmetic_task import completion_entropy

    for method in compare.STUDY_METHODS:
        overrides = run_overrides(Cell(method, 1, 3, 4), tmp_path, "drift_stress", prompts=8, steps=40, eval_every=10)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            config = OmegaConf.to_object(
                compose(config_name="config", overrides=[*overrides, f"model.path={tmp_path}"])
            )
        validate(config)
        assert (config.trainer.max_staleness, config.data.eval_prompts) == (4, 200)
    assert config.data.task.solution == "any_order" and config.data.task.free_format
    assert completion_entropy(config.data.task) == pytest.approx(0.50, abs=0.01)  # the model measured 0.54


def test_the_grid_runs_every_cell_with_the_overrides_after_the_separator(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(
        compare.subprocess, "run", lambda command, **_: commands.append(command) or SimpleNamespace(returncode=0)
    )
    _write_run(tmp_path, Cell("cppo", 1, 0, 0, "cal"), 0.4, 0.5, 0.5, 0.01)  # finished earlier: skipped
    _write_run(tmp_path / "archive", Cell("dppo", 1, 0, 2, "cal"), 0.4, 0.5, 0.5, 0.01)  # archived: skipped too
    argv = ["--methods", "cppo", "dppo", "--staleness", "0", "2", "--seeds", "0", "--steps", "4", "--variant", "cal"]
    argv += ["--archive", str(tmp_path / "archive")]
    assert main([*argv, "--out", str(tmp_path), "--", "algorithm.delta=0.03"]) == 0
    names = [next(o for o in command if o.startswith("trainer.run_name=")).split("=")[1] for command in commands]
    assert names == ["dppo@cal-k0-u1-s0", "cppo@cal-k2-u1-s0"]
    assert all(command[-1] == "algorithm.delta=0.03" for command in commands)
    assert "trainer.max_staleness=2" in commands[1] and "trainer.total_steps=4" in commands[1]
    with pytest.raises(SystemExit):  # a '-' would make the folder names ambiguous
        main(["--variant", "c-al", "--report-only", "--out", str(tmp_path)])


def test_finished_runs_are_found_and_tabulated_with_collapse(tmp_path):
    _write_run(tmp_path, Cell("cppo", 8, 0), 0.40, 0.60, 0.62, 0.010)
    _write_run(tmp_path, Cell("cppo", 8, 1), 0.40, 0.50, 0.55, 0.030)
    _write_run(tmp_path, Cell("grpo", 8, 0), 0.40, 0.20, 0.45, 0.0)  # collapsed: 20 points below its start
    _write_run(tmp_path, Cell("grpo", 8, 1), 0.40, 0.30, 0.41, 0.0, steps=2)  # unfinished for a 4-step budget
    _write_run(tmp_path, Cell("dppo", 8, 0), 0.40, 0.65, 0.65, 0.005)  # above cppo's seed 0, below its seed 1
    _write_run(tmp_path, Cell("dppo", 8, 1), 0.40, 0.45, 0.50, 0.005)
    assert finished(tmp_path / "cppo-k0-u8-s0", 4) and not finished(tmp_path / "grpo-k0-u8-s1", 4)
    runs = [r for r in load_runs(tmp_path) if r["summary"]["steps"] >= 4]
    rows = table(runs)
    assert rows[2] == (
        "| cppo | 0 | 8 | 2 | 0.550 ± 0.071 | 0.150 ± 0.071 | 0.585 ± 0.049 | - | - | - | - | 0/2 | 0.0200 | 0.0100 "
        "| - | - |"  # no Top-K TV or entropy logged
    )
    # dppo: +0.05 and -0.05 against cppo's same seed, below it in one seed of two; the only p-value (Holm's too)
    assert rows[3] == (
        "| dppo | 0 | 8 | 2 | 0.550 ± 0.141 | 0.150 ± 0.141 | 0.575 ± 0.106 | 0.000 ± 0.071 | 1/2 | 1.000 | 1.000 "
        "| 0/2 | 0.0050 | 0.0025 | - | - |"
    )
    # grpo seed 0: 0.20 - 0.40 from its start, 0.20 - 0.60 against cppo seed 0
    assert rows[4] == (
        "| grpo | 0 | 8 | 1 | 0.200 ± 0.000 | -0.200 ± 0.000 | 0.450 ± 0.000 | -0.400 ± 0.000 | 1/1 | - | - | 1/1 "
        "| 0.0000 | 0.0000 | - | - |"
    )
    assert seed_table(runs, 8) == [
        "| k = 0, 8 updates / rollout | seed 0 | seed 1 |",
        "|---|---|---|",
        "| start (all methods) | 0.400 | 0.400 |",
        "| cppo | 0.600 | 0.500 |",
        "| dppo | 0.650 | 0.450 |",
        "| grpo | 0.200 | - |",  # its seed 1 is unfinished
    ]


def test_holm_adjusts_in_rank_order_monotone_capped_and_skips_nan():
    """By hand: the 4 non-nan p-values sorted are 0.005, 0.01, 0.03, 0.04, times 4, 3, 2, 1: 0.02, 0.03, 0.06,
    0.04, the last raised to 0.06 (adjusted p-values do not fall with rank)."""
    adjusted = holm_adjust([0.01, 0.04, 0.03, float("nan"), 0.005])
    assert adjusted[:3] + adjusted[4:] == pytest.approx([0.03, 0.06, 0.06, 0.02]) and math.isnan(adjusted[3])
    assert holm_adjust([0.4, 0.5]) == pytest.approx([0.8, 0.8])
    assert holm_adjust([0.9, 0.6]) == [1.0, 1.0]  # capped
    assert holm_adjust([0.2]) == [0.2] and holm_adjust([]) == []
    assert all(math.isnan(p) for p in holm_adjust([float("nan")] * 2))


def test_a_variant_is_paired_with_cppo_of_the_same_variant_staleness_updates_and_seed():
    assert Cell("dppo", 1, 3, 2, "cal").reference == Cell("cppo", 1, 3, 2, "cal")
    runs = [
        _run(Cell("cppo", 1, 0, 2), 0.50),
        _run(Cell("cppo", 1, 1, 2), 0.60),
        _run(Cell("cppo", 1, 0, 2, "cal"), 0.70),
        _run(Cell("cppo", 1, 1, 2, "cal"), 0.80),
        _run(Cell("dppo", 1, 0, 2, "cal"), 0.60),  # -0.10 and -0.05 against cppo@cal (+0.10, +0.15 against cppo)
        _run(Cell("dppo", 1, 1, 2, "cal"), 0.75),
    ]
    rows = table(runs)
    assert [row.split(" | ")[0] for row in rows[2:]] == ["| cppo", "| cppo@cal", "| dppo@cal"]
    assert rows[4].startswith(
        "| dppo@cal | 2 | 1 | 2 | 0.675 ± 0.106 | 0.175 ± 0.106 | 0.675 ± 0.106 | -0.075 ± 0.035 | 2/2 |"
    )
    assert (
        seed_table(runs, 1, staleness=2, variant="cal")[0]
        == "| k = 2, 1 updates / rollout, variant cal | seed 0 | seed 1 |"
    )
    assert seed_table(runs, 1, staleness=2, variant="cal")[3:] == [
        "| cppo@cal | 0.700 | 0.800 |",
        "| dppo@cal | 0.600 | 0.750 |",
    ]


def test_the_table_sorts_by_setting_adjusts_over_all_comparisons_and_shows_top_k_tv_and_entropy():
    ends = {  # (method, staleness, variant): final accuracy of seeds 0, 1, 2
        ("cppo", 0, ""): (0.50, 0.60, 0.70),
        ("grpo", 0, ""): (0.40, 0.55, 0.66),
        ("dppo", 0, ""): (0.45, 0.50, 0.62),
        ("cppo", 4, ""): (0.40, 0.50, 0.60),
        ("dppo", 4, ""): (0.30, 0.45, 0.45),
        ("cppo", 0, "cal"): (0.50, 0.50, 0.50),
        ("dppo", 0, "cal"): (0.50, 0.50, 0.50),  # no spread in the difference: no test, not counted by Holm
    }
    runs = [
        _run(Cell(method, 1, seed, staleness, variant), end, metrics={"actor/entropy": 0.1 * (seed + 1)})
        for (method, staleness, variant), seed_ends in ends.items()
        for seed, end in enumerate(seed_ends)
    ]
    runs += [_run(Cell("cppo", 2, seed), 0.5, metrics={"actor/topk_tv": 0.002 * (seed + 1)}) for seed in range(3)]
    rows = table(runs)
    header = [column.strip() for column in rows[0].split("|")[1:-1]]
    assert header[9:12] == ["p (paired t)", "p (Holm)", "collapsed"]
    assert header[-2:] == ["mean Top-K TV", "entropy"]
    cells = [[cell.strip() for cell in row.split("|")[1:-1]] for row in rows[2:]]
    order = [(row[0], row[1], row[2]) for row in cells]  # variant, then staleness, updates, method order
    assert order == [
        ("cppo", "0", "1"),
        ("dppo", "0", "1"),
        ("grpo", "0", "1"),
        ("cppo", "0", "2"),
        ("cppo", "4", "1"),
        ("dppo", "4", "1"),
        ("cppo@cal", "0", "1"),
        ("dppo@cal", "0", "1"),
    ]
    p_values = [
        paired_p_value([-0.05, -0.10, -0.08]),  # dppo, k = 0
        paired_p_value([-0.10, -0.05, -0.04]),  # grpo, k = 0
        paired_p_value([-0.10, -0.05, -0.15]),  # dppo, k = 4
    ]
    holm = holm_adjust(p_values)
    assert [row[9] for row in cells] == [
        "-",
        f"{p_values[0]:.3f}",
        f"{p_values[1]:.3f}",
        "-",
        "-",
        f"{p_values[2]:.3f}",
        "-",
        "-",
    ]
    assert [row[10] for row in cells] == ["-", f"{holm[0]:.3f}", f"{holm[1]:.3f}", "-", "-", f"{holm[2]:.3f}", "-", "-"]
    assert holm == pytest.approx([3 * p_values[0], 2 * p_values[2], 2 * p_values[2]])  # 3 tests; grpo's raised
    assert [row[-2] for row in cells] == ["-", "-", "-", "0.0040", "-", "-", "-", "-"]  # mean over seeds 1-3
    assert cells[0][-1] == "0.2000" and cells[3][-1] == "-"  # entropy 0.1, 0.2, 0.3 over seeds


def test_plots_are_written_with_a_staleness_plot_when_k_varies(tmp_path):
    runs = [
        _run(
            Cell(method, 1, seed, staleness),
            0.5,
            masked=0.01 * (staleness + 1),
            metrics={"actor/masked_by_token_frac": 0.01},
        )
        for method in ("cppo", "dppo", "grpo")
        for staleness in (0, 2, 4)
        for seed in (0, 1)
    ]
    runs += [_run(Cell(method, 1, seed, 4, "cal"), 0.5) for method in ("cppo", "dppo") for seed in (0, 1)]
    images = plot(runs, tmp_path / "img", "drift")
    names = ["accuracy", "masked_by_cause", "masked_by_staleness", "divergence_by_position", "masked_by_position"]
    assert images == [tmp_path / "img" / f"drift_{name}.png" for name in names]
    assert all(image.is_file() and image.stat().st_size > 1000 for image in images)
    one_level = plot([r for r in runs if r["cell"].staleness == 4], tmp_path / "one", "drift")
    assert [image.name for image in one_level] == [
        f"drift_{name}.png" for name in names if name != "masked_by_staleness"
    ]


def test_archived_runs_rebuild_the_same_table(tmp_path):
    out, kept = tmp_path / "runs", tmp_path / "archive"
    _write_run(out, Cell("cppo", 8, 0, 2), 0.40, 0.60, 0.62, 0.010)
    _write_run(out, Cell("dppo", 2, 1), 0.40, 0.30, 0.45, 0.020)
    (out / "cppo-k2-u8-s0" / "checkpoints").mkdir()  # not archived
    (out / "cppo-k2-u8-s0" / ".hydra").mkdir()
    (out / "cppo-k2-u8-s0" / ".hydra" / "config.yaml").write_text("algorithm:\n  delta: 0.04\n")
    runs = load_runs(out)
    archive(runs, kept)
    assert sorted(p.name for p in (kept / "cppo-k2-u8-s0").iterdir()) == [
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
    ]
    assert (kept / "cppo-k2-u8-s0" / "config.yaml").read_text() == "algorithm:\n  delta: 0.04\n"
    assert sorted(p.name for p in (kept / "dppo-k0-u2-s1").iterdir()) == ["metrics.jsonl", "summary.json"]
    assert table(load_runs(kept)) == table(runs)


def test_the_first_studys_archived_folders_load_as_k0_without_variant_and_keep_their_names(tmp_path):
    out, kept = tmp_path / "old", tmp_path / "kept"
    for name in ("cppo-u8-s0", "dppo-u8-s0"):
        shutil.copytree(ARCHIVE / name, out / name)
    runs = load_runs(out)
    assert [r["cell"] for r in runs] == [Cell("cppo", 8, 0), Cell("dppo", 8, 0)]
    assert table(runs)[3].startswith("| dppo | 0 | 8 | 1 | 0.316 ± 0.000 |")  # docs/results.md: 0.305 and 0.316
    assert "0.305" in seed_table(runs, 8)[3] and "0.316" in seed_table(runs, 8)[4]
    archive(runs, kept)
    assert sorted(p.name for p in kept.iterdir()) == ["cppo-u8-s0", "dppo-u8-s0"]
    shutil.copytree(out / "cppo-u8-s0", out / "cppo-k0-u8-s0")  # the same cell under the new name
    with pytest.raises(ValueError, match="cppo-k0-u8-s0 and cppo-u8-s0 are runs of one cell"):
        load_runs(out)


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
    out, report = tmp_path / "drift", tmp_path / "docs" / "results.md"
    for staleness in (0, 2):
        _write_run(out, Cell("cppo", 1, 0, staleness), 0.40, 0.60, 0.62, 0.010)
        _write_run(out, Cell("dppo", 1, 0, staleness), 0.40, 0.50, 0.55, 0.005)
    _write_run(out, Cell("dppo", 1, 0, 0, "cal"), 0.40, 0.50, 0.55, 0.005)  # its cppo@cal is missing
    assert main(["--report-only", "--steps", "4", "--out", str(out), "--report", str(report)]) == 0
    text = report.read_text()
    assert "| dppo | 2 | 1 | 1 | 0.500 ± 0.000 | 0.100 ± 0.000 | 0.550 ± 0.000 | -0.100 ± 0.000 | 1/1 | - | - |" in text
    assert "| dppo@cal | 0 | 1 | 1 | 0.500 ± 0.000 | 0.100 ± 0.000 | 0.550 ± 0.000 | - | 0/0 | - | - |" in text
    assert (
        "| k = 2, 1 updates / rollout | seed 0 |\n|---|---|\n| start (all methods) | 0.400 |\n| cppo | 0.600 |" in text
    )
    assert "| k = 0, 1 updates / rollout, variant cal | seed 0 |" in text
    assert "![drift_masked_by_staleness](img/drift_masked_by_staleness.png)" in text
    names = ("accuracy", "masked_by_cause", "masked_by_staleness", "divergence_by_position", "masked_by_position")
    assert all((report.parent / "img" / f"drift_{name}.png").is_file() for name in names)


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
