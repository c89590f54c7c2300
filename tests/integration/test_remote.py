"""`get_all` on real Ray actors: a death or a hang among actors that wait for each other never hangs the caller."""

from __future__ import annotations

import os
import time

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture
def peers(ray_local):
    """Two actors standing in for the ranks of a collective, alive and answering."""

    class Peer:  # defined here so that Ray ships the class by value (workers cannot import test modules)
        def wait(self, seconds: float) -> str:
            time.sleep(seconds)
            return "done"

        def die(self) -> None:
            os._exit(1)

        def fail(self) -> None:
            raise ValueError("a bug in the task, not a dead actor")

    actor = ray_local.remote(num_cpus=0)(Peer)
    handles = [actor.remote(), actor.remote()]
    assert ray_local.get([h.wait.remote(0) for h in handles], timeout=60) == ["done", "done"]
    yield handles
    for handle in handles:
        ray_local.kill(handle)


def test_a_dead_actor_fails_the_call_at_once(peers):
    from cppo_rl.remote import ActorFailure, get_all

    started = time.monotonic()
    with pytest.raises(ActorFailure, match="learner step: an actor died"):
        get_all([peers[0].wait.remote(600), peers[1].die.remote()], "learner step")
    assert time.monotonic() - started < 60  # not the 600 s the survivor would have waited


def test_a_hang_fails_after_the_timeout(peers):
    from cppo_rl.remote import ActorFailure, get_all

    with pytest.raises(ActorFailure, match=r"weight sync: 1 of 2 calls unfinished after 2 s"):
        get_all([peers[0].wait.remote(0), peers[1].wait.remote(600)], "weight sync", timeout_s=2)


def test_a_task_error_is_raised_as_it_is_and_results_come_in_order(peers, ray_local):
    from cppo_rl.remote import get_all

    with pytest.raises(ray_local.exceptions.RayTaskError, match="a bug in the task"):
        get_all([peers[0].fail.remote(), peers[1].wait.remote(0)], "call", grace_s=1)
    assert get_all([peers[0].wait.remote(0.5), peers[1].wait.remote(0)], "call") == ["done", "done"]
