"""The CPPO algorithm core: pure torch, no Ray / vLLM / DeepSpeed.

Divergences (`divergence.py`), masks and weights (`masks.py`), loss aggregation with global
normalisers (`aggregation.py`), advantages (`advantages.py`), the policy losses (`policy_losses.py`)
and mask diagnostics (`diagnostics.py`). Policy losses, divergences and advantage estimators are each
a `Registry` (`registry.py`) of functions of one signature, selected by name. Shapes: [B, T] for
per-token tensors (B right-padded responses), [B, T, S] for the token set of a top-K divergence.
"""

from cppo_rl.algorithms.advantages import (
    ADVANTAGES,
    Advantage,
    count_constant_groups,
    get_advantage,
    grpo_advantages,
    register_advantage,
    rloo_advantages,
)
from cppo_rl.algorithms.aggregation import LOSS_AGG_MODES, LossNormaliser, aggregate_loss, local_counts
from cppo_rl.algorithms.diagnostics import cppo_diagnostics, mask_diagnostics
from cppo_rl.algorithms.divergence import (
    DIVERGENCES,
    Divergence,
    binary_kl,
    binary_tv,
    get_divergence,
    register_divergence,
    sampled_k2,
    sampled_k3,
    topk_kl,
    topk_tv,
)
from cppo_rl.algorithms.masks import (
    CPPOMaskResult,
    cispo_weights,
    cppo_mask,
    cppo_mask_details,
    cppo_soft_mask,
    dppo_mask,
    minpro_weights,
    per_sequence_delta_b,
    position_weights,
    ppo_clip_mask,
    trm_avg_mask,
    trm_max_mask,
)
from cppo_rl.algorithms.policy_losses import (
    METHOD_DEFAULTS,
    POLICY_LOSSES,
    PolicyLoss,
    PolicyLossConfig,
    PolicyLossInputs,
    PolicyLossOutput,
    default_config,
    get_policy_loss,
    register_policy_loss,
    token_divergence,
)
from cppo_rl.algorithms.registry import Registry

__all__ = [
    "ADVANTAGES",
    "DIVERGENCES",
    "LOSS_AGG_MODES",
    "METHOD_DEFAULTS",
    "POLICY_LOSSES",
    "Advantage",
    "CPPOMaskResult",
    "Divergence",
    "LossNormaliser",
    "PolicyLoss",
    "PolicyLossConfig",
    "PolicyLossInputs",
    "PolicyLossOutput",
    "Registry",
    "aggregate_loss",
    "binary_kl",
    "binary_tv",
    "cispo_weights",
    "count_constant_groups",
    "cppo_diagnostics",
    "cppo_mask",
    "cppo_mask_details",
    "cppo_soft_mask",
    "default_config",
    "dppo_mask",
    "get_advantage",
    "get_divergence",
    "get_policy_loss",
    "grpo_advantages",
    "local_counts",
    "mask_diagnostics",
    "minpro_weights",
    "per_sequence_delta_b",
    "position_weights",
    "ppo_clip_mask",
    "register_advantage",
    "register_divergence",
    "register_policy_loss",
    "rloo_advantages",
    "sampled_k2",
    "sampled_k3",
    "token_divergence",
    "topk_kl",
    "topk_tv",
    "trm_avg_mask",
    "trm_max_mask",
]
