"""A hub name (model.path=org/name) is resolved once, by the driver, to its snapshot directory in the local HF
cache, and that directory is what every role gets (cppo_rl.data.hub): with HF_HUB_OFFLINE=1 a cached model runs,
an absent one is refused before anything starts, naming model.path and the fix; a local directory passes as is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(root: Path, repo: str = "org/name") -> Path:
    """A cache laid out as huggingface_hub writes it: models--org--name/{refs/main, snapshots/<commit>/...}."""
    folder = root / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    config = {"architectures": ["Qwen3ForCausalLM"], "max_position_embeddings": 4096}
    (snapshot / "config.json").write_text(json.dumps(config))
    return snapshot


@pytest.fixture
def hub_cache(monkeypatch, tmp_path):
    """HF_HUB_CACHE is a temporary folder holding org/name; the hub is offline (as `make test` sets it)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = fake_hub_cache(cache)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read once, at import
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snapshot


def _config(tmp_path: Path, model_path: str):
    from cppo_rl.preflight import compose

    config, _ = compose(["model=hf", f"model.path={model_path}", f"trainer.output_dir={tmp_path / 'runs'}"])
    return config


def test_a_cached_hub_name_resolves_to_its_snapshot_offline(hub_cache, tmp_path):
    from cppo_rl.controller.trainer import Trainer
    from cppo_rl.data.hub import resolve_model_path
    from cppo_rl.preflight import model_problems

    assert resolve_model_path("org/name") == hub_cache
    config = _config(tmp_path, "org/name")
    assert model_problems(config) == []
    # the driver hands the snapshot directory, not the hub name, to the engines, the learner and the tokenizer
    model_path, train, _ = Trainer(config, tmp_path / "run")._model_and_data()
    assert model_path == str(hub_cache) and Path(model_path).is_dir() and train


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_the_cache_is_found_where_the_environment_puts_it(tmp_path, variable):
    """In a fresh process (as a role or `make train` starts one), HF_HUB_CACHE or HF_HOME/hub locate the cache."""
    cache = tmp_path / "hub"
    snapshot = fake_hub_cache(cache)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_HUB_CACHE")}
    env |= {variable: str(cache if variable == "HF_HUB_CACHE" else tmp_path), "HF_HUB_OFFLINE": "1"}
    code = "from cppo_rl.data.hub import resolve_model_path; print(resolve_model_path('org/name'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(snapshot)


def test_an_absent_hub_name_is_refused_offline_naming_the_key_and_the_fix(hub_cache, tmp_path):
    from cppo_rl.controller.trainer import Trainer
    from cppo_rl.data.hub import ModelNotFound, resolve_model_path
    from cppo_rl.preflight import model_problems

    config = _config(tmp_path, "org/absent")
    (problem,) = model_problems(config)
    assert problem.startswith("model.path='org/absent' is not in the local HF cache")
    assert str(hub_cache.parents[2]) in problem  # the cache it looked in
    assert "hf download org/absent" in problem and "unset HF_HUB_OFFLINE" in problem
    with pytest.raises(ModelNotFound, match=r"model.path='org/absent' is not in the local HF cache"):
        resolve_model_path("org/absent")
    with pytest.raises(ModelNotFound, match="hf download org/absent"):  # the trainer never passes the name on
        Trainer(config, tmp_path / "run")._model_and_data()


def test_a_local_directory_passes_through_unchanged(hub_cache, tmp_path):
    from cppo_rl.controller.trainer import Trainer
    from cppo_rl.data.hub import ModelNotFound, resolve_model_path

    local = hub_cache  # any model directory
    assert resolve_model_path(str(local)) == local
    model_path, _, _ = Trainer(_config(tmp_path, str(local)), tmp_path / "run")._model_and_data()
    assert model_path == str(local)
    with pytest.raises(ModelNotFound, match="does not exist"):
        resolve_model_path(str(tmp_path / "no_model"))


def test_online_a_missing_hub_name_is_downloaded_once_by_the_driver(hub_cache, monkeypatch, tmp_path):
    """HF_HUB_OFFLINE unset: the run downloads the snapshot (here a stand-in for snapshot_download); the
    preflight check does not (download=False), it reads config.json alone."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from cppo_rl.data.hub import resolve_model_path

    calls = []

    def snapshot_download(repo_id, local_files_only=False, **_):
        calls.append((repo_id, local_files_only))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        return str(tmp_path / "downloaded")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve_model_path("org/remote", download=False) is None
    assert resolve_model_path("org/remote") == tmp_path / "downloaded"
    assert calls == [("org/remote", True), ("org/remote", True), ("org/remote", False)]
