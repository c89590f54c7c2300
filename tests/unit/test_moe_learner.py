"""MoE in the learner without actors: the tiny Qwen3-MoE, its router statistics against transformers' own
aux loss, and the ZeRO-3 leaf modules."""

from __future__ import annotations

import pytest
import torch

from cppo_rl.data.tiny_model import TinyModelConfig, init_tiny_model
from cppo_rl.learner.logprobs import LogprobPolicy
from cppo_rl.learner.moe import mark_leaf_modules, num_experts, router_stats

MOE = TinyModelConfig(
    hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=128,
    max_position_embeddings=256, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
)  # fmt: skip


@pytest.fixture(scope="module")
def moe_model():
    return init_tiny_model(MOE).eval()


def _inputs():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 100, (3, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0  # right padding
    attention_mask[2, 5:] = 0
    return input_ids, attention_mask


def test_the_tiny_moe_is_qwen3_moe_and_dense_cache_keys_are_unchanged(moe_model):
    assert type(moe_model).__name__ == "Qwen3MoeForCausalLM" and num_experts(moe_model.config) == 4
    assert moe_model.config.output_router_logits and moe_model.config.router_aux_loss_coef == 0.001
    assert "num_experts" in MOE.to_dict() and "num_experts" not in TinyModelConfig().to_dict()
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        TinyModelConfig(num_experts=2, num_experts_per_tok=3)


def test_router_stats_match_the_models_own_aux_loss_and_count_valid_tokens(moe_model):
    input_ids, attention_mask = _inputs()
    with torch.no_grad():
        reference = moe_model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
        output = moe_model.model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
    stats = router_stats(type(moe_model).__module__, output.router_logits, attention_mask, moe_model.config)
    torch.testing.assert_close(stats.aux_loss, reference.aux_loss.float())
    # the load by hand: top-2 experts of every valid token in every layer
    valid = attention_mask.reshape(-1).bool()
    chosen = torch.cat([layer[valid].topk(2, dim=-1).indices.reshape(-1) for layer in output.router_logits])
    torch.testing.assert_close(stats.expert_load, torch.bincount(chosen, minlength=4).float() / chosen.numel())
    metrics = stats.metrics()
    assert metrics["moe_expert_load_max"] >= 1.0 >= metrics["moe_expert_load_min"] >= 0.0


def test_the_policy_keeps_the_router_stats_of_each_forward_and_gradients_reach_the_router(moe_model):
    policy = LogprobPolicy(moe_model)
    input_ids, attention_mask = _inputs()
    rows, positions = torch.tensor([0, 1, 2]), torch.tensor([4, 3, 2])
    token_ids = torch.tensor([[5], [6], [7]])
    logprobs = policy(input_ids, attention_mask, rows, positions, token_ids, 1.0)
    assert logprobs.shape == (3, 1) and policy.router is not None
    policy.router.aux_loss.backward()
    gate = moe_model.model.layers[0].mlp.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    moe_model.zero_grad()


def test_sparse_moe_blocks_become_zero3_leaf_modules():
    model = init_tiny_model(MOE)
    assert mark_leaf_modules(model) == ["Qwen3MoeSparseMoeBlock"]
    assert all(getattr(m, "_z3_leaf", False) for m in model.modules() if type(m).__name__ == "Qwen3MoeSparseMoeBlock")
    assert mark_leaf_modules(init_tiny_model(TinyModelConfig(hidden_size=64, num_layers=1, intermediate_size=64))) == []
