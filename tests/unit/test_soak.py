"""The soak run's arithmetic: slopes per 100 steps over the second half, before the final step."""

from __future__ import annotations

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
