"""Start-up phases (cppo_rl/controller/startup.py): progress lines, a deadline that names the phase, what it
waited for and the fix, and errors before the deadline left as they are."""

from __future__ import annotations

import time

import pytest

from cppo_rl.controller.startup import Startup, StartupTimeout


def test_a_phase_says_when_it_starts_and_ends():
    lines = []
    startup = Startup(10.0, log=lines.append)
    with startup.phase("rollout engines", "2 engines", "raise it") as remaining:
        assert 9.0 < remaining() <= 10.0
    assert lines[0] == "start-up: rollout engines ..."
    assert lines[1].startswith("start-up: rollout engines done in ")
    assert set(startup.seconds) == {"rollout engines"}


def test_a_call_that_outlives_the_deadline_fails_the_phase_by_name():
    startup = Startup(0.3, log=lambda line: None)
    started = time.monotonic()
    with (
        pytest.raises(StartupTimeout) as caught,
        startup.phase("learner set-up", "2 DeepSpeed ranks", "read the logs") as remaining,
    ):
        time.sleep(remaining())  # a blocking call given the phase's remaining time ...
        raise TimeoutError("GetTimeoutError: timed out")  # ... times out at the deadline
    message = str(caught.value)
    assert "start-up phase 'learner set-up' did not finish within 0.3 s" in message
    assert "waiting for 2 DeepSpeed ranks" in message and "Likely fix: read the logs" in message
    assert "TimeoutError: GetTimeoutError: timed out" in message  # the underlying error, named
    assert isinstance(caught.value.__cause__, TimeoutError)
    assert time.monotonic() - started < 5
    assert "learner set-up" not in startup.seconds


def test_an_error_before_the_deadline_is_raised_as_it_is():
    lines = []
    startup = Startup(60.0, log=lines.append)
    with pytest.raises(ValueError, match="bad model"), startup.phase("rollout engines", "engines", "fix"):
        raise ValueError("bad model")
    assert lines[-1].startswith("start-up: rollout engines failed after ")


def test_a_phase_may_carry_its_own_deadline():
    startup = Startup(1000.0, log=lambda line: None)
    with startup.phase("placement", "CPUs", "ray status", timeout_s=5.0) as remaining:
        assert remaining() <= 5.0
