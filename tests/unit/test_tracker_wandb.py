"""W&B never stops training: WANDB_MODE is respected, a failed online start falls back to offline, a W&B
failure mid-run is survived. Real wandb 0.31 (offline needs no network; the "server" is a closed port, so
the online attempt fails at once and retries only until the short init timeout)."""

import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from cppo_rl.config import TrainConfig, config_problems
from cppo_rl.controller.progress import summary_screen
from cppo_rl.controller.tracker import Tracker, wandb_mode

CLOSED_PORT = "http://127.0.0.1:9"  # nothing listens: connection refused at once
GOOD_LOOKING_KEY = "k" * 40  # passes wandb's format check, refused by no server since none answers
CONFIG = {"logging": {"init_timeout_s": 1.0}}


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """No W&B variables but the test's own; wandb's files under tmp_path; wandb's process-wide state reset."""
    import wandb

    for name in list(os.environ):
        if name.startswith("WANDB_") or name == "NETRC":
            monkeypatch.delenv(name)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", CLOSED_PORT)
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    wandb.teardown()  # the settings singleton reads the environment once
    yield tmp_path
    wandb.teardown()


def _tracker(run_dir: Path, mode: str = "auto", run_id: str | None = None) -> Tracker:
    run_dir.mkdir(exist_ok=True)
    return Tracker(run_dir, CONFIG, project="p", entity=None, name=None, tags=[], mode=mode, run_id=run_id)


def _recorded_modes(monkeypatch) -> list[str]:
    import wandb

    modes, real_init = [], wandb.init

    def init(*args, **kwargs):
        modes.append(kwargs.get("mode"))
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    return modes


def test_auto_follows_wandb_mode_and_an_explicit_mode_wins(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", GOOD_LOOKING_KEY)
    for name in ("WANDB_MODE", "WANDB_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    assert wandb_mode("auto") == "online"
    for env_mode, expected in (("offline", "offline"), ("dryrun", "offline"), ("disabled", "disabled")):
        monkeypatch.setenv("WANDB_MODE", env_mode)
        assert wandb_mode("auto") == expected
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode("online") == "online"  # the config's explicit mode wins, as mode= does in wandb.init
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    assert wandb_mode("auto") == "disabled"


def test_wandb_mode_offline_with_a_key_makes_no_online_attempt(wandb_env, monkeypatch, capfd):
    monkeypatch.setenv("WANDB_API_KEY", "not-a-valid-key")  # online, this fails at once
    monkeypatch.setenv("WANDB_MODE", "offline")
    modes = _recorded_modes(monkeypatch)
    tracker = _tracker(wandb_env / "run")
    tracker.log({"train/reward": 0.5}, step=1)
    tracker.finish()
    assert modes == ["offline"] and tracker.mode == "offline" and tracker.offline_reason is None
    assert Path(tracker.wandb_dir).name.startswith("offline-run-")
    assert list(Path(tracker.wandb_dir).glob("*.wandb"))
    assert "warning:" not in capfd.readouterr().err


def _assert_fell_back(tracker: Tracker, err: str, key: str) -> None:
    assert tracker.mode == "offline" and tracker.offline_reason
    assert Path(tracker.wandb_dir).name.startswith("offline-run-")
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].endswith(f"wandb sync {tracker.wandb_dir}"), err
    assert "Traceback" not in err and key not in err
    assert tracker.summary()["wandb_sync"] == f"wandb sync {tracker.wandb_dir}"


def test_a_malformed_key_falls_back_to_offline_at_once(wandb_env, monkeypatch, capfd):
    monkeypatch.setenv("WANDB_API_KEY", "not-a-valid-key")
    modes = _recorded_modes(monkeypatch)
    started = time.perf_counter()
    tracker = _tracker(wandb_env / "run")
    assert time.perf_counter() - started < 15
    tracker.log({"train/reward": 0.5}, step=1)
    tracker.finish()
    assert modes == ["online", "offline"]
    _assert_fell_back(tracker, capfd.readouterr().err, "not-a-valid-key")
    assert "API key" in tracker.offline_reason


def test_an_unreachable_server_falls_back_to_offline_and_resume_keeps_the_run_id(wandb_env, monkeypatch, capfd):
    monkeypatch.setenv("WANDB_API_KEY", GOOD_LOOKING_KEY)
    run_dir = wandb_env / "run"
    started = time.perf_counter()
    tracker = _tracker(run_dir)
    assert time.perf_counter() - started < 15  # bounded by logging.init_timeout_s, not wandb's 90 s
    for step in (0, 1, 2):
        tracker.log({"train/reward": step / 10}, step=step)
    tracker.table("eval/samples", ["prompt", "response", "reward"], [["1+1", "2", 1.0]], step=2)
    tracker.finish()
    _assert_fell_back(tracker, capfd.readouterr().err, GOOD_LOOKING_KEY)
    assert "127.0.0.1:9" in tracker.offline_reason
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    screen = summary_screen(
        {**_summary(), **tracker.summary()}, str(run_dir), "python -m cppo_rl.train trainer.resume=auto"
    )
    assert f"online failed ({tracker.offline_reason})" in screen and f"wandb sync {tracker.wandb_dir}" in screen

    # the resumed run (the checkpoint saved the W&B run id) still cannot reach W&B: same id, offline
    resumed = _tracker(run_dir, run_id=tracker.run_id)
    resumed.log({"train/reward": 0.3}, step=3)
    resumed.finish()
    assert resumed.run_id == tracker.run_id and resumed.wandb_dir.endswith(tracker.run_id)
    _assert_fell_back(resumed, capfd.readouterr().err, GOOD_LOOKING_KEY)


def _summary() -> dict:
    return {
        "algorithm": "cppo",
        "steps": 3,
        "wall_seconds": 1.0,
        "eval_accuracy_start": 0.25,
        "eval_accuracy_end": 0.5,
        "eval_accuracy_best": 0.5,
        "mean_step_seconds": {},
        "checkpoint": None,
        "interrupted_by": None,
    }


# In a fresh process, to see everything it prints up to its exit (wandb's atexit hook included).
MID_RUN = """
import os, signal, sys
from pathlib import Path
from cppo_rl.controller.tracker import Tracker

run_dir = Path(sys.argv[1])
tracker = Tracker(run_dir, {}, project="p", entity=None, name=None, tags=[], mode="offline")
tracker.log({"train/reward": 0.1}, step=1)
for pid in os.listdir("/proc"):  # wandb's service process (wandb-core), a child of this one
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        continue
    if pid.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and b"wandb-core" in cmdline:
        os.kill(int(pid), signal.SIGKILL)
        os.waitpid(int(pid), 0)
for step in (2, 3):
    tracker.log({"train/reward": step / 10}, step=step)
    tracker.table("eval/samples", ["prompt"], [["x"]], step=step)
tracker.finish()
print("summary", tracker.summary())
print("finished")
"""


def test_wandb_dying_mid_run_is_survived_and_the_history_goes_on(wandb_env):
    run_dir = wandb_env / "run"
    run_dir.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MID_RUN), str(run_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "finished" in result.stdout, output
    assert "Traceback" not in output and "Exception ignored" not in output, output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "W&B failed at step 2" in warnings[0] and "wandb sync" in warnings[0], output
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_init_timeout_must_be_positive():
    config = TrainConfig()
    config = replace(config, logging=replace(config.logging, init_timeout_s=0))
    assert "logging.init_timeout_s=0 must be > 0" in config_problems(config)
