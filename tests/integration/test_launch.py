"""launch/submit.sh for real: a Ray head on this machine started as docs/launch.md says (`ray start --head
--dashboard-host 127.0.0.1`, no auth settings: Ray 2.60 turns token authentication on by itself because
~/.ray/auth_token exists), the smoke run submitted through it as a Ray job with no auth settings either, which
succeeds and logs its training steps; without a token to be found, submit.sh stops at once and says what to set."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from support.ray_nodes import RAY, cluster_environment, free_port, start_node, stop_node

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.own_cluster]

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "launch" / "submit.sh"
AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head (job server on 127.0.0.1) in its own process group, started with Ray's defaults as a user
    gets them: no RAY_AUTH_* variables, and a HOME whose ~/.ray/auth_token exists (any local ray.init() writes
    one: ray/_private/worker.py -> generate_and_save_token), so `ray start --head` turns token authentication on
    (scripts.py:start -> maybe_enable_token_auth_if_token_available). Yields (job server address, environment
    for clients: the same HOME, no RAY_AUTH_*)."""
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # short: Ray's unix socket paths
    home = Path(temp_dir) / "home"
    home.mkdir()
    environment = {key: value for key, value in cluster_environment(temp_dir).items() if key not in AUTH_VARIABLES}
    # this test's own ~/.ray/auth_token, not the user's; caches stay where they were
    environment["XDG_CACHE_HOME"] = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    environment["HOME"] = str(home)
    subprocess.run([RAY, "get-auth-token", "--generate"], env=environment, check=True, capture_output=True)
    assert (home / ".ray" / "auth_token").stat().st_size > 0
    dashboard = free_port()
    head = start_node(
        ["--head", "--num-cpus", "2", "--port", str(free_port()), "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dashboard)],
        environment,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)  # 401 without a token: still up
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not start"
                time.sleep(1)
        with urllib.request.urlopen(f"{address}/api/authentication_mode", timeout=10) as response:
            assert json.load(response)["authentication_mode"] == "token"  # the head wants a token by default
        yield address, environment
    finally:
        stop_node(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_submit_runs_the_smoke_job_on_the_cluster(ray_head, tmp_path):
    address, environment = ray_head
    environment = {
        **environment,
        "RAY_ADDRESS": address,
        "CPPO_PYTHON": sys.executable,
        "CPPO_OUTPUT_DIR": str(tmp_path),
    }
    assert not set(AUTH_VARIABLES) & set(environment)  # as a user's shell: submit.sh finds the token itself
    done = subprocess.run(
        [str(SUBMIT), "experiment=smoke", "logging=local", "trainer.total_steps=2"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "succeeded" in output and "step 2/2" in output
    token = (Path(environment["HOME"]) / ".ray" / "auth_token").read_text().strip()
    assert token not in output  # the token is used, never shown
    (run_dir,) = tmp_path.iterdir()  # the Hydra override reached the job unchanged
    assert (run_dir / "summary.json").is_file() and (run_dir / "checkpoints" / "latest").is_file()


def test_submit_without_a_token_stops_before_ray_and_says_what_to_set(ray_head, tmp_path):
    """A client that cannot find the cluster's token (a remote head, or another user's): submit.sh fails at
    once, before calling `ray job submit`, naming the variables and the head's token file; no traceback."""
    address, environment = ray_head
    empty_home = tmp_path / "home"
    empty_home.mkdir()
    environment = {**environment, "HOME": str(empty_home), "RAY_ADDRESS": address, "CPPO_PYTHON": sys.executable}
    started = time.monotonic()
    done = subprocess.run(
        [str(SUBMIT), "experiment=smoke"], env=environment, capture_output=True, text=True, timeout=120
    )
    elapsed = time.monotonic() - started
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "requires token authentication" in done.stderr and "RAY_AUTH_TOKEN_PATH=" in done.stderr, output
    assert "~/.ray/auth_token" in done.stderr and f"{empty_home}/.ray/auth_token" in done.stderr, output
    assert "Traceback" not in output and "Job submission server address" not in output, output  # Ray never ran
    assert elapsed < 20, elapsed
