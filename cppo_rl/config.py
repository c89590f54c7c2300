"""The typed configuration of a training run; `conf/` (Hydra) maps onto it one-to-one.

Every key is a dataclass field (unknown keys and wrong types are refused by Hydra's structured
config), and `validate(config)` runs the cross-field checks before any actor starts, each error
naming the keys and the fix. Batch sizes are named so prompts are not confused with samples:
`prompts_per_step` x `samples_per_prompt` responses per step, `minibatch_prompts` per update.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cppo_rl.data.arithmetic_task import ArithmeticTaskConfig


@dataclass
class AlgorithmConfig:
    """The policy loss and its knobs (see cppo_rl.algorithms.PolicyLossConfig)."""

    name: str = "cppo"
    divergence: str = "topk_tv"
    delta: float = 0.15
    delta_b: float = 0.02
    w_min: float = 0.8
    position_horizon: str = "max_response_length"  # or "sequence" or "padded"
    adaptive_delta_b: bool = False
    delta_b_quantile: float = 0.9
    delta_b_scale: float = 1.0
    is_cap: float = 20.0
    clip_low: float = 0.2
    clip_high: float = 0.28
    cispo_eps_low: float = 10.0
    cispo_eps_high: float = 0.2
    minpro_eps_low: float = 0.2
    minpro_eps_high: float = 0.28
    trm_max_delta: float = 0.05
    trm_avg_delta: float = 0.001
    loss_agg_mode: str = "seq-mean-token-sum-norm"
    advantage: str = "grpo"
    adv_std_norm: bool = False
    anchor: str = "rollout"


@dataclass
class ModelConfig:
    """`path`: a HF directory or hub name; "tiny" builds the project's tiny Qwen3 (and warms it up)."""

    path: str = "tiny"
    warm_start: bool = True
    warm_start_max_seconds: float = 900.0
    warm_start_target_accuracy: float = 0.25


@dataclass
class DataConfig:
    """jsonl files with `prompt` and `answer`; "generated" writes the arithmetic task into the run."""

    train_files: list[str] = field(default_factory=lambda: ["generated"])
    eval_files: list[str] = field(default_factory=lambda: ["generated"])
    eval_prompts: int = 64
    shuffle: bool = True
    seed: int = 0
    prompt_template: str = "{prompt}"  # the user turn; "{prompt}" is the row's problem text
    # the generated task ("generated" in train_files / eval_files) and the tiny model's warm start on it:
    # data.task.max_operations=8 lengthens the worked answers (about 10 tokens per operation)
    task: ArithmeticTaskConfig = field(default_factory=ArithmeticTaskConfig)


@dataclass
class RolloutConfig:
    num_engines: int = 1
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    max_model_len: int = 256
    max_response_length: int = 32
    temperature: float = 1.0
    top_k_logprobs: int = 20
    eval_temperature: float = 0.7
    eval_top_p: float = 0.95
    eval_samples: int = 4
    cpu_kv_cache_gib: int = 1
    gpu_memory_utilization: float = 0.6
    generate_timeout_s: float = 1800.0  # a worker silent this long in one generate call is replaced
    max_engine_restarts: int = 3  # dead or hung engines a run may replace before it stops


@dataclass
class LearnerSettings:
    world_size: int = 1
    micro_batch_size: int = 16
    lr: float = 5e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    gradient_checkpointing: bool = False
    logprob_chunk_size: int = 512
    sync_transport: str = "collective"
    sync_bucket_mb: int = 256
    # OpenMP threads per rank on CPU; 0: one per CPU it asks for (cluster.cpus_per_learner, at least 1). The
    # engines idle while the learner trains, so a one-machine run can give the learner every core
    threads_per_rank: int = 0
    zero_stage: int = 3  # 3 shards everything over the ranks; 0-2 keep full parameters per rank (see docs/learner.md)
    call_timeout_s: float = 3600.0  # a learner call (a step, a sync, a checkpoint) taking longer fails the run


@dataclass
class RewardConfig:
    """`grader`: "module:function", called as grader(response_text, gold) -> RewardOutcome in the pool's
    worker processes (each with `memory_limit_mb` MiB and a `timeout_s` deadline per sample)."""

    grader: str = "cppo_rl.rewards.math_grader:grade_boxed"
    num_workers: int = 1
    timeout_s: float = 10.0
    memory_limit_mb: int = 2048


@dataclass
class ClusterConfig:
    """`address`: a Ray cluster to join (or $RAY_ADDRESS); null starts a local one with `num_cpus`."""

    address: str | None = None
    num_cpus: int = 2
    num_gpus: int = 0  # in the whole cluster; > 0 runs engines and learner ranks on GPUs
    num_nodes: int = 1  # for the preflight plan (python -m cppo_rl.plan): num_gpus / num_nodes per node
    gpu_memory_gib: float = 80.0  # per GPU, for the preflight plan
    cpus_per_engine: float = 0.5
    cpus_per_learner: float = 0.5
    placement_strategy: str = "PACK"  # of the placement group holding every engine and learner rank
    # custom Ray resources each engine / learner rank also asks for, e.g. {rollout: 1}: they put engines and
    # ranks on the nodes started with those resources (ray start --resources='{"rollout": 8}'); set them with
    # +cluster.engine_resources={rollout: 1} (the + because the key is new to the empty dict)
    engine_resources: dict[str, float] = field(default_factory=dict)
    learner_resources: dict[str, float] = field(default_factory=dict)


@dataclass
class LoggingConfig:
    project: str = "cppo_rl"
    entity: str | None = None
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = "auto"  # auto: online when WANDB_API_KEY is set, else offline; or online / offline / disabled


@dataclass
class TrainerConfig:
    """The run: `output_dir/run_name` is its directory (Hydra's run dir); `resume`: "never", "auto" (the
    latest complete checkpoint of this run directory, if any) or a checkpoint / run directory path."""

    total_steps: int = 100
    prompts_per_step: int = 8
    samples_per_prompt: int = 8
    minibatch_prompts: int = 8
    eval_every: int = 25  # 0 = only before and after training
    checkpoint_every: int = 0  # 0 = only at the end (and on SIGINT / SIGTERM)
    keep_checkpoints: int = 2  # newest complete checkpoints kept; 0 = all
    output_dir: str = "runs"
    run_name: str = "run"
    resume: str = "never"
    seed: int = 0
    progress_bar: bool = True  # a live bar on a terminal; one plain line per step otherwise
    max_restarts: int = 0  # times the run starts again from its latest checkpoint after an actor dies or hangs
    max_skipped_steps: int = 3  # stop after this many steps in a row with every update skipped (non-finite); 0 = never


@dataclass
class TrainConfig:
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerSettings = field(default_factory=LearnerSettings)
    reward: RewardConfig = field(default_factory=RewardConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    experiment: str | None = None


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the keys and the fix."""


def validate(config: TrainConfig) -> None:
    """Cross-field checks; raises ConfigError listing every problem found."""
    from cppo_rl.algorithms import POLICY_LOSSES

    problems = []
    t, a, r, lrn, c = config.trainer, config.algorithm, config.rollout, config.learner, config.cluster
    for key, value in (
        ("trainer.total_steps", t.total_steps),
        ("trainer.prompts_per_step", t.prompts_per_step),
        ("trainer.samples_per_prompt", t.samples_per_prompt),
        ("trainer.minibatch_prompts", t.minibatch_prompts),
        ("rollout.num_engines", r.num_engines),
        ("rollout.max_response_length", r.max_response_length),
        ("learner.world_size", lrn.world_size),
        ("learner.micro_batch_size", lrn.micro_batch_size),
    ):
        if value < 1:
            problems.append(f"{key}={value} must be >= 1")
    for key, value in (
        ("trainer.eval_every", t.eval_every),
        ("trainer.checkpoint_every", t.checkpoint_every),
        ("trainer.keep_checkpoints", t.keep_checkpoints),
        ("trainer.max_skipped_steps", t.max_skipped_steps),
        ("trainer.max_restarts", t.max_restarts),
        ("rollout.max_engine_restarts", r.max_engine_restarts),
        ("learner.threads_per_rank", lrn.threads_per_rank),
    ):
        if value < 0:
            problems.append(f"{key}={value} must be >= 0 (0 turns it off)")
    for key, seconds in (
        ("rollout.generate_timeout_s", r.generate_timeout_s),
        ("learner.call_timeout_s", lrn.call_timeout_s),
    ):
        if seconds <= 0:
            problems.append(f"{key}={seconds} must be > 0 (seconds)")
    if t.resume not in ("never", "auto") and not Path(t.resume).exists():
        problems.append(f"trainer.resume={t.resume!r} is neither never, auto nor an existing checkpoint/run directory")
    for key, resources in (
        ("cluster.engine_resources", c.engine_resources),
        ("cluster.learner_resources", c.learner_resources),
    ):
        bad = {name: amount for name, amount in resources.items() if amount <= 0 or name in ("CPU", "GPU")}
        if bad:
            problems.append(
                f"{key}={bad}: custom resources need amounts > 0 (CPUs and GPUs come from cluster.cpus_per_* "
                "and rollout.tensor_parallel_size)"
            )
    if lrn.zero_stage not in (0, 1, 2, 3):
        problems.append(f"learner.zero_stage={lrn.zero_stage} must be 0, 1, 2 or 3 (DeepSpeed ZeRO stages)")
    if c.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        problems.append(
            f"cluster.placement_strategy={c.placement_strategy!r}: use PACK, SPREAD, STRICT_PACK or STRICT_SPREAD"
        )
    if a.name not in POLICY_LOSSES:
        problems.append(f"algorithm.name={a.name!r} is not a known policy loss; choose one of {sorted(POLICY_LOSSES)}")
    if t.minibatch_prompts > 0 and t.prompts_per_step % t.minibatch_prompts:
        problems.append(
            f"trainer.prompts_per_step={t.prompts_per_step} is not a multiple of trainer.minibatch_prompts="
            f"{t.minibatch_prompts}; updates per rollout = prompts_per_step / minibatch_prompts must be whole"
        )
    minibatch = t.minibatch_prompts * t.samples_per_prompt
    if lrn.world_size > 0 and lrn.micro_batch_size > 0 and minibatch % (lrn.world_size * lrn.micro_batch_size):
        problems.append(
            f"a mini-batch of {minibatch} responses (trainer.minibatch_prompts x trainer.samples_per_prompt) is not "
            f"a multiple of learner.world_size x learner.micro_batch_size = {lrn.world_size * lrn.micro_batch_size}"
        )
    if r.max_response_length >= r.max_model_len:
        problems.append(
            f"rollout.max_response_length={r.max_response_length} must be below rollout.max_model_len="
            f"{r.max_model_len} (the prompt needs room); raise max_model_len"
        )
    if a.position_horizon not in ("max_response_length", "sequence", "padded"):
        problems.append(f"algorithm.position_horizon={a.position_horizon!r}: use max_response_length/sequence/padded")
    if c.address is None and not os.environ.get("RAY_ADDRESS") and c.num_gpus == 0:
        wanted = r.num_engines * c.cpus_per_engine + lrn.world_size * c.cpus_per_learner
        if wanted > c.num_cpus:
            problems.append(
                f"{r.num_engines} engines x cluster.cpus_per_engine={c.cpus_per_engine} + {lrn.world_size} learner "
                f"ranks x cluster.cpus_per_learner={c.cpus_per_learner} = {wanted} CPUs > cluster.num_cpus={c.num_cpus}"
            )
    if "{prompt}" not in config.data.prompt_template:
        problems.append("data.prompt_template must contain {prompt} (where the row's problem text goes)")
    if c.num_gpus and (c.num_nodes < 1 or c.num_gpus % c.num_nodes):
        problems.append(
            f"cluster.num_gpus={c.num_gpus} does not split evenly over cluster.num_nodes={c.num_nodes}; "
            "give the total GPU count of identical nodes"
        )
    grader_problem = _check_import_path(config.reward.grader)
    if grader_problem:
        problems.append(f"reward.grader={config.reward.grader!r}: {grader_problem}")
    if not config.model.path:
        problems.append("model.path is empty; set model.path=<an HF model directory or hub name>")
    elif Path(config.model.path).is_dir():
        model_problem = _check_causal_lm_dir(Path(config.model.path))
        if model_problem:
            problems.append(f"model.path={config.model.path!r}: {model_problem}")
    elif config.model.path != "tiny" and "/" not in config.model.path:
        problems.append(f"model.path={config.model.path!r} is neither 'tiny', a directory, nor a hub name")
    if c.num_gpus:
        wanted_gpus = r.num_engines * r.tensor_parallel_size + lrn.world_size
        if wanted_gpus > c.num_gpus:
            problems.append(
                f"{r.num_engines} engines x rollout.tensor_parallel_size={r.tensor_parallel_size} + {lrn.world_size} "
                f"learner ranks = {wanted_gpus} GPUs > cluster.num_gpus={c.num_gpus}; lower rollout.num_engines or "
                "learner.world_size, or give the cluster's real GPU count"
            )
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _check_causal_lm_dir(path: Path) -> str | None:
    """Why a local model directory cannot be trained here, or None (reads config.json only)."""
    import json

    config_file = path / "config.json"
    if not config_file.is_file():
        return "has no config.json: not a HF model directory (save one with save_pretrained)"
    try:
        architectures = json.loads(config_file.read_text()).get("architectures") or []
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        return f"config.json is not a JSON object ({error})"
    if not any(name.endswith("ForCausalLM") for name in architectures):
        return f"config.json's architectures {architectures} hold no *ForCausalLM: not a causal language model"
    return None


def _check_import_path(path: str) -> str | None:
    """Why "module:function" cannot be loaded, or None when it can."""
    import importlib

    module_name, _, name = path.partition(":")
    if not module_name or not name:
        return "must look like 'package.module:function'"
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        return f"cannot import {module_name!r} ({error}); is it installed or on PYTHONPATH?"
    if not callable(getattr(module, name, None)):
        return f"module {module_name!r} has no function {name!r}"
    return None
