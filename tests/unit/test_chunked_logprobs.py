"""Chunked logprobs equal the naive full-logits computation, values and gradients."""

from __future__ import annotations

import pytest
import torch

from cppo_rl.learner.logprobs import chunked_token_logprobs


def _naive(hidden, weight, token_ids, temperature):
    logprobs = torch.log_softmax((hidden @ weight.T).float() / temperature, dim=-1)
    gathered = logprobs.gather(-1, token_ids.clamp_min(0))
    return gathered.masked_fill(token_ids < 0, -float("inf"))


def _problem(dtype=torch.float64, positions=37, hidden_size=16, vocab=50, slots=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(positions, hidden_size, generator=generator, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=generator, dtype=dtype, requires_grad=True)
    token_ids = torch.randint(0, vocab, (positions, slots), generator=generator)
    token_ids[::3, -1] = -1  # unused slots
    token_ids[1, 2] = token_ids[1, 1]  # a repeated id
    upstream = torch.randn(positions, slots, generator=generator, dtype=torch.float32)
    return hidden, weight, token_ids, upstream


@pytest.mark.parametrize("chunk_size", [1, 5, 37, 512])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_values_and_gradients_equal_the_naive_computation(chunk_size, temperature):
    hidden, weight, token_ids, upstream = _problem()
    chunked = chunked_token_logprobs(hidden, weight, token_ids, temperature, chunk_size)
    naive = _naive(hidden, weight, token_ids, temperature)
    valid = token_ids >= 0
    assert torch.isneginf(chunked[~valid]).all()
    assert torch.allclose(chunked[valid], naive[valid], atol=1e-5, rtol=0)
    upstream = upstream.masked_fill(~valid, 0.0)
    grads_chunked = torch.autograd.grad((chunked.masked_fill(~valid, 0) * upstream).sum(), (hidden, weight))
    grads_naive = torch.autograd.grad((naive.masked_fill(~valid, 0) * upstream).sum(), (hidden, weight))
    for got, expected in zip(grads_chunked, grads_naive, strict=True):
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_float32_inputs_match_a_float64_reference():
    hidden, weight, token_ids, _ = _problem(dtype=torch.float32, vocab=1000, hidden_size=64)
    chunked = chunked_token_logprobs(hidden, weight, token_ids, 1.0, 8)
    reference = _naive(hidden.double(), weight.double(), token_ids, 1.0)
    valid = token_ids >= 0
    assert chunked.dtype == torch.float32
    assert (chunked[valid].double() - reference[valid]).abs().max() < 1e-4


def test_only_the_used_outputs_carry_gradient_to_the_weight_rows_they_touch():
    hidden, weight, token_ids, _ = _problem()
    out = chunked_token_logprobs(hidden, weight, token_ids, 1.0, 7)
    (grad_weight,) = torch.autograd.grad(out[0, 0], (weight,))
    # log p(id) depends on every logit through the normaliser, so every row gets gradient,
    # but the chosen id's row gets (1 - p) h and the others -p h.
    probs = torch.softmax(hidden[0] @ weight.T, dim=-1).detach()
    expected = -probs[:, None] * hidden[0].detach()[None, :]
    expected[token_ids[0, 0]] += hidden[0].detach()
    assert torch.allclose(grad_weight, expected, atol=1e-10)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"token_ids": torch.zeros(3, 2, dtype=torch.int32)}, "`token_ids` must be int64"),
        ({"token_ids": torch.full((4, 2), 99)}, "ids >= the vocabulary size"),
        ({"weight": torch.zeros(10, 5)}, "same H"),
        ({"temperature": 0.0}, "`temperature` must be > 0"),
        ({"chunk_size": 0}, "`chunk_size` must be an int >= 1"),
    ],
)
def test_bad_arguments_name_the_argument(change, match):
    arguments = {
        "hidden": torch.zeros(4, 3),
        "weight": torch.zeros(10, 3),
        "token_ids": torch.zeros(4, 2, dtype=torch.int64),
        "temperature": 1.0,
        "chunk_size": 2,
    }
    with pytest.raises(ValueError, match=match):
        chunked_token_logprobs(**{**arguments, **change})


def test_entropy_matches_full_softmax_and_leaves_gradients_unchanged():
    torch.manual_seed(3)
    hidden = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(29, 8, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 29, (13, 3))
    logprobs, entropy = chunked_token_logprobs(hidden, weight, ids, temperature=0.7, chunk_size=4, return_entropy=True)
    reference = torch.log_softmax((hidden @ weight.T) / 0.7, dim=-1)
    expected = -(reference.exp() * reference).sum(-1)
    torch.testing.assert_close(entropy, expected.float(), rtol=1e-5, atol=1e-6)
    assert not entropy.requires_grad
    plain = chunked_token_logprobs(hidden, weight, ids, temperature=0.7, chunk_size=4)
    torch.testing.assert_close(logprobs, plain)
    (grad_with,) = torch.autograd.grad(logprobs.sum(), hidden)
    (grad_without,) = torch.autograd.grad(plain.sum(), hidden)
    torch.testing.assert_close(grad_with, grad_without)
