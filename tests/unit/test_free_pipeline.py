"""Free-running rollouts (trainer.rollout_mode=free) against a simulated cluster: engines whose calls take
drawn times on a virtual clock, a learner whose update takes a drawn time, engines that die. The properties
of cppo_rl/controller/free_pipeline.py: every step trains exactly prompts_per_step whole groups, no trained
sample is staler than k (stale_policy=wait), no prompt is trained twice or lost (across a checkpoint too),
an engine runs one chunk at a time, the weight sync finds the engines drained, and at k = 0 nothing is
generated while the learner trains."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cppo_rl.algorithms import get_advantage
from cppo_rl.config import ConfigError, TrainConfig, chunk_prompts, validate
from cppo_rl.controller.free_pipeline import FreePipeline
from cppo_rl.controller.roles import EngineCall, EngineLost
from cppo_rl.controller.trainer import Trainer
from cppo_rl.data_plane import ChunkRef, RolloutChunk, SavedRollouts
from cppo_rl.rewards.base import RewardOutcome
from cppo_rl.rollout.sampling import SamplingConfig

SAMPLES = 2


class Ref:
    """A simulated object ref: ready at virtual time `at`."""

    def __init__(self, at: float, value=None, lost: bool = False) -> None:
        self.at, self.value, self.lost = at, value, lost


class Rewards:
    def submit(self, texts, golds):
        outcomes = [RewardOutcome(float(t.split("|")[0] == g), "correct") for t, g in zip(texts, golds, strict=True)]
        return SimpleNamespace(result=lambda: outcomes)


class Learner:
    def __init__(self, sim) -> None:
        self.sim = sim

    def start_training(self, refs):
        prompts = sorted({int(t.split("|")[0]) for t in refs.response_texts})
        assert len(refs.response_texts) == len(prompts) * SAMPLES  # whole groups
        self.sim.trained.append((prompts, refs.row_versions.tolist()))
        self.sim.log.append("train")
        return [Ref(self.sim.clock + self.sim.train_s)]

    def training_result(self, calls):
        self.sim.log.append("trained")
        return {"loss": 0.0, "masked_frac": 0.0, "busy_s": self.sim.train_s}


class Loader:
    """Example i (from 1 on) has answer str(i); batches of `size`."""

    def __init__(self, size: int) -> None:
        self.size, self.drawn = size, 0

    def next_batch(self):
        first, self.drawn = self.drawn + 1, self.drawn + self.size
        return [SimpleNamespace(answer=str(i), id=i) for i in range(first, self.drawn + 1)]


class Sim:
    """The roles of a run on a virtual clock. Engine call j (counting from 1) takes durations[j % len] seconds and
    is lost when j is in `lose`."""

    def __init__(self, engines: int, durations: list[float], train_s: float, lose: frozenset = frozenset()) -> None:
        self.clock, self.version, self.engine_restarts = 0.0, 0, 0
        self.durations, self.train_s, self.lose = durations, train_s, lose
        self.rollout = SimpleNamespace(workers=[object() for _ in range(engines)])
        self.lost_engines: set[int] = set()
        self.rewards, self.learner = Rewards(), Learner(self)
        self.calls, self.trained, self.log = 0, [], []
        self.busy: dict[int, Ref] = {}  # engine -> its unanswered call
        self.pipeline = None

    def launch(self, engine, prompt_ids, sampling):
        assert engine not in self.busy, "an engine was given a second chunk before answering the first"
        self.calls += 1
        duration = self.durations[self.calls % len(self.durations)]
        texts = [f"{p[0]}|{self.version}" for p in prompt_ids for _ in range(SAMPLES)]
        chunk = RolloutChunk(
            response_texts=texts,
            finish_reason=["stop"] * len(texts),
            response_lengths=torch.full((len(texts),), 3),
            group_index=torch.arange(len(prompt_ids)).repeat_interleave(SAMPLES),
            policy_version=self.version,
            num_prompts=len(prompt_ids),
            prompt_lengths=torch.ones(len(texts), dtype=torch.int64),
        )
        ref = Ref(self.clock + duration, chunk, lost=self.calls in self.lose)
        self.busy[engine] = ref
        self.log.append(("launch", engine))
        return EngineCall(engine, self.rollout.workers[engine], ref, None)

    def wait(self, refs, num_returns=1, timeout_s=None):
        if not refs:
            return []
        target = sorted(r.at for r in refs)[min(num_returns, len(refs)) - 1]
        if timeout_s is not None:
            target = min(target, self.clock + timeout_s)
        self.clock = max(self.clock, target)
        return [r for r in refs if r.at <= self.clock]

    def receive(self, call):
        del self.busy[call.engine]
        if call.ready.lost:
            raise EngineLost(f"worker {call.engine} died")
        return ChunkRef(call.ready.value, None)

    def is_current(self, call):
        return self.rollout.workers[call.engine] is call.worker

    def sync(self, version):
        assert not self.pipeline.running, "the weights were synced while engines were generating"
        for engine in sorted(self.lost_engines):
            self.rollout.workers[engine] = object()
            self.busy.pop(engine, None)
            self.engine_restarts += 1
        self.lost_engines.clear()
        self.version = version
        self.log.append(("sync", version))
        return SimpleNamespace(bytes_per_second=1.0)


def _run(sim, *, prompts, chunk, k, steps, policy="wait", loader=None, first_step=1, restore=None, total=None):
    """Steps first_step..steps of a free-running run of `total` steps (default: steps) over `sim` with the real
    Trainer._step; the pipeline and the steps' metrics."""
    total = total or steps
    config = TrainConfig()
    config.trainer.max_staleness, config.trainer.total_steps = k, total
    trainer = Trainer(config, run_dir=None)
    trainer.roles = sim
    encode = lambda examples: [[e.id] for e in examples]  # noqa: E731
    sampling = SamplingConfig(n=SAMPLES, seed=3)
    pipeline = FreePipeline(
        sim, loader or Loader(prompts), encode, sampling, get_advantage("grpo"), False, k, total, prompts, chunk, policy
    )
    sim.pipeline = pipeline
    if restore is not None:
        pipeline.restore(restore, put=lambda tensors: tensors)
    pipeline.fill(first_step)
    metrics = [trainer._step(step, pipeline) for step in range(first_step, steps + 1)]
    return pipeline, metrics


def _trained_ids(sim) -> list[int]:
    return [p for prompts, _ in sim.trained for p in prompts]


@settings(max_examples=60, deadline=None)
@given(
    engines=st.integers(1, 3),
    prompts_and_chunk=st.sampled_from([(2, 1), (2, 2), (4, 1), (4, 2), (6, 3), (6, 2)]),
    k=st.integers(0, 3),
    steps=st.integers(1, 6),
    durations=st.lists(st.floats(0.1, 5.0), min_size=1, max_size=7),
    train_s=st.floats(0.1, 6.0),
    lose=st.frozensets(st.integers(1, 40), max_size=4),
)
def test_every_step_trains_whole_fresh_enough_batches_and_each_prompt_once(
    engines, prompts_and_chunk, k, steps, durations, train_s, lose
):
    prompts, chunk = prompts_and_chunk
    sim = Sim(engines, durations, train_s, lose)
    _, metrics = _run(sim, prompts=prompts, chunk=chunk, k=k, steps=steps)
    assert [len(p) for p, _ in sim.trained] == [prompts] * steps
    for step, (_, versions) in enumerate(sim.trained, start=1):
        assert all(0 <= step - 1 - v <= k for v in versions)
    trained = _trained_ids(sim)
    assert len(trained) == len(set(trained))  # none twice
    assert [m["pipeline/staleness_max"] <= k for m in metrics] == [True] * steps
    synced, version = [], 0  # a sync that keeps the version heals engines lost while the learner waited
    for entry in sim.log:
        if entry[0] == "sync" and entry[1] != version:
            synced.append(entry[1])
            version = entry[1]
    assert synced == list(range(1, steps + 1))


def test_at_zero_staleness_nothing_is_generated_while_the_learner_trains():
    sim = Sim(2, [1.0, 2.0, 0.5], train_s=3.0)
    _run(sim, prompts=4, chunk=1, k=0, steps=4)
    training = False
    for entry in sim.log:
        training = {"train": True, "trained": training}.get(entry, training)
        if entry[0] == "sync":
            training = False
        assert not (training and entry[0] == "launch")


def test_with_staleness_the_engines_generate_while_the_learner_trains():
    sim = Sim(2, [1.0], train_s=4.0)
    _, metrics = _run(sim, prompts=4, chunk=1, k=1, steps=5)
    between = sim.log[sim.log.index("train") : sim.log.index("trained")]
    assert ("launch", 0) in between and ("launch", 1) in between
    assert max(m["pipeline/staleness_max"] for m in metrics) == 1.0


def test_a_lost_chunk_runs_again_elsewhere_and_its_engine_is_replaced_at_the_sync():
    sim = Sim(2, [1.0], train_s=1.0, lose=frozenset({1}))  # the first call (engine 0) dies
    pipeline, _ = _run(sim, prompts=4, chunk=2, k=1, steps=3)
    assert sim.engine_restarts == 1
    assert pipeline.run_stats() == {"dropped_prompts": 0, "regenerated_prompts": 0, "restarted_chunks": 1}
    assert sorted(_trained_ids(sim)) == list(range(1, 13))


def _interrupted(k: int, steps: int):
    """The first `steps` steps of a 20-step free-running run at staleness k: its sim, saved rollouts, loader."""
    sim, loader = Sim(2, [1.0, 2.5, 0.7], train_s=2.0), Loader(4)
    first, _ = _run(sim, prompts=4, chunk=1, k=k, steps=steps, loader=loader, total=20)
    saved = first.saved()
    return sim, SavedRollouts([{**item, "tensors": [None]} for item in saved.items], saved.state), loader


def _resume(saved, loader, k: int, first_step: int, steps: int, policy: str = "wait"):
    sim = Sim(2, [0.9, 1.3], train_s=2.0)
    sim.version = first_step - 1  # the checkpoint's weights, synced at restore
    resumed_loader = Loader(4)
    resumed_loader.drawn = loader.drawn  # the loader's saved position: the drawn frontier
    pipeline, metrics = _run(sim, prompts=4, chunk=1, k=k, steps=steps, loader=resumed_loader, first_step=first_step,
                             restore=saved, policy=policy)  # fmt: skip
    return sim, pipeline, metrics


@pytest.mark.parametrize("policy", ["wait", "drop"])
def test_finished_chunks_past_the_bound_are_generated_again_or_dropped(policy):
    """Resuming a k = 2 run's checkpoint at k = 0: its finished chunks of old versions may not be trained. With
    wait their prompts are generated again (none lost), with drop they are dropped and counted."""
    _, saved, loader = _interrupted(k=2, steps=2)
    old = [item["chunks"][0] for item in saved.items if item["version"] < 2]
    stale = {int(text.split("|")[0]) for chunk in old for text in chunk.response_texts}
    assert stale  # the checkpoint carries chunks version 0 or 1 generated
    resumed, pipeline, metrics = _resume(saved, loader, k=0, first_step=3, steps=8, policy=policy)
    assert all(m["pipeline/staleness_max"] == 0 for m in metrics)
    trained = set(_trained_ids(resumed))
    stats = pipeline.run_stats()
    if policy == "wait":
        assert stale <= trained and stats["regenerated_prompts"] == len(stale) and stats["dropped_prompts"] == 0
    else:
        assert not stale & trained and stats["dropped_prompts"] == len(stale) == sum(
            m["pipeline/dropped_prompts"] for m in metrics
        )


@pytest.mark.parametrize("interrupt_after", [1, 2, 3])
def test_a_checkpoint_loses_no_prompt_and_trains_none_twice(interrupt_after):
    """Interrupt a k = 2 run with chunks finished, running and drawn: the resumed run (from saved() and the
    loader's position) trains every prompt the first one drew but had not trained, and nothing twice."""
    sim, saved, loader = _interrupted(k=2, steps=interrupt_after)
    assert saved.items and all(item["name"].startswith("chunk_") for item in saved.items)
    untrained = set(range(1, loader.drawn + 1)) - set(_trained_ids(sim))
    resumed, _, _ = _resume(saved, loader, k=2, first_step=interrupt_after + 1, steps=interrupt_after + 4)
    after = _trained_ids(resumed)
    assert untrained <= set(after)
    assert not set(after) & set(_trained_ids(sim))
    assert len(after) == len(set(after))


def test_chunk_prompts_default_and_validation():
    config = TrainConfig()
    config.trainer.prompts_per_step, config.rollout.num_engines = 6, 4
    assert chunk_prompts(config) == 1  # 6 / 4 -> 1
    config.rollout.num_engines = 2
    assert chunk_prompts(config) == 3
    config.trainer.chunk_prompts = 4
    with pytest.raises(ConfigError, match=re.escape("chunk_prompts=4 does not divide trainer.prompts_per_step=6")):
        validate(config)
    config.trainer.chunk_prompts, config.trainer.rollout_mode = 2, "async"
    with pytest.raises(ConfigError, match=re.escape("trainer.rollout_mode='async': use one of lockstep, free")):
        validate(config)


def test_a_checkpoint_with_rollouts_resumes_only_in_the_mode_that_wrote_them(tmp_path):
    """Refused before Ray: a lockstep batch and a free-running chunk are saved differently."""
    import json

    from cppo_rl.controller.trainer import check_rollout_mode
    from cppo_rl.learner.checkpoint import MARKER, ROLLOUTS_DIR

    checkpoint = tmp_path / "step_000002"
    (checkpoint / ROLLOUTS_DIR).mkdir(parents=True)
    marker = {"trainer": {"step": 2, "config": {"trainer": {"rollout_mode": "free"}}}}
    (checkpoint / MARKER).write_text(json.dumps(marker))
    check_rollout_mode(checkpoint, "lockstep")  # no rollouts saved: either mode resumes it
    torch.save({}, checkpoint / ROLLOUTS_DIR / "state.pt")
    check_rollout_mode(checkpoint, "free")
    with pytest.raises(ConfigError, match="carries the rollouts a free run generated ahead; resume it with"):
        check_rollout_mode(checkpoint, "lockstep")


def test_saved_rollouts_round_trip_with_the_pipeline_state(tmp_path):
    from cppo_rl.data_plane import read_rollouts, write_rollouts

    items = [{"name": "chunk_00000002", "tensors": ["b"], "x": 2}, {"name": "chunk_00000001", "tensors": ["a"], "x": 1}]
    saved = SavedRollouts(items, {"unstarted": [7, 8], "serial": 2, "dropped": 0})
    assert write_rollouts(tmp_path, saved, get=str.upper) > 0  # each heavy part fetched with `get`
    back = read_rollouts(tmp_path)
    assert [item["x"] for item in back.items] == [1, 2] and back.items[0]["tensors"] == ["A"]
    assert back.state == saved.state
    nothing = read_rollouts(tmp_path / "absent")
    assert not nothing and nothing.items == [] and nothing.state is None
