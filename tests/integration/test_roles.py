"""The controller's roles (cppo_rl/controller/roles.py) on the real stack: a role that fails to start
releases the ones started before it."""

from __future__ import annotations

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
