"""The rollout data plane's contract (issue 17): the driver carries no token sets.

An engine's generate hands its caller the light part only (texts, lengths, finish reasons) and leaves
the token sets (int32 ids) in the object store, owned by the caller; the training step and the
evaluation never bring them to the driver; a learner rank receives refs, not a batch. At the 30B
setting's size the token sets are many GB per step (bench/driver_bytes.py).
"""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.integration


def _sampling(**overrides):
    from cppo_rl.rollout.sampling import SamplingConfig

    return SamplingConfig(**{"n": 4, "max_tokens": 24, "logprobs_k": 5, "seed": 3, **overrides})


def _holds_token_sets(value) -> bool:
    """Whether a received object carries [.., T] tensors: a RolloutBatch, ChunkTensors or any 2-D+ array."""
    if hasattr(value, "topk_ids"):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_token_sets(v) for v in value)
    return hasattr(value, "__dict__") and any(
        getattr(v, "ndim", 0) > 1 or _holds_token_sets(v) for v in vars(value).values() if not callable(v)
    )


@pytest.fixture
def driver_gets(monkeypatch):
    """Every object `ray.get` returns in this process (the driver) during the test."""
    import ray

    received, get = [], ray.get

    def spy(*args, **kwargs):
        value = get(*args, **kwargs)
        received.append(value)
        return value

    monkeypatch.setattr(ray, "get", spy)
    return received


def _roles(rollout, learner, reward):
    """The controller's Roles around real engines, a stand-in learner and a reward function of the text (the
    weight sync a no-op)."""
    from cppo_rl.config import TrainConfig
    from cppo_rl.controller.roles import Roles
    from cppo_rl.rewards.base import RewardOutcome

    def score(texts, golds):
        return [RewardOutcome(reward(text), "correct") for text in texts]

    roles = Roles(TrainConfig())
    roles.rollout, roles.learner = rollout, learner
    roles.rewards = SimpleNamespace(
        score=score, submit=lambda texts, golds: SimpleNamespace(result=lambda: score(texts, golds))
    )
    roles.sync = lambda version: SimpleNamespace(bytes_per_second=0.0)
    return roles


def _recording_learner(ray, ranks=2):
    """A LearnerGroup whose ranks only say what they received for a training call (no DeepSpeed)."""
    from cppo_rl.learner.worker import LearnerGroup

    class RecordingRank:  # defined here so that Ray ships the class by value (workers cannot import test modules)
        def _received(self, method, value):
            refs = getattr(value, "tensors", [])
            tensors = [v for v in vars(value).values() if isinstance(v, torch.Tensor)]
            return {
                "method": method,
                "type": type(value).__name__,
                "refs": [type(r).__name__ for r in refs] if isinstance(refs, list) else [],
                "largest_tensor": max((t.numel() for t in tensors), default=0),
                "responses": value.num_responses,
            }

        def train_on_refs(self, source):
            return self._received("train_on_refs", source)

        def train_on_batch(self, batch):
            return self._received("train_on_batch", batch)

    group = LearnerGroup.__new__(LearnerGroup)  # the fan-out only
    group.workers = [ray.remote(RecordingRank).options(num_cpus=0).remote() for _ in range(ranks)]
    group.timeout_s = 120
    return group


def test_generate_hands_the_caller_no_token_sets_and_keeps_int32_ids(rollout_workers, chat_prompt_ids):
    import ray

    sizes = {}
    for k, max_tokens in ((1, 4), (12, 48)):
        returned = rollout_workers[0].generate.remote(chat_prompt_ids, _sampling(logprobs_k=k, max_tokens=max_tokens))
        assert isinstance(returned, list) and len(returned) == 2, "generate must return (light, heavy) refs"
        light, heavy = ray.get(returned[0]), ray.get(returned[1])
        assert not _holds_token_sets(light)
        texts = sum(len(t.encode()) for t in light.response_texts)
        sizes[k] = len(pickle.dumps(light)) - texts
        assert heavy.topk_ids.dtype.name == "int32" and heavy.topk_ids.shape[-1] == k + 1
        assert heavy.response_ids.dtype.name == "int32"
    assert abs(sizes[12] - sizes[1]) <= 64, sizes  # independent of K and of the response length


def test_a_training_step_keeps_the_tensors_off_the_driver(
    rollout_workers, chat_prompt_ids, tiny_model_dir, driver_gets
):
    """Trainer._step with the real engines and a recording learner: the driver receives light parts only
    and each learner rank receives refs to the chunks plus per-row data, never a [N, T] tensor."""
    import ray
    from transformers import AutoTokenizer

    from cppo_rl.algorithms import get_advantage
    from cppo_rl.config import TrainConfig
    from cppo_rl.controller.pipeline import LockstepPipeline
    from cppo_rl.controller.trainer import Trainer
    from cppo_rl.data.dataset import Example
    from cppo_rl.rollout.worker import RolloutGroup

    trainer = Trainer(TrainConfig(), run_dir=None)
    trainer.roles = _roles(RolloutGroup(rollout_workers), _recording_learner(ray), lambda t: float(len(t) % 2))
    examples = [Example(prompt=f"Compute {a}+{a}.", answer=str(2 * a), source=f"test:{a}") for a in range(4)]
    loader = SimpleNamespace(next_batch=lambda: examples)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    encode = lambda batch: trainer._encode(tokenizer, batch)  # noqa: E731
    sampling, advantage = _sampling(logprobs_k=8), get_advantage("grpo")
    pipeline = LockstepPipeline(trainer.roles, loader, encode, sampling, advantage, False, 0, 1)
    try:
        metrics = trainer._step(1, pipeline)
    finally:
        for worker in trainer.roles.learner.workers:
            ray.kill(worker)
    # what rank 0 received (its record comes back as the learner's metrics)
    assert (metrics["actor/method"], metrics["actor/type"]) == ("train_on_refs", "RolloutSource")
    assert metrics["actor/refs"] == ["ObjectRef", "ObjectRef"]
    assert metrics["actor/largest_tensor"] == metrics["actor/responses"] == 16  # per-row data only
    assert not any(_holds_token_sets(value) for value in driver_gets), [type(v).__name__ for v in driver_gets]
    assert metrics["train/response_length_mean"] > 0


def test_a_learner_rank_receives_refs_not_a_batch(rollout_workers, chat_prompt_ids):
    import ray

    from cppo_rl.algorithms import grpo_advantages
    from cppo_rl.rollout.worker import RolloutGroup

    refs = RolloutGroup(rollout_workers).generate_refs(chat_prompt_ids[:4], _sampling(logprobs_k=8))
    refs.rewards = (refs.response_lengths % 2).float()
    refs.advantages = grpo_advantages(refs.rewards, refs.group_index)
    learner = _recording_learner(ray)
    try:
        seen = ray.get([rank.train_on_refs.remote(refs.source()) for rank in learner.workers])
        via_group = learner.train_on_batch(refs)
    finally:
        for worker in learner.workers:
            ray.kill(worker)
    assert via_group["method"] == "train_on_refs" and via_group["type"] == "RolloutSource"
    for record in (*seen, via_group):
        assert record["refs"] == ["ObjectRef", "ObjectRef"]  # one per engine chunk, not resolved at the call
        assert record["largest_tensor"] == refs.num_responses == record["responses"]  # per-row data only


def test_evaluation_fetches_no_token_sets(rollout_workers, tiny_model_dir, driver_gets):
    from transformers import AutoTokenizer

    from cppo_rl.config import TrainConfig
    from cppo_rl.controller.trainer import Trainer
    from cppo_rl.data.dataset import Example
    from cppo_rl.rollout.worker import RolloutGroup

    config = TrainConfig()
    config.rollout.max_response_length, config.rollout.eval_samples = 16, 2
    trainer = Trainer(config, run_dir=None)
    trainer.roles = _roles(RolloutGroup(rollout_workers), None, lambda text: 1.0)
    examples = [Example(prompt=f"Compute {a}+1.", answer=str(a + 1), source=f"test:{a}") for a in range(3)]
    metrics, samples = trainer.evaluate(AutoTokenizer.from_pretrained(tiny_model_dir), examples, step=0)
    assert metrics["eval/accuracy"] == 1.0 and metrics["eval/response_length_mean"] > 0 and samples
    assert driver_gets and not any(_holds_token_sets(value) for value in driver_gets)


def test_finished_chunks_outlive_their_engine(ray_local, rollout_workers, chat_prompt_ids, tiny_model_dir):
    """A chunk's heavy part is a return value of the engine's task, owned by the driver: it survives the
    engine's death (engine replacement keeps the finished chunks and fetches them later)."""
    import ray

    from cppo_rl.remote import ACTOR_GONE
    from cppo_rl.rollout.engine import EngineConfig
    from cppo_rl.rollout.worker import RolloutGroup, start_rollout_workers, wait_until_dead

    sampling = _sampling(n=8, max_tokens=64, logprobs_k=20)
    doomed = start_rollout_workers(EngineConfig(str(tiny_model_dir), max_model_len=256, seed=0), 1, num_cpus=0.25)
    refs = RolloutGroup(doomed).generate_refs(chat_prompt_ids, sampling)
    ray.kill(doomed[0], no_restart=True)
    # ray.kill is asynchronous: a probe sent just after it may still be answered; wait until one fails
    wait_until_dead(doomed[0], timeout_s=60)
    with pytest.raises(ACTOR_GONE):
        ray.get(doomed[0].ready.remote(), timeout=60)
    fetched = refs.fetch()
    assert fetched.topk_ids.numel() * 12 > 100 << 10  # in the shared object store (not inlined in the driver)
    expected = RolloutGroup(rollout_workers[:1]).generate(chat_prompt_ids, sampling)
    assert torch.equal(fetched.response_ids, expected.response_ids)
    assert torch.equal(fetched.topk_ids, expected.topk_ids)
    assert torch.allclose(fetched.topk_logprobs, expected.topk_logprobs, atol=1e-5)
