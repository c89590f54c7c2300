"""Preflight planner: where each actor runs and how much GPU memory it needs, before any GPU is touched.

`plan(shape, layout, ...)` places the rollout engines and learner ranks on the cluster's GPUs and
estimates, per GPU, the memory of a DeepSpeed ZeRO-3 learner rank (`learner_memory`) and of a vLLM
rollout engine (`rollout_memory`); the result lists every number that does not fit with the config
key to turn. Pure Python (no torch, Ray or vLLM): it runs on a laptop. Sizes are bytes; reports
are in GiB (2**30 bytes). The formulas, their sources and assumptions are in docs/planner.md.

    python -m cppo_rl.plan experiment=qwen3_8b_base [overrides]   # a run's config, as train composes it
    python -m cppo_rl.train experiment=qwen3_8b_base --plan-only    # the same, from the train entry point
    python -m cppo_rl.plan --model qwen3_8b --nodes 1 --gpus-per-node 8 --engines 4 --learner-ranks 4 \
        --seq-len 9216 --concurrency 256    # plain numbers; each form exits 1 when the plan is infeasible
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

GIB = 1024**3
BF16 = 2  # bytes per element
FP32 = 4
CUDA_OVERHEAD_BYTES = 2 * GIB  # per learner process: CUDA context, NCCL communicators and buffers
ZERO3_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements, model dtype)
ZERO3_SUB_GROUP = 1_000_000_000  # DeepSpeed's default sub_group_size (params per fp32 grad copy at step)
ROLLOUT_RESERVE_BYTES = 2 * GIB  # inside vLLM's budget: its profiled activation peak and non-torch memory
# Outside vLLM's budget on each engine GPU: the CUDA context and NCCL communicators (vLLM's TP group, the weight-sync
# group); vLLM takes its memory snapshot after creating them, so `gpu_memory_utilization x total` excludes them
ROLLOUT_OUTSIDE_BYTES = CUDA_OVERHEAD_BYTES
DEFAULT_SYNC_BUCKET_MB = 256  # learner.sync_bucket_mb's default (cppo_rl.config.LearnerSettings)
# What an "80 GB" H100 / A100 gives CUDA (torch.cuda.get_device_properties(0).total_memory): H100 SXM 80GB
# 85,029,158,912 bytes = 79.19 GiB, A100 80GB 85,198,045,184 bytes = 79.35 GiB; rounded down. The default of
# cluster.gpu_memory_gib (cppo_rl.config.ClusterConfig, the same number, checked by a test) and of --gpu-gib.
GPU_80GB_USABLE_GIB = 79.1
TIGHT_FRACTION = 0.9  # a learner above this share of its GPU is flagged: fragmentation is not modelled


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Qwen3 (dense) or Qwen3-MoE decoder; the MoE fields are 0 for a dense model."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    max_position_embeddings: int = 0  # the model's context (config.json); 0 = unknown, not checked

    @classmethod
    def from_hf_config(cls, config: dict) -> ModelShape:
        """The shape of a HF `config.json` dict (Qwen3 / Qwen3-MoE keys)."""
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [key for key in required if key not in config]
        if missing:
            raise ValueError(f"ModelShape.from_hf_config: the config lacks {missing}")
        if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
            raise ValueError("ModelShape.from_hf_config: mixed dense/MoE layers are not modelled")
        heads = config["num_attention_heads"]
        return cls(
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            intermediate_size=config.get("intermediate_size", 0),
            vocab_size=config["vocab_size"],
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            num_experts=config.get("num_experts") or 0,
            experts_per_token=config.get("num_experts_per_tok") or 0,
            moe_intermediate_size=config.get("moe_intermediate_size") or 0,
            max_position_embeddings=config.get("max_position_embeddings") or 0,
        )

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_parameters(self, active: bool = False) -> int:
        """One decoder layer: q/k/v/o (no bias), q_norm + k_norm, 2 RMSNorms, the MLP (or router + experts)."""
        h = self.hidden_size
        attention = 2 * h * self.q_dim + 2 * h * self.kv_dim + 2 * self.head_dim
        if self.num_experts:
            experts = self.experts_per_token if active else self.num_experts
            mlp = h * self.num_experts + experts * 3 * h * self.moe_intermediate_size
        else:
            mlp = 3 * h * self.intermediate_size
        return attention + mlp + 2 * h

    def num_parameters(self, active: bool = False) -> int:
        """Distinct parameters: embeddings, layers, final norm, and lm_head unless tied."""
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        return embeddings + self.num_layers * self.layer_parameters(active) + self.hidden_size

    def active_parameters(self) -> int:
        """Parameters one token passes through (the routed experts only); = num_parameters() if dense."""
        return self.num_parameters(active=True)

    def largest_tensor_parameters(self) -> int:
        """Parameters of the largest single tensor the learner sends: the embedding (or lm_head), a projection, or a
        MoE layer's fused gate/up experts (transformers 5 keeps each layer's experts in 3-D tensors)."""
        h = self.hidden_size
        tensors = [self.vocab_size * h, self.q_dim * h]
        if self.num_experts:
            tensors.append(self.num_experts * 2 * self.moe_intermediate_size * h)
        else:
            tensors.append(self.intermediate_size * h)
        return max(tensors)

    def largest_module_parameters(self) -> int:
        """Parameters of the largest module vLLM loads as one unit: the embedding (or lm_head), a layer's fused
        q/k/v or gate/up projection, or a MoE layer's experts (all of them, one FusedMoE module)."""
        h = self.hidden_size
        modules = [self.vocab_size * h, h * (self.q_dim + 2 * self.kv_dim), self.q_dim * h]
        if self.num_experts:
            modules += [self.num_experts * 3 * h * self.moe_intermediate_size, h * self.num_experts]
        else:
            modules += [2 * h * self.intermediate_size]
        return max(modules)


# The sizes and max_position_embeddings of the public config.json files on the Hub (Qwen/<name>/config.json): the
# post-trained models say 40960 (32k native context + room for the reasoning budget), the -Base models 32768 (their
# pre-training length). Same architecture otherwise, so a -Base preset is its post-trained one with that context.
PRESETS = {
    "qwen3_1_7b": ModelShape(2048, 28, 16, 8, 128, 6144, 151936, tie_embeddings=True, max_position_embeddings=40960),
    "qwen3_8b": ModelShape(4096, 36, 32, 8, 128, 12288, 151936, tie_embeddings=False, max_position_embeddings=40960),
    "qwen3_30b_a3b": ModelShape(
        2048, 48, 32, 4, 128, 6144, 151936, tie_embeddings=False,
        num_experts=128, experts_per_token=8, moe_intermediate_size=768, max_position_embeddings=40960,
    ),
}  # fmt: skip
PRESETS.update({f"{key}_base": replace(shape, max_position_embeddings=32768) for key, shape in list(PRESETS.items())})


def load_shape(model: str) -> ModelShape:
    """A preset key or hub name ("qwen3_8b", "Qwen/Qwen3-8B-Base"), a config.json, or a model directory."""
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return ModelShape.from_hf_config(json.loads(path.read_text()))
    key = model.rsplit("/", 1)[-1].lower().replace("-", "_").replace(".", "_")
    if key not in PRESETS:
        raise ValueError(f"model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json / directory")
    return PRESETS[key]


@dataclass(frozen=True)
class Placement:
    """(node, gpu) indices: one list per rollout engine (its TP group), one entry per learner rank."""

    engines: list[list[tuple[int, int]]]
    learners: list[tuple[int, int]]


class PlanError(ValueError):
    """A layout that cannot be placed; the message names the numbers."""


@dataclass(frozen=True)
class ClusterLayout:
    """Nodes x GPUs (each `gpu_memory_gib` GiB), `num_engines` engines of `tensor_parallel_size` GPUs, and
    `learner_ranks` ranks of one GPU; engines and ranks never share a GPU."""

    num_nodes: int
    gpus_per_node: int
    gpu_memory_gib: float
    num_engines: int
    tensor_parallel_size: int
    learner_ranks: int

    def __post_init__(self) -> None:
        small = {name: value for name, value in vars(self).items() if not value > 0}
        if small:
            raise ValueError(f"ClusterLayout: every size must be > 0, got {small}")

    def placement(self) -> Placement:
        """Engines first, packed node by node (an engine's GPUs on one node), then learner ranks on the GPUs left."""
        tp, per_node, nodes = self.tensor_parallel_size, self.gpus_per_node, self.num_nodes
        if tp > per_node:
            raise PlanError(
                f"rollout.tensor_parallel_size={tp} > {per_node} GPUs per node: an engine's GPUs must share a "
                "node (one Ray bundle); lower rollout.tensor_parallel_size"
            )
        engines_per_node = per_node // tp
        if self.num_engines > engines_per_node * nodes:
            raise PlanError(
                f"{self.num_engines} engines x TP {tp} do not fit: {nodes} node(s) x {per_node} GPUs hold "
                f"{engines_per_node * nodes} such engines; lower rollout.num_engines or add nodes"
            )
        engines = [
            [(e // engines_per_node, (e % engines_per_node) * tp + i) for i in range(tp)]
            for e in range(self.num_engines)
        ]
        taken = {gpu for engine in engines for gpu in engine}
        free = [(n, g) for n in range(nodes) for g in range(per_node) if (n, g) not in taken]
        if self.learner_ranks > len(free):
            raise PlanError(
                f"{self.num_engines} engines x TP {tp} + {self.learner_ranks} learner ranks need "
                f"{self.num_engines * tp + self.learner_ranks} GPUs > {nodes} node(s) x {per_node} GPUs = "
                f"{nodes * per_node} ({len(free)} left for learners); lower learner.world_size, "
                "rollout.num_engines or rollout.tensor_parallel_size, or add nodes"
            )
        return Placement(engines, free[: self.learner_ranks])


def layer_activation_bytes(shape: ModelShape, tokens: int) -> int:
    """Bytes one decoder layer saves for backward over `tokens` tokens (HF Qwen3 layer, bf16, flash attention).

    The method of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
    Models", §4.1 Eq. 1: sbh(34 + 5as/h) per GPT layer; flash attention drops the 5as/h scores term),
    recounted for this layer: each RMSNorm keeps an fp32 copy of its input and its bf16 normalised
    value; the q/k/v projections, MLP and router keep their bf16 inputs; attention keeps q, k, v
    (native GQA, no repeated heads) and its output; SwiGLU keeps gate, up, silu(gate) and their
    product; MoE keeps fp32 router probabilities and, per routed copy of a token, its input, the
    SwiGLU tensors and its weighted output. No dropout.
    """
    h, q, kv = shape.hidden_size, shape.q_dim, shape.kv_dim
    norms = 2 * (FP32 * h + BF16 * h)  # input_layernorm, post_attention_layernorm
    qk_norms = (FP32 + BF16) * (q + kv)
    attention = BF16 * (h + q + 2 * kv + q)  # q/k/v input, q, k, v, attention output
    if shape.num_experts:
        routed = BF16 * (2 * h + 4 * shape.moe_intermediate_size)
        mlp = BF16 * h + FP32 * shape.num_experts + shape.experts_per_token * routed
    else:
        mlp = BF16 * (h + 4 * shape.intermediate_size)
    return tokens * (norms + qk_norms + attention + mlp)


def learner_memory(
    shape: ModelShape,
    world_size: int,
    micro_batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool,
    chunk_size: int,
    param_bytes: int = BF16,
    zero_stage: int = 3,
    max_tokens_per_micro_batch: int = 0,
) -> dict[str, int]:
    """Bytes per GPU of one learner rank (bf16 params, AdamW), by line; see LEARNER_LINES. Every micro-batch
    is taken at the full `seq_len` (prompt + response), or, with a token budget
    (`learner.max_tokens_per_micro_batch`), at that many tokens, the most one forward computes (the learner
    plans its micro-batches so); the lines are summed, an upper bound on the peak.
    ZeRO stage 3 shards parameters, gradients and optimizer state over the ranks; stage 2 gradients and
    optimizer state; stage 1 the optimizer state; stage 0 nothing."""
    params = shape.num_parameters()
    shard = math.ceil(params / world_size)
    sharded = {"params": zero_stage >= 3, "grads": zero_stage >= 2, "optimizer": zero_stage >= 1}
    per_rank = {name: shard if on else params for name, on in sharded.items()}
    tokens = max_tokens_per_micro_batch or micro_batch_size * seq_len
    vocab_block = shape.vocab_size * shape.hidden_size
    if gradient_checkpointing:
        activations = shape.num_layers * BF16 * tokens * shape.hidden_size + layer_activation_bytes(shape, tokens)
    else:
        activations = shape.num_layers * layer_activation_bytes(shape, tokens)
    return {
        "params": param_bytes * per_rank["params"],
        "grads": param_bytes * per_rank["grads"],
        "optimizer": 3 * FP32 * per_rank["optimizer"],
        "gathered": param_bytes * (2 * shape.layer_parameters() + vocab_block) if zero_stage >= 3 else 0,
        "activations": activations,
        "logprob_head": 2 * FP32 * chunk_size * shape.vocab_size + (FP32 + param_bytes) * vocab_block,
        "reduce_bucket": param_bytes * ZERO3_REDUCE_BUCKET,
        "step_fp32_grad": FP32 * min(shard, ZERO3_SUB_GROUP),
        "overhead": CUDA_OVERHEAD_BYTES,
    }


LEARNER_LINES = {
    "params": "params, bf16 ZeRO-3 shard (2P/W)",
    "grads": "grads, bf16 ZeRO-3 shard (2P/W)",
    "optimizer": "fp32 master + AdamW m, v (12P/W)",
    "gathered": "gathered: 1 layer + its grads + lm_head",
    "activations": "activations",
    "logprob_head": "logprob head: 2 chunk x V + V x H grad",
    "reduce_bucket": "ZeRO-3 reduce bucket (5e8 bf16)",
    "step_fp32_grad": "step: fp32 grad of 1 sub-group",
    "overhead": "CUDA context + NCCL",
}


@dataclass(frozen=True)
class RolloutMemory:
    """Bytes per GPU of one vLLM engine; the KV cache gets what the utilisation budget leaves. Outside that budget
    (`outside_capacity`, (1 - gpu_memory_utilization) x GPU): the CUDA context and NCCL (`overhead`) and the
    weight sync's receive buffers (`sync_receive`)."""

    weights: int
    reserve: int
    kv_budget: int
    kv_per_sequence: int  # one sequence of the full horizon
    concurrency: int
    sync_receive: int = 0
    overhead: int = ROLLOUT_OUTSIDE_BYTES
    outside_capacity: int = 0

    @property
    def outside_needed(self) -> int:
        return self.overhead + self.sync_receive

    @property
    def kv_needed(self) -> int:
        return self.kv_per_sequence * self.concurrency

    @property
    def max_sequences(self) -> int:
        """Full-horizon sequences the KV budget holds at once."""
        return max(0, self.kv_budget) // self.kv_per_sequence


def kv_heads_per_gpu(shape: ModelShape, tensor_parallel_size: int) -> int:
    """KV heads each TP rank stores (vLLM replicates them when TP exceeds their number)."""
    return math.ceil(shape.num_kv_heads / tensor_parallel_size)


def sync_receive_bytes(shape: ModelShape, tensor_parallel_size: int, sync_bucket_mb: int) -> int:
    """Peak bytes a weight sync adds on one engine GPU, outside vLLM's budget (docs/planner.md).

    The learner sends full bf16 tensors in flat buckets of `sync_bucket_mb` MiB (a tensor above that gets a bucket
    of its own), and each engine worker receives them one at a time (cppo_rl/sync/receiver.py): one bucket alive,
    max(B, 2 T) for the largest tensor T; the tensors of a module that straddles a bucket boundary, copied out of
    the freed bucket until the module is complete, less than 2 M for the largest module M; and vLLM's in-place
    reload materialising that module's shard before copying it into the live weights
    (model_loader/reload/layerwise.py), 2 M / TP."""
    bucket = max(sync_bucket_mb * 2**20, BF16 * shape.largest_tensor_parameters())
    module = BF16 * shape.largest_module_parameters()
    return bucket + module + math.ceil(module / tensor_parallel_size)


def rollout_memory(
    shape: ModelShape,
    tensor_parallel_size: int,
    gpu_memory_gib: float,
    gpu_memory_utilization: float,
    max_num_seqs: int,
    seq_len: int,
    sync_bucket_mb: int = DEFAULT_SYNC_BUCKET_MB,
) -> RolloutMemory:
    """Weights (bf16) / TP, a fixed reserve, and the KV cache: 2 (K, V) x layers x KV heads per GPU x head_dim x
    2 bytes per token, for `max_num_seqs` sequences of `seq_len` tokens; outside the budget, the CUDA context
    and NCCL, and the weight sync's receive buffers (`sync_receive_bytes`)."""
    weights = math.ceil(BF16 * shape.num_parameters() / tensor_parallel_size)
    budget = int(gpu_memory_utilization * gpu_memory_gib * GIB)
    per_token = 2 * shape.num_layers * kv_heads_per_gpu(shape, tensor_parallel_size) * shape.head_dim * BF16
    return RolloutMemory(
        weights=weights,
        reserve=ROLLOUT_RESERVE_BYTES,
        kv_budget=budget - weights - ROLLOUT_RESERVE_BYTES,
        kv_per_sequence=per_token * seq_len,
        concurrency=max_num_seqs,
        sync_receive=sync_receive_bytes(shape, tensor_parallel_size, sync_bucket_mb),
        outside_capacity=int(gpu_memory_gib * GIB) - budget,
    )


@dataclass
class Plan:
    """The placement and per-GPU memory of a run; `problems` make it infeasible, `warnings` do not."""

    shape: ModelShape
    layout: ClusterLayout
    micro_batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    gpu_memory_utilization: float
    learner: dict[str, int]
    rollout: RolloutMemory
    placement: Placement | None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    sync_bucket_mb: int = DEFAULT_SYNC_BUCKET_MB
    max_tokens_per_micro_batch: int = 0

    @property
    def feasible(self) -> bool:
        return not self.problems

    def render(self) -> str:
        """A text report: model, placement, per-role memory table (GiB), then problems and warnings."""
        s, lay = self.shape, self.layout
        lines = [
            f"model: {s.num_parameters() / 1e9:.2f} B params ({s.active_parameters() / 1e9:.2f} B active), "
            f"{s.num_layers} layers, hidden {s.hidden_size}, vocab {s.vocab_size}",
            f"cluster: {lay.num_nodes} node(s) x {lay.gpus_per_node} GPUs x {lay.gpu_memory_gib:g} GiB; "
            f"horizon {self.seq_len} tokens",
            "placement:",
            *_placement_lines(self.placement),
            "",
            f"learner rank x{lay.learner_ranks} ("
            + (
                f"token budget {self.max_tokens_per_micro_batch}"
                if self.max_tokens_per_micro_batch
                else f"micro-batch {self.micro_batch_size}"
            )
            + ", "
            f"checkpointing {'on' if self.gradient_checkpointing else 'off'}), per GPU:",
            *(f"  {LEARNER_LINES[key]:<42}{_gib(value):>9}" for key, value in self.learner.items()),
            _total_line(sum(self.learner.values()), lay.gpu_memory_gib * GIB),
            "",
            f"rollout engine x{lay.num_engines} (TP {lay.tensor_parallel_size}), per GPU:",
            *_rollout_lines(
                self.rollout, self.gpu_memory_utilization, lay.gpu_memory_gib, self.seq_len, self.sync_bucket_mb
            ),
            "",
            "FEASIBLE" if self.feasible else "INFEASIBLE",
            *(f"  problem: {p}" for p in self.problems),
            *(f"  warning: {w}" for w in self.warnings),
        ]
        return "\n".join(lines)


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f}"


def _total_line(total: float, capacity: float) -> str:
    verdict = "ok" if total <= capacity else "DOES NOT FIT"
    return f"  {'total':<42}{_gib(total):>9} of {_gib(capacity)} GiB  {verdict}"


def _placement_lines(placement: Placement | None) -> list[str]:
    if placement is None:
        return ["  (not placeable, see problems)"]
    lines = [
        f"  engine {e}: node {gpus[0][0]} GPU(s) {','.join(str(g) for _, g in gpus)}"
        for e, gpus in enumerate(placement.engines)
    ]
    for node in sorted({n for n, _ in placement.learners}):
        ranks = [r for r, (n, _) in enumerate(placement.learners) if n == node]
        gpus = [g for n, g in placement.learners if n == node]
        named = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
        lines.append(f"  learner {named}: node {node} GPU(s) {','.join(map(str, gpus))}")
    return lines


def _rollout_lines(r: RolloutMemory, utilization: float, gpu_gib: float, seq_len: int, bucket_mb: int) -> list[str]:
    outside = "ok" if r.outside_needed <= r.outside_capacity else "DOES NOT FIT"
    return [
        f"  {'weights, bf16 / TP':<42}{_gib(r.weights):>9}",
        f"  {'reserve: activation peak, non-torch':<42}{_gib(r.reserve):>9}",
        f"  {f'KV cache budget ({utilization:g} x {gpu_gib:g} GiB - above)':<42}{_gib(r.kv_budget):>9}",
        f"  {f'KV cache for {r.concurrency} seqs x {seq_len} tokens':<42}{_gib(r.kv_needed):>9}"
        f"  (holds {r.max_sequences} full-horizon sequences)",
        f"  outside the budget ({1 - utilization:.2g} x {gpu_gib:g} GiB):",
        f"  {'  CUDA context + NCCL':<42}{_gib(r.overhead):>9}",
        f"  {f'  weight-sync receive ({bucket_mb} MiB buckets)':<42}{_gib(r.sync_receive):>9}",
        f"  {'  total':<42}{_gib(r.outside_needed):>9} of {_gib(r.outside_capacity)} GiB  {outside}",
    ]


def plan(
    shape: ModelShape,
    layout: ClusterLayout,
    *,
    micro_batch_size: int,
    seq_len: int,
    concurrency: int,
    gradient_checkpointing: bool = True,
    logprob_chunk_size: int = 512,
    gpu_memory_utilization: float = 0.9,
    zero_stage: int = 3,
    sync_bucket_mb: int = DEFAULT_SYNC_BUCKET_MB,
    max_tokens_per_micro_batch: int = 0,
) -> Plan:
    """Place and size a run. `seq_len`: prompt + response tokens (rollout.max_model_len); `concurrency`:
    sequences in flight per engine (responses per step / engines, at most vLLM's max_num_seqs);
    `sync_bucket_mb`: learner.sync_bucket_mb; `max_tokens_per_micro_batch`: the learner's token budget (0:
    micro-batches of `micro_batch_size` responses)."""
    problems: list[str] = []
    if not 0 < gpu_memory_utilization <= 1:
        problems.append(
            f"rollout.gpu_memory_utilization={gpu_memory_utilization:g} must lie in (0, 1]: it is the share of each "
            "engine GPU that vLLM takes for weights, activations and KV cache"
        )
    context = shape.max_position_embeddings
    if context and seq_len > context:
        problems.append(
            f"rollout.max_model_len={seq_len} exceeds the model's context of {context} tokens (max_position_embeddings "
            "in its config.json); lower rollout.max_model_len (and rollout.max_response_length)"
        )
    try:
        placement = layout.placement()
    except PlanError as error:
        placement = None
        problems.append(str(error))
    learner = learner_memory(
        shape,
        layout.learner_ranks,
        micro_batch_size,
        seq_len,
        gradient_checkpointing,
        logprob_chunk_size,
        zero_stage=zero_stage,
        max_tokens_per_micro_batch=max_tokens_per_micro_batch,
    )
    rollout = rollout_memory(
        shape,
        layout.tensor_parallel_size,
        layout.gpu_memory_gib,
        gpu_memory_utilization,
        concurrency,
        seq_len,
        sync_bucket_mb,
    )
    result = Plan(
        shape, layout, micro_batch_size, seq_len, gradient_checkpointing, gpu_memory_utilization,
        learner, rollout, placement, problems, sync_bucket_mb=sync_bucket_mb,
        max_tokens_per_micro_batch=max_tokens_per_micro_batch,
    )  # fmt: skip
    _check_learner(result)
    _check_rollout(result)
    return result


def _check_learner(p: Plan) -> None:
    total, capacity = sum(p.learner.values()), p.layout.gpu_memory_gib * GIB
    if total <= capacity:
        if total > TIGHT_FRACTION * capacity:
            p.warnings.append(
                f"learner rank at {total / capacity:.0%} of its GPU ({_gib(total)} GiB): allocator fragmentation is "
                "not modelled; leave headroom (raise learner.world_size)"
            )
        return
    states = p.learner["params"] + p.learner["grads"] + p.learner["optimizer"]
    rest = total - states  # what sharding over more ranks does not shrink (taken as fixed: an upper bound)
    knobs = []
    if rest < capacity:
        ranks = math.ceil(16 * p.shape.num_parameters() / (capacity - rest))
        knobs.append(
            f"raise learner.world_size to at least {ranks} (ZeRO-3 shards 16 bytes/param: {_gib(states)} GiB "
            f"per rank at {p.layout.learner_ranks})"
        )
    if not p.gradient_checkpointing:
        knobs.append("set learner.gradient_checkpointing=true")
    if p.max_tokens_per_micro_batch > p.seq_len:
        knobs.append(f"lower learner.max_tokens_per_micro_batch (to rollout.max_model_len={p.seq_len} at least)")
    elif not p.max_tokens_per_micro_batch and p.micro_batch_size > 1:
        knobs.append("lower learner.micro_batch_size")
    if not knobs:
        knobs.append("lower rollout.max_model_len or learner.logprob_chunk_size")
    p.problems.append(
        f"learner rank needs {_gib(total)} GiB > {p.layout.gpu_memory_gib:g} GiB per GPU: " + ", or ".join(knobs)
    )


def _check_rollout(p: Plan) -> None:
    r, tp = p.rollout, p.layout.tensor_parallel_size
    if p.shape.num_heads % tp or (p.shape.num_kv_heads % tp and tp % p.shape.num_kv_heads):
        p.problems.append(
            f"rollout.tensor_parallel_size={tp} must divide the {p.shape.num_heads} attention heads and divide "
            f"or be a multiple of the {p.shape.num_kv_heads} KV heads"
        )
    if not 0 < p.gpu_memory_utilization <= 1:
        return  # refused in plan(); the budget below means nothing
    budget = p.gpu_memory_utilization * p.layout.gpu_memory_gib
    if r.max_sequences == 0:
        p.problems.append(
            f"rollout engine: weights {_gib(r.weights)} GiB + reserve {_gib(r.reserve)} GiB leave "
            f"{_gib(max(0, r.kv_budget))} GiB of the {budget:.1f} GiB budget "
            f"(rollout.gpu_memory_utilization={p.gpu_memory_utilization:g}) for the KV cache, less than one "
            f"{p.seq_len}-token sequence ({_gib(r.kv_per_sequence)} GiB): raise rollout.tensor_parallel_size or "
            "rollout.gpu_memory_utilization, or lower rollout.max_model_len"
        )
    elif r.max_sequences < r.concurrency:
        p.warnings.append(
            f"rollout KV cache ({_gib(r.kv_budget)} GiB per GPU) holds {r.max_sequences} full-horizon sequences "
            f"of the {r.concurrency} in flight per engine; vLLM pages and preempts beyond that (fine while most "
            "responses stop early); raise rollout.num_engines or rollout.tensor_parallel_size to hold them all"
        )

    if r.outside_needed > r.outside_capacity:
        p.problems.append(
            f"rollout engine: the weight sync's receive buffers ({_gib(r.sync_receive)} GiB: "
            f"learner.sync_bucket_mb={p.sync_bucket_mb} MiB buckets and one module's copy) and the CUDA context + "
            f"NCCL ({_gib(r.overhead)} GiB) live outside vLLM's budget and need {_gib(r.outside_needed)} GiB > the "
            f"{_gib(r.outside_capacity)} GiB that rollout.gpu_memory_utilization={p.gpu_memory_utilization:g} leaves "
            f"of {p.layout.gpu_memory_gib:g} GiB; lower rollout.gpu_memory_utilization or learner.sync_bucket_mb"
        )


def _positive(kind: type) -> object:
    """An argparse type: a number of `kind` > 0."""

    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def plan_config(config: object) -> Plan:
    """The plan of a training run's `cppo_rl.config.TrainConfig` on its GPU cluster (`cluster.num_gpus`
    over `cluster.num_nodes`, `cluster.gpu_memory_gib` each); raises PlanError for a CPU run."""
    c, r, t, lrn = config.cluster, config.rollout, config.trainer, config.learner
    if c.num_gpus < 1:
        raise PlanError("cluster.num_gpus=0: a CPU run has no GPU memory to plan; set cluster.num_gpus")
    layout = ClusterLayout(
        c.num_nodes, c.num_gpus // c.num_nodes, c.gpu_memory_gib, r.num_engines, r.tensor_parallel_size, lrn.world_size
    )
    return plan(
        load_shape(config.model.path),
        layout,
        micro_batch_size=lrn.micro_batch_size,
        seq_len=r.max_model_len,
        concurrency=math.ceil(t.responses_per_step / r.num_engines),
        gradient_checkpointing=lrn.gradient_checkpointing,
        logprob_chunk_size=lrn.logprob_chunk_size,
        zero_stage=lrn.zero_stage,
        gpu_memory_utilization=r.gpu_memory_utilization,
        sync_bucket_mb=lrn.sync_bucket_mb,
        max_tokens_per_micro_batch=lrn.max_tokens_per_micro_batch,
    )


def main_overrides(overrides: list[str]) -> int:
    """`python -m cppo_rl.plan experiment=qwen3_8b_base ...`: compose the run's config as train does, plan it
    (status 2 when the config is refused)."""
    from cppo_rl.config import ConfigError, validate
    from cppo_rl.preflight import compose

    try:
        config, _ = compose(overrides)
        validate(config)
    except ConfigError as error:
        print(f"refused: {error}", file=sys.stderr)
        return 2
    result = plan_config(config)
    print(result.render())
    return 0 if result.feasible else 1


def main(argv: list[str] | None = None) -> int:
    """CLI: print the plan; exit 0 when feasible, 1 when not (2 on bad arguments). Arguments that are all
    Hydra overrides (key=value) plan a run's config instead of the flags."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and all("=" in a and not a.startswith("-") for a in argv):
        return main_overrides([a.removeprefix("+") if a.startswith("+experiment=") else a for a in argv])
    parser = argparse.ArgumentParser(prog="python -m cppo_rl.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help=f"a preset ({', '.join(PRESETS)}), config.json or directory")
    parser.add_argument("--nodes", type=_positive(int), default=1)
    parser.add_argument("--gpus-per-node", type=_positive(int), default=8)
    parser.add_argument(
        "--gpu-gib",
        type=_positive(float),
        default=GPU_80GB_USABLE_GIB,
        help=f"memory per GPU, GiB, as CUDA reports it (default {GPU_80GB_USABLE_GIB}: an 80 GB H100 / A100)",
    )
    parser.add_argument("--engines", type=_positive(int), default=1, help="rollout engines")
    parser.add_argument("--tp", type=_positive(int), default=1, help="tensor-parallel GPUs per engine")
    parser.add_argument("--learner-ranks", type=_positive(int), default=1, help="ZeRO-3 ranks, one GPU each")
    parser.add_argument("--micro-batch", type=_positive(int), default=1, help="responses per learner micro-batch")
    parser.add_argument("--seq-len", type=_positive(int), required=True, help="prompt + response tokens")
    parser.add_argument("--concurrency", type=_positive(int), default=256, help="sequences in flight per engine")
    parser.add_argument("--chunk-size", type=_positive(int), default=512, help="learner.logprob_chunk_size")
    parser.add_argument("--gpu-memory-utilization", type=_positive(float), default=0.9, help="vLLM's GPU share")
    parser.add_argument("--sync-bucket-mb", type=_positive(int), default=DEFAULT_SYNC_BUCKET_MB, help="MiB per bucket")
    parser.add_argument("--no-checkpointing", action="store_true", help="learner without activation checkpointing")
    args = parser.parse_args(argv)
    if args.gpu_memory_utilization > 1:
        parser.error(f"--gpu-memory-utilization must be at most 1, got {args.gpu_memory_utilization}")
    try:
        shape = load_shape(args.model)
    except ValueError as error:
        parser.error(str(error))
    layout = ClusterLayout(args.nodes, args.gpus_per_node, args.gpu_gib, args.engines, args.tp, args.learner_ranks)
    result = plan(
        shape,
        layout,
        micro_batch_size=args.micro_batch,
        seq_len=args.seq_len,
        concurrency=args.concurrency,
        gradient_checkpointing=not args.no_checkpointing,
        logprob_chunk_size=args.chunk_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        sync_bucket_mb=args.sync_bucket_mb,
    )
    print(result.render())
    return 0 if result.feasible else 1


if __name__ == "__main__":
    sys.exit(main())
