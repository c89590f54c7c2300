"""The DeepSpeed configuration of a learner rank, from its `LearnerConfig` (one place, checked by tests)."""

from __future__ import annotations


def deepspeed_config(config, micro_steps: int, dtype: str) -> dict:
    """The `config` dict handed to `deepspeed.initialize` (and to HfDeepSpeedConfig for ZeRO-3 init).

    config:      the rank's cppo_rl.learner.worker.LearnerConfig
    micro_steps: micro-batches per rank per optimizer step (gradient accumulation steps)
    dtype:       the weights' dtype, "float32" or "bfloat16" (cppo_rl.learner.distributed.dtype_for)
    """
    bf16 = dtype == "bfloat16"
    ds_config = {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": micro_steps,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": {"stage": config.zero_stage, "overlap_comm": False, "contiguous_gradients": True},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": config.optimizer == "sgd",  # torch SGD: exact, for checks
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if bf16 and config.zero_stage >= 1:
        # Without it DeepSpeed accumulates the micro-steps' gradients in the weights' dtype (bf16, 8 bits of
        # mantissa): DeepSpeedEngine.get_data_types (runtime/engine.py, 0.19.8) uses the model dtype when
        # data_types.grad_accum_dtype is unset, and _configure_zero_optimizer hands that dtype to ZeRO-3
        # (DeepSpeedZeroOptimizer_Stage3: grad_partitions_flat_buffer is allocated in it and partition_grads
        # adds each micro-step's partition with `.to(gradient_accumulation_dtype)`); stages 1-2 keep a separate
        # fp32 grad_accum (stage_1_and_2.py) or take the BF16_Optimizer. Stage 0 refuses it
        # (_do_optimizer_sanity_check: NotImplementedError "unsupported mix"), so it accumulates in bf16.
        ds_config["data_types"] = {"grad_accum_dtype": "fp32"}
    return ds_config
