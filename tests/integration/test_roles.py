"""The controller's roles (cppo_rl/controller/roles.py) on the real stack: a role that fails to start
releases the ones started before it; one that never comes up fails its start-up phase by name."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.integration


def test_a_learner_that_fails_in_set_up_releases_the_engines_and_the_placement_group(
    ray_local, tiny_model_dir, monkeypatch
):
    """The engines start, then the learner's set-up raises: Roles.start re-raises it after killing the
    engines and removing the placement group (the run's W&B run is closed by Trainer.run's `finally`)."""
    import ray
    from ray.util import placement_group_table

    import cppo_rl.learner.worker
    from cppo_rl.config import TrainConfig
    from cppo_rl.controller.roles import Roles
    from cppo_rl.remote import ACTOR_GONE

    class BrokenLearner:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("learner set-up failed (planted)")

    started = []
    close = Roles.close

    def recording_close(roles):
        started.append((roles.placed, list(roles.rollout.workers) if roles.rollout else []))
        close(roles)

    monkeypatch.setattr(cppo_rl.learner.worker, "LearnerGroup", BrokenLearner)
    monkeypatch.setattr(Roles, "close", recording_close)
    config = TrainConfig()
    config.cluster.cpus_per_engine = config.cluster.cpus_per_learner = 0.25
    with pytest.raises(RuntimeError, match="planted"):
        Roles.start(config, str(tiny_model_dir), None)

    ((placed, engines),) = started
    assert placed is not None and len(engines) == 1  # the engine had started before the learner failed
    assert placement_group_table(placed.group)["state"] == "REMOVED"
    with pytest.raises(ACTOR_GONE):
        ray.get(engines[0].ready.remote(), timeout=60)


def test_engines_that_never_come_up_fail_their_start_up_phase_by_name(ray_local):
    """A stand-in engine whose readiness never comes (as a model stuck loading): the `rollout engines` phase
    fails at its deadline with StartupTimeout naming it, and the actor is killed rather than left behind."""
    import ray

    from cppo_rl.controller.startup import Startup, StartupTimeout
    from cppo_rl.remote import ACTOR_GONE
    from cppo_rl.rollout.worker import RolloutGroup

    class StuckEngine:  # defined here: Ray ships it by value
        def ready(self) -> int:
            time.sleep(600)
            return 0

        def probe(self) -> str:
            return "alive"

    started = []

    def launcher(index: int):
        started.append(ray.remote(StuckEngine).options(num_cpus=0, max_concurrency=2).remote())
        return started[-1]

    lines = []
    clock = time.monotonic()
    phase = Startup(3.0, log=lines.append).phase("rollout engines", "1 vLLM engine to load the model", "read the logs")
    with (
        pytest.raises(StartupTimeout, match=r"start-up phase 'rollout engines' did not finish within 3 s"),
        phase as left,
    ):
        RolloutGroup.start(launcher, 1, left())
    assert time.monotonic() - clock < 30
    assert lines == ["start-up: rollout engines ..."]
    with pytest.raises(ACTOR_GONE):
        ray.get(started[0].probe.remote(), timeout=60)
