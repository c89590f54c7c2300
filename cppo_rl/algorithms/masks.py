"""Token masks and importance weights: CPPO and the baselines it is compared with.

Conventions (algorithm_spec.md sections 3, 4 and 8). Every input is [B, T]: B responses,
right-padded to T positions; position t (1-based) is column t - 1, so a response starts at
column 0. `response_mask` (bool) marks valid response tokens. `log_ratio` is
log pi(y_t) - log mu(y_t) of the sampled token. Advantages may be [B, T] or [B] (broadcast over
tokens). Masks are bool, detached, computed in float32 or better and False on padding. A token
update "moves toward mu" when `A_t * (rho_t - 1) <= 0`; the mask family never masks those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cppo_rl.algorithms._checks import (
    check_bool,
    check_floating,
    check_in_interval,
    check_non_negative,
    check_positive,
    check_rank,
    check_same_shape,
)

HorizonSpec = int | str | None
"""Position-schedule horizon: None (padded width T), "sequence" (each response's own length), or an int."""


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------


def token_advantages(advantages: torch.Tensor, response_mask: torch.Tensor, caller: str) -> torch.Tensor:
    """Broadcast [B] advantages to [B, T]; [B, T] advantages pass through. Checks dtype and shape."""
    check_floating("advantages", advantages, caller)
    if advantages.dim() == 1 and advantages.shape[0] == response_mask.shape[0]:
        return advantages.unsqueeze(-1).expand_as(response_mask)
    check_same_shape(caller, "response_mask", {"response_mask": response_mask, "advantages": advantages})
    return advantages


def _check_token_inputs(caller: str, response_mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    """Check that `response_mask` is bool [B, T] and every other tensor is a float of its shape."""
    check_bool("response_mask", response_mask, caller)
    check_rank("response_mask", response_mask, 2, "[B, T]", caller)
    for name, tensor in tensors.items():
        check_floating(name, tensor, caller)
    check_same_shape(caller, "response_mask", {"response_mask": response_mask, **tensors})


def _as_float(tensor: torch.Tensor) -> torch.Tensor:
    """Detach and upcast to at least float32."""
    tensor = tensor.detach()
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def moves_toward_mu(advantages: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """`A_t * (rho_t - 1) <= 0` as a bool [B, T], computed from signs (no underflow)."""
    return torch.sign(advantages.detach()) * torch.sign(log_ratio.detach()) <= 0


def _exclusive_cumsum(values: torch.Tensor) -> torch.Tensor:
    """Sum of the strictly earlier positions along the last dimension (0 at position 1)."""
    return F.pad(values.cumsum(dim=-1)[..., :-1], (1, 0))


def response_lengths(response_mask: torch.Tensor) -> torch.Tensor:
    """[B] int64: index of the last valid token + 1 (0 for an empty row)."""
    if response_mask.shape[-1] == 0:
        return torch.zeros(response_mask.shape[0], dtype=torch.int64, device=response_mask.device)
    positions = torch.arange(1, response_mask.shape[-1] + 1, device=response_mask.device)
    return (positions * response_mask).amax(dim=-1)


def position_weights(response_mask: torch.Tensor, *, w_min: float = 0.8, horizon: HorizonSpec = None) -> torch.Tensor:
    """Linear position weights `w_t = 1 - (1 - w_min) (t - 1) / max(T - 1, 1)`, float32 [B, T].

    `horizon` sets T: None -> the padded width of `response_mask`; "sequence" -> each response's
    own length (last valid index + 1); an int -> that fixed horizon, which must be >= the padded
    width. Weights at padding are 0.
    """
    caller = "position_weights"
    check_bool("response_mask", response_mask, caller)
    check_rank("response_mask", response_mask, 2, "[B, T]", caller)
    check_in_interval("w_min", w_min, 0.0, 1.0, caller, low_open=True)
    width = response_mask.shape[-1]
    offsets = torch.arange(width, device=response_mask.device, dtype=torch.float32).expand(response_mask.shape)
    if horizon is None:
        denominator = torch.full((response_mask.shape[0], 1), max(width - 1, 1), dtype=torch.float32)
    elif horizon == "sequence":
        denominator = (response_lengths(response_mask).float() - 1).clamp_min(1.0).unsqueeze(-1)
    elif isinstance(horizon, int) and not isinstance(horizon, bool) and horizon >= 1:
        if width > horizon:
            raise ValueError(
                f"{caller}: the padded response width {width} exceeds `horizon`={horizon}; set "
                f"`horizon` to the max response length (>= {width}) or use horizon=None"
            )
        denominator = torch.full((response_mask.shape[0], 1), max(horizon - 1, 1), dtype=torch.float32)
    else:
        raise ValueError(f'{caller}: `horizon` must be None (padded width), "sequence" or an int >= 1, got {horizon!r}')
    weights = 1.0 - (1.0 - w_min) * offsets / denominator.to(response_mask.device)
    return torch.where(response_mask, weights, torch.zeros_like(weights))


def shuffle_within_rows(
    values: torch.Tensor, response_mask: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Permute each row's valid entries at random among its valid positions; padding becomes 0.

    Used by the "shuffled weights" ablation: the multiset {w_t} of a response is kept and its
    order destroyed. [B, T] -> [B, T].
    """
    random_keys = torch.rand(values.shape, generator=generator, device=values.device)
    random_keys = torch.where(response_mask, random_keys, torch.full_like(random_keys, 2.0))
    destinations = random_keys.argsort(dim=-1, stable=True)  # valid positions first, random order
    position_keys = torch.arange(values.shape[-1], device=values.device).expand(values.shape)
    position_keys = torch.where(response_mask, position_keys, position_keys + values.shape[-1])
    sources = position_keys.argsort(dim=-1, stable=True)  # valid positions first, in order
    shuffled = torch.zeros_like(values).scatter_(-1, destinations, values.gather(-1, sources))
    return torch.where(response_mask, shuffled, torch.zeros_like(shuffled))


def per_sequence_delta_b(
    divergence: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    delta_b_min: float = 0.02,
    quantile: float = 0.9,
    scale: float = 1.0,
    ceiling: float = 2.0,
) -> torch.Tensor:
    """Per-sequence budget `clamp(scale * Quantile_q(D_valid), delta_b_min, ceiling * delta_b_min)`, [B, 1].

    Linear-interpolation quantile over each row's valid tokens; an empty row gets `delta_b_min`
    (algorithm_spec.md 3.3, 8.7 and 8.15: `ceiling` 2 is the paper's, 5 the authors' later code).
    """
    caller = "per_sequence_delta_b"
    _check_token_inputs(caller, response_mask, divergence=divergence)
    check_positive("delta_b_min", delta_b_min, caller)
    check_in_interval("quantile", quantile, 0.0, 1.0, caller)
    check_positive("scale", scale, caller)
    check_in_interval("ceiling", ceiling, 1.0, math.inf, caller)
    masked = torch.where(response_mask, _as_float(divergence), torch.full_like(_as_float(divergence), float("nan")))
    if masked.numel() == 0:  # nanquantile refuses empty input; every row is empty
        return torch.full((masked.shape[0], 1), delta_b_min, dtype=masked.dtype, device=masked.device)
    per_row = torch.nanquantile(masked, quantile, dim=-1, keepdim=True)
    per_row = torch.nan_to_num(scale * per_row, nan=delta_b_min)
    return per_row.clamp(min=delta_b_min, max=ceiling * delta_b_min)


# ----------------------------------------------------------------------------------------------
# CPPO
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CPPOMaskResult:
    """Everything the CPPO rule computed for one batch; all tensors [B, T] unless noted.

    response_mask:     bool, the valid response tokens the rule was computed on
    mask:              bool, kept tokens (toward-mu or inside the trust region), False on padding
    toward_mu:         bool, valid tokens whose update moves toward mu (always kept)
    token_violation:   bool, valid tokens with `w_t D_t > delta` (the per-token rule)
    prefix_violation:  bool, valid tokens that pass the token rule but break the prefix budget
    weights:           float, the position weights used (0 on padding)
    weighted_divergence: float, `Z_t = w_t D_t` (0 on padding)
    violation_score:   float, `x_t = max(Z_t / delta, S_t / (delta + delta_b W_{t-1}))`; <= 1 iff inside
                       (up to one rounding step at the boundary)
    delta_b:           float [B, 1], the prefix budget per response (constant unless adaptive)
    """

    response_mask: torch.Tensor
    mask: torch.Tensor
    toward_mu: torch.Tensor
    token_violation: torch.Tensor
    prefix_violation: torch.Tensor
    weights: torch.Tensor
    weighted_divergence: torch.Tensor
    violation_score: torch.Tensor
    delta_b: torch.Tensor

    def soft_mask(self) -> torch.Tensor:
        """The soft gate of spec 3.5: 1 toward mu, else `min(1, 1 / x_t)`; 0 on padding. float [B, T]."""
        gate = torch.where(
            self.violation_score > 1, self.violation_score.reciprocal(), torch.ones_like(self.violation_score)
        )
        return torch.where(self.toward_mu, torch.ones_like(gate), gate) * self.response_mask


@torch.no_grad()
def cppo_mask_details(
    divergence: torch.Tensor,
    advantages: torch.Tensor,
    log_ratio: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    delta: float = 0.15,
    delta_b: float = 0.02,
    w_min: float = 0.8,
    horizon: HorizonSpec = None,
    adaptive_delta_b: bool = False,
    delta_b_quantile: float = 0.9,
    delta_b_scale: float = 1.0,
    delta_b_ceiling: float = 2.0,
    position_weight: bool = True,
    prefix_budget: bool = True,
    shuffle_weights: bool = False,
    generator: torch.Generator | None = None,
) -> CPPOMaskResult:
    """The CPPO trust-region rule (spec Eqs. 8-10, Algorithm 1), vectorised over [B, T].

    Token t is kept iff it moves toward mu, or `Z_t <= min(delta, delta + delta_b W_{t-1} - S_{t-1})`
    with `Z_t = w_t D_t`, `S_t = sum_{j<=t} Z_j`, `W_t = sum_{j<=t} w_j` over every valid token
    of the same response (masked ones included, padding excluded). `delta_b` is the fixed budget,
    or the minimum of the adaptive one, whose maximum is `delta_b_ceiling * delta_b` (see
    `per_sequence_delta_b`). `position_weight=False` sets w = 1, `prefix_budget=False` drops the
    prefix term, `shuffle_weights=True` permutes w within each response (the ablations).
    """
    caller = "cppo_mask"
    _check_token_inputs(caller, response_mask, divergence=divergence, log_ratio=log_ratio)
    advantages = token_advantages(advantages, response_mask, caller)
    check_positive("delta", delta, caller)
    check_non_negative("delta_b", delta_b, caller)
    check_in_interval("w_min", w_min, 0.0, 1.0, caller, low_open=True)
    check_in_interval("delta_b_quantile", delta_b_quantile, 0.0, 1.0, caller)
    check_positive("delta_b_scale", delta_b_scale, caller)
    check_in_interval("delta_b_ceiling", delta_b_ceiling, 1.0, math.inf, caller)
    if adaptive_delta_b:
        check_positive("delta_b", delta_b, caller)

    valid = response_mask
    d = torch.where(valid, _as_float(divergence), torch.zeros((), dtype=torch.float32))
    if position_weight:
        weights = position_weights(valid, w_min=w_min, horizon=horizon).to(d.dtype)
    else:
        weights = valid.to(d.dtype)
    if shuffle_weights:
        weights = shuffle_within_rows(weights, valid, generator)
    z = weights * d

    if adaptive_delta_b:
        budget_rate = per_sequence_delta_b(
            d, valid, delta_b_min=delta_b, quantile=delta_b_quantile, scale=delta_b_scale, ceiling=delta_b_ceiling
        ).to(d.dtype)
    else:
        budget_rate = torch.full((d.shape[0], 1), float(delta_b), dtype=d.dtype, device=d.device)

    token_ok = z <= delta
    score = z / delta
    if prefix_budget:
        prefix_before = _exclusive_cumsum(z)  # S_{t-1}
        weight_before = _exclusive_cumsum(weights)  # W_{t-1}
        earned = budget_rate * weight_before  # delta_b W_{t-1}; 0 when W_{t-1} = 0 even if delta_b = inf
        allowance = delta + torch.where(weight_before > 0, earned, torch.zeros_like(earned))  # > 0
        prefix_ok = z <= allowance - prefix_before
        score = torch.maximum(score, (prefix_before + z) / allowance)
    else:
        prefix_ok = torch.ones_like(token_ok)

    toward = moves_toward_mu(advantages, log_ratio) & valid
    return CPPOMaskResult(
        response_mask=valid,
        mask=valid & (toward | (token_ok & prefix_ok)),
        toward_mu=toward,
        token_violation=valid & ~token_ok,
        prefix_violation=valid & token_ok & ~prefix_ok,
        weights=weights,
        weighted_divergence=z,
        violation_score=torch.where(valid, score, torch.zeros_like(score)),
        delta_b=budget_rate,
    )


def cppo_mask(
    divergence: torch.Tensor,
    advantages: torch.Tensor,
    log_ratio: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    delta: float = 0.15,
    delta_b: float = 0.02,
    w_min: float = 0.8,
    horizon: HorizonSpec = None,
    adaptive_delta_b: bool = False,
    delta_b_quantile: float = 0.9,
    delta_b_scale: float = 1.0,
    delta_b_ceiling: float = 2.0,
    position_weight: bool = True,
    prefix_budget: bool = True,
) -> torch.Tensor:
    """CPPO keep-mask, bool [B, T]. See `cppo_mask_details` for the rule and the arguments."""
    return cppo_mask_details(
        divergence,
        advantages,
        log_ratio,
        response_mask,
        delta=delta,
        delta_b=delta_b,
        w_min=w_min,
        horizon=horizon,
        adaptive_delta_b=adaptive_delta_b,
        delta_b_quantile=delta_b_quantile,
        delta_b_scale=delta_b_scale,
        delta_b_ceiling=delta_b_ceiling,
        position_weight=position_weight,
        prefix_budget=prefix_budget,
    ).mask


def cppo_soft_mask(
    divergence: torch.Tensor,
    advantages: torch.Tensor,
    log_ratio: torch.Tensor,
    response_mask: torch.Tensor,
    **kwargs: object,
) -> torch.Tensor:
    """CPPO soft gate (spec 3.5), float [B, T] in [0, 1]: 1 toward mu, else `min(1, 1 / x_t)`.

    Takes the keyword arguments of `cppo_mask_details`; the result is detached.
    """
    return cppo_mask_details(divergence, advantages, log_ratio, response_mask, **kwargs).soft_mask()


# ----------------------------------------------------------------------------------------------
# Baselines (same conventions)
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def dppo_mask(
    divergence: torch.Tensor,
    advantages: torch.Tensor,
    log_ratio: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    delta: float = 0.15,
) -> torch.Tensor:
    """DPPO keep-mask `1[A_t (rho_t - 1) <= 0  or  D_t <= delta]`, bool [B, T] (any divergence)."""
    caller = "dppo_mask"
    _check_token_inputs(caller, response_mask, divergence=divergence, log_ratio=log_ratio)
    advantages = token_advantages(advantages, response_mask, caller)
    check_positive("delta", delta, caller)
    inside = _as_float(divergence) <= delta
    return response_mask & (moves_toward_mu(advantages, log_ratio) | inside)


@torch.no_grad()
def ppo_clip_mask(
    advantages: torch.Tensor,
    log_ratio: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
) -> torch.Tensor:
    """Tokens whose clipped-surrogate gradient is non-zero: `1[A (rho-1) <= 0 or 1-eps_low <= rho <= 1+eps_high]`.

    The mask form of GRPO/PPO with clip-higher (spec Eq. 2), bool [B, T]; used for diagnostics,
    the GRPO loss itself is the clipped surrogate.
    """
    caller = "ppo_clip_mask"
    _check_token_inputs(caller, response_mask, log_ratio=log_ratio)
    advantages = token_advantages(advantages, response_mask, caller)
    check_positive("clip_low", clip_low, caller)
    check_positive("clip_high", clip_high, caller)
    ratio = _as_float(log_ratio).exp()
    inside = (ratio >= 1 - clip_low) & (ratio <= 1 + clip_high)
    return response_mask & (moves_toward_mu(advantages, log_ratio) | inside)


def _broadcast_row_decision(keep_row: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    return response_mask & keep_row.unsqueeze(-1)


@torch.no_grad()
def trm_max_mask(divergence: torch.Tensor, response_mask: torch.Tensor, *, delta: float = 0.05) -> torch.Tensor:
    """TRM-Max: keep a whole response iff `max_t D_t <= delta` over its valid tokens, bool [B, T]."""
    caller = "trm_max_mask"
    _check_token_inputs(caller, response_mask, divergence=divergence)
    check_positive("delta", delta, caller)
    d = torch.where(response_mask, _as_float(divergence), torch.full_like(_as_float(divergence), -float("inf")))
    row_max = d.amax(dim=-1) if d.shape[-1] else torch.full(d.shape[:1], -float("inf"), device=d.device)
    return _broadcast_row_decision(row_max <= delta, response_mask)


@torch.no_grad()
def trm_avg_mask(divergence: torch.Tensor, response_mask: torch.Tensor, *, delta_avg: float = 0.001) -> torch.Tensor:
    """TRM-Avg: keep a whole response iff `mean_t D_t <= delta_avg` over its valid tokens, bool [B, T]."""
    caller = "trm_avg_mask"
    _check_token_inputs(caller, response_mask, divergence=divergence)
    check_positive("delta_avg", delta_avg, caller)
    d = torch.where(response_mask, _as_float(divergence), torch.zeros_like(_as_float(divergence)))
    mean = d.sum(dim=-1) / response_mask.sum(dim=-1).clamp_min(1)
    return _broadcast_row_decision(mean <= delta_avg, response_mask)


@torch.no_grad()
def cispo_weights(
    log_ratio: torch.Tensor, response_mask: torch.Tensor, *, eps_low: float = 10.0, eps_high: float = 0.2
) -> torch.Tensor:
    """CISPO's detached IS weight `clamp(rho, 1 - eps_low, 1 + eps_high)`, float [B, T], 0 on padding."""
    caller = "cispo_weights"
    _check_token_inputs(caller, response_mask, log_ratio=log_ratio)
    check_positive("eps_low", eps_low, caller)
    check_positive("eps_high", eps_high, caller)
    weights = _as_float(log_ratio).exp().clamp(min=1 - eps_low, max=1 + eps_high)
    return torch.where(response_mask, weights, torch.zeros_like(weights))


@torch.no_grad()
def minpro_weights(
    log_ratio: torch.Tensor, response_mask: torch.Tensor, *, eps_low: float = 10.0, eps_high: float = 0.28
) -> torch.Tensor:
    """MinPRO's detached token weight `clip(m_t rho_t, 1 - eps_low, 1 + eps_high)`, float [B, T].

    `m_t = min_{i<t} rho_i` over the earlier valid tokens of the same response, `m_1 = 1`
    (MinPRO as described in secondary sources, spec section 8.12). The clip is CISPO's convention:
    eps_low = 10 leaves no effective lower clip. 0 on padding.
    """
    caller = "minpro_weights"
    _check_token_inputs(caller, response_mask, log_ratio=log_ratio)
    check_positive("eps_low", eps_low, caller)
    check_positive("eps_high", eps_high, caller)
    ratio = _as_float(log_ratio).exp()
    running_min = torch.where(response_mask, ratio, torch.full_like(ratio, float("inf"))).cummin(dim=-1).values
    prefix_min = F.pad(running_min[..., :-1], (1, 0), value=float("inf"))
    prefix_min = torch.where(torch.isinf(prefix_min), torch.ones_like(prefix_min), prefix_min)
    weights = (prefix_min * ratio).clamp(min=1 - eps_low, max=1 + eps_high)
    return torch.where(response_mask, weights, torch.zeros_like(weights))
