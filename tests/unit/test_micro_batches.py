"""Token-budget micro-batches over token-balanced ranks (cppo_rl/learner/micro_batches.py): every row once, the
budget kept, the same micro-step count on every rank, balanced loads, and the fixed-size plan unchanged."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cppo_rl.learner.micro_batches import Batching, balance_ranks, padded_tokens, plan_minibatch


@st.composite
def minibatches(draw):
    world_size = draw(st.integers(1, 4))
    share = draw(st.integers(1, 12))
    tokens = draw(st.lists(st.integers(1, 400), min_size=world_size * share, max_size=world_size * share))
    budget = draw(st.integers(1, 1200))
    return tokens, world_size, budget


@settings(max_examples=300, deadline=None)
@given(minibatches(), st.booleans())
def test_a_plan_trains_every_row_once_within_the_budget_with_equal_step_counts(case, packed):
    tokens, world_size, budget = case
    plan = plan_minibatch(tokens, world_size, budget, packed)
    rows = sorted(row for batches in plan for batch in batches for row in batch)
    assert rows == list(range(len(tokens)))
    assert len({len(batches) for batches in plan}) == 1  # every rank runs the same number of micro-steps
    for batches in plan:
        assert len({row for batch in batches for row in batch}) == len(tokens) // world_size  # equal row counts
        for batch in batches:
            assert batch and batch == sorted(batch)
            assert padded_tokens(batch, tokens, packed) <= budget or len(batch) == 1


@settings(max_examples=300, deadline=None)
@given(minibatches())
def test_balanced_ranks_are_within_one_row_of_the_mean(case):
    tokens, world_size, _ = case
    loads = [sum(tokens[r] for r in rows) for rows in balance_ranks(tokens, world_size)]
    assert max(loads) <= sum(tokens) / world_size + max(tokens)


def test_the_fixed_size_plan_is_the_contiguous_one():
    rows, micro, total = Batching(micro_batch_size=2).rank_plan([5] * 12, rank=1, world_size=2)
    assert rows == list(range(6, 12))
    assert micro == [[0, 1], [2, 3], [4, 5]] and total == 6


def test_packing_computes_no_more_than_padding_and_a_row_at_a_time():
    tokens = [2048, 900, 700, 300, 300, 200, 100, 100]
    for rows in ([0, 1, 2, 3], [1, 4, 5, 6, 7], list(range(8))):
        real = sum(tokens[r] for r in rows)
        assert real <= padded_tokens(rows, tokens, packed=True) <= padded_tokens(rows, tokens)
    assert padded_tokens(list(range(8)), tokens, packed=True) == 3 * 2048  # [2048], [900, 700, 300], [300, ...]


def test_a_long_tailed_minibatch_computes_far_less_padding_within_the_budget():
    """One response at the cap among short ones: fixed micro-batches of 4 pad a whole micro-batch to the cap;
    the budget plan gives the long row a micro-batch of its own and packs the short ones together."""
    tokens = [2048] + [100] * 15
    fixed = Batching(micro_batch_size=4)
    budget = Batching(micro_batch_size=4, max_tokens=2048)
    computed = {}
    for name, batching in (("fixed", fixed), ("budget", budget)):
        total = 0
        for rank in range(2):
            rows, micro, _ = batching.rank_plan(tokens, rank, 2)
            total += sum(padded_tokens([rows[i] for i in batch], tokens) for batch in micro)
        computed[name] = total
    real = sum(tokens)
    assert computed["fixed"] == 4 * 2048 + 3 * 400  # rank 0's first micro-batch is padded to 2048
    assert computed["budget"] < 1.5 * real < computed["fixed"]


def test_uneven_rows_are_refused():
    with pytest.raises(ValueError, match="7 rows do not split over 2 ranks"):
        balance_ranks([1] * 7, 2)
