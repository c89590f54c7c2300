"""Token-level divergences between the rollout policy mu and the current policy pi.

The binary and top-K estimators are divergences of a coarse-grained next-token distribution, hence
lower bounds of the full-vocabulary divergence (algorithm_spec.md section 2):

* binary: the sampled token vs everything else (inputs: the sampled token's logprobs, shape [...]);
* top-K: mu's top-K tokens plus the sampled token, plus an 'other' bucket holding 1 - sum
  (inputs: logprobs over the same token set, shape [..., S]; a padded slot is -inf in both).

The sampled-token estimators k2 and k3 (TRM's, spec 8.11) take the sampled token's logprobs, shape
[...], and are single-sample estimates of KL(mu || pi) for a token drawn from mu (k3 unbiased, k2 to
second order in log rho), not bounds.

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
SAMPLED_LOG_RATIO_BOUND = 20.0  # |log rho| clamp of k2 / k3, as the TRM authors' code (verl SAFETY_BOUND)

Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""`fn(mu_logprobs, pi_logprobs) -> D`: [...] -> [...] (binary, sampled k2 / k3) or [..., S] -> [...] (top-K)."""

DIVERGENCES: Registry[Divergence] = Registry("divergence")
register_divergence = DIVERGENCES.register
get_divergence = DIVERGENCES.get


def _result_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, else float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _as_float(tensor: torch.Tensor) -> torch.Tensor:
    """Detach and upcast to at least float32."""
    return tensor.detach().to(_result_dtype(tensor))


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


def _sampled_log_ratio(mu_logprobs: torch.Tensor, pi_logprobs: torch.Tensor, caller: str) -> torch.Tensor:
    """`log pi - log mu` of the sampled token clamped to +-20, detached, [...] -> [...]."""
    _check_pair(mu_logprobs, pi_logprobs, caller)
    bound = SAMPLED_LOG_RATIO_BOUND
    return (_as_float(pi_logprobs) - _as_float(mu_logprobs)).clamp(-bound, bound)


@register_divergence("sampled_k2")
def sampled_k2(mu_logprobs: torch.Tensor, pi_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 `0.5 * (log rho)^2` of the sampled token, rho = pi / mu, shape [...] -> [...]."""
    return 0.5 * _sampled_log_ratio(mu_logprobs, pi_logprobs, "sampled_k2").square()


@register_divergence("sampled_k3")
def sampled_k3(mu_logprobs: torch.Tensor, pi_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 `rho - 1 - log rho` of the sampled token, rho = pi / mu, shape [...] -> [...].

    Computed as `expm1(x) - x` in float64 (no cancellation for small x = log rho), clamped at >= 0.
    """
    x = _sampled_log_ratio(mu_logprobs, pi_logprobs, "sampled_k3")
    exact = x.double()
    return (torch.expm1(exact) - exact).clamp_min(0.0).to(x.dtype)


def _set_probabilities(logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 probabilities of the set slots [..., S] and of the 'other' bucket [...] (>= 0).

    `other = -expm1(logsumexp(set))` keeps a tiny bucket exact where `1 - sum` would round it away;
    padded slots (-inf) count 0, an all-padded row has other = 1.
    """
    logprobs = logprobs.detach().double()
    other = -torch.expm1(torch.logsumexp(logprobs, dim=-1))
    return logprobs.exp(), other.clamp_min(0.0)


@register_divergence("topk_tv")
def topk_tv(mu_logprobs: torch.Tensor, pi_logprobs: torch.Tensor) -> torch.Tensor:
    """Top-K TV over mu's token set plus 'other', shape [..., S] -> [...].

    `0.5 * (sum_a |mu(a) - pi(a)| + |mu(other) - pi(other)|)` with `other = 1 - sum over the set`,
    computed in float64.
    """
    _check_pair(mu_logprobs, pi_logprobs, "topk_tv")
    p_mu, other_mu = _set_probabilities(mu_logprobs)
    p_pi, other_pi = _set_probabilities(pi_logprobs)
    tv = 0.5 * ((p_mu - p_pi).abs().sum(dim=-1) + (other_mu - other_pi).abs())
    return tv.to(_result_dtype(mu_logprobs))


@register_divergence("topk_kl")
def topk_kl(mu_logprobs: torch.Tensor, pi_logprobs: torch.Tensor) -> torch.Tensor:
    """Top-K KL(mu || pi) over mu's token set plus 'other', shape [..., S] -> [...], computed in float64.

    Slots where mu has probability 0 (padding) contribute 0; the 'other' bucket is floored at 1e-12
    on both sides.
    """
    _check_pair(mu_logprobs, pi_logprobs, "topk_kl")
    log_mu, log_pi = mu_logprobs.detach().double(), pi_logprobs.detach().double()
    p_mu, other_mu = _set_probabilities(log_mu)
    _, other_pi = _set_probabilities(log_pi)
    slot_terms = torch.where(p_mu > 0, p_mu * (log_mu - log_pi), torch.zeros_like(p_mu))
    other_mu = other_mu.clamp_min(OTHER_BUCKET_FLOOR)
    other_pi = other_pi.clamp_min(OTHER_BUCKET_FLOOR)
    other_term = other_mu * (other_mu.log() - other_pi.log())
    return (slot_terms.sum(dim=-1) + other_term).clamp_min(0.0).to(_result_dtype(mu_logprobs))


TOPK_DIVERGENCES = frozenset({"topk_tv", "topk_kl"})
"""The estimators that take [..., S] token-set logprobs."""
