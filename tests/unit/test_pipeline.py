"""The rollout pipeline's schedule (trainer.max_staleness) with in-process stand-ins for the roles: which
policy version generates each step's batch, the order of generate / train / sync calls (k = 0 is the
synchronous loop call for call), prompts and seeds independent of k, checkpointed batches, engines lost
while the learner trains ahead."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cppo_rl.algorithms import get_advantage
from cppo_rl.config import TrainConfig
from cppo_rl.controller.pipeline import LockstepPipeline, generating_version
from cppo_rl.controller.trainer import PipelineTotals, Trainer
from cppo_rl.data_plane import ChunkRef, RolloutChunk, RolloutRefs, SavedRollouts
from cppo_rl.rewards.base import RewardOutcome
from cppo_rl.rollout.sampling import SamplingConfig

SAMPLES = 2


class FakePending:
    def __init__(self, prompt_ids, sampling, version):
        self.prompt_ids, self.sampling, self.version = prompt_ids, sampling, version
        self.chunks = [(0, len(prompt_ids))]
        self.submitted_at = time.monotonic()


class FakeRewards:
    def submit(self, texts, golds):
        pairs = zip(texts, golds, strict=True)
        outcomes = [RewardOutcome(float(text.endswith(gold)), "correct") for text, gold in pairs]
        return SimpleNamespace(result=lambda: outcomes)


class FakeLearner:
    def __init__(self, log):
        self.log = log

    def start_training(self, refs):
        self.log.append(("train", refs.response_texts[0].split("|")[0], refs.policy_version))
        return refs

    def training_result(self, refs):
        self.log.append(("trained",))
        return {"loss": 0.0, "masked_frac": 0.1, "busy_s": 0.0}


class FakeRoles:
    """Engines that answer prompt p with text "p|seed|version|answer" (right for even p); a call log."""

    def __init__(self, lose_engines_at: int | None = None):
        self.version, self.log, self.rewards = 0, [], FakeRewards()
        self.learner, self.engine_restarts = FakeLearner(self.log), 0
        self.lose_engines_at = lose_engines_at  # the submit count whose collect loses every engine

    def submit(self, prompt_ids, sampling):
        self.log.append(("submit", prompt_ids[0][0], sampling.seed, self.version))
        return FakePending(prompt_ids, sampling, self.version)

    def collect(self, pending, same_weights=True, on_chunk=None):
        submits = sum(entry[0] == "submit" for entry in self.log)
        self.log.append(("collect", pending.prompt_ids[0][0], same_weights))
        if submits == self.lose_engines_at and not same_weights:
            self.lose_engines_at = None
            return None
        answers = [str(p[0] % 3) if p[0] % 2 == 0 else "x" for p in pending.prompt_ids]  # even prompts right
        tag = f"{pending.sampling.seed}|{pending.version}"
        texts = [f"{p[0]}|{tag}|{a}" for p, a in zip(pending.prompt_ids, answers, strict=True)]
        texts = [t for t in texts for _ in range(SAMPLES)]
        chunk = RolloutChunk(
            response_texts=texts,
            finish_reason=["stop"] * len(texts),
            response_lengths=torch.full((len(texts),), 4),
            group_index=torch.arange(len(pending.prompt_ids)).repeat_interleave(SAMPLES),
            policy_version=pending.version,
            num_prompts=len(pending.prompt_ids),
            prompt_lengths=torch.ones(len(texts), dtype=torch.int64),
        )
        if on_chunk is not None:
            on_chunk(0, chunk)
        return RolloutRefs([ChunkRef(chunk, None)])

    def sync(self, version):
        self.log.append(("sync", version))
        self.version = version
        return SimpleNamespace(bytes_per_second=1.0)


class FakeLoader:
    """Batch b (1-based) holds prompts [[10 * b], [10 * b + 1]]."""

    def __init__(self):
        self.batches = 0

    def next_batch(self):
        self.batches += 1
        return [SimpleNamespace(answer=str((10 * self.batches + i) % 3), first=10 * self.batches + i) for i in range(2)]


def _pipeline(roles, k, total, loader=None):
    sampling = SamplingConfig(n=SAMPLES, seed=7)
    encode = lambda examples: [[e.first] for e in examples]  # noqa: E731
    return LockstepPipeline(roles, loader or FakeLoader(), encode, sampling, get_advantage("grpo"), False, k, total)


def _trainer(roles, k, total):
    config = TrainConfig()
    config.trainer.max_staleness, config.trainer.total_steps = k, total
    trainer = Trainer(config, run_dir=None)
    trainer.roles = roles
    return trainer


def _run(k: int, total: int, roles=None):
    roles = roles or FakeRoles()
    trainer, pipeline = _trainer(roles, k, total), _pipeline(roles, k, total)
    pipeline.fill(1)
    metrics = [trainer._step(step, pipeline) for step in range(1, total + 1)]
    return roles, metrics


@settings(max_examples=30, deadline=None)
@given(k=st.integers(0, 4), total=st.integers(1, 8))
def test_lockstep_trains_step_n_on_the_batch_version_n_minus_1_minus_k_generated(k, total):
    roles, metrics = _run(k, total)
    trained = [entry for entry in roles.log if entry[0] == "train"]
    assert [int(prompt) // 10 for _, prompt, _ in trained] == list(range(1, total + 1))  # batch n at step n
    assert [version for *_, version in trained] == [generating_version(n, k) for n in range(1, total + 1)]
    for step, m in enumerate(metrics, start=1):
        assert m["pipeline/staleness_max"] == step - 1 - generating_version(step, k) <= k
    # every batch generated once, with its own prompts and seed whatever k is
    submits = [entry for entry in roles.log if entry[0] == "submit"]
    assert [(p, seed) for _, p, seed, _ in submits] == [(10 * n, 7 + n * 100_003) for n in range(1, total + 1)]
    assert [entry for entry in roles.log if entry[0] == "sync"] == [("sync", n) for n in range(1, total + 1)]


def test_zero_staleness_is_the_synchronous_loop_call_for_call():
    roles, _ = _run(0, 3)
    expected = []
    for n in (1, 2, 3):
        expected += [
            ("submit", 10 * n, 7 + n * 100_003, n - 1),
            ("collect", 10 * n, True),
            ("train", str(10 * n), n - 1),
            ("trained",),
            ("sync", n),
        ]
    assert roles.log == expected


def test_one_step_ahead_generates_the_next_batch_while_the_learner_trains():
    roles, metrics = _run(1, 3)
    assert roles.log == [
        ("submit", 10, 100_010, 0),  # fill: batch 1, version 0
        ("collect", 10, True),
        ("submit", 20, 200_013, 0),  # step 1: batch 2 starts ...
        ("train", "10", 0),  # ... the learner trains batch 1 ...
        ("collect", 20, False),  # ... batch 2 is collected while it trains
        ("trained",),
        ("sync", 1),
        ("submit", 30, 300_016, 1),
        ("train", "20", 0),
        ("collect", 30, False),
        ("trained",),
        ("sync", 2),
        ("train", "30", 1),  # the last step: nothing left to generate ahead
        ("trained",),
        ("sync", 3),
    ]
    assert [m["pipeline/staleness_mean"] for m in metrics] == [0.0, 1.0, 1.0]
    assert metrics[-1]["pipeline/ahead_generate_s"] == 0.0


def test_rewards_and_advantages_follow_each_batch():
    _, metrics = _run(2, 4)
    for m in metrics:
        assert m["train/reward"] == pytest.approx(0.5)  # one prompt of two right: the golds follow the rows
        assert m["train/advantage_abs_mean"] == pytest.approx(0.0)  # both samples of a prompt agree


def test_saved_batches_restore_to_the_same_schedule():
    """A checkpoint after step 2 of a k = 2 run carries batches 3 and 4; a pipeline restored from it (with the
    loader's position) continues exactly as the uninterrupted one."""
    full_roles, _ = _run(2, 5)
    roles = FakeRoles()
    trainer, loader = _trainer(roles, 2, 5), FakeLoader()
    pipeline = _pipeline(roles, 2, 5, loader)
    pipeline.fill(1)
    for step in (1, 2):
        trainer._step(step, pipeline)
    saved = pipeline.saved()
    assert [item["step"] for item in saved.items] == [3, 4]
    assert [item["version"] for item in saved.items] == [0, 1]
    assert all(len(item["outcomes"]) == 2 * SAMPLES for item in saved.items)

    resumed_roles = FakeRoles()
    resumed_roles.version = 2  # the checkpoint's weights, synced at restore
    resumed_loader = FakeLoader()
    resumed_loader.batches = loader.batches  # the loader's saved position (batch 4 was the last taken)
    resumed = _pipeline(resumed_roles, 2, 5, resumed_loader)
    restored = SavedRollouts([{**item, "tensors": [None]} for item in saved.items])
    resumed.restore(restored, put=lambda tensors: tensors)
    resumed.fill(3)
    resumed_trainer = _trainer(resumed_roles, 2, 5)
    for step in (3, 4, 5):
        resumed_trainer._step(step, resumed)
    tail = [e for e in full_roles.log if e[0] in ("train", "submit")][-4:]  # submit 5, train 3, 4, 5
    assert [e for e in resumed_roles.log if e[0] in ("train", "submit")] == tail


def test_a_batch_whose_engines_are_all_lost_while_training_is_generated_after_the_sync():
    """The only engine dies while the learner trains ahead of it: the batch is generated again after the
    sync, with the new weights, and recorded with their version (its staleness is one less)."""
    roles, metrics = _run(1, 3, FakeRoles(lose_engines_at=2))  # the 2nd submit: batch 2, during step 1
    assert roles.log[2:9] == [
        ("submit", 20, 200_013, 0),
        ("train", "10", 0),
        ("collect", 20, False),  # lost
        ("trained",),
        ("sync", 1),
        ("submit", 20, 200_013, 1),  # the same prompts and seed, version 1
        ("collect", 20, True),
    ]
    assert [m["pipeline/generated_by_version"] for m in metrics] == [0.0, 1.0, 1.0]


def test_totals_report_staleness_and_idle_fractions():
    totals = PipelineTotals()
    base = {"pipeline/queue_s": 0.0, "pipeline/in_flight_s": 1.0, "actor/masked_frac": 0.2, "policy_version": 1}
    totals.add({**base, "time/step_s": 4.0, "pipeline/staleness_mean": 0.0, "pipeline/staleness_max": 0.0,
                "pipeline/rollout_busy_s": 1.0, "pipeline/learner_busy_s": 3.0})  # fmt: skip
    totals.add({**base, "time/step_s": 4.0, "pipeline/staleness_mean": 2.0, "pipeline/staleness_max": 2.0,
                "pipeline/rollout_busy_s": 3.0, "pipeline/learner_busy_s": 4.0})  # fmt: skip
    summary = totals.summary()
    assert summary["staleness"] == {"mean": 1.0, "max": 2.0}
    assert summary["idle_fraction"] == {"rollout": 0.5, "learner": 0.125}
    assert summary["mean_step_seconds"] == {"step": 4.0}
    assert totals.rows == [[1, 0.0, 0.2], [1, 2.0, 0.2]]
