"""Run configuration: Hydra composition onto the typed schema, and the cross-field checks."""

from __future__ import annotations

import re

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ValidationError

import cppo_rl.train  # noqa: F401  (registers the schema)
from cppo_rl.algorithms import PolicyLossConfig
from cppo_rl.config import AlgorithmConfig, ConfigError, TrainConfig, policy_loss_config, validate

CONF = str(__import__("pathlib").Path(__file__).resolve().parents[2] / "conf")


def _compose(*overrides: str) -> TrainConfig:
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return OmegaConf.to_object(compose(config_name="config", overrides=list(overrides)))


def test_defaults_compose_validate_and_map_to_the_algorithm_core():
    config = _compose()
    validate(config)
    loss = policy_loss_config(config)
    assert config.algorithm.name == "cppo"
    assert loss.horizon == config.rollout.max_response_length  # position horizon = max response length


@pytest.mark.parametrize("name", ["dppo", "grpo", "cispo", "trm_max", "trm_avg", "minpro", "cppo_no_prefix_budget"])
def test_every_algorithm_group_entry_composes(name):
    config = _compose(f"algorithm={name}", "algorithm.delta=0.2")
    validate(config)
    assert config.algorithm.name == name and config.algorithm.delta == 0.2


def test_method_defaults_come_from_the_algorithm_core_unless_set():
    trm = _compose("algorithm=trm_both")
    assert trm.algorithm.divergence is None and trm.algorithm.trm_max_delta is None  # null: the method's own
    assert (policy_loss_config(trm).trm_max_delta, policy_loss_config(trm).trm_avg_delta) == (0.1, 0.002)
    assert policy_loss_config(_compose("algorithm=dppo", "algorithm.divergence=binary_kl")).divergence == "binary_kl"
    assert policy_loss_config(_compose()).divergence == "topk_tv"
    assert policy_loss_config(_compose("algorithm.delta_b_ceiling=5")).delta_b_ceiling == 5.0
    with pytest.raises(ConfigError, match=r"algorithm\.delta_b_ceiling must lie in"):
        policy_loss_config(_compose("algorithm.delta_b_ceiling=0.5"))


def test_trm_estimators_are_config_keys_defaulting_to_the_authors_k2_k3():
    """Spec 8.11: TRM-Max on the sampled token's k2, TRM-Avg on its k3, one source for each default
    (PolicyLossConfig); top-K KL stays selectable per rule; a bad name names the user's key."""
    for name in ("trm_max", "trm_avg", "trm_both"):
        loss = policy_loss_config(_compose(f"algorithm={name}"))
        assert (loss.trm_max_divergence, loss.trm_avg_divergence) == ("sampled_k2", "sampled_k3"), name
    assert (AlgorithmConfig.trm_max_divergence, AlgorithmConfig.trm_avg_divergence) == (
        PolicyLossConfig.trm_max_divergence,
        PolicyLossConfig.trm_avg_divergence,
    )
    loss = policy_loss_config(_compose("algorithm=trm_both", "algorithm.trm_max_divergence=topk_kl"))
    assert (loss.trm_max_divergence, loss.trm_avg_divergence) == ("topk_kl", "sampled_k3")
    loss = policy_loss_config(_compose("algorithm=trm_avg", "algorithm.trm_avg_divergence=topk_kl"))
    assert loss.trm_avg_divergence == "topk_kl" and loss.divergence == "topk_tv"  # `divergence` is CPPO / DPPO's
    for key in ("trm_max_divergence", "trm_avg_divergence"):
        with pytest.raises(ConfigError, match=rf"unknown algorithm\.{key} 'k4'; choose one of .*sampled_k2"):
            policy_loss_config(_compose("algorithm=trm_max", f"algorithm.{key}=k4"))
        with pytest.raises(ConfigError, match=rf"algorithm\.{key}"):
            validate(_compose(f"algorithm.{key}=full_kl"))


def test_unknown_keys_and_wrong_types_are_refused():
    with pytest.raises(ConfigCompositionException, match=r"trainer\.total_stepz"):
        _compose("trainer.total_stepz=3")
    with pytest.raises((ConfigCompositionException, ValidationError), match="total_steps"):
        _compose("trainer.total_steps=many")
    with pytest.raises((ConfigCompositionException, ConfigAttributeError)):
        _compose("algorithm=nonexistent")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["trainer.prompts_per_step=6", "trainer.minibatch_prompts=4"], "not a multiple of trainer.minibatch_prompts"),
        (["learner.micro_batch_size=5"], r"not a multiple of learner.micro_batch_size=5; choose one dividing 64"),
        (["trainer.total_steps=0"], r"trainer.total_steps=0 must be >= 1"),
        (["rollout.max_response_length=300"], "must be below rollout.max_model_len"),
        (["rollout.num_engines=4", "cluster.num_cpus=2"], "CPUs > cluster.num_cpus=2"),
        (["algorithm.name=ppo"], "not a known policy loss"),
        (["algorithm.position_horizon=fixed"], "position_horizon"),
        (["trainer.keep_checkpoints=-1"], r"trainer.keep_checkpoints=-1 must be >= 0"),
        (["trainer.max_skipped_steps=-2"], r"trainer.max_skipped_steps=-2 must be >= 0"),
        (["trainer.max_staleness=-1"], r"trainer.max_staleness=-1 must be >= 0 \(0 turns it off\)"),
        (["cluster.startup_timeout_s=0"], r"cluster.startup_timeout_s=0.0 must be > 0"),
        (["cluster.placement_timeout_s=-5"], r"cluster.placement_timeout_s=-5.0 must be > 0"),
        (["cluster.placement_strategy=RANDOM"], "cluster.placement_strategy='RANDOM'"),
        (["+cluster.engine_resources={rollout: 0}"], r"cluster.engine_resources=\{'rollout': 0.0\}: custom resources"),
        (["+cluster.learner_resources={CPU: 1}"], r"cluster.learner_resources=\{'CPU': 1.0\}: custom resources"),
        (["learner.share_prompts=true", "learner.pack_sequences=true"], "two layouts of the forward rows; choose one"),
        (
            ["learner.share_prompts=true", "learner.attn_implementation=flash_attention_2"],
            r"learner.share_prompts computes attention with its own SDPA-based kernel.*not "
            r"learner.attn_implementation='flash_attention_2'; set learner.attn_implementation to auto",
        ),
        (["reward.grader=math_verify"], "must look like 'package.module:function'"),
        (["reward.grader=no_such_module:grade"], "cannot import 'no_such_module'"),
        (["reward.grader=cppo_rl.rewards.math_grader:nope"], "has no function 'nope'"),
    ],
)
def test_cross_field_checks_name_the_keys(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(_compose(*overrides))


def test_bad_algorithm_values_fail_before_any_actor_starts():
    with pytest.raises(ConfigError, match=r"algorithm.w_min must lie in \(0.0, 1.0\], got 1.5"):
        policy_loss_config(_compose("algorithm.w_min=1.5"))


def test_groups_pick_presets_and_experiments_apply_last():
    default = _compose()
    assert default.model.path == "tiny" and default.data.train_files == ["generated"]
    assert default.cluster.address is None and default.trainer.run_name.endswith("-cppo")
    assert _compose("cluster=existing").cluster.address == "auto"
    assert _compose("logging=local").logging.mode == "disabled"
    assert _compose("rollout=vllm_gpu").rollout.dtype == "bfloat16"
    assert default.reward.grader == "cppo_rl.data.arithmetic_task:boxed_integer_reward"
    paper_data = _compose("data=dapo_math")
    assert paper_data.reward.grader == "cppo_rl.rewards.math_grader:grade_boxed"
    assert paper_data.data.train_files[0].endswith("dapo_math_17k/train.jsonl")
    assert [f.rsplit("/", 2)[-2] for f in paper_data.data.eval_files] == ["aime24", "aime25"]
    smoke = _compose("experiment=smoke", "trainer.total_steps=3")
    assert smoke.experiment == "smoke" and smoke.trainer.total_steps == 3 and smoke.trainer.prompts_per_step == 4
    validate(smoke)


def test_a_model_preset_without_its_path_is_refused():
    with pytest.raises(ConfigError, match=r"model.path is empty; set model.path="):
        validate(_compose("model=hf"))
    assert _compose("model=hf", "model.path=org/model").model.warm_start is False


def test_resume_config_changes_name_the_keys():
    from dataclasses import asdict

    from cppo_rl.controller.trainer import config_changes

    saved = asdict(_compose())
    current = asdict(_compose("trainer.total_steps=90", "algorithm.delta=0.3", "logging.mode=disabled"))
    assert config_changes(saved, current) == ["algorithm.delta: 0.15 -> 0.3"]


@pytest.mark.parametrize(
    ("config_json", "match"),
    [
        (None, "has no config.json: not a HF model directory"),
        (
            '{"architectures": ["BertForMaskedLM"]}',
            r"config.json's architectures \['BertForMaskedLM'\] hold no \*ForCausalLM",
        ),
        ("[1, 2", "config.json is not a JSON object"),
    ],
)
def test_a_model_directory_must_hold_a_causal_lm(tmp_path, config_json, match):
    if config_json is not None:
        (tmp_path / "config.json").write_text(config_json)
    from cppo_rl.preflight import model_problems

    (problem,) = model_problems(_compose(f"model.path={tmp_path}"))
    assert re.search(rf"model.path='{tmp_path}'.*{match}", problem)


def test_more_gpus_than_the_cluster_has_are_refused():
    with pytest.raises(ConfigError, match=r"4 engines x rollout.tensor_parallel_size=2 \+ 4 learner ranks = 12 GPUs"):
        validate(_compose("experiment=qwen3_8b_base", "rollout.tensor_parallel_size=2"))


def test_the_generated_task_is_a_config_section():
    task = _compose("data.task.max_operations=8", "data.task.operators=+-").data.task
    assert (task.max_operations, task.operators) == (8, "+-")
    with pytest.raises(Exception, match="need 1 <= `min_operations` <= `max_operations`"):
        _compose("data.task.min_operations=5", "data.task.max_operations=2")
