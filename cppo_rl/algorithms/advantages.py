"""Outcome advantages from per-response rewards and their prompt groups.

`rewards` is float [N] (one scalar per response); `group_index` is int [N] naming the prompt each
response answers (any integers; samples of one prompt share a value). Results are float32 [N];
broadcast over tokens by the policy losses. Every estimator has the `Advantage` signature and is
selectable by name (`get_advantage`); add one with `@register_advantage("name")`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from cppo_rl.algorithms._checks import check_floating, check_rank
from cppo_rl.algorithms.registry import Registry


class Advantage(Protocol):
    """`fn(rewards [N] float, group_index [N] int, *, std_norm) -> advantages [N] float32` (detached)."""

    def __call__(self, rewards: torch.Tensor, group_index: torch.Tensor, *, std_norm: bool = False) -> torch.Tensor: ...


ADVANTAGES: Registry[Advantage] = Registry("advantage estimator")
register_advantage = ADVANTAGES.register
get_advantage = ADVANTAGES.get


def _check_rewards(rewards: torch.Tensor, group_index: torch.Tensor, caller: str) -> None:
    check_floating("rewards", rewards, caller)
    check_rank("rewards", rewards, 1, "[N]", caller)
    if not isinstance(group_index, torch.Tensor) or group_index.dtype not in (torch.int32, torch.int64):
        got = group_index.dtype if isinstance(group_index, torch.Tensor) else type(group_index).__name__
        raise TypeError(f"{caller}: `group_index` must be an int64 tensor [N], got {got}")
    if tuple(group_index.shape) != tuple(rewards.shape):
        raise ValueError(
            f"{caller}: `group_index` has shape {tuple(group_index.shape)} but `rewards` has shape "
            f"{tuple(rewards.shape)}; give one group id per response"
        )
    if not torch.isfinite(rewards).all():
        raise ValueError(f"{caller}: `rewards` contains NaN or inf; score failed responses 0 instead")


def _group_sums(values: torch.Tensor, group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-response (sum over its group, size of its group), both [N]."""
    _, dense = torch.unique(group_index, return_inverse=True)
    groups = int(dense.max()) + 1 if dense.numel() else 0
    sums = torch.zeros(groups, dtype=values.dtype).index_add_(0, dense, values)
    sizes = torch.zeros(groups, dtype=values.dtype).index_add_(0, dense, torch.ones_like(values))
    return sums[dense], sizes[dense]


def _group_centred(
    rewards: torch.Tensor, group_index: torch.Tensor, std_norm: bool, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 `r_i - mean_group(r)`, divided by the group's unbiased std + eps if `std_norm`; group sizes. Both [N]."""
    values = rewards.detach().double()
    sums, sizes = _group_sums(values, group_index)
    centred = values - sums / sizes
    if std_norm:
        squares, _ = _group_sums(centred**2, group_index)
        centred = centred / ((squares / (sizes - 1).clamp_min(1)).sqrt() + eps)
    return centred, sizes


@register_advantage("grpo")
def grpo_advantages(
    rewards: torch.Tensor, group_index: torch.Tensor, *, std_norm: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO group-relative advantage `r_i - mean_group(r)`, divided by the group's std + eps if `std_norm`.

    The std is the unbiased one (as GRPO implementations use); a group of one response, or one whose
    rewards are all equal, gets advantage 0.
    """
    _check_rewards(rewards, group_index, "grpo_advantages")
    return _group_centred(rewards, group_index, std_norm, eps)[0].float()


@register_advantage("rloo")
def rloo_advantages(
    rewards: torch.Tensor, group_index: torch.Tensor, *, std_norm: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """RLOO (leave-one-out) advantage `r_i - mean_{j != i in group}(r_j)`; 0 for a group of one.

    Equal to `n / (n - 1)` times GRPO's in a group of n; `std_norm` divides by the same group std + eps
    as GRPO's, so `rloo = n / (n - 1) * grpo` holds in both modes.
    """
    _check_rewards(rewards, group_index, "rloo_advantages")
    centred, sizes = _group_centred(rewards, group_index, std_norm, eps)
    return (centred * sizes / (sizes - 1).clamp_min(1)).float()


def count_constant_groups(rewards: torch.Tensor, group_index: torch.Tensor) -> int:
    """Number of prompt groups whose rewards are all equal (they carry no learning signal)."""
    _check_rewards(rewards, group_index, "count_constant_groups")
    if rewards.numel() == 0:
        return 0
    _, dense = torch.unique(group_index, return_inverse=True)
    groups = int(dense.max()) + 1
    values = rewards.detach().double()
    highest = torch.full((groups,), -float("inf"), dtype=values.dtype).scatter_reduce(0, dense, values, "amax")
    lowest = torch.full((groups,), float("inf"), dtype=values.dtype).scatter_reduce(0, dense, values, "amin")
    return int((highest == lowest).sum())
