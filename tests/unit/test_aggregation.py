"""Loss aggregation with global normalisers (algorithm_spec.md 3.2 item 4, 6.3 item 11, 8.5)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cppo_rl.algorithms.aggregation import LOSS_AGG_MODES, LossNormaliser, aggregate_loss, local_counts

# ----------------------------------------------------------------------------------------------
# A hand-made batch: row 0 has 3 valid tokens, row 1 has 1, row 2 none; width 4
# ----------------------------------------------------------------------------------------------

MASK = torch.tensor([[True, True, True, False], [True, False, False, False], [False, False, False, False]])
VALUES = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])

# token-mean: (1+2+3+4)/4; seq-mean-token-sum: (6+4)/2; seq-mean-token-mean: (2+4)/2;
# seq-mean-token-sum-norm with the padded width 4 as horizon: (6+4)/(2*4)
HAND_EXPECTED = {
    "token-mean": 2.5,
    "seq-mean-token-sum": 5.0,
    "seq-mean-token-mean": 3.0,
    "seq-mean-token-sum-norm": 1.25,
}


def test_modes_are_the_documented_four():
    assert set(LOSS_AGG_MODES) == set(HAND_EXPECTED)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_hand_example_equals_the_documented_formula(mode):
    out = aggregate_loss(VALUES, MASK, mode)
    assert out.dim() == 0
    assert out.item() == pytest.approx(HAND_EXPECTED[mode], abs=1e-6)


def test_seq_mean_token_sum_norm_uses_the_given_horizon():
    out = aggregate_loss(VALUES, MASK, "seq-mean-token-sum-norm", LossNormaliser(horizon=10))
    assert out.item() == pytest.approx(10.0 / (2 * 10), abs=1e-7)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("junk", [math.inf, -math.inf, math.nan, 1e30])
def test_padding_with_inf_or_nan_does_not_leak(mode, junk):
    losses = torch.where(MASK, VALUES, torch.tensor(junk)).requires_grad_(True)
    out = aggregate_loss(losses, MASK, mode)
    assert out.item() == pytest.approx(HAND_EXPECTED[mode], abs=1e-6)
    out.backward()
    assert torch.isfinite(losses.grad).all()
    assert (losses.grad[~MASK] == 0).all()


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_gradient_wrt_token_losses_hand_example(mode):
    losses = VALUES.clone().requires_grad_(True)
    aggregate_loss(losses, MASK, mode).backward()
    row_len = MASK.sum(-1, keepdim=True).clamp_min(1).float()
    expected_valid = {
        "token-mean": torch.full_like(VALUES, 1 / 4),
        "seq-mean-token-sum": torch.full_like(VALUES, 1 / 2),
        "seq-mean-token-mean": (1 / row_len / 2).expand_as(VALUES),
        "seq-mean-token-sum-norm": torch.full_like(VALUES, 1 / (2 * 4)),
    }[mode]
    expected = torch.where(MASK, expected_valid, torch.zeros(()))
    torch.testing.assert_close(losses.grad, expected)


def test_global_counts_replace_the_local_ones():
    norm = LossNormaliser(num_tokens=20, num_sequences=8, horizon=16)
    assert aggregate_loss(VALUES, MASK, "token-mean", norm).item() == pytest.approx(10 / 20)
    assert aggregate_loss(VALUES, MASK, "seq-mean-token-sum", norm).item() == pytest.approx(10 / 8)
    assert aggregate_loss(VALUES, MASK, "seq-mean-token-mean", norm).item() == pytest.approx((2 + 4) / 8)
    assert aggregate_loss(VALUES, MASK, "seq-mean-token-sum-norm", norm).item() == pytest.approx(10 / (8 * 16))


def test_local_counts_skip_empty_rows():
    assert local_counts(MASK) == (4, 2)
    assert all(isinstance(x, int) for x in local_counts(MASK))
    assert local_counts(torch.zeros(3, 5, dtype=torch.bool)) == (0, 0)


@pytest.mark.parametrize("mode", ["seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_rows_without_valid_tokens_are_not_counted_as_sequences(mode):
    norm = LossNormaliser(horizon=4)
    with_empty = aggregate_loss(VALUES, MASK, mode, norm)
    without_empty = aggregate_loss(VALUES[:2], MASK[:2], mode, norm)
    assert with_empty.item() == pytest.approx(without_empty.item(), abs=1e-7)
    only_empty = aggregate_loss(VALUES[2:], MASK[2:], mode, norm)
    assert only_empty.item() == 0.0 and torch.isfinite(only_empty)


def test_seq_mean_token_sum_norm_horizon_is_constant_not_the_shard_width():
    norm = LossNormaliser(horizon=12)
    narrow = aggregate_loss(VALUES[:, :3], MASK[:, :3], "seq-mean-token-sum-norm", norm)
    wide = aggregate_loss(
        torch.cat([VALUES, torch.full((3, 5), 7.0)], dim=-1),
        torch.cat([MASK, torch.zeros(3, 5, dtype=torch.bool)], dim=-1),
        "seq-mean-token-sum-norm",
        norm,
    )
    assert narrow.item() == pytest.approx(10 / (2 * 12), abs=1e-7)
    assert wide.item() == pytest.approx(narrow.item(), abs=1e-7)


def test_unknown_mode_lists_the_modes():
    with pytest.raises(ValueError, match="token-sum-mean") as info:
        aggregate_loss(VALUES, MASK, "token-sum-mean")
    for mode in LOSS_AGG_MODES:
        assert mode in str(info.value)


def test_bad_inputs_raise_naming_the_argument():
    with pytest.raises(TypeError, match="response_mask"):
        aggregate_loss(VALUES, MASK.float(), "token-mean")
    with pytest.raises(TypeError, match="token_losses"):
        aggregate_loss(VALUES.long(), MASK, "token-mean")
    with pytest.raises(ValueError, match="response_mask"):
        aggregate_loss(VALUES, MASK[:, :3], "token-mean")
    with pytest.raises(ValueError, match="token_losses"):
        aggregate_loss(VALUES[0], MASK[0], "token-mean")
    with pytest.raises(ValueError, match="horizon"):
        aggregate_loss(VALUES, MASK, "seq-mean-token-sum-norm", LossNormaliser(horizon=0))


# ----------------------------------------------------------------------------------------------
# Global-normaliser invariance: shards (ranks x micro-batches) with different padded widths
# ----------------------------------------------------------------------------------------------

HORIZON = 16


def random_batch(seed: int, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 token losses (garbage on padding) and a right-padded mask with one empty row."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, width + 1, (rows,), generator=generator)
    lengths[0] = width
    lengths[rows // 2] = 0
    mask = torch.arange(width).expand(rows, width) < lengths.unsqueeze(-1)
    losses = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    losses = torch.where(mask, losses, torch.full_like(losses, math.nan))
    return losses, mask


def shard(losses: torch.Tensor, mask: torch.Tensor, sizes: list[int], extra_pads: list[int]):
    """Split rows into shards of `sizes`; cut each shard to its longest row plus `extra_pads[i]` columns
    (garbage losses there). Shard losses stay connected to `losses` for autograd."""
    shards, start = [], 0
    for size, extra in zip(sizes, extra_pads, strict=True):
        rows_loss, rows_mask = losses[start : start + size], mask[start : start + size]
        start += size
        used = int(rows_mask.sum(-1).max()) if size else 0
        width = used + extra
        if width <= rows_loss.shape[-1]:
            part_loss, part_mask = rows_loss[:, :width], rows_mask[:, :width]
        else:
            fill = width - rows_loss.shape[-1]
            part_loss = torch.cat([rows_loss, torch.full((size, fill), math.inf, dtype=losses.dtype)], dim=-1)
            part_mask = torch.cat([rows_mask, torch.zeros(size, fill, dtype=torch.bool)], dim=-1)
        shards.append((part_loss, part_mask))
    assert start == losses.shape[0]
    return shards


def sharded_equals_full(losses_leaf, mask, sizes, extra_pads, mode):
    shards = shard(losses_leaf, mask, sizes, extra_pads)
    counts = [local_counts(m) for _, m in shards]
    norm = LossNormaliser(
        num_tokens=sum(c[0] for c in counts), num_sequences=sum(c[1] for c in counts), horizon=HORIZON
    )
    assert (norm.num_tokens, norm.num_sequences) == local_counts(mask)
    total = sum(aggregate_loss(part, m, mode, norm) for part, m in shards)
    (grad_sharded,) = torch.autograd.grad(total, losses_leaf)
    full = aggregate_loss(losses_leaf, mask, mode, LossNormaliser(horizon=HORIZON))
    (grad_full,) = torch.autograd.grad(full, losses_leaf)
    assert torch.isfinite(full)
    torch.testing.assert_close(total, full, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad_sharded, grad_full, rtol=0, atol=1e-9)
    assert (grad_full[~mask] == 0).all()
    return total


# (name, rows per shard) for a 12-row batch; a rank's micro-batches are consecutive shards
LAYOUTS = {
    "2 ranks x 2 micro-batches": [3, 3, 4, 2],
    "1 rank x 4 micro-batches": [5, 1, 4, 2],
    "4 ranks x 1 micro-batch": [2, 4, 3, 3],
    "single shard": [12],
}


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sum_over_shards_equals_the_full_batch(mode, layout):
    losses, mask = random_batch(seed=17, rows=12, width=9)
    leaf = losses.requires_grad_(True)
    sizes = LAYOUTS[layout]
    extra_pads = [(3 * i + 1) % 5 for i in range(len(sizes))]  # differing padded widths per shard
    sharded_equals_full(leaf, mask, sizes, extra_pads, mode)


@settings(derandomize=True, deadline=None, max_examples=40)
@given(
    st.integers(0, 10_000),
    st.sampled_from(LOSS_AGG_MODES),
    st.lists(st.integers(1, 4), min_size=1, max_size=6),
    st.lists(st.integers(0, 6), min_size=6, max_size=6),
)
def test_sum_over_random_shards_equals_the_full_batch(seed, mode, sizes, pads):
    losses, mask = random_batch(seed=seed, rows=sum(sizes) + 1, width=8)
    sizes = [*sizes[:-1], sizes[-1] + 1]
    sharded_equals_full(losses.requires_grad_(True), mask, sizes, pads[: len(sizes)], mode)


def test_local_normalisers_would_not_be_invariant():
    """Sanity check of the test itself: without global counts the shard sum differs."""
    losses, mask = random_batch(seed=17, rows=12, width=9)
    losses = torch.nan_to_num(losses, nan=0.0)
    shards = shard(losses, mask, [3, 3, 4, 2], [0, 1, 2, 3])
    local = sum(aggregate_loss(part, m, "token-mean") for part, m in shards)
    assert abs(local.item() - aggregate_loss(losses, mask, "token-mean").item()) > 1e-3
