"""Exporting the learner's ZeRO-3 weights: full parameters on rank 0, the bucket plan of a weight sync,
and the bucketed broadcast to the rollout engines (the receiving side is cppo_rl/sync/)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cppo_rl.sync.buckets import BucketPlan, plan_buckets


def gather_weights(module: torch.nn.Module, rank: int, names: Sequence[str] | None = None):
    """Full (unpartitioned) parameters by HF name, on rank 0 (host memory); [] on other ranks. Every rank
    must call (each parameter's gather is a ZeRO-3 collective)."""
    import deepspeed

    wanted = set(names) if names is not None else None
    gathered = []
    for name, parameter in module.named_parameters():
        if wanted is not None and name not in wanted:
            continue
        with deepspeed.zero.GatheredParameters([parameter], modifier_rank=None):
            if rank == 0:
                gathered.append((name, parameter.detach().clone().cpu()))
    return gathered


def weight_plan(module: torch.nn.Module, budget_bytes: int) -> BucketPlan:
    """The bucket plan of a weight sync: every parameter, full (unpartitioned) shapes, HF names."""
    specs = [(name, tuple(getattr(p, "ds_shape", p.shape)), p.dtype) for name, p in module.named_parameters()]
    return plan_buckets(specs, budget_bytes)


def broadcast_weights(module: torch.nn.Module, rank: int, group, plan: BucketPlan, device: torch.device) -> None:
    """Every rank: gather each bucket's parameters (ZeRO-3 collective); rank 0 packs it into one flat
    buffer on `device` and broadcasts it over the weight-sync `group` with one collective.

    If a broadcast fails (a rollout worker died; gloo raises, at the latest after the sync group's
    timeout), rank 0 still takes part in the remaining gathers, so the other ranks are not left waiting
    in one, and raises at the end. On NCCL a broadcast whose peer is gone does not raise here: the
    group's watchdog aborts it after the timeout and tears this process down (docs/reliability.md)."""
    import deepspeed

    parameters = dict(module.named_parameters())
    failure = None
    for bucket in plan.buckets:
        members = [parameters[slot.name] for slot in bucket.slots]
        with deepspeed.zero.GatheredParameters(members, modifier_rank=None):
            if rank == 0 and failure is None:
                flat = bucket.pack([p.detach() for p in members], device)
                try:
                    group.broadcast(flat, 0).wait()
                except RuntimeError as error:  # gloo: a peer is gone or the group's timeout passed
                    failure = error
                del flat  # one bucket's buffer at a time
    if failure is not None:
        raise RuntimeError(f"weight sync broadcast failed: {failure}") from failure
