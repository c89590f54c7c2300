"""A process pool that scores responses beside generation, with a hard deadline per sample.

Each worker is a long-lived spawned process with its own Pipe, an address-space limit
(RLIMIT_AS) and SIGINT ignored; one supervisor thread in the parent owns each worker. A supervisor
takes the next sample from the shared queue, sends it, and waits at most `timeout_s` for the outcome.
On the deadline it SIGKILLs the worker (the sample scores 0, reason "timeout"); if the worker dies
it scores 0, reason "crashed"; either way a fresh worker replaces it. A sample's deadline starts when
a ready worker receives it, so queueing and worker start-up never count against it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import pickle
import queue
import resource
import signal
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from cppo_rl.rewards.base import Grader, RewardOutcome, as_text, check_gold

logger = logging.getLogger(__name__)

# The defaults of a pool, and of a run's `reward` config section (cppo_rl.config.RewardConfig takes them)
DEFAULT_GRADER = "cppo_rl.rewards.math_grader:grade_boxed"  # math-verify on the last \boxed{} answer
DEFAULT_NUM_WORKERS = 1
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_LIMIT_MB = 2048
_READY = "ready"


@dataclass(frozen=True)
class RewardStats:
    """Counts since the pool started.

    scored:    samples given an outcome (every reason)
    timeouts:  samples whose worker was killed at the hard deadline
    crashes:   samples whose worker died while grading them
    restarts:  worker processes replaced
    by_reason: outcomes per reason; "timeout" also counts math-verify's own timeouts inside a worker
    """

    scored: int = 0
    timeouts: int = 0
    crashes: int = 0
    restarts: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


class RewardHandle:
    """The outcomes of one `RewardPool.submit` call, filled in by the pool's supervisor threads."""

    def __init__(self, size: int) -> None:
        self._outcomes: list[RewardOutcome | None] = [None] * size
        self._remaining = size
        self._lock = threading.Lock()
        self._done = threading.Event()
        if size == 0:
            self._done.set()

    def done(self) -> bool:
        """True once every sample has an outcome."""
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> list[RewardOutcome]:
        """Block until every sample is scored (at most `timeout` seconds); outcomes in input order."""
        if not self._done.wait(timeout):
            raise TimeoutError(
                f"RewardHandle.result: {self._remaining} of {len(self._outcomes)} samples still being scored "
                f"after {timeout} s; call result() again, or with a larger `timeout`"
            )
        return list(self._outcomes)  # type: ignore[arg-type]  # all filled once done

    def _set(self, index: int, outcome: RewardOutcome) -> None:
        with self._lock:
            self._outcomes[index] = outcome
            self._remaining -= 1
            if self._remaining == 0:
                self._done.set()


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection

    def kill(self) -> None:
        """SIGKILL the process (it may be stuck in native code) and reap it."""
        self.process.kill()
        self.process.join(5.0)
        self.conn.close()

    def stop(self) -> None:
        """Ask the process to exit; kill it if it does not within 5 s."""
        with contextlib.suppress(OSError):  # already dead
            self.conn.send(None)
        self.process.join(5.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5.0)
        self.conn.close()


class RewardPool:
    """Scores (response, gold) pairs in `num_workers` spawned processes with a hard per-sample deadline.

    `timeout_s` (seconds) bounds each sample; `memory_limit_mb` (MiB, None = no limit) caps each
    worker's address space; `grader` is a module-level function or a "module:function" path, called
    as `grader(response_text, gold) -> RewardOutcome` (default: math-verify's `grade`, whose own 5 s
    per-step timeout ends most slow samples without a restart). Workers are started and checked in
    the constructor; `start_timeout_s` bounds a start (spawn + imports). Use as a context manager, or
    call `close()`.
    """

    def __init__(
        self,
        num_workers: int = DEFAULT_NUM_WORKERS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        memory_limit_mb: int | None = DEFAULT_MEMORY_LIMIT_MB,
        grader: Grader | str = DEFAULT_GRADER,
        start_timeout_s: float = 60.0,
    ) -> None:
        caller = "RewardPool"
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
            raise ValueError(f"{caller}: `num_workers` must be an int >= 1, got {num_workers!r}")
        for name, value in (("timeout_s", timeout_s), ("start_timeout_s", start_timeout_s)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
                raise ValueError(f"{caller}: `{name}` must be a finite number of seconds > 0, got {value!r}")
        if memory_limit_mb is not None and (
            not isinstance(memory_limit_mb, int) or isinstance(memory_limit_mb, bool) or memory_limit_mb < 256
        ):
            raise ValueError(
                f"{caller}: `memory_limit_mb` must be an int >= 256 (MiB; a worker needs ~100 MiB to import "
                f"math-verify) or None for no limit, got {memory_limit_mb!r}"
            )
        _check_grader(grader, caller)
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.memory_limit_mb = memory_limit_mb
        self.grader = grader
        self.start_timeout_s = float(start_timeout_s)
        self._context = multiprocessing.get_context("spawn")
        self._tasks: queue.SimpleQueue[tuple[RewardHandle, int, str, str] | None] = queue.SimpleQueue()
        self._by_reason: Counter[str] = Counter()
        self._events: Counter[str] = Counter()  # "timeouts", "crashes", "restarts"
        self._stats_lock = threading.Lock()
        self._submit_lock = threading.Lock()  # no sample is queued behind the stop sentinels
        self._closed = False
        self._workers: list[_Worker | None] = [self._spawn() for _ in range(num_workers)]
        try:
            for worker in self._workers:
                self._await_ready(worker)  # type: ignore[arg-type]  # all spawned just above
        except RuntimeError:
            for worker in self._workers:
                worker.kill()  # type: ignore[union-attr]
            raise
        self._threads = [
            threading.Thread(target=self._supervise, args=(slot,), name=f"reward-supervisor-{slot}", daemon=True)
            for slot in range(num_workers)
        ]
        for thread in self._threads:
            thread.start()

    # -- public API ---------------------------------------------------------------------------------

    def submit(self, responses: Sequence[str | bytes], golds: Sequence[str]) -> RewardHandle:
        """Queue a batch for scoring and return at once; `handle.result()` gives outcomes in input order.

        Responses may be str or bytes (invalid UTF-8 and lone surrogates become U+FFFD).
        """
        caller = "RewardPool.submit"
        for name, values in (("responses", responses), ("golds", golds)):
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                raise TypeError(
                    f"{caller}: `{name}` must be a list, got {type(values).__name__}; wrap one item in [...]"
                )
        if len(responses) != len(golds):
            raise ValueError(
                f"{caller}: `responses` has {len(responses)} items but `golds` has {len(golds)}; "
                f"pass one gold answer per response (repeat a prompt's gold for each of its samples)"
            )
        texts = [as_text(response, f"responses[{i}]", caller) for i, response in enumerate(responses)]
        for i, gold in enumerate(golds):
            check_gold(gold, f"golds[{i}]", caller)
        handle = RewardHandle(len(texts))
        with self._submit_lock:
            if self._closed:
                raise RuntimeError(f"{caller}: the pool is closed; create a new RewardPool")
            for index, (text, gold) in enumerate(zip(texts, golds, strict=True)):
                self._tasks.put((handle, index, text, gold))
        return handle

    def score(self, responses: Sequence[str | bytes], golds: Sequence[str]) -> list[RewardOutcome]:
        """`submit(responses, golds).result()`: block until the batch is scored."""
        return self.submit(responses, golds).result()

    @property
    def stats(self) -> RewardStats:
        """A snapshot of the counts (see `RewardStats`)."""
        with self._stats_lock:
            by_reason, events = dict(self._by_reason), dict(self._events)
        return RewardStats(scored=sum(by_reason.values()), by_reason=by_reason, **events)

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for monitoring)."""
        return [w.process.pid for w in self._workers if w is not None and w.process.pid is not None]

    def close(self) -> None:
        """Finish the samples already submitted (each bounded by `timeout_s`), then stop every worker.

        Leaves no child process behind; idempotent.
        """
        with self._submit_lock:
            if self._closed:
                return
            self._closed = True
            for _ in self._threads:
                self._tasks.put(None)
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- workers ------------------------------------------------------------------------------------

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._context.Pipe()
        process = self._context.Process(
            target=_worker_main, args=(child_conn, self.grader, self.memory_limit_mb), name="reward-worker", daemon=True
        )
        process.start()
        child_conn.close()
        return _Worker(process, parent_conn)

    def _await_ready(self, worker: _Worker) -> None:
        """Wait for the worker's start-up handshake; raise RuntimeError (worker killed) if it fails."""
        problem = f"did not become ready within start_timeout_s={self.start_timeout_s} s"
        try:
            if worker.conn.poll(self.start_timeout_s):
                message = worker.conn.recv()
                if message == _READY:
                    return
                problem = f"failed to start: {message}"
        except (EOFError, OSError):
            worker.process.join(5.0)
            problem = f"exited during start-up with code {worker.process.exitcode}"
        worker.kill()
        raise RuntimeError(f"RewardPool: a reward worker {problem} (grader={self.grader!r})")

    def _supervise(self, slot: int) -> None:
        """Supervisor thread of one worker: score queued samples until the stop sentinel."""
        while (task := self._tasks.get()) is not None:
            handle, index, text, gold = task
            outcome = self._grade_on_worker(slot, text, gold)
            with self._stats_lock:
                self._by_reason[outcome.reason] += 1
            handle._set(index, outcome)
            if self._workers[slot] is None:
                self._replace(slot)
        worker = self._workers[slot]
        if worker is not None:
            worker.stop()
            self._workers[slot] = None

    def _grade_on_worker(self, slot: int, text: str, gold: str) -> RewardOutcome:
        """One sample on this slot's worker; a timed-out or dead worker is killed and its slot emptied."""
        worker = self._workers[slot]
        if worker is None or not worker.process.is_alive():
            worker = self._replace(slot)
            if worker is None:
                return RewardOutcome(0.0, "crashed")
        try:
            worker.conn.send((text, gold))
            if worker.conn.poll(self.timeout_s):
                return worker.conn.recv()
            reason, event = "timeout", "timeouts"
        except (EOFError, OSError):
            reason, event = "crashed", "crashes"
        worker.kill()
        self._workers[slot] = None
        logger.warning(
            "reward worker pid %s %s on a sample (exit code %s); scored 0 and replacing it",
            worker.process.pid,
            f"passed the {self.timeout_s} s deadline" if reason == "timeout" else "died",
            worker.process.exitcode,
        )
        with self._stats_lock:
            self._events[event] += 1
        return RewardOutcome(0.0, reason)

    def _replace(self, slot: int) -> _Worker | None:
        """Start a worker in `slot`; None (logged) if it cannot start, so the next sample retries."""
        old = self._workers[slot]
        if old is not None:
            old.kill()
        self._workers[slot] = None
        try:
            worker = self._spawn()
            self._await_ready(worker)
        except (RuntimeError, OSError):
            logger.exception("RewardPool: could not replace a reward worker; its samples score 0 (crashed)")
            return None
        self._workers[slot] = worker
        with self._stats_lock:
            self._events["restarts"] += 1
        return worker


def _check_grader(grader: object, caller: str) -> None:
    """Raise TypeError unless `grader` is a "module:function" path or a picklable module-level callable."""
    if isinstance(grader, str):
        module, _, name = grader.partition(":")
        if not module or not name:
            raise TypeError(f"{caller}: `grader` path must look like 'package.module:function', got {grader!r}")
        return
    if not callable(grader):
        raise TypeError(f"{caller}: `grader` must be a callable or a 'module:function' path, got {grader!r}")
    try:
        pickle.dumps(grader)
    except Exception as exc:
        raise TypeError(
            f"{caller}: `grader` must be picklable to reach the worker processes ({exc}); define it at module "
            f"level (no lambda or closure) or pass its 'module:function' path"
        ) from exc


def _worker_main(conn: Connection, grader: Grader | str, memory_limit_mb: int | None) -> None:
    """Worker process: set limits, load the grader, say ready, then grade (text, gold) until None or EOF."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
        if memory_limit_mb is not None:
            limit = memory_limit_mb * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        if isinstance(grader, str):
            module, _, name = grader.partition(":")
            grader = getattr(importlib.import_module(module), name)
    except Exception as exc:
        conn.send(f"{type(exc).__name__}: {exc}")
        return
    conn.send(_READY)
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return  # the parent is gone
        if task is None:
            return
        try:
            outcome = grader(*task)
            if not isinstance(outcome, RewardOutcome):
                raise TypeError(f"grader returned {type(outcome).__name__}, not RewardOutcome")
        except Exception:
            outcome = RewardOutcome(0.0, "error")
        conn.send(outcome)
