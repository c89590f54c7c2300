"""Outcome advantages (algorithm_spec.md section 1 and 8.3)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cppo_rl.algorithms.advantages import (
    ADVANTAGES,
    count_constant_groups,
    get_advantage,
    grpo_advantages,
    register_advantage,
    rloo_advantages,
)

# groups with non-contiguous, unsorted, negative and large ids
REWARDS = torch.tensor([1.0, 0.0, 3.0, 5.0, 2.0, 4.0])
GROUPS = torch.tensor([7, -2, 7, 100, -2, 100])


def test_grpo_mean_centres_per_group_with_unsorted_ids():
    # group 7: (1, 3) mean 2; group -2: (0, 2) mean 1; group 100: (5, 4) mean 4.5
    expected = torch.tensor([-1.0, -1.0, 1.0, 0.5, 1.0, -0.5])
    out = grpo_advantages(REWARDS, GROUPS)
    assert out.dtype == torch.float32 and out.shape == (6,)
    torch.testing.assert_close(out, expected)
    # the default is mean-centring only (spec 8.3)
    torch.testing.assert_close(grpo_advantages(REWARDS, GROUPS, std_norm=False), expected)


def test_grpo_accepts_int32_group_ids_and_float64_rewards():
    out = grpo_advantages(REWARDS.double(), GROUPS.int())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, grpo_advantages(REWARDS, GROUPS))


def test_grpo_std_norm_divides_by_the_unbiased_std_plus_eps():
    rewards = torch.tensor([1.0, 0.0, 3.0, 5.0, 2.0, 4.0, 0.0])
    groups = torch.tensor([3, 9, 3, 9, 3, 9, 9])
    eps = 1e-6
    # group 3: (1, 3, 2) mean 2, unbiased std 1; group 9: (0, 5, 4, 0) mean 2.25
    g9 = torch.tensor([0.0, 5.0, 4.0, 0.0], dtype=torch.float64)
    std9 = float(g9.std(unbiased=True))
    expected = [
        (1 - 2) / (1 + eps),
        (0 - 2.25) / (std9 + eps),
        (3 - 2) / (1 + eps),
        (5 - 2.25) / (std9 + eps),
        0.0 / (1 + eps),
        (4 - 2.25) / (std9 + eps),
        (0 - 2.25) / (std9 + eps),
    ]
    out = grpo_advantages(rewards, groups, std_norm=True, eps=eps)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float32))
    # a bigger eps shrinks the result accordingly
    out_big = grpo_advantages(rewards, groups, std_norm=True, eps=1.0)
    assert out_big[0].item() == pytest.approx(-1 / 2, rel=1e-6)


@pytest.mark.parametrize("std_norm", [False, True])
@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_constant_group_and_singleton_group_give_zero(name, std_norm):
    rewards = torch.tensor([0.7, 0.7, 0.7, 1.0, 0.0, 1.0, 5.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2])  # group 2 has one response
    out = get_advantage(name)(rewards, groups, std_norm=std_norm)
    assert (out[:3] == 0).all()
    assert out[6] == 0
    assert torch.isfinite(out).all()
    assert (out[3:6] != 0).all()


@settings(derandomize=True, deadline=None, max_examples=50)
@given(st.floats(-100, 100, allow_nan=False, width=32), st.integers(1, 64), st.booleans())
def test_all_equal_group_is_exactly_zero(value, size, std_norm):
    rewards = torch.full((size + 2,), value, dtype=torch.float32)
    rewards[-2:] = torch.tensor([0.0, 1.0])  # another, informative group
    groups = torch.tensor([3] * size + [1, 1])
    assert (grpo_advantages(rewards, groups, std_norm=std_norm)[:size] == 0).all()
    assert (rloo_advantages(rewards, groups, std_norm=std_norm)[:size] == 0).all()
    assert count_constant_groups(rewards, groups) == 1


def test_rloo_formula():
    rewards = torch.tensor([1.0, 2.0, 6.0, 3.0, 0.0, 4.0])
    groups = torch.tensor([5, 5, 5, 8, 2, 8])
    # group 5: r_i - mean of the other two; group 8: r_i - the other one; group 2: single -> 0
    expected = torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5, 3 - 4.0, 0.0, 4 - 3.0])
    out = rloo_advantages(rewards, groups)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    # std_norm divides by the group's unbiased std + eps, as GRPO's: group 5 has std 2.646, group 8 std 0.707
    std5, std8 = float(torch.tensor([1.0, 2.0, 6.0]).std()), float(torch.tensor([3.0, 4.0]).std())
    stds = torch.tensor([std5, std5, std5, std8, 1.0, std8]) + 1e-6
    torch.testing.assert_close(rloo_advantages(rewards, groups, std_norm=True), expected / stds)


@settings(derandomize=True, deadline=None, max_examples=60)
@given(
    st.lists(
        st.tuples(st.integers(-3, 40), st.floats(-10, 10, allow_nan=False, allow_infinity=False)),
        min_size=1,
        max_size=24,
    )
)
def test_grpo_and_rloo_properties(pairs):
    groups = torch.tensor([g for g, _ in pairs])
    rewards = torch.tensor([r for _, r in pairs], dtype=torch.float64)
    grpo = grpo_advantages(rewards, groups).double()
    normed = grpo_advantages(rewards, groups, std_norm=True).double()
    rloo = rloo_advantages(rewards, groups).double()
    rloo_normed = rloo_advantages(rewards, groups, std_norm=True).double()
    for group in groups.unique():
        members = groups == group
        r = rewards[members]
        n = int(members.sum())
        centred = r - r.mean()
        torch.testing.assert_close(grpo[members], centred, rtol=1e-5, atol=1e-5)
        assert abs(float(grpo[members].sum())) < 1e-4
        std = float(r.std(unbiased=True)) if n > 1 else 0.0
        torch.testing.assert_close(normed[members], centred / (std + 1e-6), rtol=1e-5, atol=1e-4)
        # RLOO = n / (n - 1) * GRPO's advantage, with or without std_norm; 0 for a group of one
        scale = n / (n - 1) if n > 1 else 0.0
        torch.testing.assert_close(rloo[members], scale * centred, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(rloo_normed[members], scale * centred / (std + 1e-6), rtol=1e-5, atol=1e-4)


def test_count_constant_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0])
    groups = torch.tensor([4, 4, 9, 9, 11, 20, 20, 20])  # constant: 4, 11 (single), 20
    assert count_constant_groups(rewards, groups) == 3
    assert isinstance(count_constant_groups(rewards, groups), int)
    assert count_constant_groups(torch.tensor([0.0, 1.0]), torch.tensor([1, 1])) == 0
    assert count_constant_groups(torch.zeros(0), torch.zeros(0, dtype=torch.long)) == 0


def test_empty_batch_gives_empty_advantages():
    for fn in (grpo_advantages, rloo_advantages):
        out = fn(torch.zeros(0), torch.zeros(0, dtype=torch.long))
        assert out.shape == (0,)


@pytest.mark.parametrize("fn", [grpo_advantages, rloo_advantages, count_constant_groups])
def test_bad_inputs_raise_naming_the_argument(fn):
    groups = torch.tensor([0, 0, 1])
    with pytest.raises(TypeError, match="rewards"):
        fn(torch.tensor([1, 0, 1]), groups)
    with pytest.raises(TypeError, match="group_index"):
        fn(torch.tensor([1.0, 0.0, 1.0]), groups.float())
    with pytest.raises(TypeError, match="group_index"):
        fn(torch.tensor([1.0, 0.0, 1.0]), [0, 0, 1])
    with pytest.raises(ValueError, match="group_index"):
        fn(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="rewards"):
        fn(torch.tensor([[1.0, 0.0, 1.0]]), groups)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="rewards"):
            fn(torch.tensor([1.0, bad, 1.0]), groups)


def test_results_do_not_carry_gradient():
    rewards = torch.tensor([1.0, 0.0, 3.0], requires_grad=True)
    groups = torch.tensor([0, 0, 0])
    assert not grpo_advantages(rewards, groups).requires_grad
    assert not rloo_advantages(rewards, groups).requires_grad


def test_get_advantage_by_name_and_unknown_name():
    assert get_advantage("grpo") is grpo_advantages
    assert get_advantage("rloo") is rloo_advantages
    assert ADVANTAGES.names() == ["grpo", "rloo"]
    with pytest.raises(ValueError, match="unknown advantage estimator 'reinforce_pp'; known: grpo, rloo"):
        get_advantage("reinforce_pp")
    with pytest.raises(ValueError, match="advantage estimator 'grpo' is already registered"):
        register_advantage("grpo")(rloo_advantages)
    assert get_advantage("grpo") is grpo_advantages


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_every_estimator_takes_the_one_signature(name):
    """What the trainer calls: `fn(rewards [N], group_index [N], std_norm=...)` -> float32 [N]."""
    fn = get_advantage(name)
    plain, normed = fn(REWARDS, GROUPS, std_norm=False), fn(REWARDS, GROUPS, std_norm=True)
    assert plain.dtype == normed.dtype == torch.float32 and plain.shape == normed.shape == REWARDS.shape
    torch.testing.assert_close(fn(REWARDS, GROUPS), plain)  # std_norm defaults to off (spec 8.3)
    # groups 7 (1, 3), -2 (0, 2), 100 (5, 4): unbiased stds sqrt(2), sqrt(2), 1 / sqrt(2)
    stds = torch.tensor([2**0.5, 2**0.5, 2**0.5, 2**-0.5, 2**0.5, 2**-0.5])
    torch.testing.assert_close(normed, plain / (stds + 1e-6))
