"""Divergence estimators (algorithm_spec.md sections 2.1, 2.2, 6.3 item 13, 8.6, 8.11).

The top-K estimators are checked against a hand-written 50-digit (decimal) computation on the full
vocabulary: random full distributions mu, pi over V tokens, mu's top-K plus the sampled token as the
token set (S = K + 1 slots, the last one -inf in both when the sampled token is already in the top-K).
The sampled-token k2 / k3 (TRM's) are checked against their closed forms.
"""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cppo_rl.algorithms.divergence import (
    BINARY_KL_EPS,
    DIVERGENCES,
    OTHER_BUCKET_FLOOR,
    SAMPLED_LOG_RATIO_BOUND,
    TOPK_DIVERGENCES,
    binary_kl,
    binary_tv,
    get_divergence,
    register_divergence,
    sampled_k2,
    sampled_k3,
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


def reference_topk_row(mu_logprobs: list[float], pi_logprobs: list[float]) -> tuple[float, float]:
    """Spec 2.2 at 50 digits from the given (already rounded) set logprobs: (TV, KL) over the set plus
    the 'other' bucket; -inf slots are padding."""
    with localcontext(prec=50):
        mu = [Decimal(x).exp() for x in mu_logprobs if x != -math.inf]
        pi = [Decimal(x).exp() for x in pi_logprobs if x != -math.inf]
        other_mu, other_pi = max(1 - sum(mu), Decimal(0)), max(1 - sum(pi), Decimal(0))
        tv = (sum(abs(a - b) for a, b in zip(mu, pi, strict=True)) + abs(other_mu - other_pi)) / 2
        kl = sum(a * (a / b).ln() for a, b in zip(mu, pi, strict=True))
        floor = Decimal(OTHER_BUCKET_FLOOR)
        other_mu, other_pi = max(other_mu, floor), max(other_pi, floor)
        return float(tv), float(max(kl + other_mu * (other_mu / other_pi).ln(), Decimal(0)))


def reference_topk(mu_set: torch.Tensor, pi_set: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference_topk_row` of every row of [ROWS, S] set logprobs, as float64 [ROWS] (TV, KL)."""
    rows = [reference_topk_row(mu.tolist(), pi.tolist()) for mu, pi in zip(mu_set, pi_set, strict=True)]
    return tuple(torch.tensor(column, dtype=torch.float64) for column in zip(*rows, strict=True))


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
    mu_set, pi_set, mu_a, pi_a, _ = token_set(mu_full, pi_full, ranks)
    ref_tv, ref_kl = reference_topk(mu_set, pi_set)
    tv, kl = topk_tv(mu_set, pi_set), topk_kl(mu_set, pi_set)
    assert tv.dtype == torch.float64 and kl.dtype == torch.float64
    assert tv.shape == (ROWS,) and kl.shape == (ROWS,)
    torch.testing.assert_close(tv, ref_tv, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(kl, ref_kl, rtol=1e-9, atol=1e-12)

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("mu_probs", "pi_probs", "other_mu", "other_pi"),
    [
        ([1 - 1e-7], [1 - 1e-9], 1e-7, 1e-9),  # one token holds nearly all mass
        ([1 - 1.1e-6, 1e-6], [1 - 1.0001e-5, 1e-5], 1e-7, 1e-9),  # a dominant token and a small one
    ],
)
def test_topk_other_bucket_survives_tiny_masses(dtype, mu_probs, pi_probs, other_mu, other_pi):
    """Spec 8.6: 'other' = 1 - sum over the set is computed as -expm1(logsumexp(set)), so a bucket far
    below float32's resolution at 1 is kept (1 - sum in float32 gives 0, floored to 1e-12)."""
    pad = [-math.inf]
    mu = torch.tensor([math.log1p(p - 1) for p in mu_probs] + pad, dtype=dtype)
    pi = torch.tensor([math.log1p(p - 1) for p in pi_probs] + pad, dtype=dtype)
    ref_tv, ref_kl = reference_topk_row(mu.tolist(), pi.tolist())  # exact, from the rounded logprobs
    tv, kl = topk_tv(mu, pi), topk_kl(mu, pi)
    assert tv.dtype == kl.dtype == dtype
    assert tv.item() == pytest.approx(ref_tv, rel=1e-6)
    assert kl.item() == pytest.approx(ref_kl, rel=1e-6)
    # the closed form from the unrounded probabilities (rounding the logprobs moves it by < 1e-4)
    closed_tv = 0.5 * (sum(abs(a - b) for a, b in zip(mu_probs, pi_probs, strict=True)) + abs(other_mu - other_pi))
    closed_kl = sum(a * math.log(a / b) for a, b in zip(mu_probs, pi_probs, strict=True))
    closed_kl += other_mu * math.log(other_mu / other_pi)
    assert tv.item() == pytest.approx(closed_tv, rel=1e-4)
    assert kl.item() == pytest.approx(closed_kl, rel=1e-4)


@settings(derandomize=True, deadline=None, max_examples=80)
@given(
    st.integers(0, 2**31 - 1),
    st.floats(0.1, 40.0),  # up to near-degenerate mu: the set holds all but ~1e-15 of the mass
    st.floats(0.0, 3.0),
    st.lists(st.integers(0, VOCAB - 1), min_size=ROWS, max_size=ROWS),
)
def test_topk_float32_inputs_match_the_exact_value_of_those_inputs(seed, mu_scale, pi_noise, ranks):
    """float32 logprobs (the trainer's dtype) give the exact top-K TV / KL of those float32 numbers up
    to float32 rounding of the result, even when the 'other' bucket is far below 1e-7."""
    mu_full, pi_full = full_distributions(seed, mu_scale, pi_noise)
    mu_set, pi_set, *_ = token_set(mu_full, pi_full, ranks)
    mu_set, pi_set = mu_set.float(), pi_set.float()
    ref_tv, ref_kl = reference_topk(mu_set, pi_set)
    torch.testing.assert_close(topk_tv(mu_set, pi_set).double(), ref_tv, rtol=1e-6, atol=1e-15)
    torch.testing.assert_close(topk_kl(mu_set, pi_set).double(), ref_kl, rtol=1e-6, atol=1e-15)


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
# Sampled-token k2 / k3 (TRM's estimators, spec 8.11)
# ----------------------------------------------------------------------------------------------


def sampled_pair(log_rho: float, mu_logprob: float = math.log(0.1)) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (mu, pi) logprobs [1] of a sampled token with log pi - log mu = log_rho."""
    return torch.tensor([mu_logprob], dtype=torch.float64), torch.tensor([mu_logprob + log_rho], dtype=torch.float64)


@pytest.mark.parametrize(
    ("rho", "k2", "k3"),
    [
        (1.0, 0.0, 0.0),
        (2.0, 0.5 * math.log(2) ** 2, 1 - math.log(2)),
        (0.5, 0.5 * math.log(2) ** 2, math.log(2) - 0.5),
        (math.e, 0.5, math.e - 2),
        (1 / math.e, 0.5, 1 / math.e),
    ],
)
def test_sampled_k2_k3_closed_forms(rho, k2, k3):
    mu, pi = sampled_pair(math.log(rho))
    assert sampled_k2(mu, pi).item() == pytest.approx(k2, rel=1e-12, abs=1e-300)
    assert sampled_k3(mu, pi).item() == pytest.approx(k3, rel=1e-12, abs=1e-300)


def test_sampled_k2_k3_clamp_log_rho_at_the_authors_bound():
    """|log rho| is clamped to 20 as verl's rollout_corr_helper (SAFETY_BOUND) does: finite in float32."""
    assert SAMPLED_LOG_RATIO_BOUND == 20.0
    for log_rho, k3 in ((30.0, math.exp(20) - 21), (-30.0, math.exp(-20) + 19)):
        mu, pi = (x.float() for x in sampled_pair(log_rho, mu_logprob=-40.0))
        assert sampled_k2(mu, pi).item() == pytest.approx(200.0, rel=1e-6)
        assert sampled_k3(mu, pi).item() == pytest.approx(k3, rel=1e-6)


nonzero_log_rho = st.one_of(st.floats(1e-6, 25.0), st.floats(-25.0, -1e-6))


@settings(derandomize=True, deadline=None, max_examples=200)
@given(st.floats(-30.0, 0.0), st.one_of(st.just(0.0), nonzero_log_rho))
def test_sampled_k2_k3_are_non_negative_and_zero_iff_rho_is_one(mu_logprob, log_rho):
    mu, pi = sampled_pair(log_rho, mu_logprob)
    for estimator in (sampled_k2, sampled_k3):
        value = estimator(mu, pi).item()
        assert value >= 0
        assert (value == 0) == (log_rho == 0), (estimator.__name__, log_rho, value)


@settings(derandomize=True, deadline=None, max_examples=200)
@given(st.floats(-0.1, 0.1))
def test_sampled_k3_equals_k2_to_second_order(log_rho):
    """k3 - k2 = e^xi x^3 / 6 for some xi between 0 and x = log rho (Taylor, Lagrange remainder)."""
    mu, pi = sampled_pair(log_rho)
    x = (pi - mu).item()
    gap = abs(sampled_k3(mu, pi).item() - sampled_k2(mu, pi).item())
    assert gap <= math.exp(abs(x)) * abs(x) ** 3 / 6 * (1 + 1e-9) + 1e-15 * abs(x)


@settings(derandomize=True, deadline=None, max_examples=100)
@given(st.floats(-20.0, -0.01), st.floats(-1e-2, 1e-2))
def test_sampled_k3_is_accurate_for_float32_inputs_and_small_log_rho(mu_logprob, log_rho):
    """No cancellation in rho - 1 - log rho: float32 inputs give the exact k3 of those numbers to ~1e-6."""
    mu = torch.tensor([mu_logprob], dtype=torch.float32)
    pi = torch.tensor([mu_logprob + log_rho], dtype=torch.float32)
    with localcontext(prec=50):
        x = Decimal(pi.item()) - Decimal(mu.item())
        exact = float(x.exp() - 1 - x)
    out = sampled_k3(mu, pi)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(exact, rel=1e-6, abs=1e-30)


@settings(derandomize=True, deadline=None, max_examples=40)
@given(st.integers(0, 2**31 - 1), st.floats(0.1, 4.0), st.floats(0.0, 2.0))
def test_sampled_k3_is_unbiased_and_k2_second_order_for_tokens_drawn_from_mu(seed, mu_scale, pi_noise):
    """E_{a~mu}[k3(a)] = KL(mu || pi) exactly; E_{a~mu}[k2(a)] >= 0 is KL's second-order estimate."""
    mu_full, pi_full = full_distributions(seed, mu_scale, pi_noise)
    _, full_kl = full_tv_kl(mu_full, pi_full)
    mean_k3 = (mu_full.exp() * sampled_k3(mu_full, pi_full)).sum(dim=-1)
    torch.testing.assert_close(mean_k3, full_kl, rtol=1e-9, atol=1e-12)
    small_mu, small_pi = full_distributions(seed, mu_scale, 1e-3 * pi_noise)  # KL = O(noise^2), gap O(noise^3)
    _, small_kl = full_tv_kl(small_mu, small_pi)
    mean_k2 = (small_mu.exp() * sampled_k2(small_mu, small_pi)).sum(dim=-1)
    assert ((mean_k2 - small_kl).abs() <= 0.1 * small_kl + 1e-15).all()


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
    for fn in (binary_tv, binary_kl, sampled_k2, sampled_k3, topk_tv, topk_kl):
        assert get_divergence(fn.__name__) is fn
    assert DIVERGENCES.names() == ["binary_kl", "binary_tv", "sampled_k2", "sampled_k3", "topk_kl", "topk_tv"]
    assert sorted(TOPK_DIVERGENCES) == ["topk_kl", "topk_tv"]
    with pytest.raises(ValueError, match="unknown divergence 'tv_full'; known: binary_kl, binary_tv, sampled_k2"):
        get_divergence("tv_full")


def test_registering_a_divergence_name_twice_fails_and_keeps_the_first():
    with pytest.raises(ValueError, match="divergence 'topk_tv' is already registered"):
        register_divergence("topk_tv")(binary_tv)
    assert get_divergence("topk_tv") is topk_tv
