"""Ray nodes started with `ray start --block` in their own process groups, for tests that need a cluster
outside the test process (stopping them cannot touch any other Ray instance on the machine)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cluster_environment(temp_dir: str) -> dict[str, str]:
    """The environment of every node and client of one test cluster (token auth, its own temp dir)."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "RAY_TMPDIR": temp_dir,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
    }


def start_node(arguments: list[str], environment: dict[str, str]) -> subprocess.Popen:
    """`ray start --block ARGUMENTS` (a head or a worker); ports of its agents are picked free so that
    several nodes can share this machine."""
    command = [
        RAY, "start", "--block", "--disable-usage-stats",
        "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
        "--metrics-export-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()), *arguments,
    ]  # fmt: skip
    return subprocess.Popen(
        command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def stop_node(node: subprocess.Popen) -> None:
    os.killpg(node.pid, signal.SIGTERM)
    try:
        node.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(node.pid, signal.SIGKILL)


def wait_for_nodes(address: str, count: int, environment: dict[str, str], nodes: list[subprocess.Popen]) -> None:
    """Until `count` nodes are alive in the cluster at `address` (GCS host:port); fails after 180 s."""
    probe = (
        f"import ray; ray.init(address={address!r}, logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
    )
    deadline = time.monotonic() + 180
    while True:
        assert all(node.poll() is None for node in nodes), "a Ray node exited while starting"
        result = subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, text=True)
        if result.returncode == 0 and int(result.stdout.strip().splitlines()[-1]) >= count:
            return
        assert time.monotonic() < deadline, f"{count} Ray nodes did not come up: {result.stderr[-2000:]}"
        time.sleep(2)
