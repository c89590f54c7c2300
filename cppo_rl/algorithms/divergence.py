"""Token-level divergences between the rollout policy mu and the current policy pi.

Every estimator is the divergence of a coarse-grained next-token distribution, hence a lower bound
of the full-vocabulary divergence (algorithm_spec.md section 2):

* binary: the sampled token vs everything else (inputs: the sampled token's logprobs, shape [...]);
* top-K: mu's top-K tokens plus the sampled token, plus an 'other' bucket holding 1 - sum
  (inputs: logprobs over the same token set, shape [..., S]; a padded slot is -inf in both).

All KL divergences are KL(mu || pi). Results are float32 (float64 when given float64), never carry
gradient, and have the batch shape of the inputs. Every estimator is selectable by name
(`get_divergence`); add one with `@register_divergence("name")` (and to `TOPK_DIVERGENCES` if it takes
a token set).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cppo_rl.algorithms._checks import check_floating, check_same_shape
from cppo_rl.algorithms.registry import Registry

BINARY_KL_EPS = 1e-8  # added inside the 'rest' log ratio, as the reference implementations do
OTHER_BUCKET_FLOOR = 1e-12  # the 'other' bucket's floor in the top-K KL

Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""`fn(mu_logprobs, pi_logprobs) -> D`: [...] -> [...] (binary) or [..., S] -> [...] (top-K)."""

DIVERGENCES: Registry[Divergence] = Registry("divergence")
register_divergence = DIVERGENCES.register
get_divergence = DIVERGENCES.get


def _as_float(tensor: torch.Tensor) -> torch.Tensor:
    """Detach and upcast to at least float32."""
    tensor = tensor.detach()
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def _check_pair(mu_logprobs: torch.Tensor, pi_logprobs: torch.Tensor, caller: str) -> None:
    check_floating("mu_logprobs", mu_logprobs, caller)
    check_floating("pi_logprobs", pi_logprobs, caller)
    check_same_shape(caller, "mu_logprobs", {"mu_logprobs": mu_logprobs, "pi_logprobs": pi_logprobs})


@register_divergence("binary_tv")
def binary_tv(mu_logprobs: torch.Tensor, pi_logprobs: torch.Tensor) -> torch.Tensor:
    """Binary TV `|mu(a_t) - pi(a_t)|` from the sampled token's logprobs, shape [...] -> [...]."""
    _check_pair(mu_logprobs, pi_logprobs, "binary_tv")
    return (_as_float(mu_logprobs).exp() - _as_float(pi_logprobs).exp()).abs()


@register_divergence("binary_kl")
def binary_kl(mu_logprobs: torch.Tensor, pi_logprobs: torch.Tensor) -> torch.Tensor:
    """Binary KL(mu || pi) over {sampled token, rest}, shape [...] -> [...], clamped at >= 0."""
    _check_pair(mu_logprobs, pi_logprobs, "binary_kl")
    log_mu, log_pi = _as_float(mu_logprobs), _as_float(pi_logprobs)
    p_mu, p_pi = log_mu.exp(), log_pi.exp()
    sampled = torch.where(p_mu > 0, p_mu * (log_mu - log_pi), torch.zeros_like(p_mu))
    rest = (1 - p_mu) * torch.log((1 - p_mu + BINARY_KL_EPS) / (1 - p_pi + BINARY_KL_EPS))
    return (sampled + rest).clamp_min(0.0)


def _set_probabilities(logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities of the set slots [..., S] and of the 'other' bucket [...] (>= 0)."""
    probs = logprobs.exp()  # exp(-inf) = 0 for padded slots
    other = (1 - probs.sum(dim=-1)).clamp_min(0.0)
    return probs, other


@register_divergence("topk_tv")
def topk_tv(mu_logprobs: torch.Tensor, pi_logprobs: torch.Tensor) -> torch.Tensor:
    """Top-K TV over mu's token set plus 'other', shape [..., S] -> [...].

    `0.5 * (sum_a |mu(a) - pi(a)| + |mu(other) - pi(other)|)` with `other = 1 - sum over the set`.
    """
    _check_pair(mu_logprobs, pi_logprobs, "topk_tv")
    p_mu, other_mu = _set_probabilities(_as_float(mu_logprobs))
    p_pi, other_pi = _set_probabilities(_as_float(pi_logprobs))
    return 0.5 * ((p_mu - p_pi).abs().sum(dim=-1) + (other_mu - other_pi).abs())


@register_divergence("topk_kl")
def topk_kl(mu_logprobs: torch.Tensor, pi_logprobs: torch.Tensor) -> torch.Tensor:
    """Top-K KL(mu || pi) over mu's token set plus 'other', shape [..., S] -> [...].

    Slots where mu has probability 0 (padding) contribute 0; the 'other' bucket is floored at 1e-12
    on both sides.
    """
    _check_pair(mu_logprobs, pi_logprobs, "topk_kl")
    log_mu, log_pi = _as_float(mu_logprobs), _as_float(pi_logprobs)
    p_mu, other_mu = _set_probabilities(log_mu)
    _, other_pi = _set_probabilities(log_pi)
    slot_terms = torch.where(p_mu > 0, p_mu * (log_mu - log_pi), torch.zeros_like(p_mu))
    other_mu = other_mu.clamp_min(OTHER_BUCKET_FLOOR)
    other_pi = other_pi.clamp_min(OTHER_BUCKET_FLOOR)
    other_term = other_mu * (other_mu.log() - other_pi.log())
    return (slot_terms.sum(dim=-1) + other_term).clamp_min(0.0)


TOPK_DIVERGENCES = frozenset({"topk_tv", "topk_kl"})
"""The estimators that take [..., S] token-set logprobs."""
