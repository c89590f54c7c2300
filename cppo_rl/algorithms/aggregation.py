"""Loss aggregation with global normalisers.

A learner splits one mini-batch over data-parallel ranks and gradient-accumulation micro-batches.
`aggregate_loss` returns this shard's *sum* divided by the *global* normaliser, so the sum of the
returned values over all shards equals the loss of the whole mini-batch, whatever the micro-batch
size or world size. Called without global counts, it normalises by this shard's own counts.

Modes (the normaliser always counts valid response tokens, never the policy mask):
  token-mean               sum_{i,t} l_it / N_tokens
  seq-mean-token-sum       sum_i (sum_t l_it) / N_seqs
  seq-mean-token-mean      sum_i (mean_t l_it) / N_seqs
  seq-mean-token-sum-norm  sum_i (sum_t l_it) / (N_seqs * horizon)    (horizon: a constant)
N_seqs counts responses with at least one valid token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cppo_rl.algorithms._checks import check_bool, check_floating, check_rank, check_same_shape

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class LossNormaliser:
    """Global counts for `aggregate_loss`; None means "use this shard's own count".

    num_tokens:    valid response tokens in the whole mini-batch (all ranks, all micro-batches)
    num_sequences: responses with >= 1 valid token in the whole mini-batch
    horizon:       the constant of `seq-mean-token-sum-norm` (the max response length);
                   None -> the padded width of the tensor given
    """

    num_tokens: float | None = None
    num_sequences: float | None = None
    horizon: int | None = None


def local_counts(response_mask: torch.Tensor) -> tuple[int, int]:
    """(valid tokens, responses with >= 1 valid token) of one shard; sum these across shards."""
    return int(response_mask.sum()), int(response_mask.any(dim=-1).sum())


def aggregate_loss(
    token_losses: torch.Tensor,
    response_mask: torch.Tensor,
    mode: str,
    normaliser: LossNormaliser | None = None,
) -> torch.Tensor:
    """Reduce [B, T] per-token losses to a scalar by `mode` (see the module docstring).

    Padding (response_mask False) never contributes, even when its loss is inf or NaN.
    """
    caller = "aggregate_loss"
    check_floating("token_losses", token_losses, caller)
    check_bool("response_mask", response_mask, caller)
    check_rank("token_losses", token_losses, 2, "[B, T]", caller)
    check_same_shape(caller, "token_losses", {"token_losses": token_losses, "response_mask": response_mask})
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"{caller}: unknown `mode` {mode!r}; choose one of {', '.join(LOSS_AGG_MODES)}")
    normaliser = normaliser or LossNormaliser()
    masked = torch.where(response_mask, token_losses, torch.zeros((), dtype=token_losses.dtype))
    tokens_here, sequences_here = local_counts(response_mask)

    if mode == "token-mean":
        count = normaliser.num_tokens if normaliser.num_tokens is not None else tokens_here
        return masked.sum() / max(float(count), 1.0)

    sequences = normaliser.num_sequences if normaliser.num_sequences is not None else sequences_here
    sequences = max(float(sequences), 1.0)
    if mode == "seq-mean-token-mean":
        per_sequence = masked.sum(dim=-1) / response_mask.sum(dim=-1).clamp_min(1)
        return per_sequence.sum() / sequences
    if mode == "seq-mean-token-sum":
        return masked.sum() / sequences
    horizon = normaliser.horizon if normaliser.horizon is not None else token_losses.shape[-1]
    if horizon < 1:
        raise ValueError(f"{caller}: `normaliser.horizon` must be >= 1, got {horizon}")
    return masked.sum() / (sequences * horizon)
