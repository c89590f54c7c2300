"""CPPO trust-region mask: Algorithm 1 oracle, spec 6.3 properties, worked vectors, soft gate, diagnostics.

References are to docs/algorithm_spec.md (sections 3.1, 3.3, 3.5, 3.6, 3.7, 6.3 and 8). The oracle
below is a literal per-token loop of Algorithm 1 in float64; it shares no code with
`cppo_rl.algorithms.masks`. Its position weights are re-derived in float32 with numpy, rounded op by
op the way the implementation computes them, and its threshold is written in the implementation's
order, `z <= (delta + delta_b W_{t-1}) - S_{t-1}`, so the comparison can be exact. Its P_q is
torch.quantile on the row's valid values (checked against the textbook linear formula).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cppo_rl.algorithms.diagnostics import NUM_DECILES, cppo_diagnostics, mask_diagnostics
from cppo_rl.algorithms.masks import (
    CPPOMaskResult,
    cppo_mask,
    cppo_mask_details,
    cppo_soft_mask,
    dppo_mask,
    per_sequence_delta_b,
    position_weights,
    shuffle_within_rows,
)

NAN = float("nan")
INF = float("inf")


def _settings(max_examples: int) -> settings:
    return settings(derandomize=True, max_examples=max_examples, deadline=None, database=None)


# ----------------------------------------------------------------------------------------------
# Batches and strategies
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """A right-padded [B, T] float64 batch; padding holds arbitrary (possibly non-finite) values."""

    d: torch.Tensor
    a: torch.Tensor
    lr: torch.Tensor
    valid: torch.Tensor

    @property
    def args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.d, self.a, self.lr, self.valid

    @property
    def lengths(self) -> list[int]:
        return [int(n) for n in self.valid.sum(-1)]

    @property
    def width(self) -> int:
        return self.valid.shape[-1]

    def replace(self, **tensors: torch.Tensor) -> Batch:
        fields = {"d": self.d, "a": self.a, "lr": self.lr, "valid": self.valid, **tensors}
        return Batch(**fields)


def make_batch(
    d_rows: list[list[float]],
    a_rows: list[list[float]] | None = None,
    lr_rows: list[list[float]] | None = None,
    *,
    width: int | None = None,
    pad: float = 0.0,
    dtype: torch.dtype = torch.float64,
) -> Batch:
    """Right-pad ragged rows to `width`; A defaults to +1 and log-ratio to log 1.5 (away from mu)."""
    width = width if width is not None else max([len(r) for r in d_rows] + [1])
    a_rows = a_rows if a_rows is not None else [[1.0] * len(r) for r in d_rows]
    lr_rows = lr_rows if lr_rows is not None else [[math.log(1.5)] * len(r) for r in d_rows]

    def pad_rows(rows: list[list[float]]) -> torch.Tensor:
        return torch.tensor([list(r) + [pad] * (width - len(r)) for r in rows], dtype=dtype)

    valid = torch.tensor([[j < len(r) for j in range(width)] for r in d_rows], dtype=torch.bool)
    return Batch(pad_rows(d_rows), pad_rows(a_rows), pad_rows(lr_rows), valid)


# Values come from a numpy generator seeded by one hypothesis draw per tensor: one primitive draw
# instead of hundreds keeps the tests fast, and each kind is a designed mixture of edge values
# (exact zeros, the thresholds, log 1.5, tiny log-ratios) and continuous ranges.
SPECIAL = {
    "div": (0.02, 0.05, 0.15, 0.2, 1.0),
    "calm": (0.015, 0.02, 0.04, 0.15),
    "adv": (-1.0, 1.0, 0.5, -2.0),
    "lr": (math.log(1.5), -math.log(1.5), math.log(1.2), -math.log(1.2)),
}
# (probability, sampler) per kind; a sampler maps (rng, n) to n floats
MIXTURES = {
    "div": [
        (0.12, lambda g, n: np.zeros(n)),
        (0.13, lambda g, n: g.choice(SPECIAL["div"], n)),
        (0.30, lambda g, n: g.uniform(0.0, 0.05, n)),
        (0.30, lambda g, n: g.uniform(0.05, 0.3, n)),
        (0.15, lambda g, n: g.uniform(0.3, 1.0, n)),
    ],
    "calm": [  # of the order of delta_b: the prefix budget decides
        (0.10, lambda g, n: np.zeros(n)),
        (0.10, lambda g, n: g.choice(SPECIAL["calm"], n)),
        (0.80, lambda g, n: g.uniform(0.0, 0.12, n)),
    ],
    "adv": [
        (0.10, lambda g, n: np.zeros(n)),
        (0.30, lambda g, n: g.choice(SPECIAL["adv"], n)),
        (0.60, lambda g, n: g.choice([-1.0, 1.0], n) * g.uniform(1e-3, 5.0, n)),
    ],
    "lr": [
        (0.10, lambda g, n: np.zeros(n)),
        (0.20, lambda g, n: g.choice(SPECIAL["lr"], n)),
        (0.60, lambda g, n: g.choice([-1.0, 1.0], n) * g.uniform(1e-6, 3.0, n)),
        (0.10, lambda g, n: g.choice([-1.0, 1.0], n) * g.uniform(1e-9, 1e-6, n)),
    ],
}
MIXTURES["div_big"] = [*MIXTURES["div"][:-1], (0.15, lambda g, n: g.uniform(1.0, 50.0, n))]


def _sample(kind: str, n: int, seed: int) -> list[float]:
    g = np.random.default_rng(seed)
    if kind == "dyadic":  # k / 256: every sum and product of the tests stays exact
        return (g.integers(0, 257, n) / 256).tolist()
    probabilities, samplers = zip(*MIXTURES[kind], strict=True)
    family = g.choice(len(samplers), n, p=probabilities)
    candidates = np.stack([sampler(g, n) for sampler in samplers])
    return candidates[family, np.arange(n)].astype(np.float64).tolist()


def values(kind: str, n: int):
    """Strategy for a list of n floats of one kind: "div", "div_big", "calm", "dyadic", "adv" or "lr"."""
    return st.integers(0, 2**32 - 1).map(lambda seed: _sample(kind, n, seed))


def value_tensor(data, kind: str, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(data.draw(values(kind, math.prod(shape))), dtype=torch.float64).reshape(shape)


D_PAD = st.sampled_from([0.0, 9.0, -3.0, NAN, INF, -INF])
AL_PAD = st.sampled_from([0.0, 5.0, -5.0, NAN])


@st.composite
def batches(draw, *, min_b: int = 1, max_b: int = 4, min_t: int = 1, max_t: int = 12, div: str = "div") -> Batch:
    b = draw(st.integers(min_b, max_b))
    t = draw(st.integers(min_t, max_t))
    # lengths: 0 and 1 (1/8 each), the full width (3/8) or anything in between (3/8)
    lengths = [
        (0, min(1, t), t, t, t)[choice] if choice < 5 else draw(st.integers(0, t))
        for choice in draw(st.lists(st.integers(0, 7), min_size=b, max_size=b))
    ]
    d, a, lr = (
        torch.tensor(draw(values(kind, b * t)), dtype=torch.float64).reshape(b, t) for kind in (div, "adv", "lr")
    )
    if div == "div":  # calm batches (D around delta_b) exercise the prefix budget, wild ones the token rule
        d = d * draw(st.sampled_from([1.0, 0.3, 0.1, 0.05]))
    valid = torch.arange(t).expand(b, t) < torch.tensor(lengths).unsqueeze(-1)
    d = torch.where(valid, d, torch.tensor(draw(D_PAD), dtype=torch.float64))
    a = torch.where(valid, a, torch.tensor(draw(AL_PAD), dtype=torch.float64))
    lr = torch.where(valid, lr, torch.tensor(draw(AL_PAD), dtype=torch.float64))
    return Batch(d, a, lr, valid)


def horizons(width: int):
    return st.one_of(st.none(), st.just("sequence"), st.just(width), st.integers(width, width + 20))


CEILINGS = st.one_of(st.sampled_from([2.0, 5.0]), st.floats(1.0, 8.0))
"""The adaptive budget's ceiling c (spec 8.15): the paper's 2, the authors' later 5, or anything >= 1."""


@st.composite
def cppo_params(draw, width: int, *, adaptive: bool | None = None, ablations: bool = False) -> dict:
    """Keyword arguments of `cppo_mask` (adaptive None: drawn)."""
    adaptive = draw(st.booleans()) if adaptive is None else adaptive
    params = {
        "delta": draw(st.one_of(st.sampled_from([0.05, 0.15, 0.2]), st.floats(0.01, 0.5))),
        "w_min": draw(st.one_of(st.sampled_from([0.8, 1.0, 0.5]), st.floats(0.05, 1.0))),
        "horizon": draw(horizons(width)),
    }
    if adaptive:
        params["delta_b"] = draw(st.one_of(st.sampled_from([0.02, 0.015]), st.floats(1e-3, 0.2)))
        params["adaptive_delta_b"] = True
        params["delta_b_quantile"] = draw(st.one_of(st.just(0.9), st.floats(0.0, 1.0)))
        params["delta_b_scale"] = draw(st.one_of(st.just(1.0), st.floats(0.25, 4.0)))
        params["delta_b_ceiling"] = draw(CEILINGS)
    else:
        params["delta_b"] = draw(st.one_of(st.sampled_from([0.0, 0.015, 0.02]), st.floats(0.0, 0.2)))
    if ablations:
        params["position_weight"] = draw(st.sampled_from([True, True, True, False]))
        params["prefix_budget"] = draw(st.sampled_from([True, True, True, False]))
    return params


# ----------------------------------------------------------------------------------------------
# Oracle: Algorithm 1 (spec 3.1) as a loop over t, one response at a time
# ----------------------------------------------------------------------------------------------


def reference_weights(length: int, width: int, w_min: float, horizon) -> list[float]:
    """Eq. 9, `w_t = 1 - (1 - w_min)(t - 1)/max(T - 1, 1)`, rounded in float32 op by op."""
    if horizon is None:
        big_t = width
    elif horizon == "sequence":
        big_t = length
    else:
        big_t = horizon
    slope = np.float32(1.0 - w_min)
    denominator = np.float32(max(big_t - 1, 1))
    return [float(np.float32(1.0) - slope * np.float32(t) / denominator) for t in range(length)]


def reference_delta_b(
    valid_d: list[float], delta_b: float, adaptive: bool, quantile: float, scale: float, ceiling: float
) -> float:
    """Spec 3.3, 8.7, 8.15: clamp(scale * P_q(D_valid), delta_b, ceiling * delta_b) (linear P_q); empty -> delta_b."""
    if not adaptive or not valid_d:
        return delta_b
    return min(max(scale * reference_quantile(valid_d, quantile), delta_b), ceiling * delta_b)


def reference_quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile of one response's valid values (torch's rounding, checked below)."""
    return torch.quantile(torch.tensor(values, dtype=torch.float64), q).item()


def reference_cppo_mask(
    batch: Batch,
    *,
    delta: float = 0.15,
    delta_b: float = 0.02,
    w_min: float = 0.8,
    horizon=None,
    adaptive_delta_b: bool = False,
    delta_b_quantile: float = 0.9,
    delta_b_scale: float = 1.0,
    delta_b_ceiling: float = 2.0,
    position_weight: bool = True,
    prefix_budget: bool = True,
) -> torch.Tensor:
    out = torch.zeros(batch.valid.shape, dtype=torch.bool)
    for i, length in enumerate(batch.lengths):
        d = batch.d[i, :length].tolist()
        a = batch.a[i, :length].tolist()
        lr = batch.lr[i, :length].tolist()
        w = reference_weights(length, batch.width, w_min, horizon) if position_weight else [1.0] * length
        rate = reference_delta_b(d, delta_b, adaptive_delta_b, delta_b_quantile, delta_b_scale, delta_b_ceiling)
        s = 0.0  # S_{t-1}
        big_w = 0.0  # W_{t-1}
        for t in range(length):
            z = w[t] * d[t]
            budget = rate * big_w if big_w > 0 else 0.0  # delta_b * W_0 = 0 even for delta_b = inf
            inside = z <= delta and (not prefix_budget or z <= (delta + budget) - s)
            toward = a[t] * math.expm1(lr[t]) <= 0  # A_t (rho_t - 1) <= 0
            out[i, t] = toward or inside
            s += z  # every valid token enters S and W, masked or not
            big_w += w[t]
    return out


def reference_dppo_mask(batch: Batch, delta: float) -> torch.Tensor:
    out = torch.zeros(batch.valid.shape, dtype=torch.bool)
    for i, length in enumerate(batch.lengths):
        for t in range(length):
            toward = batch.a[i, t].item() * math.expm1(batch.lr[i, t].item()) <= 0
            out[i, t] = toward or batch.d[i, t].item() <= delta
    return out


def assert_close(actual: torch.Tensor, expected, *, atol: float = 1e-6, equal_nan: bool = False) -> None:
    """Absolute-tolerance comparison (torch.testing.assert_close costs ~1 s of imports on first use)."""
    actual = actual.detach().double()
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    assert torch.allclose(actual, expected, rtol=0, atol=atol, equal_nan=equal_nan), f"\n{actual}\n!=\n{expected}"


def exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros_like(x[..., :1]), x.cumsum(-1)[..., :-1]], dim=-1)


def assert_mask_equal(actual: torch.Tensor, expected: torch.Tensor, context: object = "") -> None:
    assert actual.dtype == torch.bool
    assert torch.equal(actual, expected), f"{context}\nactual:\n{actual.int()}\nexpected:\n{expected.int()}"


# ----------------------------------------------------------------------------------------------
# 1. The implementation equals the Algorithm 1 oracle exactly
# ----------------------------------------------------------------------------------------------


def _check_against_oracle(batch: Batch, params: dict) -> None:
    expected = reference_cppo_mask(batch, **params)
    assert_mask_equal(cppo_mask(*batch.args, **params), expected, params)
    details = cppo_mask_details(*batch.args, **params)
    assert_mask_equal(details.mask, expected, params)
    expected_rate = [
        reference_delta_b(
            batch.d[i, :length].tolist(),
            params["delta_b"],
            params.get("adaptive_delta_b", False),
            params.get("delta_b_quantile", 0.9),
            params.get("delta_b_scale", 1.0),
            params.get("delta_b_ceiling", 2.0),
        )
        for i, length in enumerate(batch.lengths)
    ]
    assert details.delta_b.shape == (batch.valid.shape[0], 1)
    assert details.delta_b[:, 0].tolist() == expected_rate, params
    if params.get("position_weight", True):
        expected_w = torch.zeros(batch.valid.shape, dtype=torch.float64)
        for i, length in enumerate(batch.lengths):
            expected_w[i, :length] = torch.tensor(
                reference_weights(length, batch.width, params["w_min"], params["horizon"]), dtype=torch.float64
            )
        assert torch.equal(details.weights, expected_w)


@_settings(200)
@given(data=st.data())
def test_cppo_mask_matches_algorithm1_oracle(data):
    batch = data.draw(batches())
    params = data.draw(cppo_params(batch.width, ablations=True))
    _check_against_oracle(batch, params)


@_settings(120)
@given(data=st.data())
def test_cppo_mask_matches_algorithm1_oracle_near_the_budget(data):
    """Divergences of the order of delta_b and long rows: the prefix budget makes the decisions."""
    batch = data.draw(batches(min_t=4, div="calm"))
    adaptive = data.draw(st.booleans())
    params = {
        "delta": data.draw(st.sampled_from([0.05, 0.1, 0.15, 0.2])),
        "delta_b": data.draw(st.one_of(st.just(0.02), st.floats(0.005, 0.05))),
        "w_min": data.draw(st.one_of(st.just(0.8), st.floats(0.05, 1.0))),
        "horizon": data.draw(horizons(batch.width)),
        "adaptive_delta_b": adaptive,
        "delta_b_ceiling": data.draw(st.sampled_from([2.0, 5.0])),
    }
    _check_against_oracle(batch, params)


def test_oracle_quantile_is_linear_interpolation():
    """The oracle's P_q is the textbook linear-interpolation quantile (rank q (n - 1))."""
    sample = [0.3, 0.01, 0.07, 0.2, 0.05, 0.0, 0.11]
    ordered = sorted(sample)
    for q in (0.0, 0.1, 0.5, 0.9, 1.0):
        rank = q * (len(sample) - 1)
        lo, hi = math.floor(rank), math.ceil(rank)
        textbook = ordered[lo] + (rank - lo) * (ordered[hi] - ordered[lo])
        assert reference_quantile(sample, q) == pytest.approx(textbook, abs=1e-15)


def test_per_sequence_delta_b_p90_clamp_padding_and_empty_rows():
    # row 0: ten valid values 0.01..0.10 -> P90 = 0.09 + 0.1 * 0.01 = 0.091, inside [0.05, 0.1]
    # row 1: same values but P90 is read only from the 3 valid tokens; padding is NaN / inf
    # row 2: empty -> delta_b_min; row 3: tiny values -> clamped up; row 4: huge values -> clamped down
    rows = [[k / 100 for k in range(1, 11)], [0.0, 0.01, 0.02], [], [0.001] * 4, [0.9] * 2]
    batch = make_batch(rows, width=10, pad=NAN)
    d = batch.d.clone()
    d[1, 3:] = INF
    got = per_sequence_delta_b(d, batch.valid, delta_b_min=0.05)
    expected = torch.tensor([[0.091], [0.05], [0.05], [0.05], [0.1]], dtype=torch.float64)
    assert got.shape == (5, 1)
    assert_close(got, expected, atol=1e-12)
    # scale multiplies the quantile before the clamp; q is used as given
    got = per_sequence_delta_b(d, batch.valid, delta_b_min=0.05, scale=0.5, quantile=1.0)
    assert_close(got[:, 0], [0.05, 0.05, 0.05, 0.05, 0.1], atol=1e-12)
    got = per_sequence_delta_b(d, batch.valid, delta_b_min=0.01, quantile=0.5)
    assert_close(got[:, 0], [0.02, 0.01, 0.01, 0.01, 0.02], atol=1e-12)
    # the ceiling is `ceiling * delta_b_min` (spec 8.15): only row 4 reaches it; 1 pins every row to the minimum
    got = per_sequence_delta_b(d, batch.valid, delta_b_min=0.05, ceiling=5.0)
    assert_close(got[:, 0], [0.091, 0.05, 0.05, 0.05, 0.25], atol=1e-12)
    got = per_sequence_delta_b(d, batch.valid, delta_b_min=0.05, ceiling=1.0)
    assert_close(got[:, 0], [0.05] * 5, atol=0)


def test_delta_b_ceiling_two_and_five_give_different_masks():
    """Spec 8.15 worked example (w = 1, delta 0.15, delta_b_min 0.02, every token away from mu).

    D = (0.14, 0.09, 0.1 x 8): P90 = 0.1 + 0.1 * 0.04 = 0.104, so delta_b = 0.04 at c = 2 (the paper)
    and 0.1 at c = 5 (the authors' later code). Token 2: 0.09 <= 0.15 + delta_b * 1 - 0.14, i.e.
    0.05 at c = 2 (masked), 0.11 at c = 5 (kept); token t >= 3 has allowance 0.18 - 0.06 t at c = 2
    (masked) and 0.12 at c = 5 (kept).
    """
    batch = make_batch([[0.14, 0.09] + [0.1] * 8])
    kw = {"delta": 0.15, "delta_b": 0.02, "w_min": 1.0, "adaptive_delta_b": True}
    paper = cppo_mask_details(*batch.args, **kw)
    later = cppo_mask_details(*batch.args, delta_b_ceiling=5.0, **kw)
    assert paper.delta_b.item() == pytest.approx(0.04) and later.delta_b.item() == pytest.approx(0.1)
    assert paper.mask[0].tolist() == [True] + [False] * 9
    assert later.mask[0].tolist() == [True] * 10
    assert paper.prefix_violation[0].tolist() == [False] + [True] * 9  # the budget, not the token rule
    for c, result in ((2.0, paper), (5.0, later)):
        assert_mask_equal(result.mask, reference_cppo_mask(batch, delta_b_ceiling=c, **kw), c)


# ----------------------------------------------------------------------------------------------
# 2. Spec 6.3 properties
# ----------------------------------------------------------------------------------------------


@_settings(50)
@given(data=st.data())
def test_first_token_decision_equals_dppo(data):
    """6.3.1: w_1 = 1 and c_1 = delta, fixed or adaptive delta_b, any horizon and w_min."""
    batch = data.draw(batches())
    params = data.draw(cppo_params(batch.width))
    cppo = cppo_mask(*batch.args, **params)
    dppo = dppo_mask(*batch.args, delta=params["delta"])
    assert_mask_equal(cppo[:, 0], dppo[:, 0], params)
    assert_mask_equal(dppo, reference_dppo_mask(batch, params["delta"]))


@pytest.mark.parametrize("w_min", [0.8, 0.5, 0.05, 0.99])
@pytest.mark.parametrize("width", [2, 3, 5, 12, 1000])
def test_schedule_endpoints_linear_and_strictly_decreasing(w_min, width):
    """6.3.2: w_1 = 1, w_T = w_min, linear in t, strictly decreasing when w_min < 1, 0 on padding."""
    valid = torch.ones(2, width, dtype=torch.bool)
    valid[1, width // 2 :] = False
    w = position_weights(valid, w_min=w_min)
    assert w.dtype == torch.float32
    assert w[0, 0].item() == 1.0
    assert w[0, -1].item() == pytest.approx(w_min, abs=1e-6)
    expected = 1 - (1 - w_min) * torch.arange(width, dtype=torch.float64) / (width - 1)
    assert_close(w[0], expected)
    assert bool((w[0, 1:] < w[0, :-1]).all())
    # the padded row keeps the batch-wide schedule (horizon None = padded width) and is 0 on padding
    assert torch.equal(w[1, : width // 2], w[0, : width // 2])
    assert bool((w[1, width // 2 :] == 0).all())


@pytest.mark.parametrize("horizon", [None, "sequence", 1, 4])
def test_schedule_single_token_has_weight_one(horizon):
    """6.3.2: T = 1 gives w_1 = 1 with no division by zero."""
    w = position_weights(torch.ones(1, 1, dtype=torch.bool), w_min=0.8, horizon=horizon)
    assert w.tolist() == [[1.0]]
    # length-1 and empty rows under the per-sequence horizon
    valid = torch.tensor([[True, False, False], [False, False, False], [True, True, True]])
    w = position_weights(valid, w_min=0.8, horizon="sequence")
    assert bool(torch.isfinite(w).all())
    assert w[0].tolist() == [1.0, 0.0, 0.0]
    assert w[1].tolist() == [0.0, 0.0, 0.0]


def test_schedule_horizon_variants():
    valid = torch.tensor([[True] * 5 + [False] * 4, [True] * 9, [True] * 2 + [False] * 7])
    # "sequence": each response ends at w_min
    w = position_weights(valid, w_min=0.6, horizon="sequence")
    for row, length in enumerate([5, 9, 2]):
        expected = 1 - 0.4 * torch.arange(length, dtype=torch.float64) / (length - 1)
        assert_close(w[row, :length], expected)
        assert w[row, length - 1].item() == pytest.approx(0.6, abs=1e-6)
    # None: the padded width (9) for every row
    w_none = position_weights(valid, w_min=0.6)
    assert torch.equal(w_none, position_weights(valid, w_min=0.6, horizon=9))
    assert w_none[0, 4].item() == pytest.approx(1 - 0.4 * 4 / 8, abs=1e-6)
    # an int horizon larger than the width
    w_20 = position_weights(valid, w_min=0.6, horizon=20)
    assert_close(w_20[1], 1 - 0.4 * torch.arange(9, dtype=torch.float64) / 19)
    # w_min = 1 is the constant schedule
    assert torch.equal(position_weights(valid, w_min=1.0, horizon="sequence"), valid.float())


def test_schedule_int_horizon_below_width_raises():
    valid = torch.ones(1, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"`horizon`=4"):
        position_weights(valid, horizon=4)
    with pytest.raises(ValueError, match=r"`horizon`=4"):
        cppo_mask(*make_batch([[0.1] * 5]).args, horizon=4)
    position_weights(valid, horizon=5)  # equal to the width is fine


@_settings(70)
@given(data=st.data())
def test_toward_mu_tokens_are_never_masked(data):
    """6.3.3: A_t (rho_t - 1) <= 0 -> M_t = 1 whatever delta, delta_b, w or the prefix."""
    batch = data.draw(batches(div=data.draw(st.sampled_from(["div", "div_big"]))))
    params = data.draw(cppo_params(batch.width, ablations=True))
    params["delta"] = data.draw(st.one_of(st.just(1e-6), st.just(params["delta"])))
    toward = batch.valid & (batch.a * torch.expm1(batch.lr) <= 0)
    mask = cppo_mask(*batch.args, **params)
    assert bool(mask[toward].all())
    assert not bool(mask[~batch.valid].any())


def test_toward_mu_uses_signs_without_underflow():
    """A * (rho - 1) underflows to 0 for tiny values; the sign rule must still call the token 'away'."""
    batch = make_batch([[0.9, 0.9, 0.9, 0.9]], [[1e-200, 0.0, 1.0, -1e-200]], [[1e-200, 0.3, 0.0, 1e-200]])
    mask = cppo_mask(*batch.args)
    assert mask.tolist() == [[False, True, True, True]]


@_settings(70)
@given(data=st.data())
def test_equivalent_forms_of_the_trust_region(data):
    """6.3.4: Z_t <= min(delta, delta + delta_b W_{t-1} - S_{t-1})
    <=>  w_t D_t <= delta  and  S_t <= delta + delta_b W_{t-1}.

    On a dyadic grid every sum and product is exact, so both forms must agree bit for bit.
    """
    batch = data.draw(batches(div="dyadic"))
    delta = data.draw(st.integers(1, 32)) / 64
    delta_b = data.draw(st.integers(0, 64)) / 256
    w_min = data.draw(st.sampled_from([0.25, 0.5, 0.75, 1.0]))
    horizon = data.draw(st.sampled_from([17, 33]))  # T - 1 a power of two: dyadic weights
    r = cppo_mask_details(*batch.args, delta=delta, delta_b=delta_b, w_min=w_min, horizon=horizon)
    z = r.weighted_divergence
    s_prev, w_prev = exclusive_cumsum(z), exclusive_cumsum(r.weights)
    c = torch.clamp(delta + delta_b * w_prev - s_prev, max=delta)
    first_form = batch.valid & (z <= c)
    second_form = batch.valid & (z <= delta) & (z.cumsum(-1) <= delta + delta_b * w_prev)
    assert torch.equal(first_form, second_form)
    inside = batch.valid & ~r.token_violation & ~r.prefix_violation
    assert torch.equal(inside, first_form)
    assert torch.equal(r.mask, r.toward_mu | inside)
    # the violation score x_t is <= 1 exactly inside the region (spec 3.5)
    assert torch.equal(batch.valid & (r.violation_score <= 1), inside)


@_settings(50)
@given(data=st.data())
def test_causal_with_fixed_delta_b(data):
    """6.3.5: with fixed delta_b, M_{1..t} depends on D_{1..t} only."""
    batch = data.draw(batches())
    params = data.draw(cppo_params(batch.width, adaptive=False, ablations=True))
    t = data.draw(st.integers(0, batch.width - 1))
    new_d = value_tensor(data, "div", tuple(batch.d.shape))
    later = torch.arange(batch.width) > t
    perturbed = batch.replace(d=torch.where(later & batch.valid, new_d, batch.d))
    before = cppo_mask(*batch.args, **params)
    after = cppo_mask(*perturbed.args, **params)
    assert_mask_equal(after[:, : t + 1], before[:, : t + 1], params)


def test_adaptive_delta_b_is_not_causal():
    """6.3.5 / 3.3: the P90 budget reads D_{1:T}, so a later token can flip an earlier decision."""
    # token 2: Z = 0.04 against c_2 = 0.15 + delta_b * 1 - 0.14 = 0.01 + delta_b
    d_low = [0.14, 0.04] + [0.0] * 18  # P90 = 0.004 -> delta_b = 0.02 -> c_2 = 0.03 -> masked
    d_high = [0.14, 0.04] + [0.0] * 17 + [0.3]  # P90 = 0.05 -> delta_b = 0.04 -> c_2 = 0.05 -> kept
    low, high = make_batch([d_low]), make_batch([d_high])
    kw = {"delta": 0.15, "delta_b": 0.02, "w_min": 1.0}
    m_low = cppo_mask(*low.args, adaptive_delta_b=True, **kw)
    m_high = cppo_mask(*high.args, adaptive_delta_b=True, **kw)
    assert m_low[0, :2].tolist() == [True, False]
    assert m_high[0, :2].tolist() == [True, True]
    r_low = cppo_mask_details(*low.args, adaptive_delta_b=True, **kw)
    r_high = cppo_mask_details(*high.args, adaptive_delta_b=True, **kw)
    assert r_low.delta_b.item() == pytest.approx(0.02) and r_high.delta_b.item() == pytest.approx(0.04)
    # the fixed mode is causal on the same pair
    assert torch.equal(cppo_mask(*low.args, **kw)[0, :2], cppo_mask(*high.args, **kw)[0, :2])


@_settings(60)
@given(data=st.data())
def test_adaptive_delta_b_with_ceiling_one_is_the_fixed_budget(data):
    """Spec 8.15: c = 1 pins clamp(k P_q(D), delta_b, c delta_b) to delta_b, whatever q and k."""
    batch = data.draw(batches(div=data.draw(st.sampled_from(["div", "calm"]))))
    params = data.draw(cppo_params(batch.width, adaptive=True, ablations=True))
    fixed = {key: value for key, value in params.items() if not key.startswith(("adaptive", "delta_b_"))}
    pinned = cppo_mask_details(*batch.args, **{**params, "delta_b_ceiling": 1.0})
    assert (pinned.delta_b == params["delta_b"]).all()
    assert_mask_equal(pinned.mask, cppo_mask(*batch.args, **fixed), params)


@_settings(70)
@given(data=st.data())
def test_reduces_to_dppo_with_w_min_one_and_a_budget_that_never_binds(data):
    """6.3.6: w_min = 1 and delta_b >= max_j D_j gives DPPO exactly (0 mismatches)."""
    batch = data.draw(batches(div="dyadic"))
    delta = data.draw(st.sampled_from([0.05, 0.15, 0.2, 0.5]))
    max_d = float(torch.where(batch.valid, batch.d, torch.zeros(())).max())
    delta_b = max_d + data.draw(st.integers(0, 64)) / 256
    horizon = data.draw(horizons(batch.width))
    mask = cppo_mask(*batch.args, delta=delta, delta_b=delta_b, w_min=1.0, horizon=horizon)
    assert_mask_equal(mask, dppo_mask(*batch.args, delta=delta), (delta, delta_b))
    no_prefix = cppo_mask(*batch.args, delta=delta, w_min=1.0, horizon=horizon, prefix_budget=False)
    assert_mask_equal(no_prefix, dppo_mask(*batch.args, delta=delta))


def test_infinite_delta_b_disables_the_prefix_budget():
    """6.3.6 names delta_b = inf as a way to switch the prefix term off; `_checks` accepts inf.

    With w_min = 1 the result must be DPPO. Regression: delta_b * W_0 = inf * 0 = NaN at t = 1 once
    masked the first away-from-mu token of every response.
    """
    batch = make_batch([[0.1, 0.05, 0.0, 0.3], [0.0, 0.2]])
    mask = cppo_mask(*batch.args, delta=0.15, delta_b=INF, w_min=1.0)
    assert_mask_equal(mask, dppo_mask(*batch.args, delta=0.15))


def test_infinite_delta_b_gives_finite_violation_score():
    """Same regression, seen in the soft gate's score: x_1 = max(Z_1/delta, Z_1/(delta + inf * 0)) was NaN."""
    batch = make_batch([[0.1, 0.05, 0.0]])
    r = cppo_mask_details(*batch.args, delta=0.15, delta_b=INF, w_min=1.0)
    assert bool(torch.isfinite(r.violation_score).all()), r.violation_score
    assert_close(r.violation_score[0, 0], 0.1 / 0.15, atol=1e-12)


def test_w_min_one_with_delta_b_at_least_delta_is_not_dppo():
    """6.3.6 counterexample: a masked token with D > delta still drains the budget of later tokens."""
    batch = make_batch([[0.5, 0.1]])
    cppo = cppo_mask(*batch.args, delta=0.15, delta_b=0.15, w_min=1.0)
    dppo = dppo_mask(*batch.args, delta=0.15)
    assert cppo.tolist() == [[False, False]]  # c_2 = 0.15 + 0.15 - 0.5 = -0.2 < 0.1
    assert dppo.tolist() == [[False, True]]


@_settings(50)
@given(data=st.data())
def test_keep_set_is_subset_of_dppo_when_w_min_is_one(data):
    """6.3.7: w_min = 1 -> c_t <= delta -> CPPO keeps a subset of what DPPO keeps."""
    batch = data.draw(batches())
    params = data.draw(cppo_params(batch.width))
    params["w_min"] = 1.0
    cppo = cppo_mask(*batch.args, **params)
    dppo = dppo_mask(*batch.args, delta=params["delta"])
    assert not bool((cppo & ~dppo).any()), params


def test_keep_set_is_not_subset_of_dppo_when_w_min_below_one():
    """6.3.7 counterexample: D_5 = 0.17 > delta but w_5 D_5 = 0.136 <= delta and the budget has room."""
    batch = make_batch([[0.0, 0.0, 0.0, 0.0, 0.17]])
    cppo = cppo_mask(*batch.args, delta=0.15, delta_b=0.02, w_min=0.8)
    dppo = dppo_mask(*batch.args, delta=0.15)
    assert cppo[0, 4].item() is True
    assert dppo[0, 4].item() is False


@_settings(50)
@given(data=st.data())
def test_monotone_in_delta_and_delta_b(data):
    """6.3.8: S and W do not depend on the mask, so raising delta, delta_b or the adaptive budget's
    ceiling (which can only raise the per-sequence delta_b) never masks a kept token."""
    batch = data.draw(batches())
    params = data.draw(cppo_params(batch.width, ablations=True))
    base = cppo_mask(*batch.args, **params)
    bigger_delta = params["delta"] + data.draw(st.one_of(st.just(1e-9), st.floats(0.0, 0.5)))
    bigger_delta_b = params["delta_b"] + data.draw(st.one_of(st.just(1e-9), st.floats(0.0, 0.5)))
    bigger_ceiling = params.get("delta_b_ceiling", 2.0) + data.draw(st.one_of(st.just(1e-9), st.floats(0.0, 5.0)))
    for changes in (
        {"delta": bigger_delta},
        {"delta_b": bigger_delta_b},
        {"delta": bigger_delta, "delta_b": bigger_delta_b},
        {"delta_b_ceiling": bigger_ceiling},
    ):
        raised = cppo_mask(*batch.args, **{**params, **changes})
        assert not bool((base & ~raised).any()), (params, changes)


def test_prefix_sum_includes_masked_tokens():
    """6.3.9: token 1 (D = 0.5 > delta) is masked yet still enters S, masking token 2 with D = 0."""
    batch = make_batch([[0.5, 0.0]])
    r = cppo_mask_details(*batch.args, delta=0.15, delta_b=0.02, w_min=0.8)
    assert r.mask.tolist() == [[False, False]]
    assert r.token_violation.tolist() == [[True, False]]
    assert r.prefix_violation.tolist() == [[False, True]]


@_settings(50)
@given(data=st.data())
def test_prefix_sum_does_not_depend_on_directions(data):
    """6.3.9: S and W include toward-mu tokens; which tokens are inside the region ignores A and rho."""
    batch = data.draw(batches())
    params = data.draw(cppo_params(batch.width, ablations=True))
    other = batch.replace(
        a=value_tensor(data, "adv", tuple(batch.d.shape)),
        lr=value_tensor(data, "lr", tuple(batch.d.shape)),
    )
    r1, r2 = cppo_mask_details(*batch.args, **params), cppo_mask_details(*other.args, **params)
    assert torch.equal(r1.token_violation, r2.token_violation)
    assert torch.equal(r1.prefix_violation, r2.prefix_violation)
    assert torch.equal(r1.violation_score, r2.violation_score)


@_settings(50)
@given(data=st.data())
def test_padding_values_change_nothing(data):
    """6.3.9: padding is excluded from S, W, the P90 and the mask, even when it holds NaN or inf."""
    batch = data.draw(batches())
    params = data.draw(cppo_params(batch.width, ablations=True))
    fills = {"d": data.draw(D_PAD), "a": data.draw(AL_PAD), "lr": data.draw(AL_PAD)}
    clean = batch.replace(**{k: torch.where(batch.valid, getattr(batch, k), torch.zeros(())) for k in fills})
    dirty = batch.replace(
        **{
            k: torch.where(batch.valid, getattr(batch, k), torch.tensor(v, dtype=torch.float64))
            for k, v in fills.items()
        }
    )
    r1, r2 = cppo_mask_details(*clean.args, **params), cppo_mask_details(*dirty.args, **params)
    for field in ("mask", "toward_mu", "token_violation", "prefix_violation", "weights", "weighted_divergence"):
        assert torch.equal(getattr(r1, field), getattr(r2, field)), field
    assert torch.equal(r1.violation_score, r2.violation_score)
    assert torch.equal(r1.delta_b, r2.delta_b)
    assert torch.equal(r1.soft_mask(), r2.soft_mask())
    assert not bool(r2.mask[~batch.valid].any())
    assert bool((r2.weights[~batch.valid] == 0).all()) and bool((r2.weighted_divergence[~batch.valid] == 0).all())


@_settings(50)
@given(data=st.data())
def test_rows_never_bleed_into_each_other(data):
    """6.3.9: replacing one response (values and length) never changes another response's mask."""
    batch = data.draw(batches(min_b=2))
    params = data.draw(cppo_params(batch.width, ablations=True))
    row = data.draw(st.integers(0, batch.valid.shape[0] - 1))
    width = batch.width
    new_len = data.draw(st.integers(0, width))
    d, a, lr, valid = (x.clone() for x in batch.args)
    d[row], a[row], lr[row] = (value_tensor(data, kind, (width,)) for kind in ("div", "adv", "lr"))
    valid[row] = torch.arange(width) < new_len
    before = cppo_mask(*batch.args, **params)
    after = cppo_mask(d, a, lr, valid, **params)
    others = torch.arange(valid.shape[0]) != row
    assert_mask_equal(after[others], before[others], params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mask_is_detached_bool(dtype):
    """6.3.10: the mask (and the soft gate) carry no gradient even when every input requires grad."""
    batch = make_batch([[0.1, 0.05, 0.0, 0.12, 0.16], [0.3, 0.01]], dtype=dtype)
    d = batch.d.clone().requires_grad_(True)
    a = batch.a.clone().requires_grad_(True)
    lr = batch.lr.clone().requires_grad_(True)
    for adaptive in (False, True):
        mask = cppo_mask(d, a, lr, batch.valid, adaptive_delta_b=adaptive)
        assert mask.dtype == torch.bool and not mask.requires_grad and mask.grad_fn is None
        r = cppo_mask_details(d, a, lr, batch.valid, adaptive_delta_b=adaptive)
        for field in ("mask", "weights", "weighted_divergence", "violation_score", "delta_b"):
            assert not getattr(r, field).requires_grad, field
        soft = cppo_soft_mask(d, a, lr, batch.valid, adaptive_delta_b=adaptive)
        assert soft.is_floating_point() and not soft.requires_grad
        assert r.soft_mask().grad_fn is None


@_settings(50)
@given(data=st.data())
def test_ablation_without_prefix_budget_is_the_weighted_token_rule(data):
    """3.7 / 6.3.12: prefix_budget=False -> M = 1[A(rho - 1) <= 0 or w_t D_t <= delta]."""
    batch = data.draw(batches())
    params = data.draw(cppo_params(batch.width))
    params["prefix_budget"] = False
    w = position_weights(batch.valid, w_min=params["w_min"], horizon=params["horizon"]).double()
    d = torch.where(batch.valid, batch.d, torch.zeros(()))
    toward = batch.valid & (batch.a * torch.expm1(batch.lr) <= 0)
    expected = batch.valid & (toward | (w * d <= params["delta"]))
    assert_mask_equal(cppo_mask(*batch.args, **params), expected, params)
    r = cppo_mask_details(*batch.args, **params)
    assert not bool(r.prefix_violation.any())


@_settings(50)
@given(data=st.data())
def test_ablation_without_position_weight_uses_unit_weights(data):
    """3.7 / 6.3.12: position_weight=False is w = 1: the same as w_min = 1, whatever w_min and horizon say."""
    batch = data.draw(batches())
    params = data.draw(cppo_params(batch.width))
    r = cppo_mask_details(*batch.args, **params, position_weight=False)
    assert torch.equal(r.weights, batch.valid.double())
    assert_mask_equal(r.mask, cppo_mask(*batch.args, **{**params, "w_min": 1.0}), params)
    assert_mask_equal(r.mask, reference_cppo_mask(batch, **params, position_weight=False), params)


def test_shuffle_within_rows_keeps_each_rows_multiset_and_is_reproducible():
    valid = torch.tensor([[True] * 8, [False] * 8, [True] + [False] * 7, [True] * 5 + [False] * 3])
    values = position_weights(valid, w_min=0.3, horizon="sequence") + torch.where(valid, 0.0, NAN)
    results = []
    for seed in range(20):
        out = shuffle_within_rows(values, valid, torch.Generator().manual_seed(seed))
        again = shuffle_within_rows(values, valid, torch.Generator().manual_seed(seed))
        assert torch.equal(out, again)  # reproducible with a seeded generator
        assert bool((out[~valid] == 0).all())  # padding becomes 0 (even NaN padding)
        for row, length in enumerate(valid.sum(-1).tolist()):
            assert sorted(out[row, :length].tolist()) == sorted(values[row, :length].tolist())
        results.append(out)
    # it really permutes: some seeds reorder the 8-token row, and seeds differ from one another
    assert any(not torch.equal(out[0], values[0]) for out in results)
    assert len({tuple(out[0].tolist()) for out in results}) > 10
    # the 1-token row can only stay put
    assert all(out[2, 0].item() == 1.0 for out in results)
    # no generator: still a permutation of each row
    out = shuffle_within_rows(values, valid)
    assert sorted(out[3, :5].tolist()) == sorted(values[3, :5].tolist())


def test_shuffled_weights_ablation():
    """3.7: the w/o-prefix-budget rule with {w_t} permuted within each response, reproducible."""
    torch.manual_seed(0)
    valid = torch.ones(3, 12, dtype=torch.bool)
    valid[1, 7:] = False
    d = torch.rand(3, 12, dtype=torch.float64) * 0.3
    batch = make_batch(d.tolist()).replace(valid=valid)
    kw = {"delta": 0.15, "w_min": 0.5, "prefix_budget": False, "shuffle_weights": True}
    r1 = cppo_mask_details(*batch.args, **kw, generator=torch.Generator().manual_seed(7))
    r2 = cppo_mask_details(*batch.args, **kw, generator=torch.Generator().manual_seed(7))
    assert torch.equal(r1.mask, r2.mask) and torch.equal(r1.weights, r2.weights)
    ordered = position_weights(valid, w_min=0.5).double()
    for row, length in enumerate(valid.sum(-1).tolist()):
        assert sorted(r1.weights[row, :length].tolist()) == sorted(ordered[row, :length].tolist())
    assert not torch.equal(r1.weights, ordered)
    d_valid = torch.where(valid, batch.d, torch.zeros(()))
    assert torch.equal(r1.mask, valid & (r1.weights * d_valid <= 0.15))


@pytest.mark.parametrize(
    "params",
    [{}, {"adaptive_delta_b": True}, {"horizon": "sequence"}, {"horizon": 8}, {"prefix_budget": False}],
    ids=["fixed", "adaptive", "sequence", "int-horizon", "no-prefix"],
)
@pytest.mark.parametrize("shape", [(3, 0), (0, 5)], ids=["zero-width", "no-responses"])
def test_empty_batches(shape, params):
    """A micro-batch whose responses are all empty (padded width 0), or that holds no response at all.

    Every row is empty, so the adaptive budget is delta_b_min (spec 8.7) and there is nothing to mask.
    Known bug: the zero-width batch crashes with adaptive_delta_b (torch.nanquantile on an empty dim)
    and with horizon="sequence" / in the diagnostics (`response_lengths` takes amax over an empty dim);
    the batch with no responses crashes with adaptive_delta_b.
    """
    z = torch.zeros(shape)
    valid = torch.zeros(shape, dtype=torch.bool)
    r = cppo_mask_details(z, z, z, valid, delta_b=0.02, **params)
    assert r.mask.shape == shape and r.mask.dtype == torch.bool
    assert r.soft_mask().shape == shape
    assert r.delta_b.shape == (shape[0], 1)
    assert_close(r.delta_b, torch.full((shape[0], 1), 0.02))
    metrics = cppo_diagnostics(r, r.mask, z)
    assert metrics["masked_frac"].item() == 0.0


def test_per_response_advantages_broadcast_over_tokens():
    batch = make_batch([[0.1, 0.2, 0.01], [0.3, 0.0]], [[1.0] * 3, [-1.0] * 2])
    per_seq = torch.tensor([1.0, -1.0], dtype=torch.float64)
    assert torch.equal(cppo_mask(batch.d, per_seq, batch.lr, batch.valid), cppo_mask(*batch.args))


# ----------------------------------------------------------------------------------------------
# 3. Worked vectors (spec 3.6): delta = 0.15, delta_b = 0.02, w_min = 0.8
# ----------------------------------------------------------------------------------------------

VECTOR_A = [0.10, 0.05, 0.00, 0.12, 0.16]
VECTOR_B = ([0.10, 0.40, 0.00, 0.05, 0.05], [1.0, -1.0, 1.0, 1.0, 1.0], [1.2, 1.5, 1.1, 1.1, 1.1])
WORKED = {"delta": 0.15, "delta_b": 0.02, "w_min": 0.8}


def _columns(r: CPPOMaskResult) -> dict[str, torch.Tensor]:
    z = r.weighted_divergence.double()
    w_prev = exclusive_cumsum(r.weights.double())
    s_prev = exclusive_cumsum(z)
    c = torch.clamp(WORKED["delta"] + r.delta_b.double() * w_prev - s_prev, max=WORKED["delta"])
    return {"w": r.weights.double()[0], "z": z[0], "w_prev": w_prev[0], "s_prev": s_prev[0], "c": c[0]}


@pytest.mark.parametrize("horizon", ["sequence", None])
def test_worked_vector_a(horizon):
    batch = make_batch([VECTOR_A], dtype=torch.float32)
    r = cppo_mask_details(*batch.args, **WORKED, horizon=horizon)
    assert r.mask.tolist() == [[True, True, True, False, False]]
    assert r.prefix_violation.tolist() == [[False, False, False, True, True]]
    assert not bool(r.token_violation.any())
    expected = {
        "w": [1.00, 0.95, 0.90, 0.85, 0.80],
        "z": [0.1000, 0.0475, 0.0000, 0.1020, 0.1280],
        "w_prev": [0.00, 1.00, 1.95, 2.85, 3.70],
        "s_prev": [0.0000, 0.1000, 0.1475, 0.1475, 0.2495],
        "c": [0.1500, 0.0700, 0.0415, 0.0595, -0.0255],
    }
    for name, column in _columns(r).items():
        assert_close(column, expected[name], atol=5e-5)
    assert cppo_mask(*batch.args, **WORKED, horizon=horizon).tolist() == [[True, True, True, False, False]]


def test_worked_vector_a_with_fixed_horizon_8():
    batch = make_batch([VECTOR_A], dtype=torch.float32)
    r = cppo_mask_details(*batch.args, **WORKED, horizon=8)
    assert_close(r.weights[0], [1.0, 0.9714, 0.9429, 0.9143, 0.8857], atol=5e-5)
    assert r.mask.tolist() == [[True, True, True, False, False]]


def test_worked_vector_a_dppo():
    batch = make_batch([VECTOR_A], dtype=torch.float32)
    assert dppo_mask(*batch.args, delta=0.15).tolist() == [[True, True, True, True, False]]


def test_worked_vector_b_toward_mu_token_drains_the_budget():
    d, a, rho = VECTOR_B
    batch = make_batch([d], [a], [[math.log(x) for x in rho]], dtype=torch.float32)
    r = cppo_mask_details(*batch.args, **WORKED, horizon="sequence")
    assert r.mask.tolist() == [[True, True, False, False, False]]
    assert r.toward_mu.tolist() == [[False, True, False, False, False]]
    columns = _columns(r)
    assert columns["z"][1].item() == pytest.approx(0.38, abs=5e-5)
    assert columns["c"][2].item() == pytest.approx(-0.291, abs=5e-5)
    # token 3 has D = 0 and is still masked: c_3 < 0
    assert r.prefix_violation[0, 2].item() is True


# ----------------------------------------------------------------------------------------------
# 4. Soft gate (spec 3.5, 8.8): 1 toward mu, else g(x) = min(1, 1/x); 0 on padding
# ----------------------------------------------------------------------------------------------


@_settings(50)
@given(data=st.data())
def test_soft_gate_on_exact_grid(data):
    batch = data.draw(batches(div="dyadic"))
    params = {
        "delta": data.draw(st.integers(1, 32)) / 64,
        "delta_b": data.draw(st.integers(0, 64)) / 256,
        "w_min": data.draw(st.sampled_from([0.25, 0.5, 0.75, 1.0])),
        "horizon": data.draw(st.sampled_from([17, 33])),
    }
    r = cppo_mask_details(*batch.args, **params)
    soft = r.soft_mask()
    assert torch.equal(soft, cppo_soft_mask(*batch.args, **params))
    assert torch.equal(soft == 1, r.mask)  # 1 exactly where the hard mask keeps
    away = batch.valid & ~r.toward_mu
    assert torch.equal(away & (r.violation_score <= 1), away & r.mask)
    _check_gate(batch, r, soft, slack=1e-12)


@_settings(50)
@given(data=st.data())
def test_soft_gate_general_inputs(data):
    batch = data.draw(batches())
    params = data.draw(cppo_params(batch.width))
    r = cppo_mask_details(*batch.args, **params)
    soft = cppo_soft_mask(*batch.args, **params)
    assert torch.equal(soft, r.soft_mask())
    # kept tokens have gate 1 up to the rounding of S_{t-1} + Z_t versus allowance - S_{t-1}
    assert bool((soft[r.mask] >= 1 - 1e-12).all())
    _check_gate(batch, r, soft, slack=1e-12)


def _check_gate(batch: Batch, r: CPPOMaskResult, soft: torch.Tensor, *, slack: float) -> None:
    assert not soft.requires_grad
    assert bool(((soft >= 0) & (soft <= 1)).all())
    assert bool((soft[r.toward_mu] == 1).all())
    assert bool((soft[~batch.valid] == 0).all())
    away = batch.valid & ~r.toward_mu
    x = r.violation_score[away]
    g = soft[away]
    assert torch.equal(g, torch.clamp(1 / x, max=1.0))
    assert bool((x * g <= 1 + slack).all())  # x g(x) <= 1
    assert bool((r.violation_score[~batch.valid] == 0).all())


def test_soft_gate_values_on_worked_vector_a():
    batch = make_batch([VECTOR_A])
    soft = cppo_soft_mask(*batch.args, **WORKED)
    # x_4 = S_4 / (delta + delta_b W_3) = 0.2495 / 0.207; x_5 = 0.3775 / 0.224
    expected = torch.tensor([[1.0, 1.0, 1.0, 0.207 / 0.2495, 0.224 / 0.3775]], dtype=torch.float64)
    assert_close(soft, expected)


# ----------------------------------------------------------------------------------------------
# 5. Diagnostics
# ----------------------------------------------------------------------------------------------


@_settings(50)
@given(data=st.data())
def test_diagnostics_rule_fractions_add_up(data):
    batch = data.draw(batches())
    params = data.draw(cppo_params(batch.width))
    r = cppo_mask_details(*batch.args, **params)
    m = cppo_diagnostics(r, r.mask, batch.d)
    # every masked token is attributed to exactly one rule
    away = batch.valid & ~r.toward_mu
    assert not bool((r.token_violation & r.prefix_violation).any())
    assert torch.equal(batch.valid & ~r.mask, away & (r.token_violation | r.prefix_violation))
    n_valid = max(int(batch.valid.sum()), 1)
    assert m["masked_frac"].item() == pytest.approx(int((batch.valid & ~r.mask).sum()) / n_valid, abs=1e-6)
    total = m["masked_by_token_frac"] + m["masked_by_prefix_frac"]
    assert total.item() == pytest.approx(m["masked_frac"].item(), abs=1e-6)
    assert m["toward_mu_frac"].item() == pytest.approx(int(r.toward_mu.sum()) / n_valid, abs=1e-6)


def test_diagnostics_on_worked_vectors():
    batch = make_batch([VECTOR_A], dtype=torch.float32)
    r = cppo_mask_details(*batch.args, **WORKED)
    m = cppo_diagnostics(r, r.mask, batch.d)
    assert m["masked_frac"].item() == pytest.approx(2 / 5)
    assert m["masked_by_prefix_frac"].item() == pytest.approx(2 / 5)
    assert m["masked_by_token_frac"].item() == 0.0
    assert m["toward_mu_frac"].item() == 0.0
    assert m["kept_toward_mu_frac"].item() == 0.0
    d, a, rho = VECTOR_B
    batch = make_batch([d], [a], [[math.log(x) for x in rho]], dtype=torch.float32)
    r = cppo_mask_details(*batch.args, **WORKED)
    m = cppo_diagnostics(r, r.mask, batch.d)
    assert m["kept_toward_mu_frac"].item() == pytest.approx(1 / 5)
    assert m["toward_mu_frac"].item() == pytest.approx(1 / 5)
    assert m["masked_by_prefix_frac"].item() == pytest.approx(3 / 5)
    assert m["masked_frac"].item() == pytest.approx(3 / 5)


def test_diagnostics_position_deciles():
    """Deciles are relative to each response's own length: floor(10 (t - 1) / L); empty deciles are NaN."""
    # row 0 (L = 5): deciles 0, 2, 4, 6, 8; row 1 (L = 3): deciles 0, 3, 6
    valid = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    keep = torch.tensor([[True, False, True, True, False], [False, True, True, False, False]])
    d = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5], [0.6, 0.7, 0.8, 100.0, NAN]])
    m = mask_diagnostics(keep, valid, d)
    nan = NAN
    masked = [0.5, nan, 1.0, 0.0, 0.0, nan, 0.0, nan, 1.0, nan]
    div = [0.35, nan, 0.2, 0.7, 0.3, nan, 0.6, nan, 0.5, nan]
    got_masked = torch.stack([m[f"masked_frac_decile_{k}"] for k in range(NUM_DECILES)])
    got_div = torch.stack([m[f"divergence_mean_decile_{k}"] for k in range(NUM_DECILES)])
    assert_close(got_masked, masked, equal_nan=True)
    assert_close(got_div, div, equal_nan=True)
    assert m["masked_frac"].item() == pytest.approx(3 / 8)
    assert m["divergence_mean"].item() == pytest.approx(3.6 / 8)
    assert m["divergence_max"].item() == pytest.approx(0.8)
    # a length-10 response puts one token in each decile
    valid10 = torch.ones(1, 10, dtype=torch.bool)
    keep10 = torch.tensor([[k % 3 != 0 for k in range(10)]])
    m10 = mask_diagnostics(keep10, valid10)
    assert [m10[f"masked_frac_decile_{k}"].item() for k in range(10)] == [float(k % 3 == 0) for k in range(10)]


def test_diagnostics_delta_b_mean():
    batch = make_batch([[0.03] * 4, [0.0] * 6, [1.0] * 2, []], width=6, dtype=torch.float32)
    r = cppo_mask_details(*batch.args, delta_b=0.02)
    assert cppo_diagnostics(r, r.mask, batch.d)["delta_b_mean"].item() == pytest.approx(0.02)
    r = cppo_mask_details(*batch.args, delta_b=0.02, adaptive_delta_b=True)
    assert_close(r.delta_b[:, 0], [0.03, 0.02, 0.04, 0.02])
    # the mean is over non-empty responses: (0.03 + 0.02 + 0.04) / 3
    assert cppo_diagnostics(r, r.mask, batch.d)["delta_b_mean"].item() == pytest.approx(0.03, abs=1e-7)


# ----------------------------------------------------------------------------------------------
# 6. Bad input: every error names the offending argument
# ----------------------------------------------------------------------------------------------


def _good_inputs() -> dict[str, torch.Tensor]:
    b = make_batch([[0.1, 0.2, 0.0, 0.05], [0.3, 0.1]])
    return {"divergence": b.d, "advantages": b.a, "log_ratio": b.lr, "response_mask": b.valid}


@pytest.mark.parametrize(
    ("replace", "exc", "match"),
    [
        ({"divergence": torch.zeros(2, 5, dtype=torch.float64)}, ValueError, r"`divergence` has shape \(2, 5\)"),
        ({"log_ratio": torch.zeros(2, 3, dtype=torch.float64)}, ValueError, r"`log_ratio` has shape"),
        ({"advantages": torch.zeros(3, dtype=torch.float64)}, ValueError, r"`advantages` has shape"),
        ({"advantages": torch.zeros(2, 5, dtype=torch.float64)}, ValueError, r"`advantages` has shape"),
        ({"response_mask": torch.ones(2, 4)}, TypeError, r"`response_mask` must be a bool.*`response_mask\.bool\(\)`"),
        ({"response_mask": torch.ones(2, 4, dtype=torch.long)}, TypeError, r"response_mask\.bool\(\)"),
        ({"response_mask": torch.ones(4, dtype=torch.bool)}, ValueError, r"`response_mask` must have shape \[B, T\]"),
        ({"divergence": torch.zeros(2, 4, dtype=torch.long)}, TypeError, r"`divergence` must be a floating-point"),
        ({"log_ratio": torch.zeros(2, 4, dtype=torch.int32)}, TypeError, r"`log_ratio` must be a floating-point"),
        ({"advantages": torch.ones(2, 4, dtype=torch.long)}, TypeError, r"`advantages` must be a floating-point"),
    ],
)
@pytest.mark.parametrize("fn", [cppo_mask, cppo_mask_details, cppo_soft_mask])
def test_bad_tensors_raise_naming_the_argument(fn, replace, exc, match):
    inputs = {**_good_inputs(), **replace}
    with pytest.raises(exc, match=match):
        fn(inputs["divergence"], inputs["advantages"], inputs["log_ratio"], inputs["response_mask"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"delta": 0.0}, r"`delta` must be a finite number > 0"),
        ({"delta": -0.15}, r"`delta` must be a finite number > 0"),
        ({"delta": NAN}, r"`delta` must be a finite number > 0"),
        ({"delta": INF}, r"`delta` must be a finite number > 0"),
        ({"w_min": 0.0}, r"`w_min` must lie in \(0"),
        ({"w_min": 1.5}, r"`w_min` must lie in \(0"),
        ({"w_min": -0.1}, r"`w_min` must lie in \(0"),
        ({"delta_b": -0.01}, r"`delta_b` must be a number >= 0"),
        ({"delta_b": NAN}, r"`delta_b` must be a number >= 0"),
        ({"horizon": "foo"}, r"`horizon` must be None"),
        ({"horizon": 0}, r"`horizon` must be None"),
        ({"horizon": -3}, r"`horizon` must be None"),
        ({"horizon": True}, r"`horizon` must be None"),
        ({"horizon": 4.0}, r"`horizon` must be None"),
        ({"horizon": 3}, r"padded response width 4 exceeds `horizon`=3"),
        ({"adaptive_delta_b": True, "delta_b_quantile": 1.5}, r"cppo_mask: `delta_b_quantile` must lie in \[0"),
        ({"adaptive_delta_b": True, "delta_b_quantile": -0.1}, r"cppo_mask: `delta_b_quantile` must lie in \[0"),
        ({"delta_b_quantile": 1.5}, r"cppo_mask: `delta_b_quantile` must lie in \[0"),
        ({"adaptive_delta_b": True, "delta_b_scale": 0.0}, r"cppo_mask: `delta_b_scale` must be a finite number > 0"),
        ({"adaptive_delta_b": True, "delta_b": 0.0}, r"cppo_mask: `delta_b` must be a finite number > 0"),
        ({"adaptive_delta_b": True, "delta_b_ceiling": 0.5}, r"cppo_mask: `delta_b_ceiling` must lie in \[1"),
        ({"delta_b_ceiling": 0.0}, r"cppo_mask: `delta_b_ceiling` must lie in \[1"),
        ({"delta_b_ceiling": NAN}, r"cppo_mask: `delta_b_ceiling` must lie in \[1"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(kwargs, match):
    inputs = _good_inputs()
    with pytest.raises(ValueError, match=match):
        cppo_mask(*inputs.values(), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"quantile": 1.5}, r"per_sequence_delta_b: `quantile`"),
        ({"delta_b_min": 0.0}, r"per_sequence_delta_b: `delta_b_min`"),
        ({"scale": -1.0}, r"per_sequence_delta_b: `scale`"),
        ({"ceiling": 0.99}, r"per_sequence_delta_b: `ceiling` must lie in \[1"),
    ],
)
def test_per_sequence_delta_b_bad_arguments(kwargs, match):
    inputs = _good_inputs()
    with pytest.raises(ValueError, match=match):
        per_sequence_delta_b(inputs["divergence"], inputs["response_mask"], **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"w_min": 0.0}, r"`w_min`"), ({"horizon": "foo"}, r"`horizon`"), ({"horizon": False}, r"`horizon`")],
)
def test_position_weights_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        position_weights(torch.ones(1, 3, dtype=torch.bool), **kwargs)
    with pytest.raises(TypeError, match=r"response_mask\.bool\(\)"):
        position_weights(torch.ones(1, 3))
