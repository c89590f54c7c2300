"""Outcome advantages from per-response rewards and their prompt groups.

`rewards` is float [N] (one scalar per response); `group_index` is int [N] naming the prompt each
response answers (any integers; samples of one prompt share a value). Results are float32 [N];
broadcast over tokens by the policy losses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cppo_rl.algorithms._checks import check_floating, check_rank

Advantage = Callable[..., torch.Tensor]


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


def grpo_advantages(
    rewards: torch.Tensor, group_index: torch.Tensor, *, std_norm: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO group-relative advantage `r_i - mean_group(r)`, divided by the group's std if `std_norm`.

    The std is the unbiased one (as GRPO implementations use); a group of one response, or one whose
    rewards are all equal, gets advantage 0.
    """
    _check_rewards(rewards, group_index, "grpo_advantages")
    values = rewards.detach().double()
    sums, sizes = _group_sums(values, group_index)
    centred = values - sums / sizes
    if std_norm:
        squares, _ = _group_sums(centred**2, group_index)
        std = (squares / (sizes - 1).clamp_min(1)).sqrt()
        centred = centred / (std + eps)
    return centred.float()


def rloo_advantages(rewards: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """RLOO (leave-one-out) advantage `r_i - mean_{j != i in group}(r_j)`; 0 for a group of one."""
    _check_rewards(rewards, group_index, "rloo_advantages")
    values = rewards.detach().double()
    sums, sizes = _group_sums(values, group_index)
    others = (sums - values) / (sizes - 1).clamp_min(1)
    return torch.where(sizes > 1, values - others, torch.zeros_like(values)).float()


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


ADVANTAGES: dict[str, Advantage] = {"grpo": grpo_advantages, "rloo": rloo_advantages}
"""Advantage estimators by name."""


def get_advantage(name: str) -> Advantage:
    """Return the advantage estimator called `name`, or raise listing the known names."""
    if name not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {name!r}; known: {', '.join(sorted(ADVANTAGES))}")
    return ADVANTAGES[name]
