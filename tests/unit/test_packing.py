"""Padding-free packing (learner.pack_sequences): the policy's logprobs and entropies of sequences packed several
to a forward row equal those of one sequence per row, and no sequence sees another (spec 6.3 item 9: nothing
per-sequence bleeds across packed sequences; the loss downstream sees one sequence per row either way)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cppo_rl.batch import RolloutBatch
from cppo_rl.data.tiny_model import TinyModelConfig, init_tiny_model
from cppo_rl.learner.logprobs import LogprobPolicy
from cppo_rl.learner.micro_batches import pack_rows, padded_tokens
from cppo_rl.learner.step import model_inputs, set_logprobs

VOCAB, SLOTS = 128, 3


class Engine:
    """The learner's engine as set_logprobs calls it: the policy, on the CPU."""

    device = torch.device("cpu")

    def __init__(self, policy) -> None:
        self.policy = policy

    def __call__(self, *args, **kwargs):
        return self.policy(*args, **kwargs)


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    model = init_tiny_model(TinyModelConfig(num_layers=2))
    return Engine(LogprobPolicy(model.eval().float()))


def _micro(prompt_lengths: list[int], response_lengths: list[int], seed: int) -> RolloutBatch:
    generator = torch.Generator().manual_seed(seed)
    n, width = len(response_lengths), max(response_lengths)
    mask = torch.arange(width).expand(n, width) < torch.tensor(response_lengths).unsqueeze(-1)
    topk_ids = torch.randint(0, VOCAB, (n, width, SLOTS), generator=generator)
    topk_ids = torch.where(mask.unsqueeze(-1), topk_ids, torch.full_like(topk_ids, -1))
    return RolloutBatch(
        prompt_ids=[torch.randint(0, VOCAB, (p,), generator=generator).tolist() for p in prompt_lengths],
        response_ids=torch.where(mask, topk_ids[..., 0], torch.zeros_like(topk_ids[..., 0])),
        response_mask=mask,
        rollout_logprobs=torch.zeros(n, width),
        topk_ids=topk_ids,
        topk_logprobs=torch.where(
            mask.unsqueeze(-1), torch.zeros(n, width, SLOTS), torch.full((n, width, SLOTS), -float("inf"))
        ),
        group_index=torch.arange(n),
        finish_reason=["stop"] * n,
        policy_version=0,
    )


lengths = st.lists(st.tuples(st.integers(1, 12), st.integers(1, 20)), min_size=1, max_size=7)


@settings(max_examples=25, deadline=None)
@given(lengths=lengths, seed=st.integers(0, 1000))
def test_packed_logprobs_and_entropy_equal_one_sequence_per_row(engine, lengths, seed):
    micro = _micro([p for p, _ in lengths], [r for _, r in lengths], seed)
    with torch.no_grad():
        padded, padded_entropy = set_logprobs(engine, micro, 0.8, return_entropy=True)
        packed, packed_entropy = set_logprobs(engine, micro, 0.8, return_entropy=True, pack=True)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_entropy, padded_entropy, rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(lengths=st.lists(st.tuples(st.integers(1, 8), st.integers(1, 12)), min_size=2, max_size=6), data=st.data())
def test_no_sequence_sees_another_in_its_packed_row(engine, lengths, data):
    """Change every token of one sequence: the other sequences' logprobs, and so their CPPO prefix sums, do not
    move at all (spec 6.3 item 9), though some share its packed row."""
    prompts, responses = [p for p, _ in lengths], [r for _, r in lengths]
    micro, changed = _micro(prompts, responses, seed=1), _micro(prompts, responses, seed=1)
    target = data.draw(st.integers(0, len(lengths) - 1))
    changed.prompt_ids[target] = [(t + 1) % VOCAB for t in changed.prompt_ids[target]]
    changed.response_ids[target] = (changed.response_ids[target] + 1) % VOCAB
    with torch.no_grad():
        before = set_logprobs(engine, micro, 1.0, pack=True)
        after = set_logprobs(engine, changed, 1.0, pack=True)
    others = [i for i in range(len(lengths)) if i != target]
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=0)
    mask = micro.response_mask[target]
    assert not torch.equal(after[target][mask], before[target][mask])


def test_packing_shares_rows():
    inputs = model_inputs(_micro([4, 3, 5, 2], [6, 9, 3, 2], seed=1), pack=True)
    assert inputs["input_ids"].shape[0] < 4


def test_packing_gradients_equal_one_sequence_per_row(engine):
    micro = _micro([3, 5, 2, 4], [7, 2, 5, 3], seed=3)
    grads = []
    for pack in (False, True):
        engine.policy.zero_grad(set_to_none=True)
        logprobs = set_logprobs(engine, micro, 1.0, pack=pack)
        logprobs[micro.response_mask][:, 0].sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in engine.policy.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_first_fit_decreasing_rows():
    assert pack_rows([5, 3, 2, 4, 1]) == [[0], [3, 4], [1, 2]]
    assert padded_tokens([0, 1, 2, 3, 4], [5, 3, 2, 4, 1], packed=True) == 3 * 5
    assert padded_tokens([0, 1, 2, 3, 4], [5, 3, 2, 4, 1]) == 5 * 5
