"""DeepSpeed's JIT-built ops and torch's build lock: one build directory for the job, a stale lock refused.

On CPU the learner ranks need DeepSpeed's `deepspeed_shm_comm` op, built on first use:
`deepspeed.init_distributed` -> `deepspeed/comm/torch.py` `TorchBackend.__init__` -> `build_shm_op()` ->
`ShareMemCommBuilder.load()` -> `OpBuilder.jit_load` (`deepspeed/ops/op_builder/builder.py`) ->
`torch.utils.cpp_extension.load` -> `_jit_compile`, which takes `FileBaton(<build dir>/<op>/lock)`: the
process that creates the file (O_CREAT | O_EXCL) builds and removes it in a `finally`; every other process
waits in `FileBaton.wait` (torch/utils/file_baton.py) until the file is gone, with no timeout and no owner
check. A build killed from outside (SIGKILL, a stopped job) never removes it, so every later run waited in
`LearnerWorker.setup` forever, printing nothing.

What this module does (called by `LearnerGroup.__init__`, in the driver, before any learner rank starts):

- `learner_env` gives the ranks one build directory, TORCH_EXTENSIONS_DIR: the driver's value when set,
  else torch's own default for this interpreter (`cpp_extension._get_build_directory`'s root:
  `get_default_build_root()/py<major><minor><abiflags>_<cpu|cuXY|rocmXY>`), so the driver checks the
  directory the ranks will use, even on a cluster whose workers were started with another environment.
- `check_build_locks` looks for `<dir>/*/lock`. The lock holds no pid, so the rule is its age (the file's
  mtime: torch creates it empty and never writes it) plus, on this node, whether a process works in
  the op's folder (torch runs ninja, and ninja the compiler, with cwd = that folder):
  a lock older than `stale_after_s` (default 10 min; a build of these ops takes 1-3 min) with no such
  process is stale: `StaleBuildLock` names its path, its age and the fix (`rm <path>` if no build is
  running), and the run does not start. A younger lock, or one whose builder is alive, is a build in
  progress: a warning names it and the driver waits until it is gone, at most `stale_after_s` from the
  start of the wait, then refuses as above.
- `watch_setup` prints, every `after_s` seconds while the ranks' set-up has not finished, the build locks
  under the directory (or that there are none): a lock taken after the check (e.g. by a rank on another
  node whose home is not the driver's) is named while set-up waits on it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

STALE_AFTER_S = 600.0  # a JIT build of DeepSpeed's CPU ops takes about 1-3 minutes
WATCH_AFTER_S = 300.0  # first (and repeated) report of a set-up still running


class StaleBuildLock(RuntimeError):
    """A torch extension build lock that no build will ever remove: every rank would wait on it forever."""


@dataclass(frozen=True)
class BuildLock:
    path: Path
    age_s: float
    builders: tuple[int, ...]  # pids on this node working in the op's folder (a live build)

    def describe(self) -> str:
        live = f", build process {', '.join(map(str, self.builders))} running in its folder" if self.builders else ""
        return f"{self.path} (age {self.age_s:.0f} s{live})"


def default_extensions_dir() -> str:
    """The directory torch builds extensions under when TORCH_EXTENSIONS_DIR is not set
    (torch.utils.cpp_extension._get_build_directory's resolution, for this interpreter and torch build)."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return os.path.join(get_default_build_root(), f"{python}_{accelerator}")


def extensions_dir(environ: Mapping[str, str] | None = None) -> str:
    """TORCH_EXTENSIONS_DIR of `environ` (default: this process's) if set, else torch's default."""
    environ = os.environ if environ is None else environ
    return environ.get("TORCH_EXTENSIONS_DIR") or default_extensions_dir()


def learner_env(
    num_cpus_per_rank: float, use_gpu: bool, threads_per_rank: int = 0, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The learner ranks' runtime_env env_vars: OpenMP threads, DeepSpeed's CPU accelerator off GPU, and the
    job's extensions build directory (`extensions_dir`), the one `check_build_locks` checks."""
    env = {
        "OMP_NUM_THREADS": str(threads_per_rank or max(1, int(num_cpus_per_rank))),
        "TORCH_EXTENSIONS_DIR": extensions_dir(environ),
    }
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def _builders(folder: Path) -> tuple[int, ...]:
    """Pids of this node's processes (of this user: others' cwd cannot be read) whose cwd is `folder`."""
    proc = Path("/proc")
    if not proc.is_dir():
        return ()
    target = os.path.realpath(folder)
    pids = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.path.realpath(entry / "cwd") == target:
                    pids.append(int(entry.name))
    return tuple(sorted(pids))


def find_locks(root: str | os.PathLike, now: float | None = None) -> list[BuildLock]:
    """Every `<root>/<op>/lock` (torch's FileBaton of a JIT build), with its age and live builders."""
    now = time.time() if now is None else now
    locks = []
    for path in sorted(Path(root).glob("*/lock")):
        with contextlib.suppress(FileNotFoundError):  # released while we looked
            age = max(0.0, now - path.stat().st_mtime)
            locks.append(BuildLock(path, age, _builders(path.parent)))
    return locks


def _refusal(stale: list[BuildLock], root: str, stale_after_s: float) -> StaleBuildLock:
    lines = [
        f"refused: a stale torch extension build lock under {root} (TORCH_EXTENSIONS_DIR): every learner rank "
        f"would wait on it forever in DeepSpeed's op build (torch's FileBaton has no timeout).",
    ]
    for lock in stale:
        lines.append(f"  {lock.describe()}: older than {stale_after_s:.0f} s; a build takes 1-3 minutes")
    lines.append(
        "A build was killed before it could remove its lock. If no build is running (no ninja / c++ in that "
        "folder on any node of the job), remove it and start again:"
    )
    lines += [f"  rm {lock.path}" for lock in stale]
    return StaleBuildLock("\n".join(lines))


def check_build_locks(
    root: str | os.PathLike | None = None,
    *,
    stale_after_s: float = STALE_AFTER_S,
    poll_s: float = 1.0,
    log: Callable[[str], None] | None = None,
) -> None:
    """Return when `root` (default: `extensions_dir()`) holds no build lock; raise StaleBuildLock for a stale
    one (older than `stale_after_s`, no process on this node building in its folder). A lock in progress
    is reported through `log` (default: stderr) and waited for, at most `stale_after_s` seconds in all."""
    root = str(root if root is not None else extensions_dir())
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    waited_since = time.monotonic()
    warned: set[Path] = set()
    while True:
        locks = find_locks(root)
        if not locks:
            return
        waited = time.monotonic() - waited_since
        stale = [
            lock for lock in locks if not lock.builders and (lock.age_s >= stale_after_s or waited >= stale_after_s)
        ]
        if stale or waited >= stale_after_s:
            raise _refusal(stale or locks, root, stale_after_s)
        for lock in locks:
            if lock.path not in warned:
                warned.add(lock.path)
                log(
                    f"learner: a DeepSpeed op build is in progress: lock {lock.describe()}; waiting for it "
                    f"(refused once it is {stale_after_s:.0f} s old with no build process, or after "
                    f"{stale_after_s:.0f} s of waiting)"
                )
        time.sleep(poll_s)


@contextlib.contextmanager
def watch_setup(
    root: str | os.PathLike, after_s: float = WATCH_AFTER_S, log: Callable[[str], None] | None = None
) -> Iterator[None]:
    """While the block runs, every `after_s` seconds report that set-up is still running and name the build
    locks under `root` (what a rank blocked in torch's FileBaton is waiting on) with their ages and the fix."""
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    done = threading.Event()
    started = time.monotonic()

    def report() -> None:
        while not done.wait(after_s):
            locks = find_locks(root)
            elapsed = time.monotonic() - started
            if not locks:
                log(f"learner: set-up still running after {elapsed:.0f} s (no build lock under {root})")
                continue
            named = "; ".join(lock.describe() for lock in locks)
            fixes = " ".join(f"rm {lock.path};" for lock in locks)
            log(
                f"learner: set-up still running after {elapsed:.0f} s; build lock(s) the ranks may wait on: "
                f"{named}. A build takes 1-3 minutes: if none is running, stop the run and: {fixes}"
            )

    thread = threading.Thread(target=report, name="learner-setup-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=10.0)  # a report under way ends before the caller goes on
