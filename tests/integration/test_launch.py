"""launch/submit.sh for real: a Ray head on this machine (job server on 127.0.0.1), the smoke run
submitted through it as a Ray job, which succeeds and logs its training steps."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from support.ray_nodes import cluster_environment, free_port, start_node, stop_node

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.own_cluster]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head (job server on 127.0.0.1) in its own process group; yields (job server address,
    environment for clients)."""
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # short: Ray's unix socket paths
    environment = cluster_environment(temp_dir)
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
    done = subprocess.run(
        [str(REPO / "launch" / "submit.sh"), "experiment=smoke", "logging=local", "trainer.total_steps=2"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "succeeded" in output and "step 2/2" in output
    (run_dir,) = tmp_path.iterdir()  # the Hydra override reached the job unchanged
    assert (run_dir / "summary.json").is_file() and (run_dir / "checkpoints" / "latest").is_file()
