"""The soak run's arithmetic: slopes per 100 steps over the second half, before the final step."""

from __future__ import annotations

import os

import pytest

from cppo_rl.experiments.soak import slope, summarise


def test_slope_is_least_squares():
    assert slope([0, 1, 2, 3], [1, 3, 5, 7]) == pytest.approx(2.0)
    assert slope([5, 5], [1, 2]) == 0.0


def _sample(step, rss, fds):
    return {"step": step, "roles": {"RolloutWorker": {"rss_mib": rss, "fds": fds, "processes": 1}}}


def test_summary_uses_the_second_half_before_the_last_step():
    warm_up = [_sample(step, 100.0 + 50 * step, 10) for step in range(0, 50)]  # growth while warming up
    steady = [_sample(step, 3000.0 + 0.02 * step, 40) for step in range(50, 100)]  # 2 MiB per 100 steps
    shutdown = [_sample(100, 10.0, 2)]  # the final step: evaluation and shutdown
    report = summarise(warm_up + steady + shutdown, total_steps=100)["RolloutWorker"]
    assert report["rss_mib_per_100_steps"] == pytest.approx(2.0)
    assert report["fds_per_100_steps"] == 0.0 and report["fds_end"] == 40 and report["processes"] == 1
    assert report["rss_mib_mid"] == pytest.approx(3001.0)


def test_the_chaos_plan_is_seeded_balanced_and_inside_the_run():
    from cppo_rl.experiments.soak import VICTIMS, chaos_plan

    plan = chaos_plan(6, 200, seed=3)
    assert plan == chaos_plan(6, 200, seed=3) and plan != chaos_plan(6, 200, seed=4)
    assert sorted(s["role"] for s in plan) == sorted(VICTIMS * 2)
    steps = [s["step"] for s in plan]
    assert steps == sorted(set(steps)) and steps[0] >= 5 and steps[-1] <= 195
    assert all(0 <= s["delay_s"] <= 3 for s in plan)


def test_the_expected_cursor_follows_the_loader_across_epochs():
    from cppo_rl.experiments.soak import expected_cursor

    assert expected_cursor(20, 8, 1) == {"epoch": 0, "cursor": 8}
    assert expected_cursor(20, 8, 2) == {"epoch": 0, "cursor": 16}
    assert expected_cursor(20, 8, 3) == {"epoch": 1, "cursor": 8}  # 4 examples left over: a new epoch


def _healed_run(tmp_path, steps=4, cursor=None, restarts=1):
    """A run directory as a healed chaos run leaves it: 20 train prompts, 8 per step."""
    import json

    import yaml

    from cppo_rl.learner.checkpoint import finalize, staging_dir

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "data" / "arithmetic").mkdir(parents=True)
    (run / "data" / "arithmetic" / "train.jsonl").write_text("{}\n" * 20)
    config = {"trainer": {"prompts_per_step": 8}, "data": {"eval_prompts": 64}, "rollout": {"eval_samples": 4}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(steps + 1)))
    summary = {"restarts": restarts, "eval_accuracy_end": 0.84, "skipped_long_prompts": {"train": 0}}
    (run / "summary.json").write_text(json.dumps(summary))
    staging_dir(run / "checkpoints", steps).mkdir(parents=True)
    finalize(run / "checkpoints", steps, {"trainer": {"loader": cursor or {"epoch": 1, "cursor": 16}}})
    (tmp_path / "train.log").write_text("warning: worker 0 died: restarting rollout engines [0]\n")
    return run


STRIKES = [{"role": "LearnerWorker", "killed": True}, {"role": "RolloutWorker", "killed": True}]


def test_chaos_checks_pass_a_healed_run_and_fail_a_skipped_step_or_a_moved_cursor(tmp_path):
    from cppo_rl.experiments.soak import chaos_checks

    shm = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()  # what exists now is not a leak
    checks = chaos_checks(_healed_run(tmp_path / "a"), 4, STRIKES, shm, reference=0.855)
    assert all(c["ok"] for c in checks.values()), checks
    assert checks["final accuracy within noise of an undisturbed run"]["bound"] == pytest.approx(0.0936, abs=1e-3)

    broken = chaos_checks(
        _healed_run(tmp_path / "b", cursor={"epoch": 1, "cursor": 8}, restarts=0), 4, STRIKES, set(), 0.5
    )
    failed = {name for name, c in broken.items() if not c["ok"]}
    assert failed == {
        "data cursor at the consumed frontier",
        "learner restarts = learner kills",
        "final accuracy within noise of an undisturbed run",
    }
    run = _healed_run(tmp_path / "c")
    (run / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n{"step": 3}\n{"step": 4}\n')
    assert not chaos_checks(run, 4, STRIKES, shm, None)["every step logged once"]["ok"]
