"""The paper's four settings as Hydra experiments: Table 3's numbers, and a feasible GPU plan for each."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import cppo_rl.train  # noqa: F401  (registers the schema)
from cppo_rl.config import ConfigError, policy_loss_config, validate
from cppo_rl.plan import PlanError, plan_config
from cppo_rl.train import CONF_DIR

# Table 3 (spec §5.1) and T_stop (§5.2): prompts, n, mini-batch prompts, updates, T_max, delta, delta_b, adaptive
TABLE_3 = {
    "qwen3_1p7b": ("Qwen/Qwen3-1.7B", 64, 8, 32, 2, 8192, 0.15, 0.015, False, 1120),
    "qwen3_1p7b_base": ("Qwen/Qwen3-1.7B-Base", 64, 8, 32, 2, 8192, 0.15, 0.02, True, 680),
    "qwen3_8b_base": ("Qwen/Qwen3-8B-Base", 128, 8, 32, 4, 8192, 0.15, 0.02, True, 490),
    "qwen3_30b_a3b_base": ("Qwen/Qwen3-30B-A3B-Base", 256, 16, 32, 8, 16384, 0.20, 0.02, True, 560),
}


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return OmegaConf.to_object(compose(config_name="config", overrides=list(overrides)))


@pytest.mark.parametrize("name", sorted(TABLE_3))
def test_experiment_carries_table_3_and_plans_as_feasible(name):
    path, prompts, n, minibatch, updates, t_max, delta, delta_b, adaptive, t_stop = TABLE_3[name]
    config = _compose(f"experiment={name}")
    validate(config)
    t, a, r, lrn = config.trainer, config.algorithm, config.rollout, config.learner
    assert (config.experiment, config.model.path) == (name, path)
    assert (t.prompts_per_step, t.samples_per_prompt, t.minibatch_prompts) == (prompts, n, minibatch)
    assert t.prompts_per_step // t.minibatch_prompts == updates and t.total_steps == t_stop
    assert r.max_response_length == t_max and r.max_model_len > t_max
    assert (a.name, a.delta, a.delta_b, a.adaptive_delta_b, a.w_min) == ("cppo", delta, delta_b, adaptive, 0.8)
    loss = policy_loss_config(config)
    assert (loss.divergence, r.top_k_logprobs, loss.loss_agg_mode) == ("topk_tv", 20, "seq-mean-token-sum-norm")
    assert (lrn.lr, r.temperature, r.eval_samples, r.eval_temperature, r.eval_top_p) == (1e-6, 1.0, 16, 0.7, 0.95)
    assert [f.rsplit("/", 2)[-2] for f in config.data.eval_files] == ["aime24", "aime25", "aime26"]
    assert config.data.train_files[0].endswith("dapo_math_17k/train.jsonl")
    assert "\\boxed{}" in config.data.prompt_template and config.reward.grader.endswith(":grade_boxed")
    plan = plan_config(config)
    assert plan.feasible, plan.render()


@pytest.mark.parametrize("method", ["grpo", "dppo", "cispo", "trm_max", "trm_avg", "minpro"])
def test_a_baseline_keeps_the_experiment_and_changes_the_loss(method):
    config = _compose("experiment=qwen3_30b_a3b_base", f"baseline={method}")
    validate(config)
    a = config.algorithm
    assert a.name == method and config.trainer.prompts_per_step == 256 and a.delta == 0.20
    # TRM masks on the sampled token's k2 (max) / k3 (avg) (spec 8.11), CPPO and DPPO on Top-K TV
    loss = policy_loss_config(config)
    estimators = (loss.divergence, loss.trm_max_divergence, loss.trm_avg_divergence)
    assert estimators == ("topk_tv", "sampled_k2", "sampled_k3")
    assert (a.clip_low, a.clip_high) == (0.2, 0.28)  # GRPO's clip-higher (spec 4.1), untouched by the experiment


def test_cpu_runs_have_nothing_to_plan_and_bad_templates_are_refused():
    with pytest.raises(PlanError, match=r"cluster.num_gpus=0"):
        plan_config(_compose())
    with pytest.raises(ConfigError, match=r"data.prompt_template must contain \{prompt\}"):
        validate(_compose("data.prompt_template=Solve it."))
    with pytest.raises(ConfigError, match=r"does not split evenly over cluster.num_nodes=3"):
        validate(_compose("cluster.num_gpus=8", "cluster.num_nodes=3"))


def test_plan_only_refuses_a_config_that_does_not_fit():
    command = [sys.executable, "-m", "cppo_rl.train", "experiment=qwen3_8b_base", "--plan-only"]
    fits = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert fits.returncode == 0 and "FEASIBLE" in fits.stdout, fits.stderr
    tight = [*command, "learner.world_size=1", "rollout.num_engines=1", "cluster.gpu_memory_gib=40"]
    refused = subprocess.run(tight, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "GiB > 40 GiB per GPU: raise learner.world_size" in refused.stdout


def test_the_prompt_template_wraps_each_problem(tmp_path):
    from cppo_rl.controller.trainer import Trainer
    from cppo_rl.data.dataset import Example

    class RecordingTokenizer:
        def __init__(self):
            self.turns = []

        def apply_chat_template(self, turn, add_generation_prompt):
            self.turns.append(turn[0]["content"])
            return {"input_ids": [len(self.turns)]}

    config = _compose("experiment=qwen3_8b_base")
    tokenizer = RecordingTokenizer()
    ids = Trainer(config, tmp_path)._encode(tokenizer, [Example("Find $x$ if {x}=2.", "2", "f:1")])
    assert ids == [[1]]
    assert tokenizer.turns == [
        "Find $x$ if {x}=2.\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    ]


# the slowest decoding an engine of these settings should sustain over a whole call (tokens/s, all sequences
# together): far below vLLM's batched decode on one H100, so a healthy engine is never taken for a hung one
SLOWEST_HEALTHY_TOKENS_PER_S = 1000
EVAL_PROMPTS = 30 + 30 + 30  # AIME 2024, 2025, 2026


@pytest.mark.parametrize("name", sorted(TABLE_3))
def test_generate_timeout_outlasts_the_longest_healthy_call(name):
    config = _compose(f"experiment={name}")
    t, r = config.trainer, config.rollout
    responses = max(t.responses_per_step, EVAL_PROMPTS * r.eval_samples)
    longest_call_s = -(-responses // r.num_engines) * r.max_response_length / SLOWEST_HEALTHY_TOKENS_PER_S
    assert r.generate_timeout_s >= longest_call_s, (name, longest_call_s)
