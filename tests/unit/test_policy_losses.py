"""Policy losses, their registry and config, and the baseline masks/weights they use.

algorithm_spec.md sections 3.2 item 6, 4, 6.3 items 10-12 and 8. Gradients are checked against
the analytic form of each loss: the mask family (cppo*, dppo, trm_*) minimises
`-A sg(min(rho, C)) log pi M`, so d loss / d logprob_t = -A_t min(rho_t, C) M_t / normaliser.

The hand examples and analytic-form tests are about each loss's per-token form, so they name
their aggregation (`TOKEN_MEAN`, normaliser = valid tokens) instead of relying on the default,
which is the production run's `seq-mean-token-sum-norm` (spec decision 8.5).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cppo_rl.algorithms.aggregation import LossNormaliser
from cppo_rl.algorithms.divergence import binary_kl, binary_tv, sampled_k2, sampled_k3, topk_kl, topk_tv
from cppo_rl.algorithms.masks import (
    cispo_weights,
    cppo_mask,
    cppo_mask_details,
    cppo_soft_mask,
    dppo_mask,
    minpro_weights,
    ppo_clip_mask,
    trm_avg_mask,
    trm_max_mask,
)
from cppo_rl.algorithms.policy_losses import (
    METHOD_DEFAULTS,
    POLICY_LOSSES,
    PolicyLossConfig,
    PolicyLossInputs,
    PolicyLossOutput,
    default_config,
    get_policy_loss,
    register_policy_loss,
)
from cppo_rl.algorithms.registry import Registry

CPPO_FAMILY = ("cppo", "cppo_no_position_weight", "cppo_no_prefix_budget", "cppo_shuffled_weights", "cppo_soft")
MASK_FAMILY = (*CPPO_FAMILY, "dppo", "trm_max", "trm_avg", "trm_both")
ALL_LOSSES = (*MASK_FAMILY, "grpo", "cispo", "minpro")
DEFAULT_AGG_MODE = "seq-mean-token-sum-norm"  # PolicyLossConfig's default = the production run's (spec 8.5)
TOKEN_MEAN = {"loss_agg_mode": "token-mean"}  # the per-token examples below state their aggregation

# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def hand_inputs(mu_probs, pi_probs, advantages, mask, dtype=torch.float64) -> PolicyLossInputs:
    """Inputs from sampled-token probabilities (lists of rows); logprobs is a leaf with grad."""
    logprobs = torch.tensor(pi_probs, dtype=dtype).log().requires_grad_(True)
    rollout = torch.tensor(mu_probs, dtype=dtype).log()
    return PolicyLossInputs(
        logprobs=logprobs,
        rollout_logprobs=rollout,
        advantages=torch.tensor(advantages, dtype=dtype),
        response_mask=torch.tensor(mask, dtype=torch.bool),
    )


def random_inputs(
    seed: int, rows: int = 4, width: int = 7, vocab: int = 12, k: int = 3, dtype=torch.float64, seq_adv: bool = True
) -> PolicyLossInputs:
    """Consistent random inputs: full mu/pi over `vocab`, a sampled token, mu's top-k + sampled set.

    Rows differ in how far pi is from mu, so some tokens are kept and some masked; one row is
    empty and the others right-padded (padding keeps its random, finite values)."""
    g = torch.Generator().manual_seed(seed)
    mu_logits = 1.5 * torch.randn(rows, width, vocab, generator=g, dtype=torch.float64)
    noise = torch.linspace(0.05, 1.5, rows, dtype=torch.float64).view(rows, 1, 1)
    pi_logits = mu_logits + noise * torch.randn(rows, width, vocab, generator=g, dtype=torch.float64)
    mu_lp, pi_lp = mu_logits.log_softmax(-1), pi_logits.log_softmax(-1)
    sampled = torch.multinomial(mu_lp.exp().view(-1, vocab), 1, generator=g).view(rows, width)
    top = mu_lp.argsort(dim=-1, descending=True)[..., :k]
    in_top = (top == sampled.unsqueeze(-1)).any(-1, keepdim=True)
    ids = torch.cat([top, sampled.unsqueeze(-1)], dim=-1)
    mu_set, pi_set = mu_lp.gather(-1, ids), pi_lp.gather(-1, ids)
    pad_slot = torch.zeros_like(mu_set, dtype=torch.bool)
    pad_slot[..., -1:] = in_top
    mu_set = mu_set.masked_fill(pad_slot, -math.inf)
    pi_set = pi_set.masked_fill(pad_slot, -math.inf)
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    lengths[0] = width
    lengths[rows // 2] = 0
    mask = torch.arange(width).expand(rows, width) < lengths.unsqueeze(-1)
    advantages = torch.randn(rows if seq_adv else (rows, width), generator=g, dtype=torch.float64)
    return PolicyLossInputs(
        logprobs=pi_lp.gather(-1, sampled.unsqueeze(-1)).squeeze(-1).to(dtype).requires_grad_(True),
        rollout_logprobs=mu_lp.gather(-1, sampled.unsqueeze(-1)).squeeze(-1).to(dtype),
        advantages=advantages.to(dtype),
        response_mask=mask,
        topk_logprobs=pi_set.to(dtype),
        rollout_topk_logprobs=mu_set.to(dtype),
    )


def run_loss(name: str, inputs: PolicyLossInputs, config: PolicyLossConfig, normaliser=None):
    """(output, d loss / d logprobs)."""
    out = get_policy_loss(name)(inputs, config, normaliser)
    assert isinstance(out, PolicyLossOutput)
    (grad,) = torch.autograd.grad(out.loss, inputs.logprobs)
    return out, grad


def log_ratio_of(inputs: PolicyLossInputs, config: PolicyLossConfig) -> torch.Tensor:
    limit = config.log_ratio_clamp
    return (inputs.logprobs.detach() - inputs.rollout_logprobs).clamp(-limit, limit)


def divergence_of(inputs: PolicyLossInputs, config: PolicyLossConfig) -> torch.Tensor:
    if config.divergence.startswith("topk"):
        fn = topk_tv if config.divergence == "topk_tv" else topk_kl
        return fn(inputs.rollout_topk_logprobs, inputs.topk_logprobs)
    fn = binary_tv if config.divergence == "binary_tv" else binary_kl
    return fn(inputs.rollout_logprobs, inputs.logprobs.detach())


def token_mean_scale(inputs: PolicyLossInputs) -> float:
    """1 / N_tokens: the per-token gradient factor of `token-mean`."""
    return 1.0 / max(int(inputs.response_mask.sum()), 1)


def token_sum_norm_scale(inputs: PolicyLossInputs, horizon: int | None = None) -> float:
    """1 / (N_seqs * horizon): the per-token gradient factor of `seq-mean-token-sum-norm`;
    N_seqs counts responses with >= 1 valid token, horizon defaults to the padded width."""
    sequences = max(int(inputs.response_mask.any(dim=-1).sum()), 1)
    return 1.0 / (sequences * (horizon if horizon is not None else inputs.response_mask.shape[-1]))


def assert_grad(grad: torch.Tensor, expected, atol: float = 1e-12, rtol: float = 1e-9) -> None:
    expected = torch.as_tensor(expected, dtype=grad.dtype)
    torch.testing.assert_close(grad, expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------
# Registry, config defaults
# ----------------------------------------------------------------------------------------------


def test_registry_holds_every_method():
    assert POLICY_LOSSES.names() == sorted(ALL_LOSSES) == list(POLICY_LOSSES)
    for name in ALL_LOSSES:
        assert name in POLICY_LOSSES
        assert get_policy_loss(name) is POLICY_LOSSES.get(name)
        assert get_policy_loss(name).__name__ == f"{name}_loss"
    assert "ppo_kl" not in POLICY_LOSSES


def test_registry_registers_once_lists_sorted_names_and_refuses_unknown_ones():
    registry = Registry("widget")

    @registry.register("b")
    def b_widget():
        pass

    assert registry.register("a")(len) is len  # the decorator hands the function back
    assert registry.names() == ["a", "b"] and registry.get("b") is b_widget
    with pytest.raises(ValueError, match=r"widget 'a' is already registered \(by len\)"):
        registry.register("a")(abs)
    assert registry.get("a") is len
    with pytest.raises(ValueError, match=r"unknown widget 'c'; known: a, b$"):
        registry.get("c")


def test_unknown_loss_name_lists_known_names():
    with pytest.raises(ValueError, match="ppo_kl") as info:
        get_policy_loss("ppo_kl")
    for name in ALL_LOSSES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="known"):
        default_config("ppo_kl")


def test_registering_a_name_twice_fails_and_keeps_the_first():
    before = get_policy_loss("cppo")
    with pytest.raises(ValueError, match="cppo"):
        register_policy_loss("cppo")(lambda *args: None)
    assert get_policy_loss("cppo") is before


def test_default_configs():
    assert default_config("cppo") == PolicyLossConfig()
    cfg = PolicyLossConfig()
    # spec 8.5: the core's default aggregation is the production run's, for every method
    assert cfg.loss_agg_mode == DEFAULT_AGG_MODE == "seq-mean-token-sum-norm"
    assert cfg.horizon is None
    for name in ALL_LOSSES:
        assert default_config(name).loss_agg_mode == DEFAULT_AGG_MODE, name
    assert default_config("grpo", **TOKEN_MEAN).loss_agg_mode == "token-mean"
    assert (cfg.delta, cfg.delta_b, cfg.w_min, cfg.is_cap) == (0.15, 0.02, 0.8, 20.0)
    assert (cfg.clip_low, cfg.clip_high, cfg.cispo_eps_low, cfg.cispo_eps_high) == (0.2, 0.28, 10.0, 0.2)
    assert (cfg.minpro_eps_low, cfg.minpro_eps_high) == (10.0, 0.28)  # spec 8.12: CISPO-style, no lower clip
    assert cfg.divergence == "topk_tv" and not cfg.adaptive_delta_b and not cfg.soft_gate
    assert (cfg.delta_b_quantile, cfg.delta_b_scale, cfg.delta_b_ceiling) == (0.9, 1.0, 2.0)  # spec 3.3, 8.15
    # spec 8.11: TRM's rules on the sampled token's k2 (max) and k3 (avg), as the TRM authors' code
    for name in ("trm_max", "trm_avg", "trm_both"):
        trm = default_config(name)
        assert (trm.trm_max_divergence, trm.trm_avg_divergence) == ("sampled_k2", "sampled_k3"), name
    assert (default_config("trm_max").trm_max_delta, default_config("trm_avg").trm_avg_delta) == (0.05, 0.001)
    both = default_config("trm_both")
    assert (both.trm_max_delta, both.trm_avg_delta) == (0.1, 0.002)
    assert METHOD_DEFAULTS == {"trm_both": {"trm_max_delta": 0.1, "trm_avg_delta": 0.002}}
    # overrides beat the method defaults
    assert default_config("trm_both", trm_max_delta=0.3).trm_max_delta == 0.3
    assert default_config("trm_max", trm_max_divergence="topk_kl").trm_max_divergence == "topk_kl"
    assert default_config("dppo", divergence="binary_tv").divergence == "binary_tv"
    assert set(METHOD_DEFAULTS) <= set(POLICY_LOSSES)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("delta", 0.0),
        ("delta", -0.1),
        ("delta", math.nan),
        ("delta", math.inf),
        ("w_min", 0.0),
        ("w_min", 1.5),
        ("w_min", -0.2),
        ("divergence", "full_tv"),
        ("loss_agg_mode", "mean"),
        ("horizon", 0),
        ("horizon", -3),
        ("horizon", "seq"),
        ("horizon", True),
        ("horizon", 1.5),
        ("delta_b", -0.01),
        ("is_cap", 0.0),
        ("log_ratio_clamp", -1.0),
        ("clip_low", 0.0),
        ("clip_high", -0.28),
        ("cispo_eps_high", 0.0),
        ("minpro_eps_low", 0.0),
        ("trm_max_delta", 0.0),
        ("trm_avg_delta", -1.0),
        ("trm_max_divergence", "k2"),
        ("trm_avg_divergence", "topk"),
        ("delta_b_quantile", 1.5),
        ("delta_b_scale", 0.0),
        ("delta_b_ceiling", 0.5),
        ("delta_b_ceiling", math.nan),
    ],
)
def test_config_bad_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PolicyLossConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        PolicyLossConfig().replace(**{field: value})


def test_config_adaptive_budget_needs_positive_delta_b_and_good_values_pass():
    with pytest.raises(ValueError, match="delta_b"):
        PolicyLossConfig(adaptive_delta_b=True, delta_b=0.0)
    PolicyLossConfig(delta_b=0.0)  # a fixed zero budget is allowed
    for horizon in (None, "sequence", 1, 16384):
        assert PolicyLossConfig(horizon=horizon).horizon == horizon
    assert PolicyLossConfig(w_min=1.0).w_min == 1.0


# ----------------------------------------------------------------------------------------------
# PolicyLossInputs validation
# ----------------------------------------------------------------------------------------------


def _tensors():
    lp = torch.zeros(2, 3)
    return {
        "logprobs": lp,
        "rollout_logprobs": lp.clone(),
        "advantages": torch.zeros(2),
        "response_mask": torch.ones(2, 3, dtype=torch.bool),
    }


@pytest.mark.parametrize(
    ("change", "error", "name"),
    [
        ({"logprobs": torch.zeros(2, 3, dtype=torch.long)}, TypeError, "logprobs"),
        ({"rollout_logprobs": torch.zeros(2, 3, dtype=torch.int32)}, TypeError, "rollout_logprobs"),
        ({"rollout_logprobs": torch.zeros(2, 4)}, ValueError, "rollout_logprobs"),
        ({"logprobs": torch.zeros(3, 3)}, ValueError, "logprobs"),
        ({"advantages": torch.zeros(3)}, ValueError, "advantages"),
        ({"advantages": torch.zeros(2, 4)}, ValueError, "advantages"),
        ({"advantages": torch.zeros(2, dtype=torch.long)}, TypeError, "advantages"),
        ({"response_mask": torch.ones(2, 3)}, TypeError, "response_mask"),
        ({"response_mask": torch.ones(6, dtype=torch.bool)}, ValueError, "response_mask"),
        ({"topk_logprobs": torch.zeros(2, 3, 4)}, ValueError, "rollout_topk_logprobs"),
        ({"topk_logprobs": torch.zeros(2, 3), "rollout_topk_logprobs": torch.zeros(2, 3)}, ValueError, "topk_logprobs"),
        (
            {"topk_logprobs": torch.zeros(2, 3, 4), "rollout_topk_logprobs": torch.zeros(2, 3, 5)},
            ValueError,
            "rollout_topk_logprobs",
        ),
        (
            {"topk_logprobs": torch.zeros(2, 4, 4), "rollout_topk_logprobs": torch.zeros(2, 4, 4)},
            ValueError,
            "topk_logprobs",
        ),
    ],
)
def test_inputs_shape_and_dtype_errors(change, error, name):
    with pytest.raises(error, match=name):
        PolicyLossInputs(**{**_tensors(), **change})


@pytest.mark.parametrize("bad", ["topk_logprobs", "rollout_topk_logprobs"])
def test_inputs_non_float_topk_logprobs_error_names_the_field(bad):
    """An int top-K tensor must be reported under its own name (at construction or, at the latest,
    when the loss runs), not as the divergence's internal `mu_logprobs` / `pi_logprobs`."""
    topk = {"topk_logprobs": torch.zeros(2, 3, 4), "rollout_topk_logprobs": torch.zeros(2, 3, 4)}
    topk[bad] = torch.zeros(2, 3, 4, dtype=torch.long)
    with pytest.raises(TypeError, match=bad):
        inputs = PolicyLossInputs(**_tensors(), **topk)
        get_policy_loss("cppo")(inputs, PolicyLossConfig())


def test_inputs_broadcast_sequence_advantages():
    inputs = PolicyLossInputs(**{**_tensors(), "advantages": torch.tensor([1.0, -2.0])})
    assert inputs.advantages.shape == (2, 3)
    assert (inputs.advantages[1] == -2.0).all()


@pytest.mark.parametrize("name", [*CPPO_FAMILY, "dppo", "trm_max", "trm_avg", "trm_both"])
def test_topk_divergence_without_topk_inputs_raises(name):
    inputs = hand_inputs([[0.5, 0.5]], [[0.6, 0.4]], [1.0], [[True, True]])
    if name.startswith("trm"):
        get_policy_loss(name)(inputs, default_config(name))  # the default k2 / k3 need only the sampled token
        config = default_config(name, trm_max_divergence="topk_kl", trm_avg_divergence="topk_kl")
    else:
        config = default_config(name, divergence="topk_tv")
    with pytest.raises(ValueError, match=r"needs `topk_logprobs`.*choose a sampled-token estimator \(binary_kl"):
        get_policy_loss(name)(inputs, config)


# ----------------------------------------------------------------------------------------------
# Hand-built gradients
# ----------------------------------------------------------------------------------------------

# One response of 4 tokens plus a padded column. rho = pi / mu; binary TV D = |pi - mu|.
#   t1: rho 1.2,  D 0.10, A +1: away from mu, inside delta -> kept
#   t2: rho 2.5,  D 0.30, A +1: away from mu, D > delta -> masked
#   t3: rho 10,   D 0.45, A -1: toward mu -> kept, weight min(10, C)
#   t4: rho 0.75, D 0.10, A +1: toward mu -> kept
DPPO_MU = [[0.5, 0.2, 0.05, 0.4, 0.3]]
DPPO_PI = [[0.6, 0.5, 0.5, 0.3, 0.9]]
DPPO_ADV = [[1.0, 1.0, -1.0, 1.0, 5.0]]
ONE_PAD = [[True, True, True, True, False]]


@pytest.mark.parametrize(("is_cap", "t3_weight"), [(20.0, 10.0), (4.0, 4.0), (1.0, 1.0)])
def test_dppo_gradient_hand_example_with_is_cap(is_cap, t3_weight):
    inputs = hand_inputs(DPPO_MU, DPPO_PI, DPPO_ADV, ONE_PAD)
    config = default_config("dppo", divergence="binary_tv", is_cap=is_cap, **TOKEN_MEAN)
    out, grad = run_loss("dppo", inputs, config)
    t1_weight = min(1.2, is_cap)
    t4_weight = min(0.75, is_cap)
    assert_grad(grad, [[-t1_weight / 4, 0.0, t3_weight / 4, -t4_weight / 4, 0.0]])
    assert out.keep.tolist() == [[1.0, 0.0, 1.0, 1.0, 0.0]]
    # the loss value is the un-normalised sum over kept tokens of -A w log pi, over 4 tokens
    log_pi = [math.log(p) for p in DPPO_PI[0]]
    expected_loss = (-t1_weight * log_pi[0] + t3_weight * log_pi[2] - t4_weight * log_pi[3]) / 4
    assert out.loss.item() == pytest.approx(expected_loss, rel=1e-12)


# CPPO prefix example (spec 3.6 style), binary TV, A = +1, width 5 (w = 1, .95, .9, .85):
#   D = .10, .05, .10, .08; Z = .1, .0475, .09, .068; c = .15, .07, .0415, -.0305 -> keep [1, 1, 0, 0]
#   DPPO (and CPPO without the prefix budget) keeps all four.
CPPO_MU = [[0.2, 0.1, 0.2, 0.2, 0.5]]
CPPO_PI = [[0.3, 0.15, 0.3, 0.28, 0.1]]
CPPO_ADV = [[1.0, 1.0, 1.0, 1.0, 1.0]]
CPPO_RHO = [1.5, 1.5, 1.5, 1.4]


@pytest.mark.parametrize(
    ("name", "kept"),
    [
        ("cppo", [1, 1, 0, 0]),
        ("cppo_no_position_weight", [1, 1, 0, 0]),
        ("cppo_no_prefix_budget", [1, 1, 1, 1]),
        ("dppo", [1, 1, 1, 1]),
    ],
)
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum-norm", "seq-mean-token-sum"])
def test_cppo_gradient_hand_example(name, kept, mode):
    inputs = hand_inputs(CPPO_MU, CPPO_PI, CPPO_ADV, ONE_PAD)
    config = default_config(name, divergence="binary_tv", loss_agg_mode=mode)
    normaliser = LossNormaliser(horizon=8)
    out, grad = run_loss(name, inputs, config, normaliser)
    scale = {"token-mean": 1 / 4, "seq-mean-token-sum-norm": 1 / (1 * 8), "seq-mean-token-sum": 1.0}[mode]
    expected = [-rho * k * scale for rho, k in zip(CPPO_RHO, kept, strict=True)] + [0.0]
    assert_grad(grad, [expected])
    assert out.keep[0, :4].tolist() == [float(k) for k in kept]


def test_grpo_gradient_hand_example():
    # rho = 1.1 (inside), 1.5 (A>0, clipped), 0.5 (A>0, toward), 0.5 (A<0, clipped), 1.5 (A<0, toward)
    mu = [[0.4, 0.4, 0.4, 0.4, 0.4, 0.4]]
    pi = [[0.44, 0.6, 0.2, 0.2, 0.6, 0.9]]
    adv = [[1.0, 1.0, 1.0, -1.0, -1.0, 3.0]]
    mask = [[True] * 5 + [False]]
    inputs = hand_inputs(mu, pi, adv, mask)
    out, grad = run_loss("grpo", inputs, default_config("grpo", **TOKEN_MEAN))
    assert_grad(grad, [[-1.1 / 5, 0.0, -0.5 / 5, 0.0, 1.5 / 5, 0.0]])
    # token losses max(-A rho, -A clip(rho, .8, 1.28)): -1.1, -1.28, -0.5, 0.8, 1.5
    assert out.loss.item() == pytest.approx((-1.1 - 1.28 - 0.5 + 0.8 + 1.5) / 5, rel=1e-9)
    assert out.keep.tolist() == [[1.0, 0.0, 1.0, 0.0, 1.0, 0.0]]


def test_cispo_gradient_hand_example():
    # rho = 1.5 -> w 1.2 (clamped), 0.01 -> 0.01 (no lower clamp at eps_low = 10), 1.1 -> 1.1, 1.3 -> 1.2
    mu = [[0.5, 0.5, 0.5, 0.5, 0.5]]
    pi = [[0.75, 0.005, 0.55, 0.65, 0.1]]
    adv = [[1.0, 1.0, -2.0, -1.0, 7.0]]
    inputs = hand_inputs(mu, pi, adv, ONE_PAD)
    out, grad = run_loss("cispo", inputs, default_config("cispo", **TOKEN_MEAN))
    assert_grad(grad, [[-1.2 / 4, -0.01 / 4, 2.2 / 4, 1.2 / 4, 0.0]])
    assert out.keep.tolist() == [[1.0] * 5]  # nothing masked
    assert out.metrics["masked_frac"].item() == 0.0


def test_minpro_gradient_hand_example():
    # rho = 1.1, 0.7, 1.5, 1.3; m = 1, 1.1, 0.7, 0.7; m rho = 1.1, 0.77, 1.05, 0.91
    # default clip(1 - 10, 1.28) (spec 8.12): unchanged; with minpro_eps_low = 0.2, 0.77 -> 0.8
    mu = [[0.5, 0.5, 0.5, 0.5, 0.5]]
    pi = [[0.55, 0.35, 0.75, 0.65, 0.01]]
    adv = [[1.0, 1.0, 1.0, -1.0, 2.0]]
    inputs = hand_inputs(mu, pi, adv, ONE_PAD)
    _, grad = run_loss("minpro", inputs, default_config("minpro", **TOKEN_MEAN))
    assert_grad(grad, [[-1.1 / 4, -0.77 / 4, -1.05 / 4, 0.91 / 4, 0.0]])
    inputs = hand_inputs(mu, pi, adv, ONE_PAD)
    _, grad = run_loss("minpro", inputs, default_config("minpro", minpro_eps_low=0.2, **TOKEN_MEAN))
    assert_grad(grad, [[-1.1 / 4, -0.8 / 4, -1.05 / 4, 0.91 / 4, 0.0]])


BINARY_TV_TRM = {"trm_max_divergence": "binary_tv", "trm_avg_divergence": "binary_tv"}  # D = |pi - mu| by hand


# The rejected row 1 adds nothing to the sum but still counts in the normaliser:
#   token-mean (explicit):              N = N_tokens = 3 + 2 = 5
#   seq-mean-token-sum-norm (default):  N = N_seqs * horizon = 2 * 3 = 6 (horizon: the padded width,
#                                       as config.horizon is None and the normaliser names none)
#   seq-mean-token-sum-norm, horizon 8: N = 2 * 8 = 16 (config.horizon, an int, is the constant)
@pytest.mark.parametrize(
    ("agg", "normaliser_count"),
    [(TOKEN_MEAN, 5), ({}, 6), ({"loss_agg_mode": DEFAULT_AGG_MODE, "horizon": 8}, 16)],
    ids=["token-mean", "default", "default-horizon-8"],
)
def test_trm_rejected_sequence_contributes_zero_but_counts_in_normaliser(agg, normaliser_count):
    # binary TV; row 0: D = .02, .01, 0 (max .02, mean .01); row 1: D = .02, .2 (max .2, mean .11)
    mu = [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]
    pi = [[0.52, 0.49, 0.5], [0.52, 0.7, 0.3]]
    adv = [1.0, -1.0]
    mask = [[True, True, True], [True, True, False]]
    log_pi_row0 = [math.log(p) for p in pi[0]]
    rho_row0 = [1.04, 0.98, 1.0]
    n = normaliser_count
    expected_loss = sum(-1.0 * r * lp for r, lp in zip(rho_row0, log_pi_row0, strict=True)) / n
    cases = {
        "trm_max": {"trm_max_delta": 0.05},
        "trm_avg": {"trm_avg_delta": 0.015},
        "trm_both": {"trm_max_delta": 0.05, "trm_avg_delta": 0.015},
    }
    for name, thresholds in cases.items():
        inputs = hand_inputs(mu, pi, adv, mask)
        config = default_config(name, **BINARY_TV_TRM, **thresholds, **agg)
        assert config.loss_agg_mode == ("token-mean" if agg is TOKEN_MEAN else DEFAULT_AGG_MODE)
        out, grad = run_loss(name, inputs, config)
        assert out.loss.item() == pytest.approx(expected_loss, rel=1e-9), name
        assert_grad(grad, [[-r / n for r in rho_row0], [0.0, 0.0, 0.0]])
        assert out.keep.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
        assert out.metrics["rejected_sequence_frac"].item() == pytest.approx(0.5)
        assert out.metrics["masked_frac"].item() == pytest.approx(2 / 5)


def test_trm_avg_row_with_only_small_divergences_passes_with_max_failing_alone():
    # row: D = .0, .0, .0, .2 -> max .2 fails TRM-Max(.05), mean .05 passes TRM-Avg(.06)
    mu = [[0.5, 0.5, 0.5, 0.5]]
    pi = [[0.5, 0.5, 0.5, 0.7]]
    inputs = hand_inputs(mu, pi, [1.0], [[True] * 4])
    cfg = {**BINARY_TV_TRM, "trm_max_delta": 0.05, "trm_avg_delta": 0.06}
    assert run_loss("trm_max", inputs, default_config("trm_max", **cfg))[0].keep.sum() == 0
    assert run_loss("trm_avg", inputs, default_config("trm_avg", **cfg))[0].keep.sum() == 4
    assert run_loss("trm_both", inputs, default_config("trm_both", **cfg))[0].keep.sum() == 0


# log rho = 0.3:   k2 = 0.045,  k3 = e^0.3 - 1.3   = 0.04986  (k2 < 0.047 < k3)
# log rho = -0.32: k2 = 0.0512, k3 = e^-0.32 - 0.68 = 0.04615  (k3 < 0.047 < k2)
# One token per response (plus padding), so max_t and mean_t are that token's value.
TRM_LOG_RHO = [0.3, -0.32]
TRM_K2 = [0.5 * x**2 for x in TRM_LOG_RHO]
TRM_K3 = [math.expm1(x) - x for x in TRM_LOG_RHO]


def test_trm_rules_use_sampled_k2_and_k3_by_default_each_its_own():
    """Spec 8.11: TRM-Max on the sampled token's k2, TRM-Avg on its k3 (trm_both: each rule its own);
    swapping the keys swaps the decisions, and the logged divergence is the max rule's (else the avg's)."""
    pi = [[0.5 * math.exp(x), 0.9] for x in TRM_LOG_RHO]  # the second column is padding
    inputs = hand_inputs([[0.5, 0.5]] * 2, pi, [1.0, 1.0], [[True, False]] * 2)
    thresholds = {"trm_max_delta": 0.047, "trm_avg_delta": 0.047}
    swapped = {"trm_max_divergence": "sampled_k3", "trm_avg_divergence": "sampled_k2"}
    cases = [  # (name, swap, kept rows, logged D per row)
        ("trm_max", False, [True, False], TRM_K2),
        ("trm_avg", False, [False, True], TRM_K3),
        ("trm_both", False, [False, False], TRM_K2),
        ("trm_max", True, [False, True], TRM_K3),
        ("trm_avg", True, [True, False], TRM_K2),
    ]
    for name, swap, kept, logged in cases:
        config = default_config(name, **thresholds, **(swapped if swap else {}))
        out = get_policy_loss(name)(inputs, config)
        assert out.keep[:, 0].bool().tolist() == kept, (name, swap)
        assert out.metrics["divergence_mean"].item() == pytest.approx(sum(logged) / 2, rel=1e-6), (name, swap)
    # and at the published thresholds (0.05 on k2, 0.001 on k3), the first row passes TRM-Max only
    assert get_policy_loss("trm_max")(inputs, default_config("trm_max")).keep[:, 0].tolist() == [1.0, 0.0]
    assert get_policy_loss("trm_avg")(inputs, default_config("trm_avg")).keep.sum() == 0


@pytest.mark.parametrize("seed", [0, 3])
def test_trm_keep_equals_the_masks_on_the_configured_estimators(seed):
    """Default k2 / k3 of the sampled token, or the top-K KL when configured (`trm_*_divergence=topk_kl`)."""
    inputs = random_inputs(seed, rows=8)
    valid, mu, pi = inputs.response_mask, inputs.rollout_logprobs, inputs.logprobs.detach()
    k2, k3 = sampled_k2(mu, pi), sampled_k3(mu, pi)
    kl = topk_kl(inputs.rollout_topk_logprobs, inputs.topk_logprobs)
    thresholds = {"trm_max_delta": 0.11, "trm_avg_delta": 0.03}
    topk = {"trm_max_divergence": "topk_kl", "trm_avg_divergence": "topk_kl"}
    expected = {
        ("trm_max", False): trm_max_mask(k2, valid, delta=0.11),
        ("trm_avg", False): trm_avg_mask(k3, valid, delta_avg=0.03),
        ("trm_both", False): trm_max_mask(k2, valid, delta=0.11) & trm_avg_mask(k3, valid, delta_avg=0.03),
        ("trm_max", True): trm_max_mask(kl, valid, delta=0.11),
        ("trm_avg", True): trm_avg_mask(kl, valid, delta_avg=0.03),
        ("trm_both", True): trm_max_mask(kl, valid, delta=0.11) & trm_avg_mask(kl, valid, delta_avg=0.03),
    }
    for (name, use_topk), mask in expected.items():
        out = get_policy_loss(name)(inputs, default_config(name, **thresholds, **(topk if use_topk else {})))
        assert torch.equal(out.keep.bool(), mask), (name, use_topk)
    for name in ("trm_max", "trm_avg"):
        assert not torch.equal(expected[(name, False)], expected[(name, True)]), name  # the estimator matters here
        assert expected[(name, False)].any() and (valid & ~expected[(name, False)]).any(), name


# ----------------------------------------------------------------------------------------------
# Random inputs: analytic gradient of every loss, zero gradient where masked and on padding
# ----------------------------------------------------------------------------------------------


def analytic_grad(
    name: str, inputs: PolicyLossInputs, config: PolicyLossConfig, keep: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """d loss / d logprobs: the per-token factor times `scale` (default: token-mean's 1 / N_tokens)."""
    a, valid = inputs.advantages, inputs.response_mask
    log_ratio = log_ratio_of(inputs, config)
    rho = log_ratio.exp()
    if name in MASK_FAMILY:
        factor = rho.clamp(max=config.is_cap) * keep
    elif name == "grpo":
        inside = (rho >= 1 - config.clip_low) & (rho <= 1 + config.clip_high)
        factor = rho * (inside | (a * (rho - 1) <= 0))
    elif name == "cispo":
        factor = rho.clamp(max=1 + config.cispo_eps_high)  # lower clamp 1 - 10 < 0 never binds
    else:  # minpro, weights checked by hand elsewhere
        factor = minpro_weights(log_ratio, valid, eps_low=config.minpro_eps_low, eps_high=config.minpro_eps_high)
    scale = token_mean_scale(inputs) if scale is None else scale
    return torch.where(valid, -a * factor * scale, torch.zeros((), dtype=rho.dtype))


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_equals_analytic_form(name, seed):
    inputs = random_inputs(seed, seq_adv=seed != 1)
    config = default_config(name, is_cap=2.0, **TOKEN_MEAN)  # a small cap so truncation is exercised
    out, grad = run_loss(name, inputs, config)
    # out.keep is float32; a soft gate's value is rounded there (the loss used the float64 gate)
    rtol = 1e-6 if name == "cppo_soft" else 1e-9
    assert_grad(grad, analytic_grad(name, inputs, config, out.keep), atol=1e-9 * rtol, rtol=rtol)
    valid = inputs.response_mask
    assert (grad[~valid] == 0).all()
    assert (out.token_losses[~valid] == 0).all()
    assert not out.keep.requires_grad
    if name in MASK_FAMILY or name == "grpo":
        assert (grad[valid & (out.keep == 0)] == 0).all()
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_float32_inputs_give_float32_loss_and_the_analytic_gradient(name):
    inputs = random_inputs(11, dtype=torch.float32)
    config = default_config(name, is_cap=2.0, **TOKEN_MEAN)
    out, grad = run_loss(name, inputs, config)
    assert out.loss.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(grad, analytic_grad(name, inputs, config, out.keep), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("horizon", [None, 12])
def test_default_aggregation_gives_the_analytic_gradient_over_seqs_times_horizon(name, horizon):
    """Under the default `seq-mean-token-sum-norm`, every token's gradient is its per-token factor
    over N_seqs * horizon (config.horizon when an int, else the padded width), not over N_tokens."""
    inputs = random_inputs(12)
    config = default_config(name, is_cap=2.0, horizon=horizon)
    assert config.loss_agg_mode == DEFAULT_AGG_MODE
    out, grad = run_loss(name, inputs, config)
    scale = token_sum_norm_scale(inputs, horizon)
    assert scale != token_mean_scale(inputs)  # the two aggregations differ on these inputs
    rtol = 1e-6 if name == "cppo_soft" else 1e-9
    assert_grad(grad, analytic_grad(name, inputs, config, out.keep, scale), atol=1e-9 * rtol, rtol=rtol)
    expected_loss = out.token_losses.sum() * scale
    assert out.loss.item() == pytest.approx(expected_loss.item(), rel=1e-9, abs=1e-12)


def test_random_inputs_exercise_masking_and_truncation():
    """The random cases of the test above mask some tokens, keep others and hit the IS cap."""
    inputs = random_inputs(0)
    out, _ = run_loss("dppo", inputs, default_config("dppo", is_cap=2.0))
    valid = inputs.response_mask
    kept = out.keep.bool() & valid
    assert kept.any() and (valid & ~kept).any()
    rho = log_ratio_of(inputs, PolicyLossConfig()).exp()
    assert (kept & (rho > 2.0)).any()


@pytest.mark.parametrize("name", ["cppo", "cppo_no_position_weight", "cppo_no_prefix_budget", "dppo"])
def test_masked_and_padding_tokens_get_exactly_zero_gradient_with_garbage_padding(name):
    inputs = random_inputs(3)
    valid = inputs.response_mask
    # finite garbage on padding: huge logprobs gaps and advantages
    logprobs = torch.where(valid, inputs.logprobs.detach(), torch.tensor(-80.0, dtype=torch.float64))
    rollout = torch.where(valid, inputs.rollout_logprobs, torch.tensor(-1e-3, dtype=torch.float64))
    advantages = torch.where(valid, inputs.advantages, torch.tensor(1e6, dtype=torch.float64))
    garbage = PolicyLossInputs(
        logprobs=logprobs.requires_grad_(True),
        rollout_logprobs=rollout,
        advantages=advantages,
        response_mask=valid,
        topk_logprobs=inputs.topk_logprobs,
        rollout_topk_logprobs=inputs.rollout_topk_logprobs,
    )
    config = default_config(name)
    out, grad = run_loss(name, garbage, config)
    _, clean_grad = run_loss(name, inputs, config)
    assert (grad[~valid] == 0).all()
    assert (grad[valid & (out.keep == 0)] == 0).all()
    torch.testing.assert_close(grad, clean_grad, rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("junk", [math.nan, -math.inf])
def test_non_finite_padding_gets_zero_gradient(name, junk):
    """Padding logprobs that are NaN or -inf (e.g. a collator's fill value) must not turn the
    gradient into NaN: aggregate_loss promises padding never contributes, and a NaN gradient on a
    padded position propagates to every parameter."""
    inputs = random_inputs(4)
    valid = inputs.response_mask
    junk_t = torch.tensor(junk, dtype=torch.float64)
    logprobs = torch.where(valid, inputs.logprobs.detach(), junk_t).requires_grad_(True)
    rollout = torch.where(valid, inputs.rollout_logprobs, junk_t)
    bad = PolicyLossInputs(
        logprobs=logprobs,
        rollout_logprobs=rollout,
        advantages=inputs.advantages,
        response_mask=valid,
        topk_logprobs=inputs.topk_logprobs,
        rollout_topk_logprobs=inputs.rollout_topk_logprobs,
    )
    out, grad = run_loss(name, bad, default_config(name))
    assert torch.isfinite(out.loss)
    assert torch.isfinite(grad).all(), grad
    assert (grad[~valid] == 0).all()


# ----------------------------------------------------------------------------------------------
# CPPO keep = cppo_mask; ablation names force their switches; soft gate
# ----------------------------------------------------------------------------------------------


@settings(derandomize=True, deadline=None, max_examples=25)
@given(
    st.integers(0, 10_000),
    st.sampled_from(["topk_tv", "topk_kl", "binary_tv", "binary_kl"]),
    st.floats(0.02, 0.3),
    st.sampled_from([0.0, 0.01, 0.05, 1.0]),
    st.sampled_from([0.5, 0.8, 1.0]),
    st.sampled_from([None, "sequence", 12]),
    st.booleans(),
    st.sampled_from([2.0, 5.0]),
    st.booleans(),
    st.booleans(),
)
def test_cppo_keep_equals_cppo_mask(seed, divergence, delta, delta_b, w_min, horizon, adaptive, ceiling, pos_w, prefix):
    if adaptive and delta_b == 0.0:
        delta_b = 0.01
    inputs = random_inputs(seed, dtype=torch.float32)
    config = PolicyLossConfig(
        divergence=divergence,
        delta=delta,
        delta_b=delta_b,
        w_min=w_min,
        horizon=horizon,
        adaptive_delta_b=adaptive,
        delta_b_ceiling=ceiling,
        position_weight=pos_w,
        prefix_budget=prefix,
    )
    out = get_policy_loss("cppo")(inputs, config)
    expected = cppo_mask(
        divergence_of(inputs, config),
        inputs.advantages,
        log_ratio_of(inputs, config),
        inputs.response_mask,
        delta=delta,
        delta_b=delta_b,
        w_min=w_min,
        horizon=horizon,
        adaptive_delta_b=adaptive,
        delta_b_ceiling=ceiling,
        position_weight=pos_w,
        prefix_budget=prefix,
    )
    assert out.keep.dtype == torch.float32
    assert torch.equal(out.keep.bool(), expected)


def test_cppo_loss_applies_the_delta_b_ceiling():
    """Spec 8.15: the config's ceiling reaches the adaptive budget; c = 5 keeps a token c = 2 masks here."""
    inputs = random_inputs(0)
    config = PolicyLossConfig(adaptive_delta_b=True, delta_b=0.02)
    paper, later = (get_policy_loss("cppo")(inputs, config.replace(delta_b_ceiling=c)) for c in (2.0, 5.0))
    assert paper.metrics["delta_b_mean"] <= 0.04 + 1e-7 < later.metrics["delta_b_mean"]
    assert bool((paper.keep <= later.keep).all()) and paper.keep.sum() < later.keep.sum()


def _hand_weights(width: int, w_min: float) -> torch.Tensor:
    t = torch.arange(1, width + 1, dtype=torch.float64)
    return 1 - (1 - w_min) * (t - 1) / max(width - 1, 1)


@pytest.mark.parametrize("seed", [0, 5])
def test_no_prefix_budget_name_forces_its_switch(seed):
    inputs = random_inputs(seed)
    config = PolicyLossConfig(prefix_budget=True, delta=0.05, delta_b=0.0)  # cppo itself would use the budget
    out = get_policy_loss("cppo_no_prefix_budget")(inputs, config)
    d = divergence_of(inputs, config)
    w = _hand_weights(inputs.response_mask.shape[-1], config.w_min)
    a, log_ratio = inputs.advantages, log_ratio_of(inputs, config)
    expected = inputs.response_mask & ((a * (log_ratio.exp() - 1) <= 0) | (w * d <= config.delta + 1e-7))
    assert torch.equal(out.keep.bool(), expected)
    with_budget = get_policy_loss("cppo")(inputs, config).keep
    assert not torch.equal(with_budget, out.keep)  # the switch made a difference here


def test_no_position_weight_name_forces_its_switch():
    # random inputs: the ablation's keep equals cppo_mask(position_weight=False)
    inputs = random_inputs(6)
    config = PolicyLossConfig(position_weight=True, w_min=0.5, delta=0.1, delta_b=0.05)
    out = get_policy_loss("cppo_no_position_weight")(inputs, config)
    expected = cppo_mask(
        divergence_of(inputs, config),
        inputs.advantages,
        log_ratio_of(inputs, config),
        inputs.response_mask,
        delta=0.1,
        delta_b=0.05,
        w_min=0.5,
        position_weight=False,
    )
    assert torch.equal(out.keep.bool(), expected)
    # hand example where the switch matters: D = 0, 0, 0, .12 (the last token moves away from mu);
    # w_4 = 0.5 so Z_4 = .06 <= delta = .1 (kept by CPPO); with w = 1, Z_4 = .12 > delta (masked)
    hand = hand_inputs([[0.5, 0.5, 0.5, 0.2]], [[0.5, 0.5, 0.5, 0.32]], [1.0], [[True] * 4])
    config = PolicyLossConfig(divergence="binary_tv", position_weight=True, w_min=0.5, delta=0.1, delta_b=0.05)
    assert get_policy_loss("cppo")(hand, config).keep.tolist() == [[1.0, 1.0, 1.0, 1.0]]
    assert get_policy_loss("cppo_no_position_weight")(hand, config).keep.tolist() == [[1.0, 1.0, 1.0, 0.0]]


def test_shuffled_weights_name_forces_its_switches():
    inputs = random_inputs(7)
    config = PolicyLossConfig(prefix_budget=True, shuffle_weights=False, w_min=0.3, delta=0.1)
    torch.manual_seed(1234)
    out = get_policy_loss("cppo_shuffled_weights")(inputs, config)
    torch.manual_seed(1234)
    reference = cppo_mask_details(
        divergence_of(inputs, config),
        inputs.advantages,
        log_ratio_of(inputs, config),
        inputs.response_mask,
        delta=0.1,
        w_min=0.3,
        prefix_budget=False,
        shuffle_weights=True,
    )
    assert torch.equal(out.keep.bool(), reference.mask)
    assert not reference.prefix_violation.any()
    # the multiset of weights of each response is kept
    plain = cppo_mask_details(
        divergence_of(inputs, config),
        inputs.advantages,
        log_ratio_of(inputs, config),
        inputs.response_mask,
        delta=0.1,
        w_min=0.3,
        prefix_budget=False,
    )
    torch.testing.assert_close(reference.weights.sort(-1).values, plain.weights.sort(-1).values)


@pytest.mark.parametrize("name", ["cppo_soft", "cppo"])
def test_soft_gate_multiplies_the_loss_by_the_gate(name):
    inputs = random_inputs(8)
    config = PolicyLossConfig(soft_gate=name == "cppo", delta=0.1, is_cap=3.0, **TOKEN_MEAN)  # cppo_soft forces it on
    out, grad = run_loss(name, inputs, config)
    valid = inputs.response_mask
    gate = cppo_soft_mask(
        divergence_of(inputs, config),
        inputs.advantages,
        log_ratio_of(inputs, config),
        valid,
        delta=0.1,
    )
    torch.testing.assert_close(out.keep, gate.float())
    assert ((gate > 0) & (gate < 1) & valid).any(), "the example must have a partial gate"
    assert not out.keep.requires_grad
    rho = log_ratio_of(inputs, config).exp()
    expected = torch.where(valid, -inputs.advantages * rho.clamp(max=3.0) * gate * token_mean_scale(inputs), 0.0)
    assert_grad(grad, expected)
    # the hard mask keeps exactly the tokens with gate 1
    hard = get_policy_loss("cppo")(inputs, config.replace(soft_gate=False)).keep
    assert torch.equal(hard.bool(), (gate == 1) & valid)


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_metrics_are_0dim_tensors_with_masked_frac(name):
    inputs = random_inputs(9)
    out = get_policy_loss(name)(inputs, default_config(name))
    metrics = out.metrics
    for key in ("masked_frac", "ratio_mean", "log_ratio_abs_mean", "masked_frac_decile_0"):
        assert key in metrics, key
    for key, value in metrics.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0, key
        assert not value.requires_grad, key
    valid = inputs.response_mask
    expected_masked = ((1 - out.keep) * valid).sum() / valid.sum()
    assert metrics["masked_frac"].item() == pytest.approx(expected_masked.item(), abs=1e-6)
    rho = log_ratio_of(inputs, PolicyLossConfig()).exp()
    assert metrics["ratio_mean"].item() == pytest.approx(rho[valid].mean().item(), rel=1e-5)
    if name in CPPO_FAMILY:
        for key in (
            "masked_by_token_frac",
            "masked_by_prefix_frac",
            "toward_mu_frac",
            "delta_b_mean",
            "divergence_mean",
        ):
            assert key in metrics, key
    if name.startswith("trm"):
        assert "rejected_sequence_frac" in metrics and "divergence_mean" in metrics
    if name in ("cispo", "minpro"):
        assert "is_weight_mean" in metrics
        assert metrics["masked_frac"].item() == 0.0


# ----------------------------------------------------------------------------------------------
# Baseline masks and weights (masks.py)
# ----------------------------------------------------------------------------------------------


@settings(derandomize=True, deadline=None, max_examples=30)
@given(st.integers(0, 10_000), st.floats(0.01, 0.5))
def test_dppo_mask_formula(seed, delta):
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(3, 6, generator=g) * 0.4
    log_ratio = torch.randn(3, 6, generator=g) * 0.3
    log_ratio[0, 0] = 0.0  # rho == 1 is toward mu
    adv = torch.randn(3, 6, generator=g)
    adv[1, 1] = 0.0  # A == 0 is toward mu
    mask = torch.arange(6).expand(3, 6) < torch.tensor([[6], [4], [0]])
    out = dppo_mask(d, adv, log_ratio, mask, delta=delta)
    expected = mask & ((adv * (log_ratio.exp() - 1) <= 0) | (d <= delta))
    assert out.dtype == torch.bool and torch.equal(out, expected)
    assert torch.equal(
        dppo_mask(d, adv[:, 0], log_ratio, mask, delta=delta),
        mask & ((adv[:, :1] * (log_ratio.exp() - 1) <= 0) | (d <= delta)),
    )


def test_ppo_clip_mask_region_with_clip_higher():
    rho = torch.tensor([[0.79, 0.81, 1.0, 1.27, 1.29, 0.79, 0.81, 1.27, 1.29, 1.5]])
    adv = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0, 1.0]])
    mask = torch.tensor([[True] * 9 + [False]])
    out = ppo_clip_mask(adv, rho.log(), mask)
    # A > 0: rho below 0.8 moves toward mu (kept), above 1.28 clipped; A < 0: the mirror image
    expected = [[True, True, True, True, False, False, True, True, True, False]]
    assert out.tolist() == expected
    narrow = ppo_clip_mask(adv, rho.log(), mask, clip_low=0.1, clip_high=0.1)
    # region [0.9, 1.1]: 0.81 (A > 0) and 1.27 (A < 0) are still kept because they move toward mu
    assert narrow.tolist() == [[True, True, True, False, False, False, False, True, True, False]]


def test_ppo_clip_mask_matches_grpo_nonzero_gradient():
    inputs = random_inputs(10)
    out, grad = run_loss("grpo", inputs, default_config("grpo"))
    nonzero = (grad != 0) & inputs.response_mask
    has_adv = inputs.advantages != 0
    assert torch.equal(nonzero & has_adv, out.keep.bool() & has_adv & inputs.response_mask)


def test_trm_masks_decide_whole_rows_and_ignore_padding():
    d = torch.tensor(
        [
            [0.01, 0.02, 0.03, 9.0],  # padding value 9 ignored: max .03, mean .02
            [0.01, 0.20, 0.00, 0.0],  # max .2, mean .07
            [0.00, 0.00, 0.00, 0.0],  # empty row
            [0.04, math.nan, math.inf, -1.0],  # one valid token, junk on padding
        ]
    )
    mask = torch.tensor([[True, True, True, False], [True, True, True, True], [False] * 4, [True, False, False, False]])
    trm_max = trm_max_mask(d, mask, delta=0.05)
    assert trm_max.tolist() == [[True, True, True, False], [False] * 4, [False] * 4, [True, False, False, False]]
    trm_avg = trm_avg_mask(d, mask, delta_avg=0.03)
    assert trm_avg.tolist() == [[True, True, True, False], [False] * 4, [False] * 4, [False] * 4]
    assert trm_avg_mask(d, mask, delta_avg=0.05).tolist() == [
        [True, True, True, False],
        [False] * 4,
        [False] * 4,
        [True, False, False, False],
    ]
    # row decisions: every valid token of a row shares the decision
    for row in range(4):
        assert trm_max[row][mask[row]].unique().numel() <= 1


def test_cispo_weights_clamp():
    rho = torch.tensor([[1e-4, 0.5, 1.0, 1.19, 1.21, 50.0, 7.0]])
    mask = torch.tensor([[True] * 6 + [False]])
    w = cispo_weights(rho.log(), mask)
    torch.testing.assert_close(w, torch.tensor([[1e-4, 0.5, 1.0, 1.19, 1.2, 1.2, 0.0]]), rtol=1e-5, atol=1e-7)
    w2 = cispo_weights(rho.log(), mask, eps_low=0.5, eps_high=0.1)  # a lower clamp that binds
    torch.testing.assert_close(w2, torch.tensor([[0.5, 0.5, 1.0, 1.1, 1.1, 1.1, 0.0]]), rtol=1e-5, atol=1e-7)
    assert not cispo_weights(rho.log().requires_grad_(True), mask).requires_grad


def test_minpro_weights_hand_example():
    rho = torch.tensor(
        [
            [1.1, 0.7, 1.5, 1.3, 0.2],  # m = 1, 1.1, .7, .7 -> m rho = 1.1, .77, 1.05, .91
            [0.9, 1.2, 0.1, 0.1, 0.1],  # m = 1, .9 -> .9, 1.08; padding 0
            [2.0, 1.0, 0.5, 1.0, 1.0],  # m = 1, 2, 1, .5, .5 -> 2, 2, .5, .5, .5 -> clipped above (below too at 0.2)
            [1.0, 1.0, 1.0, 1.0, 1.0],  # empty row
        ],
        dtype=torch.float64,
    )
    mask = torch.tensor([[True] * 4 + [False], [True, True, False, False, False], [True] * 5, [False] * 5])
    w = minpro_weights(rho.log(), mask)  # spec 8.12: eps_low 10 (no effective lower clip), eps_high 0.28
    expected = torch.tensor(
        [[1.1, 0.77, 1.05, 0.91, 0.0], [0.9, 1.08, 0.0, 0.0, 0.0], [1.28, 1.28, 0.5, 0.5, 0.5], [0.0] * 5],
        dtype=torch.float64,
    )
    torch.testing.assert_close(w, expected, rtol=1e-12, atol=1e-12)
    low_clip = minpro_weights(rho.log(), mask, eps_low=0.2)  # a lower clip that binds
    expected = torch.tensor(
        [[1.1, 0.8, 1.05, 0.91, 0.0], [0.9, 1.08, 0.0, 0.0, 0.0], [1.28, 1.28, 0.8, 0.8, 0.8], [0.0] * 5],
        dtype=torch.float64,
    )
    torch.testing.assert_close(low_clip, expected, rtol=1e-12, atol=1e-12)
    # without clipping, the weight is m_t rho_t exactly
    wide = minpro_weights(rho.log(), mask, eps_low=0.99, eps_high=100.0)
    torch.testing.assert_close(wide[2], torch.tensor([2.0, 2.0, 0.5, 0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(wide[0, :4], torch.tensor([1.1, 0.77, 1.05, 0.91], dtype=torch.float64))


@settings(derandomize=True, deadline=None, max_examples=30)
@given(st.integers(0, 10_000))
def test_minpro_prefix_min_is_causal_and_uses_earlier_valid_tokens_only(seed):
    g = torch.Generator().manual_seed(seed)
    log_ratio = torch.randn(3, 8, generator=g, dtype=torch.float64) * 0.3
    mask = torch.arange(8).expand(3, 8) < torch.tensor([[8], [5], [1]])
    wide = minpro_weights(log_ratio, mask, eps_low=0.999, eps_high=1e6)
    rho = log_ratio.exp()
    for b in range(3):
        for t in range(8):
            if not mask[b, t]:
                assert wide[b, t] == 0
                continue
            m = 1.0 if t == 0 else float(rho[b, :t].min())
            assert wide[b, t].item() == pytest.approx(m * float(rho[b, t]), rel=1e-12)


@pytest.mark.parametrize(
    ("fn", "args"),
    [
        (dppo_mask, ("divergence", "advantages", "log_ratio")),
        (trm_max_mask, ("divergence",)),
        (trm_avg_mask, ("divergence",)),
        (cispo_weights, ("log_ratio",)),
        (minpro_weights, ("log_ratio",)),
        (ppo_clip_mask, ("advantages", "log_ratio")),
    ],
)
def test_baseline_mask_input_errors(fn, args):
    mask = torch.ones(2, 3, dtype=torch.bool)
    good = {name: torch.zeros(2, 3) for name in args}
    fn(*good.values(), mask)  # fine
    with pytest.raises(TypeError, match="response_mask"):
        fn(*good.values(), mask.float())
    for name in args:
        with pytest.raises(TypeError, match=name):
            fn(*{**good, name: torch.zeros(2, 3, dtype=torch.long)}.values(), mask)
        with pytest.raises(ValueError, match=name):
            fn(*{**good, name: torch.zeros(2, 4)}.values(), mask)
