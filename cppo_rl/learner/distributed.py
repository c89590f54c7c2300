"""The learner's process group: rendezvous address, environment, backend and dtype per device.

Every learner rank is one Ray actor with at most one GPU (Ray sets CUDA_VISIBLE_DEVICES to it, so its
local rank is 0 on GPU). The ranks form torch.distributed's default group through DeepSpeed:
`deepspeed.init_distributed(dist_backend=...)` (deepspeed/comm/comm.py, 0.19.8) reads MASTER_ADDR,
MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK from the environment.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path


def free_address() -> tuple[str, int]:
    """This node's IP and a free TCP port: a rendezvous address hosted by the calling process."""
    import ray

    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def backend_for(requested: str, on_gpu: bool) -> str:
    """`learner.backend`: "auto" is nccl on GPU and gloo on CPU."""
    return requested if requested != "auto" else ("nccl" if on_gpu else "gloo")


def dtype_for(requested: str, on_gpu: bool) -> str:
    """`learner.dtype`: "auto" is bfloat16 on GPU and float32 on CPU."""
    return requested if requested != "auto" else ("bfloat16" if on_gpu else "float32")


def attn_implementation_for(
    requested: str, on_gpu: bool, flash_attn_installed: bool | None = None, share_prompts: bool = False
) -> str:
    """`learner.attn_implementation`: with `share_prompts` (auto or sdpa requested: LearnerConfig refuses others)
    the shared-prompt attention (`shared_prefix.SHARED_PREFIX_ATTENTION`, built on SDPA, which flash attention
    cannot replace); otherwise "auto" is flash_attention_2 on GPU when the flash-attn package is installed, sdpa
    otherwise (what transformers picks when given none: PreTrainedModel.get_correct_attn_implementation,
    transformers 5.19, never picks flash attention by itself), and other values pass through.
    `flash_attn_installed`: None looks for the package (importlib.util.find_spec("flash_attn"))."""
    if share_prompts:
        from cppo_rl.learner.shared_prefix import SHARED_PREFIX_ATTENTION  # registers it with transformers

        return SHARED_PREFIX_ATTENTION
    if requested != "auto":
        return requested
    if flash_attn_installed is None:
        flash_attn_installed = importlib.util.find_spec("flash_attn") is not None
    return "flash_attention_2" if on_gpu and flash_attn_installed else "sdpa"


def router_aux_coef_for(requested: float | None, model_config) -> float:
    """`learner.router_aux_loss_coef` for a HF model config: 0 for a dense model; for an MoE, the model
    config's `router_aux_loss_coef` when `requested` is None (whatever its `output_router_logits` says:
    Qwen3-30B-A3B ships it false, which would silently drop the loss), else `requested`."""
    from cppo_rl.learner.moe import num_experts

    if num_experts(model_config) == 0:
        return 0.0
    if requested is None:
        return float(getattr(model_config, "router_aux_loss_coef", 0.0) or 0.0)
    return float(requested)


def init_process_group(master_addr: str, master_port: int, rank: int, world_size: int, backend: str, on_gpu: bool):
    """Join the learner's default process group (a collective: every rank at once)."""
    os.environ.update(
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK="0" if on_gpu else str(rank),
        LOCAL_SIZE="1" if on_gpu else str(world_size),
    )
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend)
    if not on_gpu:
        _unlink_shared_allreduce_buffer(master_addr, master_port, rank)


def _unlink_shared_allreduce_buffer(master_addr: str, master_port: int, rank: int) -> None:
    """Remove the name of this rank's /dev/shm all-reduce segment (DeepSpeed's CPU backend, 66 MB per rank).

    DeepSpeed never unlinks it, so every learner that is killed rather than closed (Ray kills actors) left
    it behind in RAM until reboot. Once every rank has mapped every other rank's segment (they do so in
    `init_distributed`; the barrier waits for all of them) the names are not needed: the memory stays
    mapped and is freed when the last rank exits.
    """
    import torch.distributed as dist

    dist.barrier()
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{master_addr}_{master_port}_{rank}"
    Path("/dev/shm", name).unlink(missing_ok=True)
