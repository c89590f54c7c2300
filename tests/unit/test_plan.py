"""The preflight planner: parameter counts, ZeRO-3 / KV-cache arithmetic by hand, placement, refusals, the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest

from cppo_rl.config import ClusterConfig
from cppo_rl.plan import (
    BF16,
    GIB,
    GPU_80GB_USABLE_GIB,
    PRESETS,
    ClusterLayout,
    ModelShape,
    PlanError,
    learner_memory,
    load_shape,
    main,
    plan,
    rollout_memory,
    sync_receive_bytes,
)

GPU = GPU_80GB_USABLE_GIB  # an "80 GB" H100 / A100 as CUDA reports it

QWEN3_30B_A3B_CONFIG = {  # the keys of Qwen/Qwen3-30B-A3B's config.json that the planner reads, and a few it ignores
    "architectures": ["Qwen3MoeForCausalLM"],
    "hidden_size": 2048,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "intermediate_size": 6144,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 768,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "rope_theta": 1000000.0,
    "max_position_embeddings": 40960,
}

# Qwen3-8B by hand: per layer q (4096 x 32*128), k and v (4096 x 8*128), o, q_norm + k_norm (128 each),
# 2 RMSNorms, gate/up/down (4096 x 12288); plus embeddings, lm_head (untied) and the final norm.
QWEN3_8B_LAYER = 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096 + 2 * 128 + 2 * 4096 + 3 * 4096 * 12288
QWEN3_8B_PARAMS = 2 * 151936 * 4096 + 36 * QWEN3_8B_LAYER + 4096


def test_qwen3_8b_parameter_count_by_hand_and_against_the_published_total():
    assert QWEN3_8B_PARAMS == 8_190_735_360
    assert PRESETS["qwen3_8b"].num_parameters() == QWEN3_8B_PARAMS
    assert PRESETS["qwen3_8b"].active_parameters() == QWEN3_8B_PARAMS
    assert abs(QWEN3_8B_PARAMS / 8.19e9 - 1) < 0.01
    assert abs((QWEN3_8B_PARAMS - 2 * 151936 * 4096) / 6.95e9 - 1) < 0.01  # model card: 6.95B non-embedding


def test_qwen3_1_7b_counts_its_tied_embedding_once():
    layer = 2048 * 2048 + 2 * 2048 * 1024 + 2048 * 2048 + 2 * 128 + 2 * 2048 + 3 * 2048 * 6144
    params = 151936 * 2048 + 28 * layer + 2048
    assert PRESETS["qwen3_1_7b"].num_parameters() == params == 1_720_574_976  # the model card's "1.7B"
    assert abs((params - 151936 * 2048) / 1.4e9 - 1) < 0.01  # model card: 1.4B non-embedding
    # The hub's "2.03B" counts the checkpoint's tensors, where lm_head is stored beside the tied embedding.
    assert abs((params + 151936 * 2048) / 2.03e9 - 1) < 0.01


def test_qwen3_30b_a3b_total_and_active_parameters():
    attention = 2048 * 4096 + 2 * 2048 * 512 + 4096 * 2048 + 2 * 128
    expert = 3 * 2048 * 768
    layer = attention + 2048 * 128 + 128 * expert + 2 * 2048  # + router + 128 experts + 2 RMSNorms
    active_layer = attention + 2048 * 128 + 8 * expert + 2 * 2048
    shape = PRESETS["qwen3_30b_a3b"]
    assert shape.num_parameters() == 2 * 151936 * 2048 + 48 * layer + 2048 == 30_532_122_624
    assert shape.active_parameters() == 2 * 151936 * 2048 + 48 * active_layer + 2048 == 3_353_032_704
    assert abs(shape.num_parameters() / 30.5e9 - 1) < 0.01
    assert abs((shape.num_parameters() - 2 * 151936 * 2048) / 29.9e9 - 1) < 0.01  # model card: 29.9B non-emb.
    # The card's "3.3B activated" is 3.35B to 0.1B: within 2%, not 1%.
    assert abs(shape.active_parameters() / 3.3e9 - 1) < 0.02


def test_from_hf_config_reads_qwen3_moe_keys_and_refuses_mixed_layers():
    assert ModelShape.from_hf_config(QWEN3_30B_A3B_CONFIG) == PRESETS["qwen3_30b_a3b"]
    with pytest.raises(ValueError, match="mixed dense/MoE"):
        ModelShape.from_hf_config({**QWEN3_30B_A3B_CONFIG, "mlp_only_layers": [0]})
    with pytest.raises(ValueError, match="lacks"):
        ModelShape.from_hf_config({"hidden_size": 8})


@pytest.mark.parametrize(
    ("name", "preset"),
    [
        ("qwen3_8b", "qwen3_8b"),
        ("Qwen/Qwen3-8B-Base", "qwen3_8b_base"),
        ("Qwen/Qwen3-1.7B", "qwen3_1_7b"),
        ("Qwen/Qwen3-30B-A3B-Base", "qwen3_30b_a3b_base"),
    ],
)
def test_load_shape_takes_preset_keys_and_hub_names(name, preset):
    assert load_shape(name) == PRESETS[preset]


def test_presets_carry_the_context_of_their_config_json():
    # max_position_embeddings of the public config.json files: post-trained 40960, -Base 32768 (pre-training length)
    contexts = {key: shape.max_position_embeddings for key, shape in PRESETS.items()}
    assert contexts == {
        "qwen3_1_7b": 40960,
        "qwen3_8b": 40960,
        "qwen3_30b_a3b": 40960,
        "qwen3_1_7b_base": 32768,
        "qwen3_8b_base": 32768,
        "qwen3_30b_a3b_base": 32768,
    }
    assert PRESETS["qwen3_8b_base"] == replace(PRESETS["qwen3_8b"], max_position_embeddings=32768)


def test_load_shape_reads_a_config_json_or_its_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_30B_A3B_CONFIG))
    assert load_shape(str(tmp_path)) == load_shape(str(tmp_path / "config.json")) == PRESETS["qwen3_30b_a3b"]
    with pytest.raises(ValueError, match="neither a preset"):
        load_shape("llama_70b")


def test_zero3_states_of_qwen3_8b_over_8_ranks():
    lines = learner_memory(PRESETS["qwen3_8b"], 8, 1, 9216, True, 512)
    assert lines["params"] == lines["grads"] == 2 * 8_190_735_360 // 8 == 2_047_683_840
    assert lines["optimizer"] == 12 * 8_190_735_360 // 8 == 12_286_103_040  # fp32 master, AdamW m and v
    assert lines["step_fp32_grad"] == 4 * 1_000_000_000  # a rank's 1.02e9 params exceed one 1e9 sub-group


def test_logprob_head_and_gathered_block_of_qwen3_8b():
    lines = learner_memory(PRESETS["qwen3_8b"], 8, 1, 9216, True, 512)
    vocab_block = 151936 * 4096
    assert lines["logprob_head"] == 512 * 151936 * 4 * 2 + vocab_block * (4 + 2) == 4_356_308_992
    assert lines["gathered"] == 2 * (2 * QWEN3_8B_LAYER + vocab_block)


def test_activations_of_qwen3_8b_with_and_without_checkpointing():
    tokens = 2 * 9216  # micro-batch 2
    per_token_layer = (
        2 * (4 + 2) * 4096  # two RMSNorms: fp32 input copy + bf16 normalised
        + (4 + 2) * (4096 + 1024)  # q_norm, k_norm
        + 2 * (4096 + 4096 + 2 * 1024 + 4096)  # q/k/v input, q, k, v, attention output
        + 2 * (4096 + 4 * 12288)  # MLP input, gate, up, silu(gate), product
    )
    assert per_token_layer == 215_040
    checkpointed = learner_memory(PRESETS["qwen3_8b"], 8, 2, 9216, True, 512)["activations"]
    assert checkpointed == 36 * 2 * tokens * 4096 + tokens * per_token_layer
    full = learner_memory(PRESETS["qwen3_8b"], 8, 2, 9216, False, 512)["activations"]
    assert full == 36 * tokens * per_token_layer


def test_kv_cache_by_hand():
    memory = rollout_memory(PRESETS["qwen3_8b"], 2, 80, 0.9, 4, 1000)
    assert memory.kv_needed == 2 * 36 * (8 // 2) * 128 * 2 * 1000 * 4 == 294_912_000
    assert memory.weights == 2 * 8_190_735_360 // 2
    assert memory.kv_budget == int(0.9 * 80 * GIB) - 8_190_735_360 - 2 * GIB
    assert memory.max_sequences == memory.kv_budget // (2 * 36 * 4 * 128 * 2 * 1000)
    # TP 8 over 4 KV heads: vLLM replicates, one head per GPU
    assert rollout_memory(PRESETS["qwen3_30b_a3b"], 8, 80, 0.9, 1, 1000).kv_per_sequence == 2 * 48 * 1 * 128 * 2 * 1000


def test_placement_of_two_tp2_engines_and_four_ranks_on_one_node():
    placement = ClusterLayout(1, 8, 80, 2, 2, 4).placement()
    assert placement.engines == [[(0, 0), (0, 1)], [(0, 2), (0, 3)]]
    assert placement.learners == [(0, 4), (0, 5), (0, 6), (0, 7)]


def test_placement_keeps_each_engine_on_one_node():
    placement = ClusterLayout(2, 8, 80, 3, 3, 5).placement()
    assert placement.engines == [[(0, 0), (0, 1), (0, 2)], [(0, 3), (0, 4), (0, 5)], [(1, 0), (1, 1), (1, 2)]]
    assert placement.learners == [(0, 6), (0, 7), (1, 3), (1, 4), (1, 5)]


@pytest.mark.parametrize(
    ("layout", "match"),
    [
        (ClusterLayout(1, 8, 80, 2, 2, 5), r"need 9 GPUs > 1 node\(s\) x 8 GPUs = 8"),
        (ClusterLayout(2, 8, 80, 1, 16, 1), "tensor_parallel_size=16 > 8 GPUs per node"),
        (ClusterLayout(1, 8, 80, 3, 3, 1), "3 engines x TP 3 do not fit"),
    ],
)
def test_placement_refusals_name_the_numbers(layout, match):
    with pytest.raises(PlanError, match=match):
        layout.placement()


def test_layout_sizes_must_be_positive():
    with pytest.raises(ValueError, match="learner_ranks"):
        ClusterLayout(1, 8, 80, 1, 1, 0)


def test_qwen3_8b_on_one_24_gib_rank_is_refused_with_the_number_and_the_knob():
    layout = ClusterLayout(1, 2, 24, 1, 1, 1)
    result = plan(PRESETS["qwen3_8b"], layout, micro_batch_size=1, seq_len=9216, concurrency=8)
    assert not result.feasible
    need = sum(result.learner.values()) / GIB
    assert need > 16 * 8.19e9 / GIB  # the ZeRO-3 states alone are 122 GiB
    (problem,) = [p for p in result.problems if p.startswith("learner")]  # and the engine's sync buffers (below)
    assert f"learner rank needs {need:.2f} GiB > 24 GiB per GPU" in problem
    ranks = int(problem.split("raise learner.world_size to at least ")[1].split()[0])
    for world_size, fits in ((ranks, True), (ranks // 2, False)):  # the hint suffices (an upper bound)
        layout = ClusterLayout(1, 32, 24, 1, 1, world_size)
        problems = plan(PRESETS["qwen3_8b"], layout, micro_batch_size=1, seq_len=9216, concurrency=8).problems
        assert (not any(p.startswith("learner") for p in problems)) is fits
    assert "INFEASIBLE" in result.render()


def test_rollout_weights_over_the_budget_are_refused():
    layout = ClusterLayout(1, 8, 16, 1, 1, 7)
    result = plan(PRESETS["qwen3_8b"], layout, micro_batch_size=1, seq_len=4096, concurrency=1)
    (problem,) = [p for p in result.problems if "KV cache" in p]
    assert "less than one 4096-token sequence" in problem and "raise rollout.tensor_parallel_size" in problem


def test_tensor_parallel_size_must_divide_the_heads():
    layout = ClusterLayout(1, 8, 80, 1, 3, 4)
    result = plan(PRESETS["qwen3_8b"], layout, micro_batch_size=1, seq_len=4096, concurrency=1)
    assert any("must divide the 32 attention heads" in p for p in result.problems)


# Table 3 of the paper (prompts x n responses per step, T_max = response horizon, + 1k prompt) on the layouts
# docs/planner.md ships: one 8 x 80 GiB node for the dense models (4 engines + 4 ranks), four for 30B-A3B
# (8 engines x TP 2 on nodes 0-1, 16 ranks on nodes 2-3; on 2 nodes the 8 ranks would sit at 94% of a GPU).
PAPER_RUNS = {  # preset, prompts per step, responses per prompt, prompt + response horizon, layout
    "Qwen3-1.7B": ("qwen3_1_7b", 64, 8, 1024 + 8192, ClusterLayout(1, 8, GPU, 4, 1, 4)),
    "Qwen3-1.7B-Base": ("qwen3_1_7b_base", 64, 8, 1024 + 8192, ClusterLayout(1, 8, GPU, 4, 1, 4)),
    "Qwen3-8B-Base": ("qwen3_8b_base", 128, 8, 1024 + 8192, ClusterLayout(1, 8, GPU, 4, 1, 4)),
    "Qwen3-30B-A3B-Base": ("qwen3_30b_a3b_base", 256, 16, 1024 + 16384, ClusterLayout(4, 8, GPU, 8, 2, 16)),
}


@pytest.mark.parametrize("utilization", [0.85, 0.9])  # the experiments' (conf/experiment/_paper_common.yaml), the CLI's
@pytest.mark.parametrize("run", PAPER_RUNS)
def test_paper_configs_plan_as_feasible(run, utilization):
    preset, prompts, n, seq_len, layout = PAPER_RUNS[run]
    concurrency = prompts * n // layout.num_engines
    result = plan(
        PRESETS[preset],
        layout,
        micro_batch_size=1,
        seq_len=seq_len,
        concurrency=concurrency,
        gpu_memory_utilization=utilization,
    )
    assert result.feasible, result.render()
    assert sum(result.learner.values()) < 0.9 * GPU * GIB  # headroom: no "tight" warning
    assert result.rollout.max_sequences >= 32
    assert (32 * n) % layout.learner_ranks == 0  # a mini-batch of 32 prompts splits over the ranks


def test_cli_exit_codes(capsys):
    common = ["--model", "qwen3_8b", "--seq-len", "9216", "--concurrency", "256"]
    assert main([*common, "--engines", "4", "--learner-ranks", "4"]) == 0
    assert "FEASIBLE" in capsys.readouterr().out
    assert main([*common, "--gpus-per-node", "2", "--gpu-gib", "24"]) == 1
    assert "learner.world_size" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "no_such_model", "--seq-len", "9216"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "qwen3_8b", "--seq-len", "0"])
    assert exit_info.value.code == 2


def test_module_entry_point_imports_no_heavy_stack():
    code = (
        "import sys, runpy\n"
        "sys.argv = ['plan', '--model', 'qwen3_1_7b', '--seq-len', '9216', '--learner-ranks', '9']\n"
        "try:\n"
        "    runpy.run_module('cppo_rl.plan', run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    heavy = [m for m in ('torch', 'ray', 'vllm', 'deepspeed', 'transformers') if m in sys.modules]\n"
        "    print('heavy:', heavy, 'exit:', done.code)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "heavy: [] exit: 1" in result.stdout  # 1 engine + 9 ranks > 8 GPUs


def test_lower_zero_stages_keep_more_on_every_rank():
    full = {stage: learner_memory(PRESETS["qwen3_8b"], 8, 1, 9216, True, 512, zero_stage=stage) for stage in range(4)}
    params = PRESETS["qwen3_8b"].num_parameters()
    assert full[0]["params"] == full[1]["params"] == full[2]["params"] == BF16 * params
    assert full[3]["params"] == BF16 * math.ceil(params / 8)
    assert full[1]["grads"] == BF16 * params and full[2]["grads"] == BF16 * math.ceil(params / 8)
    assert full[0]["optimizer"] == 12 * params and full[1]["optimizer"] == 12 * math.ceil(params / 8)
    assert full[2]["gathered"] == 0 < full[3]["gathered"]


def test_weight_sync_receive_buffers_by_hand():
    # Qwen3-8B: the embedding (or lm_head), 151936 x 4096 bf16, is both the largest tensor (a bucket of its own,
    # above the 256 MiB budget) and the largest module vLLM loads as one unit: one bucket alive + the module's
    # received tensors copied out of freed buckets + its materialised shard
    embedding = 2 * 151936 * 4096
    assert PRESETS["qwen3_8b"].largest_tensor_parameters() * 2 == embedding
    assert PRESETS["qwen3_8b"].largest_module_parameters() * 2 == embedding
    assert sync_receive_bytes(PRESETS["qwen3_8b"], 1, 256) == embedding + embedding + embedding
    # Qwen3-30B-A3B: one layer's 128 experts (gate, up, down of 2048 x 768) form one FusedMoE module, sharded by TP;
    # the largest tensor is a layer's fused gate/up experts, 128 x 1536 x 2048 (above the 151936 x 2048 embedding)
    experts = 2 * 128 * 3 * 2048 * 768
    gate_up_experts = 2 * 128 * 1536 * 2048
    assert PRESETS["qwen3_30b_a3b"].largest_module_parameters() * 2 == experts
    assert PRESETS["qwen3_30b_a3b"].largest_tensor_parameters() * 2 == gate_up_experts
    assert sync_receive_bytes(PRESETS["qwen3_30b_a3b"], 2, 256) == gate_up_experts + experts + experts // 2
    # tensors and modules smaller than the bucket: one bucket, the module's copies and its shard
    small = replace(PRESETS["qwen3_8b"], vocab_size=1000)
    gate_up = 2 * 2 * 4096 * 12288
    assert sync_receive_bytes(small, 1, 1024) == 1024 * 2**20 + gate_up + gate_up
    memory = rollout_memory(PRESETS["qwen3_8b"], 1, GPU, 0.85, 4, 1000, sync_bucket_mb=256)
    assert memory.sync_receive == sync_receive_bytes(PRESETS["qwen3_8b"], 1, 256)
    assert memory.outside_capacity == int(GPU * GIB) - int(0.85 * GPU * GIB)
    assert memory.outside_needed == memory.sync_receive + 2 * GIB


@pytest.mark.parametrize(("utilization", "bucket_mb"), [(0.97, 256), (0.9, 4096)])
def test_weight_sync_buffers_outside_the_vllm_budget_are_refused(utilization, bucket_mb):
    layout = ClusterLayout(1, 8, GPU, 4, 1, 4)
    kwargs = {"micro_batch_size": 1, "seq_len": 9216, "concurrency": 256}
    result = plan(PRESETS["qwen3_8b"], layout, gpu_memory_utilization=utilization, sync_bucket_mb=bucket_mb, **kwargs)
    (problem,) = result.problems
    assert "outside vLLM's budget" in problem
    assert f"rollout.gpu_memory_utilization={utilization:g}" in problem and f"sync_bucket_mb={bucket_mb}" in problem
    assert f"weight-sync receive ({bucket_mb} MiB buckets)" in result.render()
    assert "DOES NOT FIT" in result.render()
    assert plan(PRESETS["qwen3_8b"], layout, gpu_memory_utilization=0.85, sync_bucket_mb=256, **kwargs).feasible


@pytest.mark.parametrize("utilization", [0.0, -0.5, 1.5])
def test_gpu_memory_utilization_outside_0_1_is_refused(utilization):
    layout = ClusterLayout(1, 8, GPU, 4, 1, 4)
    result = plan(PRESETS["qwen3_1_7b"], layout, micro_batch_size=1, seq_len=9216, concurrency=128,
                  gpu_memory_utilization=utilization)  # fmt: skip
    assert result.problems == [f"rollout.gpu_memory_utilization={utilization:g} must lie in (0, 1]: it is the share "
                               "of each engine GPU that vLLM takes for weights, activations and KV cache"]  # fmt: skip
    assert "INFEASIBLE" in result.render()


def test_max_model_len_beyond_the_model_context_is_refused():
    layout = ClusterLayout(1, 8, GPU, 4, 1, 4)
    kwargs = {"micro_batch_size": 1, "concurrency": 8}
    (problem,) = plan(PRESETS["qwen3_8b_base"], layout, seq_len=40960, **kwargs).problems
    assert problem.startswith("rollout.max_model_len=40960 exceeds the model's context of 32768 tokens")
    assert plan(PRESETS["qwen3_8b"], layout, seq_len=40960, **kwargs).feasible  # post-trained: 40960
    assert plan(PRESETS["qwen3_8b_base"], layout, seq_len=32768, **kwargs).feasible
    unknown = replace(PRESETS["qwen3_8b"], max_position_embeddings=0)
    assert not any("model's context" in p for p in plan(unknown, layout, seq_len=10**6, **kwargs).problems)


def test_the_default_gpu_is_the_usable_memory_of_an_80gb_card(capsys):
    # torch.cuda.get_device_properties(0).total_memory of an H100 SXM 80GB and an A100 80GB, in bytes
    assert GPU_80GB_USABLE_GIB <= min(85_029_158_912, 85_198_045_184) / GIB < 80
    assert ClusterConfig().gpu_memory_gib == GPU_80GB_USABLE_GIB
    assert main(["--model", "qwen3_1_7b", "--seq-len", "9216", "--engines", "4", "--learner-ranks", "4"]) == 0
    assert f"8 GPUs x {GPU_80GB_USABLE_GIB:g} GiB" in capsys.readouterr().out


def test_a_run_config_plans_its_sync_bucket_and_context():
    from cppo_rl.plan import plan_config
    from cppo_rl.preflight import compose

    config, _ = compose(["experiment=qwen3_8b_base"])
    result = plan_config(config)
    assert result.feasible and result.shape == PRESETS["qwen3_8b_base"]
    assert result.rollout.sync_receive == sync_receive_bytes(PRESETS["qwen3_8b_base"], 1, config.learner.sync_bucket_mb)
    config.learner.sync_bucket_mb = 8192
    assert any("learner.sync_bucket_mb=8192" in p for p in plan_config(config).problems)
    config, _ = compose(
        ["experiment=qwen3_8b_base", "rollout.max_model_len=40960", "rollout.max_response_length=32768"]
    )
    assert any(p.startswith("rollout.max_model_len=40960 exceeds") for p in plan_config(config).problems)
