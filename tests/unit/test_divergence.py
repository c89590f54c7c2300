"""Divergence estimators (algorithm_spec.md sections 2.1, 2.2, 6.3 item 13, 8.6).

The top-K estimators are checked against a hand-written float64 computation on the full vocabulary:
random full distributions mu, pi over V tokens, mu's top-K plus the sampled token as the token set
(S = K + 1 slots, the last one -inf in both when the sampled token is already in the top-K).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cppo_rl.algorithms.divergence import (
    BINARY_KL_EPS,
    DIVERGENCES,
    OTHER_BUCKET_FLOOR,
    binary_kl,
    binary_tv,
    get_divergence,
    register_divergence,
    topk_kl,
    topk_tv,
)

VOCAB = 50
TOP_K = 5
ROWS = 8
TOL = 1e-6

# ----------------------------------------------------------------------------------------------
# Helpers: random full distributions and the reduced token set
# ----------------------------------------------------------------------------------------------


def full_distributions(seed: int, mu_scale: float, pi_noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 full-vocabulary logprobs [ROWS, VOCAB] of mu and of a perturbed pi."""
    generator = torch.Generator().manual_seed(seed)
    mu_logits = mu_scale * torch.randn(ROWS, VOCAB, generator=generator, dtype=torch.float64)
    pi_logits = mu_logits + pi_noise * torch.randn(ROWS, VOCAB, generator=generator, dtype=torch.float64)
    return torch.log_softmax(mu_logits, dim=-1), torch.log_softmax(pi_logits, dim=-1)


def token_set(
    mu_full: torch.Tensor, pi_full: torch.Tensor, sampled_ranks: list[int], k: int = TOP_K
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]]]:
    """mu's top-k plus the sampled token (the token of rank `sampled_ranks[i]` under mu).

    Returns (mu_set, pi_set) [ROWS, k+1] logprobs (last slot -inf in both when the sampled token is
    in the top-k), the sampled token's (mu, pi) logprobs [ROWS], and the vocabulary ids of each set.
    """
    order = torch.argsort(mu_full, dim=-1, descending=True, stable=True)
    mu_set = torch.full((mu_full.shape[0], k + 1), -math.inf, dtype=mu_full.dtype)
    pi_set = torch.full_like(mu_set, -math.inf)
    mu_sampled = torch.empty(mu_full.shape[0], dtype=mu_full.dtype)
    pi_sampled = torch.empty_like(mu_sampled)
    id_sets = []
    for row, rank in enumerate(sampled_ranks):
        ids = order[row, :k].tolist()
        token = int(order[row, rank])
        if token not in ids:
            ids.append(token)
        id_sets.append(ids)
        mu_set[row, : len(ids)] = mu_full[row, ids]
        pi_set[row, : len(ids)] = pi_full[row, ids]
        mu_sampled[row] = mu_full[row, token]
        pi_sampled[row] = pi_full[row, token]
    return mu_set, pi_set, mu_sampled, pi_sampled, id_sets


def reference_topk(mu_full: torch.Tensor, pi_full: torch.Tensor, id_sets: list[list[int]]) -> tuple[list, list]:
    """Spec 2.2 in plain Python floats: (TV, KL) per row over the set plus the 'other' bucket."""
    tvs, kls = [], []
    for row, ids in enumerate(id_sets):
        mu = [math.exp(float(mu_full[row, i])) for i in ids]
        pi = [math.exp(float(pi_full[row, i])) for i in ids]
        other_mu, other_pi = max(1.0 - sum(mu), 0.0), max(1.0 - sum(pi), 0.0)
        tvs.append(0.5 * (sum(abs(a - b) for a, b in zip(mu, pi, strict=True)) + abs(other_mu - other_pi)))
        kl = sum(a * math.log(a / b) for a, b in zip(mu, pi, strict=True) if a > 0)
        other_mu, other_pi = max(other_mu, OTHER_BUCKET_FLOOR), max(other_pi, OTHER_BUCKET_FLOOR)
        kls.append(kl + other_mu * math.log(other_mu / other_pi))
    return tvs, kls


def full_tv_kl(mu_full: torch.Tensor, pi_full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary TV and KL(mu || pi), float64 [ROWS]."""
    tv = 0.5 * (mu_full.exp() - pi_full.exp()).abs().sum(dim=-1)
    kl = (mu_full.exp() * (mu_full - pi_full)).sum(dim=-1)
    return tv, kl


distribution_params = st.tuples(
    st.integers(0, 2**31 - 1),
    st.floats(0.1, 4.0),
    st.floats(0.0, 3.0),
    st.lists(st.integers(0, VOCAB - 1), min_size=ROWS, max_size=ROWS),
)


# ----------------------------------------------------------------------------------------------
# Top-K against the float64 reference; lower bounds; estimator ordering
# ----------------------------------------------------------------------------------------------


@settings(derandomize=True, deadline=None, max_examples=60)
@given(distribution_params)
def test_topk_matches_reference_and_lower_bounds_full_float64(params):
    seed, mu_scale, pi_noise, ranks = params
    mu_full, pi_full = full_distributions(seed, mu_scale, pi_noise)
    mu_set, pi_set, mu_a, pi_a, id_sets = token_set(mu_full, pi_full, ranks)
    ref_tv, ref_kl = reference_topk(mu_full, pi_full, id_sets)
    tv, kl = topk_tv(mu_set, pi_set), topk_kl(mu_set, pi_set)
    assert tv.dtype == torch.float64 and kl.dtype == torch.float64
    assert tv.shape == (ROWS,) and kl.shape == (ROWS,)
    torch.testing.assert_close(tv, torch.tensor(ref_tv, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(kl, torch.tensor(ref_kl, dtype=torch.float64), rtol=1e-9, atol=1e-12)

    full_tv, full_kl = full_tv_kl(mu_full, pi_full)
    assert (tv <= full_tv + 1e-12).all(), (tv, full_tv)
    assert (kl <= full_kl + 1e-12).all(), (kl, full_kl)
    # spec 6.3 item 13: binary <= top-K (the sampled token is always in the set)
    assert (binary_tv(mu_a, pi_a) <= tv + TOL).all()
    assert (binary_kl(mu_a, pi_a) <= kl + TOL).all()


@settings(derandomize=True, deadline=None, max_examples=60)
@given(distribution_params)
def test_estimator_ordering_float32(params):
    """D^Bin <= D^TopK <= D^full (up to 1e-6) with float32 inputs, the dtype the trainer uses."""
    seed, mu_scale, pi_noise, ranks = params
    mu_full, pi_full = full_distributions(seed, mu_scale, pi_noise)
    mu_set, pi_set, mu_a, pi_a, _ = token_set(mu_full, pi_full, ranks)
    f32 = [x.float() for x in (mu_set, pi_set, mu_a, pi_a)]
    tv, kl = topk_tv(f32[0], f32[1]), topk_kl(f32[0], f32[1])
    assert tv.dtype == torch.float32 and kl.dtype == torch.float32
    full_tv, full_kl = full_tv_kl(mu_full, pi_full)
    assert (tv.double() <= full_tv + TOL).all()
    assert (kl.double() <= full_kl + TOL).all()
    assert (binary_tv(f32[2], f32[3]) <= tv + TOL).all()
    assert (binary_kl(f32[2], f32[3]) <= kl + TOL).all()
    # and float32 stays close to the float64 values
    torch.testing.assert_close(tv.double(), topk_tv(mu_set, pi_set), rtol=0, atol=1e-5)
    torch.testing.assert_close(kl.double(), topk_kl(mu_set, pi_set), rtol=1e-4, atol=1e-5)


def test_topk_equals_full_divergence_when_the_set_covers_the_vocabulary():
    mu_full, pi_full = full_distributions(3, 1.0, 1.0)
    full_tv, full_kl = full_tv_kl(mu_full, pi_full)
    torch.testing.assert_close(topk_tv(mu_full, pi_full), full_tv, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(topk_kl(mu_full, pi_full), full_kl, rtol=1e-8, atol=1e-10)


def test_topk_hand_computed_small_example():
    # set {a, b} with mu = (0.5, 0.3), pi = (0.4, 0.4); other: mu 0.2, pi 0.2
    mu = torch.tensor([0.5, 0.3], dtype=torch.float64).log()
    pi = torch.tensor([0.4, 0.4], dtype=torch.float64).log()
    expected_tv = 0.5 * (0.1 + 0.1 + 0.0)
    expected_kl = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4) + 0.0
    assert topk_tv(mu, pi).item() == pytest.approx(expected_tv, abs=1e-12)
    assert topk_kl(mu, pi).item() == pytest.approx(expected_kl, abs=1e-12)
    # the 'other' bucket matters: mu = (0.5, 0.3) other 0.2; pi = (0.5, 0.5) other 0
    pi2 = torch.tensor([0.5, 0.5], dtype=torch.float64).log()
    assert topk_tv(mu, pi2).item() == pytest.approx(0.5 * (0.0 + 0.2 + 0.2), abs=1e-12)
    expected_kl2 = 0.3 * math.log(0.3 / 0.5) + 0.2 * math.log(0.2 / OTHER_BUCKET_FLOOR)
    assert topk_kl(mu, pi2).item() == pytest.approx(expected_kl2, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# Padding, identical inputs, dtypes, detachment, batch shapes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", [topk_tv, topk_kl])
def test_padded_slots_contribute_nothing(estimator):
    mu_full, pi_full = full_distributions(11, 1.5, 1.0)
    mu_set, pi_set, *_ = token_set(mu_full, pi_full, [0] * ROWS)  # sampled token in the top-K
    assert torch.isinf(mu_set[:, -1]).all() and torch.isinf(pi_set[:, -1]).all()
    unpadded = estimator(mu_set[:, :-1], pi_set[:, :-1])
    torch.testing.assert_close(estimator(mu_set, pi_set), unpadded, rtol=0, atol=1e-15)
    # extra padded slots anywhere in the set change nothing either
    ninf = torch.full((ROWS, 3), -math.inf, dtype=torch.float64)
    more_mu = torch.cat([ninf[:, :1], mu_set, ninf[:, 1:]], dim=-1)
    more_pi = torch.cat([ninf[:, :1], pi_set, ninf[:, 1:]], dim=-1)
    torch.testing.assert_close(estimator(more_mu, more_pi), unpadded, rtol=0, atol=1e-15)
    assert torch.isfinite(estimator(more_mu, more_pi)).all()


@pytest.mark.parametrize("name", DIVERGENCES.names())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_identical_inputs_give_zero(name, dtype):
    mu_full, _ = full_distributions(5, 2.0, 0.0)
    mu_set, _, mu_a, _, _ = token_set(mu_full, mu_full, list(range(ROWS)))
    x = mu_set if name.startswith("topk") else mu_a
    x = x.to(dtype)
    out = get_divergence(name)(x, x.clone())
    assert (out == 0).all(), out


@pytest.mark.parametrize("name", DIVERGENCES.names())
@pytest.mark.parametrize(
    ("in_dtype", "out_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_results_are_detached_with_expected_dtype_and_shape(name, in_dtype, out_dtype):
    mu_full, pi_full = full_distributions(7, 1.0, 1.0)
    mu_set, pi_set, mu_a, pi_a, _ = token_set(mu_full, pi_full, list(range(ROWS)))
    if name.startswith("topk"):
        mu, pi = mu_set.reshape(2, 4, -1), pi_set.reshape(2, 4, -1)
    else:
        mu, pi = mu_a.reshape(2, 4), pi_a.reshape(2, 4)
    mu = mu.to(in_dtype).requires_grad_(True)
    pi = pi.to(in_dtype).requires_grad_(True)
    out = get_divergence(name)(mu, pi)
    assert out.dtype == out_dtype
    assert out.shape == (2, 4)
    assert not out.requires_grad and out.grad_fn is None
    assert torch.isfinite(out).all() and (out >= 0).all()
    # low-precision inputs give roughly the float64 value
    exact = get_divergence(name)(mu.detach().double(), pi.detach().double())
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-6 if in_dtype != torch.bfloat16 else 1e-1)
    if in_dtype == torch.bfloat16:
        # bf16 inputs are computed in float32: same value as the float32 upcast of the bf16 numbers
        torch.testing.assert_close(out, get_divergence(name)(mu.detach().float(), pi.detach().float()))


# ----------------------------------------------------------------------------------------------
# Binary estimators
# ----------------------------------------------------------------------------------------------


@settings(derandomize=True, deadline=None, max_examples=100)
@given(st.floats(1e-6, 1.0), st.floats(1e-6, 1.0))
def test_binary_tv_is_the_probability_gap(p_mu, p_pi):
    mu = torch.tensor([math.log(p_mu)], dtype=torch.float64)
    pi = torch.tensor([math.log(p_pi)], dtype=torch.float64)
    assert binary_tv(mu, pi).item() == pytest.approx(abs(p_mu - p_pi), rel=1e-12, abs=1e-15)


def bernoulli_kl(p_mu: float, p_pi: float) -> float:
    sampled = p_mu * math.log(p_mu / p_pi) if p_mu > 0 else 0.0
    rest = (1 - p_mu) * math.log((1 - p_mu + BINARY_KL_EPS) / (1 - p_pi + BINARY_KL_EPS))
    return sampled + rest


@settings(derandomize=True, deadline=None, max_examples=100)
@given(st.floats(1e-6, 1.0), st.floats(1e-6, 1.0))
def test_binary_kl_matches_bernoulli_formula_with_eps(p_mu, p_pi):
    mu = torch.tensor([math.log(p_mu)], dtype=torch.float64)
    pi = torch.tensor([math.log(p_pi)], dtype=torch.float64)
    expected = max(bernoulli_kl(p_mu, p_pi), 0.0)
    assert binary_kl(mu, pi).item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_binary_kl_eps_keeps_the_rest_term_finite():
    # pi puts all its mass on the sampled token: without the 1e-8 the 'rest' log ratio is infinite
    mu = torch.tensor([math.log(0.5)], dtype=torch.float64)
    pi = torch.tensor([0.0], dtype=torch.float64)
    expected = 0.5 * math.log(0.5) + 0.5 * math.log((0.5 + 1e-8) / 1e-8)
    assert binary_kl(mu, pi).item() == pytest.approx(expected, rel=1e-12)
    # mu = 1 on the sampled token: the rest term vanishes
    assert binary_kl(
        torch.tensor([0.0], dtype=torch.float64), torch.tensor([math.log(0.25)], dtype=torch.float64)
    ).item() == pytest.approx(math.log(4.0), rel=1e-12)


def test_binary_estimators_hand_values():
    mu = torch.tensor([0.2, 0.9, 0.5]).log()
    pi = torch.tensor([0.3, 0.6, 0.5]).log()
    torch.testing.assert_close(binary_tv(mu, pi), torch.tensor([0.1, 0.3, 0.0]), rtol=0, atol=1e-6)
    expected = torch.tensor([bernoulli_kl(0.2, 0.3), bernoulli_kl(0.9, 0.6), 0.0])
    torch.testing.assert_close(binary_kl(mu, pi), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Errors and registry
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DIVERGENCES.names())
def test_shape_mismatch_names_the_argument(name):
    with pytest.raises(ValueError, match="pi_logprobs"):
        get_divergence(name)(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))


@pytest.mark.parametrize("name", DIVERGENCES.names())
@pytest.mark.parametrize("bad", ["mu_logprobs", "pi_logprobs"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_non_float_inputs_name_the_argument(name, bad, dtype):
    good = torch.zeros(2, 3)
    wrong = torch.zeros(2, 3, dtype=dtype)
    args = (wrong, good) if bad == "mu_logprobs" else (good, wrong)
    with pytest.raises(TypeError, match=bad):
        get_divergence(name)(*args)


def test_get_divergence_by_name_and_unknown_name_lists_known():
    for fn in (binary_tv, binary_kl, topk_tv, topk_kl):
        assert get_divergence(fn.__name__) is fn
    assert DIVERGENCES.names() == ["binary_kl", "binary_tv", "topk_kl", "topk_tv"]
    with pytest.raises(ValueError, match="unknown divergence 'tv_full'; known: binary_kl, binary_tv, topk_kl, topk_tv"):
        get_divergence("tv_full")


def test_registering_a_divergence_name_twice_fails_and_keeps_the_first():
    with pytest.raises(ValueError, match="divergence 'topk_tv' is already registered"):
        register_divergence("topk_tv")(binary_tv)
    assert get_divergence("topk_tv") is topk_tv
