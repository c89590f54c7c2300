"""Policy losses for CPPO and its baselines, one signature (`PolicyLoss`), selectable by name.

Every loss takes `(inputs, config, normaliser)` and returns a `PolicyLossOutput` whose `loss` is
this shard's contribution to the mini-batch loss (see `aggregation.py` for the global normalisers;
when the normaliser names no horizon and `config.horizon` is an int, that int is the constant of
`seq-mean-token-sum-norm`).

Loss forms (minimised; rho = exp(clamp(log pi - log mu, -20, 20)); sg = stop-gradient):
  mask family (cppo*, dppo, trm_*):  -A * sg(min(rho, C)) * log pi * M     (C = `is_cap`)
  grpo:                             max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))
  cispo:                            -sg(clamp(rho, 1 - eps_low, 1 + eps_high)) * A * log pi
  minpro:                           -sg(clip(m_t rho_t, 1 - eps_low, 1 + eps_high)) * A * log pi
                                    (MinPRO as described in secondary sources; eps_low 10, CISPO-style)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

from cppo_rl.algorithms._checks import (
    check_floating,
    check_in_interval,
    check_non_negative,
    check_positive,
    check_rank,
    check_same_shape,
)
from cppo_rl.algorithms.aggregation import LOSS_AGG_MODES, LossNormaliser, aggregate_loss
from cppo_rl.algorithms.diagnostics import cppo_diagnostics, mask_diagnostics
from cppo_rl.algorithms.divergence import DIVERGENCES, TOPK_DIVERGENCES, get_divergence
from cppo_rl.algorithms.masks import (
    HorizonSpec,
    _check_token_inputs,
    cispo_weights,
    cppo_mask_details,
    dppo_mask,
    minpro_weights,
    ppo_clip_mask,
    token_advantages,
    trm_avg_mask,
    trm_max_mask,
)
from cppo_rl.algorithms.registry import Registry


@dataclass(frozen=True)
class PolicyLossConfig:
    """Every knob of every policy loss; each loss reads the fields it needs. Validated on creation.

    divergence:         estimator of D_t for CPPO and DPPO (divergence.DIVERGENCES: binary_tv, topk_tv, ...)
    delta:              token threshold of CPPO/DPPO (0.15 dense, 0.20 MoE in the paper)
    delta_b:            CPPO prefix budget rate (fixed), or its minimum when `adaptive_delta_b`
    w_min:              CPPO's last-position weight, in (0, 1]
    horizon:            position schedule T: None (padded width), "sequence", or an int (max response length)
    adaptive_delta_b, delta_b_quantile, delta_b_scale, delta_b_ceiling: the per-sequence budget of spec 3.3,
                        clamp(scale * Quantile_q(D), delta_b, delta_b_ceiling * delta_b) (ceiling 2 paper, 5 PR head)
    position_weight, prefix_budget, shuffle_weights: CPPO's ablation switches
    soft_gate:          use CPPO's soft gate min(1, 1/x) instead of the hard mask
    is_cap:             truncated-IS cap C of the mask family
    log_ratio_clamp:    |log pi - log mu| is clamped to this before exp
    clip_low, clip_high: GRPO ratio clip (clip-higher)
    cispo_eps_low, cispo_eps_high: CISPO's IS-weight clamp
    minpro_eps_low, minpro_eps_high: MinPRO's weight clip (eps_low 10: no effective lower clip, spec 8.12)
    trm_max_delta, trm_avg_delta: TRM sequence thresholds on max_t D_t and mean_t D_t
    trm_max_divergence, trm_avg_divergence: the estimators of D_t of the TRM-Max and TRM-Avg rules (spec 8.11:
                        sampled_k2 and sampled_k3, as the TRM authors' code; topk_kl available)
    loss_agg_mode:      one of aggregation.LOSS_AGG_MODES
    """

    divergence: str = "topk_tv"
    delta: float = 0.15
    delta_b: float = 0.02
    w_min: float = 0.8
    horizon: HorizonSpec = None
    adaptive_delta_b: bool = False
    delta_b_quantile: float = 0.9
    delta_b_scale: float = 1.0
    delta_b_ceiling: float = 2.0
    position_weight: bool = True
    prefix_budget: bool = True
    shuffle_weights: bool = False
    soft_gate: bool = False
    is_cap: float = 20.0
    log_ratio_clamp: float = 20.0
    clip_low: float = 0.2
    clip_high: float = 0.28
    cispo_eps_low: float = 10.0
    cispo_eps_high: float = 0.2
    minpro_eps_low: float = 10.0
    minpro_eps_high: float = 0.28
    trm_max_delta: float = 0.05
    trm_avg_delta: float = 0.001
    trm_max_divergence: str = "sampled_k2"
    trm_avg_divergence: str = "sampled_k3"
    loss_agg_mode: str = "seq-mean-token-sum-norm"

    def __post_init__(self) -> None:
        caller = "PolicyLossConfig"
        for name in ("divergence", "trm_max_divergence", "trm_avg_divergence"):
            if getattr(self, name) not in DIVERGENCES:
                raise ValueError(
                    f"{caller}: unknown `{name}` {getattr(self, name)!r}; "
                    f"choose one of {', '.join(DIVERGENCES.names())}"
                )
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(
                f"{caller}: unknown `loss_agg_mode` {self.loss_agg_mode!r}; choose one of {', '.join(LOSS_AGG_MODES)}"
            )
        for name in (
            "delta",
            "is_cap",
            "log_ratio_clamp",
            "clip_low",
            "clip_high",
            "delta_b_scale",
            "cispo_eps_low",
            "cispo_eps_high",
            "minpro_eps_low",
            "minpro_eps_high",
            "trm_max_delta",
            "trm_avg_delta",
        ):
            check_positive(name, getattr(self, name), caller)
        check_non_negative("delta_b", self.delta_b, caller)
        if self.adaptive_delta_b:
            check_positive("delta_b", self.delta_b, caller)
        check_in_interval("w_min", self.w_min, 0.0, 1.0, caller, low_open=True)
        check_in_interval("delta_b_quantile", self.delta_b_quantile, 0.0, 1.0, caller)
        check_in_interval("delta_b_ceiling", self.delta_b_ceiling, 1.0, math.inf, caller)
        valid_horizon = (
            self.horizon is None
            or self.horizon == "sequence"
            or (isinstance(self.horizon, int) and not isinstance(self.horizon, bool) and self.horizon >= 1)
        )
        if not valid_horizon:
            raise ValueError(
                f'{caller}: `horizon` must be None (padded width), "sequence" or an int >= 1, got {self.horizon!r}'
            )

    def replace(self, **changes: object) -> PolicyLossConfig:
        """A copy with `changes` applied (and validated)."""
        return dataclasses.replace(self, **changes)


@dataclass
class PolicyLossInputs:
    """One micro-batch as the loss sees it. Padding positions of the [B, T] tensors are set to 0 on
    creation, so padding may hold any value (NaN, -inf) without reaching a gradient.

    logprobs:              float [B, T], log pi(y_t) at the rollout temperature; carries the gradient
    rollout_logprobs:      float [B, T], log mu(y_t) from the rollout engine
    advantages:            float [B, T] or [B]
    response_mask:         bool  [B, T], valid response tokens
    topk_logprobs:         float [B, T, S], log pi over mu's token set (top-K + sampled), for top-K divergences
    rollout_topk_logprobs: float [B, T, S], log mu over the same set; padded slots -inf in both
    """

    logprobs: torch.Tensor
    rollout_logprobs: torch.Tensor
    advantages: torch.Tensor
    response_mask: torch.Tensor
    topk_logprobs: torch.Tensor | None = None
    rollout_topk_logprobs: torch.Tensor | None = None

    def __post_init__(self) -> None:
        caller = "PolicyLossInputs"
        _check_token_inputs(caller, self.response_mask, logprobs=self.logprobs, rollout_logprobs=self.rollout_logprobs)
        advantages = token_advantages(self.advantages, self.response_mask, caller)
        # Padding may hold anything (NaN, -inf): zero it here so no gradient can pick it up (0 * NaN = NaN).
        zero = torch.zeros((), dtype=self.logprobs.dtype, device=self.logprobs.device)
        self.logprobs = torch.where(self.response_mask, self.logprobs, zero)
        self.rollout_logprobs = torch.where(self.response_mask, self.rollout_logprobs, zero)
        self.advantages = torch.where(self.response_mask, advantages, torch.zeros((), dtype=advantages.dtype))
        if (self.topk_logprobs is None) != (self.rollout_topk_logprobs is None):
            raise ValueError(f"{caller}: give both `topk_logprobs` and `rollout_topk_logprobs`, or neither")
        if self.topk_logprobs is not None:
            check_floating("topk_logprobs", self.topk_logprobs, caller)
            check_floating("rollout_topk_logprobs", self.rollout_topk_logprobs, caller)
            check_rank("topk_logprobs", self.topk_logprobs, 3, "[B, T, S]", caller)
            check_same_shape(
                caller,
                "topk_logprobs",
                {"topk_logprobs": self.topk_logprobs, "rollout_topk_logprobs": self.rollout_topk_logprobs},
            )
            if tuple(self.topk_logprobs.shape[:2]) != tuple(self.response_mask.shape):
                raise ValueError(
                    f"{caller}: `topk_logprobs` has shape {tuple(self.topk_logprobs.shape)}; its first two "
                    f"dimensions must equal `response_mask`'s {tuple(self.response_mask.shape)}"
                )


@dataclass
class PolicyLossOutput:
    """loss: scalar with gradient; token_losses: [B, T] (0 on padding); keep: float [B, T] multiplier
    applied per token (1 kept, 0 masked, a gate in between); metrics: 0-dim tensors by name."""

    loss: torch.Tensor
    token_losses: torch.Tensor
    keep: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class PolicyLoss(Protocol):
    """`fn(inputs, config, normaliser=None) -> PolicyLossOutput`; see the module docstring."""

    def __call__(
        self, inputs: PolicyLossInputs, config: PolicyLossConfig, normaliser: LossNormaliser | None = None
    ) -> PolicyLossOutput: ...


POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")
register_policy_loss = POLICY_LOSSES.register
get_policy_loss = POLICY_LOSSES.get


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------


def _log_ratio(inputs: PolicyLossInputs, config: PolicyLossConfig) -> torch.Tensor:
    """Clamped log pi - log mu, with gradient through log pi."""
    limit = config.log_ratio_clamp
    return (inputs.logprobs - inputs.rollout_logprobs.detach()).clamp(-limit, limit)


def token_divergence(inputs: PolicyLossInputs, estimator: str) -> torch.Tensor:
    """D_t [B, T] between mu and pi by the divergence named `estimator` (detached)."""
    divergence = get_divergence(estimator)
    if estimator not in TOPK_DIVERGENCES:
        return divergence(inputs.rollout_logprobs, inputs.logprobs)
    if inputs.topk_logprobs is None:
        sampled = ", ".join(name for name in DIVERGENCES.names() if name not in TOPK_DIVERGENCES)
        raise ValueError(
            f"divergence {estimator!r} needs `topk_logprobs` and `rollout_topk_logprobs` (the rollout's "
            f"top-K); pass them, or choose a sampled-token estimator ({sampled})"
        )
    return divergence(inputs.rollout_topk_logprobs, inputs.topk_logprobs)


def _finish(
    token_losses: torch.Tensor,
    keep: torch.Tensor,
    inputs: PolicyLossInputs,
    config: PolicyLossConfig,
    normaliser: LossNormaliser | None,
    metrics: dict[str, torch.Tensor],
    log_ratio: torch.Tensor,
) -> PolicyLossOutput:
    valid = inputs.response_mask
    token_losses = torch.where(valid, token_losses, torch.zeros((), dtype=token_losses.dtype))
    tokens = valid.sum().clamp_min(1)
    metrics["ratio_mean"] = (torch.where(valid, log_ratio.detach().exp(), 0.0).sum() / tokens).float()
    metrics["log_ratio_abs_mean"] = (torch.where(valid, log_ratio.detach().abs(), 0.0).sum() / tokens).float()
    surrogate = -inputs.advantages.detach() * log_ratio.detach().exp() * keep
    metrics["surrogate"] = (torch.where(valid, surrogate, 0.0).sum() / tokens).float()
    normaliser = normaliser or LossNormaliser()
    if normaliser.horizon is None and isinstance(config.horizon, int):
        normaliser = dataclasses.replace(normaliser, horizon=config.horizon)
    loss = aggregate_loss(token_losses, valid, config.loss_agg_mode, normaliser)
    return PolicyLossOutput(loss=loss, token_losses=token_losses, keep=keep, metrics=metrics)


def _masked_truncated_is_loss(
    inputs: PolicyLossInputs,
    config: PolicyLossConfig,
    normaliser: LossNormaliser | None,
    keep: torch.Tensor,
    metrics: dict[str, torch.Tensor],
) -> PolicyLossOutput:
    """The mask family's `-A * sg(min(rho, C)) * log pi * keep`."""
    log_ratio = _log_ratio(inputs, config)
    weight = log_ratio.detach().exp().clamp(max=config.is_cap) * keep.to(log_ratio.dtype)
    token_losses = -inputs.advantages.detach() * weight * inputs.logprobs
    return _finish(token_losses, keep.float(), inputs, config, normaliser, metrics, log_ratio)


def _weighted_log_prob_loss(
    inputs: PolicyLossInputs,
    config: PolicyLossConfig,
    normaliser: LossNormaliser | None,
    weight: torch.Tensor,
    log_ratio: torch.Tensor,
) -> PolicyLossOutput:
    """`-sg(weight) * A * log pi` (CISPO, MinPRO): no token masked."""
    token_losses = -weight.detach() * inputs.advantages.detach() * inputs.logprobs
    metrics = mask_diagnostics(torch.ones_like(inputs.response_mask), inputs.response_mask)
    metrics["is_weight_mean"] = (weight.sum() / inputs.response_mask.sum().clamp_min(1)).float()
    return _finish(token_losses, torch.ones_like(weight), inputs, config, normaliser, metrics, log_ratio)


# ----------------------------------------------------------------------------------------------
# The losses
# ----------------------------------------------------------------------------------------------


@register_policy_loss("cppo")
def cppo_loss(
    inputs: PolicyLossInputs, config: PolicyLossConfig, normaliser: LossNormaliser | None = None
) -> PolicyLossOutput:
    """CPPO: position-weighted token threshold plus cumulative prefix budget (spec section 3)."""
    log_ratio = _log_ratio(inputs, config)
    divergence = token_divergence(inputs, config.divergence)
    result = cppo_mask_details(
        divergence,
        inputs.advantages,
        log_ratio,
        inputs.response_mask,
        delta=config.delta,
        delta_b=config.delta_b,
        w_min=config.w_min,
        horizon=config.horizon,
        adaptive_delta_b=config.adaptive_delta_b,
        delta_b_quantile=config.delta_b_quantile,
        delta_b_scale=config.delta_b_scale,
        delta_b_ceiling=config.delta_b_ceiling,
        position_weight=config.position_weight,
        prefix_budget=config.prefix_budget,
        shuffle_weights=config.shuffle_weights,
    )
    keep = result.soft_mask() if config.soft_gate else result.mask
    metrics = cppo_diagnostics(result, keep, divergence)
    return _masked_truncated_is_loss(inputs, config, normaliser, keep, metrics)


def _register_cppo_variant(name: str, description: str, **switches: object) -> None:
    def variant(
        inputs: PolicyLossInputs, config: PolicyLossConfig, normaliser: LossNormaliser | None = None
    ) -> PolicyLossOutput:
        return cppo_loss(inputs, config.replace(**switches), normaliser)

    variant.__name__ = f"{name}_loss"
    variant.__doc__ = f"{description} (CPPO with {', '.join(f'{k}={v}' for k, v in switches.items())})."
    register_policy_loss(name)(variant)


_register_cppo_variant("cppo_no_position_weight", "Ablation 'w/o Position Weight'", position_weight=False)
_register_cppo_variant("cppo_no_prefix_budget", "Ablation 'w/o Prefix Budget'", prefix_budget=False)
_register_cppo_variant(
    "cppo_shuffled_weights", "Ablation 'Shuffled Weights'", prefix_budget=False, shuffle_weights=True
)
_register_cppo_variant("cppo_soft", "Soft-gate variant (spec 3.5)", soft_gate=True)


@register_policy_loss("dppo")
def dppo_loss(
    inputs: PolicyLossInputs, config: PolicyLossConfig, normaliser: LossNormaliser | None = None
) -> PolicyLossOutput:
    """DPPO: keep a token iff it moves toward mu or D_t <= delta."""
    log_ratio = _log_ratio(inputs, config)
    divergence = token_divergence(inputs, config.divergence)
    keep = dppo_mask(divergence, inputs.advantages, log_ratio, inputs.response_mask, delta=config.delta)
    metrics = mask_diagnostics(keep, inputs.response_mask, divergence)
    return _masked_truncated_is_loss(inputs, config, normaliser, keep, metrics)


def _trm_loss(
    inputs: PolicyLossInputs,
    config: PolicyLossConfig,
    normaliser: LossNormaliser | None,
    *,
    use_max: bool,
    use_avg: bool,
) -> PolicyLossOutput:
    """Each rule on its own estimator; the divergence metrics log the max rule's D_t when it runs."""
    keep = inputs.response_mask
    if use_avg:
        divergence = token_divergence(inputs, config.trm_avg_divergence)
        keep = keep & trm_avg_mask(divergence, inputs.response_mask, delta_avg=config.trm_avg_delta)
    if use_max:
        divergence = token_divergence(inputs, config.trm_max_divergence)
        keep = keep & trm_max_mask(divergence, inputs.response_mask, delta=config.trm_max_delta)
    metrics = mask_diagnostics(keep, inputs.response_mask, divergence)
    non_empty = inputs.response_mask.any(dim=-1)
    rejected = non_empty & ~keep.any(dim=-1)
    metrics["rejected_sequence_frac"] = rejected.sum().float() / non_empty.sum().clamp_min(1).float()
    return _masked_truncated_is_loss(inputs, config, normaliser, keep, metrics)


@register_policy_loss("trm_max")
def trm_max_loss(
    inputs: PolicyLossInputs, config: PolicyLossConfig, normaliser: LossNormaliser | None = None
) -> PolicyLossOutput:
    """TRM-Max: drop whole responses whose max_t D_t (`trm_max_divergence`) exceeds `trm_max_delta`."""
    return _trm_loss(inputs, config, normaliser, use_max=True, use_avg=False)


@register_policy_loss("trm_avg")
def trm_avg_loss(
    inputs: PolicyLossInputs, config: PolicyLossConfig, normaliser: LossNormaliser | None = None
) -> PolicyLossOutput:
    """TRM-Avg: drop whole responses whose mean_t D_t (`trm_avg_divergence`) exceeds `trm_avg_delta`."""
    return _trm_loss(inputs, config, normaliser, use_max=False, use_avg=True)


@register_policy_loss("trm_both")
def trm_both_loss(
    inputs: PolicyLossInputs, config: PolicyLossConfig, normaliser: LossNormaliser | None = None
) -> PolicyLossOutput:
    """TRM Max&Avg: a response must pass both sequence thresholds."""
    return _trm_loss(inputs, config, normaliser, use_max=True, use_avg=True)


@register_policy_loss("grpo")
def grpo_loss(
    inputs: PolicyLossInputs, config: PolicyLossConfig, normaliser: LossNormaliser | None = None
) -> PolicyLossOutput:
    """GRPO with clip-higher: the PPO clipped surrogate anchored to mu, no dual clip."""
    log_ratio = _log_ratio(inputs, config)
    ratio = log_ratio.exp()
    advantages = inputs.advantages.detach()
    clipped = ratio.clamp(1 - config.clip_low, 1 + config.clip_high)
    token_losses = torch.maximum(-advantages * ratio, -advantages * clipped)
    keep = ppo_clip_mask(
        advantages, log_ratio, inputs.response_mask, clip_low=config.clip_low, clip_high=config.clip_high
    )
    metrics = mask_diagnostics(keep, inputs.response_mask)
    return _finish(token_losses, keep.float(), inputs, config, normaliser, metrics, log_ratio)


@register_policy_loss("cispo")
def cispo_loss(
    inputs: PolicyLossInputs, config: PolicyLossConfig, normaliser: LossNormaliser | None = None
) -> PolicyLossOutput:
    """CISPO: clipped, stop-gradient IS weight times the REINFORCE term; nothing masked."""
    log_ratio = _log_ratio(inputs, config)
    weight = cispo_weights(
        log_ratio, inputs.response_mask, eps_low=config.cispo_eps_low, eps_high=config.cispo_eps_high
    )
    return _weighted_log_prob_loss(inputs, config, normaliser, weight, log_ratio)


@register_policy_loss("minpro")
def minpro_loss(
    inputs: PolicyLossInputs, config: PolicyLossConfig, normaliser: LossNormaliser | None = None
) -> PolicyLossOutput:
    """MinPRO as described in secondary sources (spec 8.12): weight by the minimum-prefix-ratio surrogate,
    clipped CISPO-style (default eps_low 10: no effective lower clip; eps_high 0.28)."""
    log_ratio = _log_ratio(inputs, config)
    weight = minpro_weights(
        log_ratio, inputs.response_mask, eps_low=config.minpro_eps_low, eps_high=config.minpro_eps_high
    )
    return _weighted_log_prob_loss(inputs, config, normaliser, weight, log_ratio)


METHOD_DEFAULTS: dict[str, dict[str, object]] = {
    "trm_both": {"trm_max_delta": 0.1, "trm_avg_delta": 0.002},
}
"""Where a method's published defaults differ from `PolicyLossConfig()`'s (spec section 8)."""


def default_config(name: str, **overrides: object) -> PolicyLossConfig:
    """The published defaults of policy loss `name`, with `overrides` applied."""
    get_policy_loss(name)  # unknown names fail here, listing the known ones
    return PolicyLossConfig(**{**METHOD_DEFAULTS.get(name, {}), **overrides})
