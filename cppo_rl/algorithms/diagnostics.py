"""Per-step diagnostics of a policy mask: what was masked, by which rule, and where.

All values are 0-dim float32 tensors (no host sync), keyed by short names the trainer prefixes
(e.g. `actor/`). Fractions are over valid response tokens. Position deciles are relative to each
response's own length: decile k holds positions t with floor(10 (t - 1) / L) = k; a decile with no
token reports NaN.
"""

from __future__ import annotations

import torch

from cppo_rl.algorithms.masks import CPPOMaskResult, response_lengths

NUM_DECILES = 10


def _fraction(selected: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return (selected & valid).sum().float() / valid.sum().clamp_min(1).float()


def position_deciles(response_mask: torch.Tensor) -> torch.Tensor:
    """int64 [B, T]: each position's decile within its own response (0..9); padding gets 9 (unused)."""
    lengths = response_lengths(response_mask).clamp_min(1).unsqueeze(-1)
    columns = torch.arange(response_mask.shape[-1], device=response_mask.device).expand(response_mask.shape)
    return (columns * NUM_DECILES // lengths).clamp(max=NUM_DECILES - 1)


def _per_decile_mean(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over valid tokens in each position decile, float32 [10] (NaN if empty)."""
    deciles = position_deciles(response_mask)[response_mask]
    picked = values[response_mask].float()
    sums = torch.zeros(NUM_DECILES, device=values.device).index_add_(0, deciles, picked)
    counts = torch.zeros(NUM_DECILES, device=values.device).index_add_(0, deciles, torch.ones_like(picked))
    return sums / counts  # 0 / 0 = NaN for an empty decile


def mask_diagnostics(
    keep: torch.Tensor, response_mask: torch.Tensor, divergence: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Masked fraction (overall and per decile) and mean divergence (overall and per decile).

    `keep` is the multiplier the loss applied per token: bool, or a float gate in [0, 1]
    (a soft gate counts as masked by `1 - gate`).
    """
    valid = response_mask
    masked = 1.0 - keep.float()
    tokens = valid.sum().clamp_min(1).float()
    metrics = {"masked_frac": (masked * valid).sum() / tokens}
    for k, value in enumerate(_per_decile_mean(masked, valid)):
        metrics[f"masked_frac_decile_{k}"] = value
    if divergence is not None:
        d = torch.where(valid, divergence.detach().float(), torch.zeros((), device=divergence.device))
        metrics["divergence_mean"] = d.sum() / tokens
        metrics["divergence_max"] = d.max() if d.numel() else torch.zeros(())
        for k, value in enumerate(_per_decile_mean(d, valid)):
            metrics[f"divergence_mean_decile_{k}"] = value
    return metrics


def cppo_diagnostics(result: CPPOMaskResult, keep: torch.Tensor, divergence: torch.Tensor) -> dict[str, torch.Tensor]:
    """`mask_diagnostics` plus which CPPO rule masked each token and the effective delta_b.

    masked_by_token_frac:  away-from-mu tokens with w_t D_t > delta
    masked_by_prefix_frac: away-from-mu tokens within delta that broke the prefix budget
    toward_mu_frac:        tokens whose update moves toward mu (never masked)
    kept_toward_mu_frac:   toward-mu tokens outside the trust region, kept only by that clause
    delta_b_mean:          the prefix budget rate, averaged over non-empty responses
    """
    valid = result.response_mask
    away = ~result.toward_mu
    outside = result.token_violation | result.prefix_violation
    metrics = mask_diagnostics(keep, valid, divergence)
    metrics["masked_by_token_frac"] = _fraction(result.token_violation & away, valid)
    metrics["masked_by_prefix_frac"] = _fraction(result.prefix_violation & away, valid)
    metrics["toward_mu_frac"] = _fraction(result.toward_mu, valid)
    metrics["kept_toward_mu_frac"] = _fraction(result.toward_mu & outside, valid)
    non_empty = valid.any(dim=-1)
    rates = result.delta_b.squeeze(-1).float()
    metrics["delta_b_mean"] = rates[non_empty].mean() if non_empty.any() else rates.mean()
    return metrics
