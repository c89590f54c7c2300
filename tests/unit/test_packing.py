"""The forward rows' layouts. Padding-free packing (learner.pack_sequences): the policy's logprobs and entropies of
sequences packed several to a forward row equal those of one sequence per row, and no sequence sees another (spec
6.3 item 9: nothing per-sequence bleeds across packed sequences; the loss downstream sees one sequence per row
either way). Shared prompts (learner.share_prompts): each prompt group's prompt computed once per row, its responses
after it (attention: cppo_rl/learner/shared_prefix.py, tested against its definition in test_shared_prefix.py): the
same logprobs, entropies and gradients, no response sees a sibling, and the token-budget plan keeps prompt groups
whole."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cppo_rl.batch import RolloutBatch
from cppo_rl.data.tiny_model import TinyModelConfig, init_tiny_model
from cppo_rl.learner.logprobs import LogprobPolicy
from cppo_rl.learner.micro_batches import Batching, pack_rows, padded_tokens, plan_shared_minibatch, shared_tokens
from cppo_rl.learner.shared_prefix import SHARED_PREFIX_ATTENTION
from cppo_rl.learner.step import model_inputs, set_logprobs

VOCAB, SLOTS = 128, 3


class Engine:
    """The learner's engine as set_logprobs calls it: the policy, on the CPU."""

    device = torch.device("cpu")

    def __init__(self, policy) -> None:
        self.policy = policy

    def __call__(self, *args, **kwargs):
        return self.policy(*args, **kwargs)


def _policy(attention: str) -> LogprobPolicy:
    torch.manual_seed(0)
    model = init_tiny_model(TinyModelConfig(num_layers=2))
    model.config._attn_implementation = attention
    return LogprobPolicy(model.eval().float())


@pytest.fixture(scope="module")
def engine():
    """The learner's model as share_prompts loads it: ordinary rows go through sdpa, shared rows not."""
    return Engine(_policy(SHARED_PREFIX_ATTENTION))


def _micro(groups: list[tuple[int, list[int]]], seed: int) -> RolloutBatch:
    """Prompt groups (prompt length, its responses' lengths), the samples of a group contiguous as in a batch."""
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, VOCAB, (p,), generator=generator).tolist() for p, _ in groups]
    rows = [(g, r) for g, (_, responses) in enumerate(groups) for r in responses]
    n, width = len(rows), max(r for _, r in rows)
    lengths = torch.tensor([r for _, r in rows])
    mask = torch.arange(width).expand(n, width) < lengths.unsqueeze(-1)
    topk_ids = torch.randint(0, VOCAB, (n, width, SLOTS), generator=generator)
    topk_ids = torch.where(mask.unsqueeze(-1), topk_ids, torch.full_like(topk_ids, -1))
    return RolloutBatch(
        prompt_ids=[list(prompts[g]) for g, _ in rows],
        response_ids=torch.where(mask, topk_ids[..., 0], torch.zeros_like(topk_ids[..., 0])),
        response_mask=mask,
        rollout_logprobs=torch.zeros(n, width),
        topk_ids=topk_ids,
        topk_logprobs=torch.where(
            mask.unsqueeze(-1), torch.zeros(n, width, SLOTS), torch.full((n, width, SLOTS), -float("inf"))
        ),
        group_index=torch.tensor([g for g, _ in rows]),
        finish_reason=["stop"] * n,
        policy_version=0,
    )


def _singles(lengths: list[tuple[int, int]], seed: int) -> RolloutBatch:
    """One response per prompt: (prompt length, response length) each."""
    return _micro([(p, [r]) for p, r in lengths], seed)


prompt_groups = st.lists(
    st.tuples(st.integers(1, 10), st.lists(st.integers(1, 12), min_size=1, max_size=4)), min_size=1, max_size=4
)
LAYOUTS = ({"pack": True}, {"share_prompts": True})


@settings(max_examples=25, deadline=None)
@given(groups=prompt_groups, seed=st.integers(0, 1000))
def test_packed_and_shared_logprobs_and_entropy_equal_one_sequence_per_row(engine, groups, seed):
    micro = _micro(groups, seed)
    with torch.no_grad():
        padded, padded_entropy = set_logprobs(engine, micro, 0.8, return_entropy=True)
        for layout in LAYOUTS:
            logprobs, entropy = set_logprobs(engine, micro, 0.8, return_entropy=True, **layout)
            torch.testing.assert_close(logprobs, padded, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(entropy, padded_entropy, rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(lengths=st.lists(st.tuples(st.integers(1, 8), st.integers(1, 12)), min_size=2, max_size=6), data=st.data())
def test_no_sequence_sees_another_in_its_packed_row(engine, lengths, data):
    """Change every token of one sequence: the other sequences' logprobs, and so their CPPO prefix sums, do not
    move at all (spec 6.3 item 9), though some share its packed row."""
    micro, changed = _singles(lengths, seed=1), _singles(lengths, seed=1)
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
    inputs = model_inputs(_singles([(4, 6), (3, 9), (5, 3), (2, 2)], seed=1), pack=True)
    assert inputs["input_ids"].shape[0] < 4


def test_packed_and_shared_gradients_equal_one_sequence_per_row(engine):
    micro = _micro([(6, [7, 2, 5]), (4, [3, 8]), (3, [4])], seed=3)
    grads = []
    for layout in ({}, *LAYOUTS):
        engine.policy.zero_grad(set_to_none=True)
        logprobs = set_logprobs(engine, micro, 1.0, **layout)
        logprobs[micro.response_mask][:, 0].sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in engine.policy.parameters() if p.grad is not None]))
    # equal up to float32 summation order (shared: a prompt's gradient is one sum over its responses)
    for other in grads[1:]:
        assert (other - grads[0]).abs().max() <= 1e-5 * grads[0].abs().max()


def test_first_fit_decreasing_rows():
    assert pack_rows([5, 3, 2, 4, 1]) == [[0], [3, 4], [1, 2]]
    assert padded_tokens([0, 1, 2, 3, 4], [5, 3, 2, 4, 1], packed=True) == 3 * 5
    assert padded_tokens([0, 1, 2, 3, 4], [5, 3, 2, 4, 1]) == 5 * 5


# -- shared prompts ------------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(groups=prompt_groups, data=st.data())
def test_no_response_sees_another_of_its_row(engine, groups, data):
    """Change every token of one response: every other response's logprobs (its row's siblings included) do not
    move at all, and the changed one's do."""
    micro = _micro(groups, seed=1)
    changed = dataclasses.replace(micro, response_ids=micro.response_ids.clone())
    target = data.draw(st.integers(0, micro.num_responses - 1))
    changed.response_ids[target] = (changed.response_ids[target] + 1) % VOCAB
    with torch.no_grad():
        before = set_logprobs(engine, micro, 1.0, share_prompts=True)
        after = set_logprobs(engine, changed, 1.0, share_prompts=True)
    others = [i for i in range(micro.num_responses) if i != target]
    torch.testing.assert_close(after[others], before[others], rtol=0, atol=0)
    length = int(micro.response_lengths[target])
    if length > 1:  # its first token is predicted from the prompt alone
        assert not torch.equal(after[target, 1:length], before[target, 1:length])


def test_each_prompt_is_computed_once():
    micro = _micro([(9, [4, 6, 2]), (7, [5, 5])], seed=2)
    inputs = model_inputs(micro, pack=False, share_prompts=True)
    assert inputs["input_ids"].shape == (2, 9 + 4 + 6 + 2)  # two rows, the longer one's width
    assert int(inputs["attention_mask"].sum()) == 9 + 12 + 7 + 10  # each prompt's tokens once
    assert inputs["input_ids"][0, :9].tolist() == micro.prompt_ids[0]
    # the second response continues the prompt's positions, whatever its place in the row
    assert inputs["position_ids"][0, 9 + 4 : 9 + 4 + 6].tolist() == list(range(9, 15))
    assert inputs["branch"][0].tolist() == [0] * 9 + [1] * 4 + [2] * 6 + [3] * 2  # the parts the attention needs
    assert inputs["branch"][1].tolist() == [0] * 7 + [1] * 5 + [2] * 5 + [-1] * 4
    padded = model_inputs(micro, pack=False)
    assert int(padded["attention_mask"].sum()) == 3 * 9 + 12 + 2 * 7 + 10


def test_ordinary_rows_are_sdpa_and_shared_rows_refuse_another_attention(engine):
    micro = _micro([(5, [4, 7]), (8, [3])], seed=4)
    sdpa = Engine(_policy("sdpa"))
    with torch.no_grad():
        torch.testing.assert_close(set_logprobs(engine, micro, 1.0), set_logprobs(sdpa, micro, 1.0), rtol=0, atol=0)
        with pytest.raises(ValueError, match="attn_implementation='cppo_shared_prefix', not 'sdpa'"):
            set_logprobs(sdpa, micro, 1.0, share_prompts=True)


@st.composite
def shared_minibatches(draw):
    world_size = draw(st.integers(1, 3))
    samples = draw(st.integers(1, 6))
    prompts_per_rank = draw(st.integers(1, 4))
    prompts, tokens, groups = [], [], []
    for group in range(world_size * prompts_per_rank):
        prompt = draw(st.integers(1, 200))
        for _ in range(samples):
            response = draw(st.integers(1, 200))
            prompts.append(prompt)
            tokens.append(prompt + response)
            groups.append(group)
    return tokens, prompts, groups, world_size, draw(st.integers(400, 2000))


@settings(max_examples=300, deadline=None)
@given(shared_minibatches())
def test_a_shared_plan_trains_every_row_once_within_the_budget_with_equal_step_counts(case):
    tokens, prompts, groups, world_size, budget = case
    plan = plan_shared_minibatch(tokens, prompts, groups, world_size, budget)
    rows = sorted(row for batches in plan for batch in batches for row in batch)
    assert rows == list(range(len(tokens)))
    assert len({len(batches) for batches in plan}) == 1
    share = len(tokens) // world_size
    for rank, batches in enumerate(plan):
        assert sorted(row for batch in batches for row in batch) == list(range(rank * share, (rank + 1) * share))
        for batch in batches:
            assert batch and batch == sorted(batch)
            assert shared_tokens(batch, tokens, prompts, groups) <= budget or len(batch) == 1


def test_a_shared_plan_keeps_prompt_groups_whole_when_they_fit():
    # 4 prompts of 100 tokens x 4 responses of 20: a group is 180 tokens shared, 480 one per row
    prompts, groups = [100] * 16, [g for g in range(4) for _ in range(4)]
    tokens = [120] * 16
    batching = Batching(micro_batch_size=1, max_tokens=400, shared=True)
    rows, micro, total = batching.rank_plan(tokens, 0, 1, prompts, groups)
    assert rows == list(range(16)) and total == len(micro) == 2
    assert all({groups[rows[i]] for i in batch} for batch in micro)
    assert sorted(len({groups[rows[i]] for i in batch}) for batch in micro) == [2, 2]  # 2 whole groups each
    with pytest.raises(ValueError, match="needs the rows' `prompts` and `groups`"):
        batching.rank_plan(tokens, 0, 1)
