"""A stale torch extension build lock is refused before the learner starts, named with its age and the fix;
a build in progress is named and waited for; the learner ranks share the build directory the driver checks.
No Ray: fake extension trees, and a stand-in `ray` module for LearnerGroup.__init__."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from cppo_rl.learner import ops_cache

OP = "deepspeed_shm_comm"


def make_lock(root: Path, age_s: float, op: str = OP) -> Path:
    """`root/op/lock` as torch's FileBaton leaves it (an empty file), `age_s` seconds old."""
    folder = root / op
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "lock"
    lock.touch()
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_a_stale_lock_is_refused_naming_path_age_and_fix(tmp_path):
    make_lock(tmp_path, 0.0, "cpu_adam")  # a fresh lock beside it does not hide the stale one
    lock = make_lock(tmp_path, 3600.0)
    messages = []
    started = time.monotonic()
    with pytest.raises(ops_cache.StaleBuildLock) as refused:
        ops_cache.check_build_locks(tmp_path, stale_after_s=600.0, log=messages.append)
    text = str(refused.value)
    assert time.monotonic() - started < 5.0  # at once, not after a wait
    assert str(lock) in text
    assert 3590 <= int(re.search(r"age (\d+) s", text).group(1)) <= 3610
    assert f"rm {lock}" in text
    assert "TORCH_EXTENSIONS_DIR" in text
    assert f"rm {tmp_path / 'cpu_adam' / 'lock'}" not in text  # the fresh one is not called stale


def test_a_fresh_lock_is_named_and_waited_for_until_it_is_released(tmp_path):
    lock = make_lock(tmp_path, 5.0)
    messages = []
    threading.Timer(0.5, lock.unlink).start()  # the build finishes
    ops_cache.check_build_locks(tmp_path, stale_after_s=600.0, poll_s=0.05, log=messages.append)
    assert len(messages) == 1
    assert "in progress" in messages[0] and str(lock) in messages[0]


def test_a_fresh_lock_never_released_is_refused_after_a_bounded_wait(tmp_path):
    lock = make_lock(tmp_path, 0.0)
    messages = []
    started = time.monotonic()
    with pytest.raises(ops_cache.StaleBuildLock, match=f"rm {lock}"):
        ops_cache.check_build_locks(tmp_path, stale_after_s=0.6, poll_s=0.05, log=messages.append)
    assert 0.5 < time.monotonic() - started < 5.0
    assert str(lock) in messages[0]


def test_an_old_lock_whose_build_process_is_alive_is_waited_for(tmp_path):
    lock = make_lock(tmp_path, 3600.0)
    builder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], cwd=lock.parent)
    try:
        messages = []
        threading.Timer(0.8, lock.unlink).start()
        ops_cache.check_build_locks(tmp_path, stale_after_s=600.0, poll_s=0.05, log=messages.append)
        assert f"build process {builder.pid}" in messages[0]
    finally:
        builder.kill()
        builder.wait()


def test_no_lock_passes_silently(tmp_path):
    messages = []
    (tmp_path / OP).mkdir()
    (tmp_path / OP / "deepspeed_shm_comm.so").touch()
    ops_cache.check_build_locks(tmp_path, log=messages.append)
    ops_cache.check_build_locks(tmp_path / "never_built", log=messages.append)
    assert messages == []


def test_the_watchdog_names_the_lock_while_setup_waits(tmp_path):
    lock = make_lock(tmp_path, 0.0)
    messages = []
    with ops_cache.watch_setup(tmp_path, after_s=0.1, log=messages.append):
        time.sleep(0.35)
    assert messages and str(lock) in messages[0] and f"rm {lock}" in messages[0]
    count = len(messages)
    time.sleep(0.3)
    assert len(messages) == count  # stops with the block


def test_learner_env_carries_the_drivers_extensions_dir(tmp_path):
    env = ops_cache.learner_env(2.0, False, 0, {"TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert env == {"OMP_NUM_THREADS": "2", "TORCH_EXTENSIONS_DIR": str(tmp_path), "DS_ACCELERATOR": "cpu"}
    env = ops_cache.learner_env(0.5, True, 3, {"TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert env == {"OMP_NUM_THREADS": "3", "TORCH_EXTENSIONS_DIR": str(tmp_path)}


def test_learner_env_defaults_to_torchs_own_build_root(tmp_path, monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # torch creates the folder: keep it in tmp
    torchs = os.path.dirname(cpp_extension._get_build_directory(OP, verbose=False))
    assert ops_cache.learner_env(1.0, False, 0, {})["TORCH_EXTENSIONS_DIR"] == torchs
    assert torchs.startswith(os.path.realpath(tmp_path))


class FakeRay(types.ModuleType):
    """Just enough of `ray` for LearnerGroup.__init__: records each actor's options."""

    def __init__(self):
        super().__init__("ray")
        self.options = []

    def remote(self, cls):
        fake = self

        class Actor:
            @staticmethod
            def options(**options):
                fake.options.append(options)
                method = types.SimpleNamespace(remote=lambda *args: ("127.0.0.1", 1))
                handle = types.SimpleNamespace(free_address=method, setup=method)
                return types.SimpleNamespace(remote=lambda *args: handle)

        return Actor

    @staticmethod
    def get(value, timeout=None):
        return value


def _group(monkeypatch, extensions: Path):
    from cppo_rl.algorithms import default_config
    from cppo_rl.learner import worker

    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(worker, "get_all", lambda futures, what, timeout: list(futures))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    config = worker.LearnerConfig(model_path="unused", responses_per_step=4, micro_batch_size=1)
    return fake, lambda: worker.LearnerGroup(config, "cppo", default_config("cppo"), 2, num_cpus_per_rank=0.5)


def test_learner_group_gives_every_rank_the_checked_extensions_dir(tmp_path, monkeypatch):
    fake, start = _group(monkeypatch, tmp_path)
    start()
    assert len(fake.options) == 2
    for options in fake.options:
        assert options["runtime_env"]["env_vars"]["TORCH_EXTENSIONS_DIR"] == str(tmp_path)


def test_learner_group_refuses_a_stale_lock_before_any_rank_starts(tmp_path, monkeypatch):
    lock = make_lock(tmp_path, 3600.0)
    fake, start = _group(monkeypatch, tmp_path)
    with pytest.raises(ops_cache.StaleBuildLock, match=f"rm {lock}"):
        start()
    assert fake.options == []
