"""The reward pool with real spawned workers: order, hostile outputs, crashes, hangs, memory limit, shutdown."""

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from cppo_rl.rewards import REASONS, RewardHandle, RewardOutcome, RewardPool, grade

pytestmark = pytest.mark.integration

TIMEOUT_S = 3.0
RESTART_SLACK_S = 6.0  # a queued sample may wait for a replacement worker (spawn + imports) on a busy machine
MEMORY_LIMIT_MB = 1024


def hostile_grader(response: str, gold: str) -> RewardOutcome:
    """math-verify, except for three test commands that misbehave inside the worker process."""
    if response == "<kill me>":
        os.kill(os.getpid(), signal.SIGKILL)
    if response == "<hang>":
        time.sleep(3600)
    if response == "<allocate 2 GiB>":
        bytearray(2 * 2**30)  # fine without a limit (calloc'd, never touched); MemoryError under 1 GiB
    return grade(response, gold)


@pytest.fixture(scope="module")
def pool():
    with RewardPool(num_workers=2, timeout_s=TIMEOUT_S, memory_limit_mb=MEMORY_LIMIT_MB, grader=hostile_grader) as p:
        yield p


def _wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _exited(pid: int) -> bool:
    """True once `pid` has exited, reaped or not (a zombie still answers os.kill(pid, 0))."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _assert_healthy(pool: RewardPool) -> None:
    _wait_for(lambda: len(pool.worker_pids) == pool.num_workers)
    outcomes = pool.score(["so \\boxed{\\frac{1}{2}}", "the answer is 7", "\\boxed{3}"] * 2, ["0.5", "7", "4"] * 2)
    assert [o.reason for o in outcomes] == ["correct", "correct", "wrong"] * 2


def test_submit_returns_a_handle_and_keeps_input_order(pool):
    responses = [f"Step 1 ... so the answer is $\\boxed{{{i}}}$." for i in range(24)]
    golds = [str(i if i % 3 else i + 1) for i in range(24)]  # every third response is wrong
    handle = pool.submit(responses, golds)
    assert isinstance(handle, RewardHandle)
    rewards = [o.reward for o in handle.result(timeout=60)]
    assert rewards == [0.0 if i % 3 == 0 else 1.0 for i in range(24)]
    assert pool.score([], []) == []


HOSTILE = [
    ("1 MB response", "Let me think. " * 75_000 + "The answer is $\\boxed{42}$.", "42", {"correct", "timeout"}),
    ("deeply nested braces", "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}", "1", {"timeout", "no_answer"}),
    ("power tower", "\\boxed{9^{9^{9^{9}}}}", "1", {"timeout", "error", "wrong"}),
    ("invalid UTF-8 bytes", b"\xff\xfe\xfd The answer is \\boxed{42} \x80\x81", "42", {"correct"}),
    ("lone surrogates", "\ud800 The answer is \\boxed{42} \udfff", "42", {"correct"}),
    ("empty response", "", "42", {"no_answer"}),
]


@pytest.mark.parametrize(("case", "response", "gold", "reasons"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_output_is_scored_within_the_timeout(pool, case, response, gold, reasons):
    start = time.monotonic()
    [outcome] = pool.score([response], [gold])
    assert time.monotonic() - start < TIMEOUT_S + RESTART_SLACK_S, case
    assert outcome.reason in reasons, case
    assert outcome.reward == (1.0 if outcome.reason == "correct" else 0.0)


def test_pool_is_healthy_after_hostile_outputs(pool):
    _assert_healthy(pool)


def test_killed_worker_is_scored_crashed_counted_and_replaced(pool):
    _wait_for(lambda: len(pool.worker_pids) == pool.num_workers)
    before, pids_before = pool.stats, set(pool.worker_pids)
    outcomes = pool.score(["<kill me>", "\\boxed{5}"], ["5", "5"])
    assert outcomes == [RewardOutcome(0.0, "crashed"), RewardOutcome(1.0, "correct")]
    _wait_for(lambda: pool.stats.restarts == before.restarts + 1)
    after = pool.stats
    assert after.crashes == before.crashes + 1
    assert after.by_reason["crashed"] == before.by_reason.get("crashed", 0) + 1
    assert len(pids_before - set(pool.worker_pids)) == 1
    assert not any(_alive(pid) for pid in pids_before - set(pool.worker_pids))
    _assert_healthy(pool)


def test_hung_worker_hits_the_deadline_and_is_replaced(pool):
    before = pool.stats
    start = time.monotonic()
    [outcome] = pool.score(["<hang>"], ["1"])
    elapsed = time.monotonic() - start
    assert outcome == RewardOutcome(0.0, "timeout")
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 2.0
    _wait_for(lambda: pool.stats.restarts == before.restarts + 1)
    assert pool.stats.timeouts == before.timeouts + 1
    _assert_healthy(pool)


def test_a_worker_killed_while_idle_is_replaced(pool):
    _wait_for(lambda: len(pool.worker_pids) == pool.num_workers)
    victim = pool.worker_pids[0]
    os.kill(victim, signal.SIGKILL)  # as the OOM killer would, between samples
    _wait_for(lambda: _exited(victim))
    _assert_healthy(pool)  # no sample is lost to the dead worker
    assert victim not in pool.worker_pids and not _alive(victim)


def test_workers_killed_mid_batch_cost_only_their_own_samples(pool):
    _wait_for(lambda: len(pool.worker_pids) == pool.num_workers)
    handle = pool.submit(["\\boxed{1}"] * 2000, ["1"] * 2000)
    kills = 0
    for _ in range(2):  # from outside, at any point of a worker's loop (grading, receiving, sending)
        time.sleep(0.3)
        if not handle.done() and pool.worker_pids:
            with contextlib.suppress(ProcessLookupError):  # reaped since it was listed
                os.kill(pool.worker_pids[-1], signal.SIGKILL)
            kills += 1
    reasons = [o.reason for o in handle.result(timeout=60)]
    assert set(reasons) <= {"correct", "crashed"}
    assert reasons.count("crashed") <= kills
    _assert_healthy(pool)


def test_memory_limit_is_enforced_in_the_worker(pool):
    [outcome] = pool.score(["<allocate 2 GiB>"], ["1"])
    assert outcome == RewardOutcome(0.0, "error")  # MemoryError from RLIMIT_AS, caught in the worker
    _assert_healthy(pool)


def test_stats_add_up(pool):
    stats = pool.stats
    assert stats.scored == sum(stats.by_reason.values())
    assert set(stats.by_reason) <= set(REASONS)


@pytest.mark.parametrize(
    ("responses", "golds", "error", "names"),
    [
        (["a", "b"], ["1"], ValueError, "`responses` has 2 items but `golds` has 1"),
        (["a", "b"], ["1", 2], TypeError, r"`golds\[1\]`"),
        ([3], ["1"], TypeError, r"`responses\[0\]`"),
        ("\\boxed{1}", ["1"], TypeError, "`responses` must be a list"),
    ],
)
def test_bad_batches_name_the_argument(pool, responses, golds, error, names):
    with pytest.raises(error, match=names):
        pool.submit(responses, golds)


def test_close_leaves_no_child_processes():
    pool = RewardPool(num_workers=2, timeout_s=10.0)  # the default math-verify grader
    pids = pool.worker_pids
    assert len(pids) == 2 and all(_alive(pid) for pid in pids)
    handle = pool.submit(["\\boxed{1}"] * 8, ["1"] * 8)
    pool.close()  # finishes the submitted batch first
    assert [o.reason for o in handle.result(timeout=0)] == ["correct"] * 8
    assert not any(_alive(pid) for pid in pids)
    assert pool.worker_pids == []
    pool.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(["x"], ["1"])


def test_a_grader_that_cannot_load_fails_at_construction():
    with pytest.raises(RuntimeError, match="failed to start: ModuleNotFoundError"):
        RewardPool(num_workers=1, grader="cppo_rl.no_such_module:grade")
