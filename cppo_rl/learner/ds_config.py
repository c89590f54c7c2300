"""The DeepSpeed configuration of a learner rank, from its `LearnerConfig` (one place, checked by tests)."""

from __future__ import annotations


def deepspeed_config(config, micro_steps: int, dtype: str) -> dict:
    """The `config` dict handed to `deepspeed.initialize` (and to HfDeepSpeedConfig for ZeRO-3 init).

    config:      the rank's cppo_rl.learner.worker.LearnerConfig
    micro_steps: micro-batches per rank per optimizer step (gradient accumulation steps)
    dtype:       the weights' dtype, "float32" or "bfloat16" (cppo_rl.learner.distributed.dtype_for)
    """
    return {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": micro_steps,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": {"stage": config.zero_stage, "overlap_comm": False, "contiguous_gradients": True},
        "bf16": {"enabled": dtype == "bfloat16"},
        "zero_allow_untested_optimizer": config.optimizer == "sgd",  # torch SGD: exact, for checks
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
