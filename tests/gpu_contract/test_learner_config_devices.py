"""Pure checks of what each device gets (issue 17): the DeepSpeed config accumulates bf16 gradients in fp32
(as parsed by DeepSpeed 0.19.8 itself), the attention kernel, the MoE router aux-loss weight, and the
router statistics' device."""

from __future__ import annotations

import types

import pytest
import torch
from strict_device import DEVICE, strict_device, tag_of


def _config(**overrides):
    from cppo_rl.learner.worker import LearnerConfig

    return LearnerConfig(model_path="unused", responses_per_step=16, micro_batch_size=2, **overrides)


def _parsed(ds_config):
    """(model dtype, gradient-accumulation dtype) as DeepSpeed itself derives them from the config dict:
    its parser (DeepSpeedConfig) and DeepSpeedEngine.get_data_types, the dtype ZeRO-3 accumulates in."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.engine import DeepSpeedEngine

    parsed = DeepSpeedConfig(ds_config)
    engine = types.SimpleNamespace(
        _config=parsed,
        fp16_enabled=lambda: parsed.float16_config.enabled,
        bfloat16_enabled=lambda: parsed.bfloat16_config.enabled,
    )
    return DeepSpeedEngine.get_data_types(engine)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_gradients_accumulate_in_fp32(stage):
    from cppo_rl.learner.ds_config import deepspeed_config

    ds_config = deepspeed_config(_config(zero_stage=stage), 4, "bfloat16")
    assert ds_config["data_types"] == {"grad_accum_dtype": "fp32"}
    assert _parsed(ds_config) == (torch.bfloat16, torch.float32)


def test_float32_config_is_unchanged_and_stage0_bf16_is_left_to_deepspeed():
    from cppo_rl.learner.ds_config import deepspeed_config

    ds_config = deepspeed_config(_config(), 4, "float32")
    assert "data_types" not in ds_config and ds_config["bf16"] == {"enabled": False}
    assert _parsed(ds_config) == (torch.float32, torch.float32)
    # stage 0 (no ZeRO optimizer) refuses bf16 weights with fp32 accumulation: nothing is set there
    assert "data_types" not in deepspeed_config(_config(zero_stage=0), 4, "bfloat16")


def test_attn_implementation_auto_picks_flash_attention_only_on_gpu_with_flash_attn():
    from cppo_rl.learner.distributed import attn_implementation_for

    assert attn_implementation_for("auto", on_gpu=True, flash_attn_installed=True) == "flash_attention_2"
    assert attn_implementation_for("auto", on_gpu=True, flash_attn_installed=False) == "sdpa"
    assert attn_implementation_for("auto", on_gpu=False, flash_attn_installed=True) == "sdpa"
    assert attn_implementation_for("auto", on_gpu=False) == "sdpa"
    assert attn_implementation_for("eager", on_gpu=True, flash_attn_installed=True) == "eager"
    assert attn_implementation_for("flash_attention_3", on_gpu=False) == "flash_attention_3"
    # shared-prompt rows take their own SDPA-based attention, even where flash attention is there (share_prompts)
    from cppo_rl.learner.shared_prefix import SHARED_PREFIX_ATTENTION

    for requested in ("auto", "sdpa"):
        assert attn_implementation_for(requested, True, True, share_prompts=True) == SHARED_PREFIX_ATTENTION
    with pytest.raises(ValueError, match="`share_prompts` and `pack_sequences` are two layouts"):
        _config(share_prompts=True, pack_sequences=True)
    with pytest.raises(ValueError, match="`share_prompts` computes attention with its own SDPA-based kernel"):
        _config(share_prompts=True, attn_implementation="flash_attention_2")


def test_router_aux_coef_defaults_to_the_model_config_for_moe_even_without_output_router_logits():
    from cppo_rl.learner.distributed import router_aux_coef_for

    # Qwen3-30B-A3B-Base's config.json: output_router_logits false, router_aux_loss_coef 0.001
    moe = types.SimpleNamespace(num_experts=128, output_router_logits=False, router_aux_loss_coef=0.001)
    dense = types.SimpleNamespace(router_aux_loss_coef=0.5)
    assert router_aux_coef_for(None, moe) == 0.001
    assert router_aux_coef_for(0.0, moe) == 0.0
    assert router_aux_coef_for(0.01, moe) == 0.01
    assert router_aux_coef_for(None, dense) == 0.0 and router_aux_coef_for(0.01, dense) == 0.0


def test_the_new_learner_keys_reach_the_rank_and_are_checked():
    from cppo_rl.config import LearnerSettings, TrainConfig, config_problems

    assert LearnerSettings().attn_implementation == "auto" and LearnerSettings().router_aux_loss_coef is None
    assert _config(attn_implementation="eager", router_aux_loss_coef=0.0).router_aux_loss_coef == 0.0
    config = TrainConfig()
    config.learner.router_aux_loss_coef = -1.0
    assert any("learner.router_aux_loss_coef" in p for p in config_problems(config))
    for bad in ("", "flash_attention2"):  # an unknown kernel fails here, not in the ranks' from_pretrained
        config = TrainConfig()
        config.learner.attn_implementation = bad
        assert any(p.startswith(f"learner.attn_implementation={bad!r}: use one of") for p in config_problems(config))
    for good in ("auto", "eager", "sdpa", "flash_attention_2", "kernels-community/flash-attn"):
        config = TrainConfig()
        config.learner.attn_implementation = good
        assert not any("attn_implementation" in p for p in config_problems(config))


def test_router_stats_live_on_the_router_logits_device():
    from cppo_rl.learner import moe

    config = types.SimpleNamespace(num_experts=4, num_experts_per_tok=2)
    module = types.ModuleType("fake_moe_modeling")
    module.load_balancing_loss_func = lambda *args: 0  # what transformers returns without router logits
    import sys

    sys.modules[module.__name__] = module
    try:
        with strict_device():
            logits = (torch.randn(6, 4, device="cpu:0"),)  # made on "the device"
            mask = torch.ones(2, 3, dtype=torch.int64, device="cpu:0")
            stats = moe.router_stats(module.__name__, logits, mask, config)
            metrics = stats.metrics()
        assert {tag_of(t) for t in [stats.aux_loss, stats.expert_load, *metrics.values()]} == {DEVICE}
    finally:
        del sys.modules[module.__name__]
