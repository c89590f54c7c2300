"""RolloutBatch (select / concat / validation), SamplingConfig validation, and the token-set layout."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cppo_rl.batch import PAD_TOKEN_SLOT, RolloutBatch
from cppo_rl.rollout.sampling import SamplingConfig


def _batch(lengths: list[int], groups: list[int], slots: int = 3, version: int = 0) -> RolloutBatch:
    n, width = len(lengths), max(lengths)
    mask = torch.arange(width).expand(n, width) < torch.tensor(lengths).unsqueeze(-1)
    response_ids = torch.where(mask, torch.arange(1, n * width + 1).view(n, width), 0)
    return RolloutBatch(
        prompt_ids=[[100 + i] for i in range(n)],
        response_ids=response_ids,
        response_mask=mask,
        rollout_logprobs=torch.where(mask, -0.5, 0.0),
        topk_ids=torch.where(mask.unsqueeze(-1), response_ids.unsqueeze(-1).expand(n, width, slots), -1),
        topk_logprobs=torch.where(mask.unsqueeze(-1), torch.full((n, width, slots), -1.0), -float("inf")),
        group_index=torch.tensor(groups),
        finish_reason=["stop"] * n,
        policy_version=version,
        response_texts=[f"text {i}" for i in range(n)],
    )


def test_select_keeps_order_and_trims_to_the_longest_selected():
    batch = _batch([2, 5, 3], [0, 0, 1])
    batch.rewards = torch.tensor([1.0, 0.0, 1.0])
    batch.advantages = torch.tensor([0.5, -0.5, 0.0])
    picked = batch.select([2, 0])
    assert picked.response_ids.shape == (2, 3)
    assert torch.equal(picked.response_ids, batch.response_ids[[2, 0], :3])
    assert picked.prompt_ids == [[102], [100]]
    assert picked.response_texts == ["text 2", "text 0"]
    assert torch.equal(picked.rewards, torch.tensor([1.0, 1.0]))
    assert torch.equal(picked.advantages, torch.tensor([0.0, 0.5]))
    assert torch.equal(picked.group_index, torch.tensor([1, 0]))


def test_select_trims_token_level_advantages_too():
    batch = _batch([2, 4], [0, 1])
    batch.advantages = torch.ones(2, 4)
    assert batch.select([0]).advantages.shape == (1, 2)


def test_concat_repads_and_makes_group_ids_distinct():
    first, second = _batch([2, 2], [0, 0]), _batch([4], [0])
    joined = RolloutBatch.concat([first, second])
    assert joined.response_ids.shape == (3, 4)
    assert torch.equal(joined.group_index, torch.tensor([0, 0, 1]))
    assert not joined.response_mask[:2, 2:].any()
    assert (joined.topk_ids[:2, 2:] == PAD_TOKEN_SLOT).all()
    assert torch.isneginf(joined.topk_logprobs[:2, 2:]).all()
    assert torch.equal(joined.response_ids[2], second.response_ids[0])
    assert joined.prompt_ids == first.prompt_ids + second.prompt_ids


def test_concat_refuses_mixed_policy_versions_and_slot_counts():
    with pytest.raises(ValueError, match="different policy versions"):
        RolloutBatch.concat([_batch([1], [0], version=0), _batch([1], [0], version=1)])
    with pytest.raises(ValueError, match="token-set slots"):
        RolloutBatch.concat([_batch([1], [0], slots=3), _batch([1], [0], slots=4)])
    with pytest.raises(ValueError, match="no batches"):
        RolloutBatch.concat([])


def test_batch_validation_names_the_field():
    batch = _batch([2, 3], [0, 1])
    with pytest.raises(ValueError, match="`rollout_logprobs` has shape"):
        RolloutBatch(**{**batch.__dict__, "rollout_logprobs": torch.zeros(2, 5)})
    with pytest.raises(ValueError, match="`finish_reason` has 1 entries"):
        RolloutBatch(**{**batch.__dict__, "finish_reason": ["stop"]})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_p": 0.9}, "training rollouts must sample the untruncated distribution"),
        ({"top_k": 5}, "training rollouts must sample the untruncated distribution"),
        ({"temperature": 0.0}, "`temperature` must be > 0"),
        ({"n": 0}, "`n` must be an int >= 1"),
        ({"max_tokens": 0}, "`max_tokens` must be an int >= 1"),
        ({"logprobs_k": -1}, "`logprobs_k` must be an int >= 0"),
        ({"top_p": 0.0, "training": False}, "`top_p` must lie in"),
    ],
)
def test_sampling_config_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_evaluation_may_truncate():
    config = SamplingConfig(temperature=0.7, top_p=0.95, training=False)
    assert config.top_p == 0.95


def test_token_sets_put_the_sampled_token_first_and_blank_its_repeat():
    from cppo_rl.rollout.engine import _token_sets

    # K = 3. Position 0: sampled 7 is the top-1 (repeated in the top-K); position 1: sampled 9 is outside.
    flat = SimpleNamespace(
        start_indices=[0, 4],
        end_indices=[4, 8],
        token_ids=[7, 7, 3, 5, 9, 2, 4, 6],
        logprobs=[-0.1, -0.1, -2.0, -3.0, -5.0, -0.5, -1.0, -1.5],
    )
    ids, logprobs = _token_sets(SimpleNamespace(token_ids=[7, 9], logprobs=flat), slots=4)
    assert ids.tolist() == [[7, -1, 3, 5], [9, 2, 4, 6]]
    assert logprobs[0, 1] == -np.inf
    assert logprobs[1].tolist() == [-5.0, -0.5, -1.0, -1.5]


def test_token_sets_reject_a_layout_they_do_not_understand():
    from cppo_rl.rollout.engine import _token_sets

    flat = SimpleNamespace(start_indices=[0], end_indices=[2], token_ids=[4, 7], logprobs=[-1.0, -0.5])
    with pytest.raises(RuntimeError, match="not the sampled token"):
        _token_sets(SimpleNamespace(token_ids=[7], logprobs=flat), slots=2)
