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


def test_concat_keeps_the_oldest_policy_version_and_refuses_mixed_slot_counts():
    assert RolloutBatch.concat([_batch([1], [0], version=3), _batch([1], [0], version=2)]).policy_version == 2
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


# -- the data plane: light / heavy parts, RolloutRefs, a rank's shards by reference ------------------


def _engine_chunk(lengths: list[int], n: int, slots: int, seed: int, version: int = 0) -> RolloutBatch:
    """A batch like one engine chunk's: len(lengths) / n prompts with n adjacent samples each, random
    token sets (slot 0 the sampled token; unused slots -1 / -inf), padding as the engine writes it."""
    generator = torch.Generator().manual_seed(seed)
    rows, width = len(lengths), max(lengths)
    mask = torch.arange(width).expand(rows, width) < torch.tensor(lengths).unsqueeze(-1)
    ids = torch.randint(0, 50_000, (rows, width, slots), generator=generator)
    ids[..., 1:][torch.rand(rows, width, slots - 1, generator=generator) < 0.2] = PAD_TOKEN_SLOT
    logprobs = torch.where(ids >= 0, -torch.rand(rows, width, slots, generator=generator) * 5, -float("inf"))
    ids = torch.where(mask.unsqueeze(-1), ids, PAD_TOKEN_SLOT)
    logprobs = torch.where(mask.unsqueeze(-1), logprobs, -float("inf"))
    groups = torch.arange(rows // n).repeat_interleave(n)
    return RolloutBatch(
        prompt_ids=[[seed, 7 + int(g), 9] for g in groups],
        response_ids=torch.where(mask, ids[..., 0], 0),
        response_mask=mask,
        rollout_logprobs=torch.where(mask, logprobs[..., 0], 0.0),
        topk_ids=ids,
        topk_logprobs=logprobs,
        group_index=groups,
        finish_reason=["stop" if length % 3 else "length" for length in lengths],
        policy_version=version,
        response_texts=[f"answer {seed} {i} " * length for i, length in enumerate(lengths)],
    )


def _assert_same_batch(actual: RolloutBatch, expected: RolloutBatch, texts: bool = True) -> None:
    for name in ("response_ids", "response_mask", "rollout_logprobs", "topk_ids", "topk_logprobs", "group_index"):
        a, e = getattr(actual, name), getattr(expected, name)
        assert a.dtype == e.dtype and torch.equal(a, e), name
    for name in ("rewards", "advantages"):
        a, e = getattr(actual, name), getattr(expected, name)
        assert (a is None and e is None) or torch.equal(a, e), name
    assert actual.prompt_ids == expected.prompt_ids
    assert actual.finish_reason == expected.finish_reason
    assert actual.policy_version == expected.policy_version
    if texts:
        assert actual.response_texts == expected.response_texts


def _refs(batches: list[RolloutBatch]):
    from cppo_rl.data_plane import ChunkRef, RolloutRefs, split_batch

    # the "refs" are the heavy parts themselves; `get` is then the identity (no Ray here)
    return RolloutRefs([ChunkRef(*split_batch(b)) for b in batches])


def _identity(refs):
    return list(refs)


def test_split_keeps_the_token_sets_out_of_the_light_part_and_as_int32():
    import pickle

    from cppo_rl.data_plane import join_chunk, split_batch

    batch = _engine_chunk([3, 7, 5, 1], n=2, slots=6, seed=1)
    light, heavy = split_batch(batch)
    _assert_same_batch(join_chunk(light, heavy), batch)
    assert heavy.topk_ids.dtype == np.int32 and heavy.response_ids.dtype == np.int32
    assert heavy.prompt_ids == [[1, 7, 9], [1, 8, 9]]  # once per prompt
    assert all(not (isinstance(v, torch.Tensor) and v.dim() > 1) for v in vars(light).values())

    def light_bytes(lengths, slots):
        light, _ = split_batch(_engine_chunk(lengths, n=2, slots=slots, seed=2))
        return len(pickle.dumps(light)) - sum(len(t.encode()) for t in light.response_texts)

    small = light_bytes([2, 3, 2, 1], slots=2)
    assert abs(light_bytes([200, 300, 250, 100], slots=21) - small) <= 64  # not [n, t] nor [n, t, S]


def test_refs_answer_the_light_questions_and_fetch_the_concatenated_batch():
    chunks = [_engine_chunk([3, 7, 5, 1], 2, 4, seed=1), _engine_chunk([2, 2], 2, 4, seed=2)]
    chunks.append(_engine_chunk([9, 4, 1, 1, 2, 6], 2, 4, seed=3))
    refs, whole = _refs(chunks), RolloutBatch.concat(chunks)
    assert refs.num_responses == whole.num_responses and refs.policy_version == 0
    assert torch.equal(refs.response_lengths, whole.response_lengths)
    assert torch.equal(refs.group_index, whole.group_index)
    assert refs.finish_reason == whole.finish_reason and refs.response_texts == whole.response_texts
    refs.rewards = torch.arange(12, dtype=torch.float32)
    refs.advantages = refs.rewards - 5
    whole.rewards, whole.advantages = refs.rewards, refs.advantages
    _assert_same_batch(refs.fetch(get=_identity), whole)


@pytest.mark.parametrize("token_level", [False, True])
@pytest.mark.parametrize(("updates", "world_size"), [(1, 1), (1, 2), (2, 2), (3, 2), (6, 1), (2, 3)])
@pytest.mark.parametrize("horizon", [None, 64])
@pytest.mark.parametrize(("max_tokens", "shared"), [(0, False), (24, False), (24, True)])
def test_shards_by_reference_equal_the_shards_of_the_whole_batch(
    updates, world_size, horizon, token_level, max_tokens, shared
):
    from cppo_rl.learner.micro_batches import Batching
    from cppo_rl.learner.shards import shards_from_source
    from cppo_rl.learner.step import split_shards

    if max_tokens and (18 // updates) % world_size:
        pytest.skip("a token-budget plan deals whole mini-batches (the learner config refuses uneven shares)")
    batching = Batching(micro_batch_size=1, max_tokens=max_tokens, shared=shared)

    # three engine chunks of different widths; mini-batches and rank shares straddle chunk borders
    chunks = [_engine_chunk([3, 7, 5, 1, 2, 2], 2, 5, seed=1), _engine_chunk([2, 2, 11, 4], 2, 5, seed=2)]
    chunks.append(_engine_chunk([9, 4, 1, 1, 2, 6, 3, 3], 2, 5, seed=3))
    refs, whole = _refs(chunks), RolloutBatch.concat(chunks)
    refs.rewards = torch.linspace(0, 1, 18)
    refs.advantages = torch.randn(18, whole.response_ids.shape[1]) if token_level else torch.randn(18)
    whole.rewards, whole.advantages = refs.rewards, refs.advantages
    offsets = [0, 6, 10, 18]
    for rank in range(world_size):
        fetched = []

        def get(wanted, fetched=fetched):
            fetched.extend(id(w) for w in wanted)
            return list(wanted)

        expected = split_shards(whole, updates, rank, world_size, horizon, batching)
        actual = shards_from_source(refs.source(), updates, rank, world_size, horizon, batching, get=get)
        assert len(actual) == len(expected) == updates
        for mine, theirs in zip(actual, expected, strict=True):
            _assert_same_batch(mine.batch, theirs.batch, texts=False)
            assert mine.normaliser == theirs.normaliser and mine.first == theirs.first
            assert (mine.micro_batches, mine.micro_steps_total) == (theirs.micro_batches, theirs.micro_steps_total)
        # only the chunks holding this rank's rows, each once
        size, prompts = 18 // updates, torch.tensor([len(p) for p in whole.prompt_ids])
        tokens, groups = whole.response_lengths + prompts, whole.group_index
        rows = set()
        for u in range(updates):
            window = slice(u * size, (u + 1) * size)
            mine_rows, _, _ = batching.rank_plan(
                tokens[window].tolist(), rank, world_size, prompts[window].tolist(), groups[window].tolist()
            )
            rows |= {u * size + r for r in mine_rows}
        holding = [i for i in range(3) if rows & set(range(offsets[i], offsets[i + 1]))]
        assert fetched == [id(refs.chunks[i].tensors) for i in holding]


def test_the_engine_builds_int32_parts_that_join_into_its_batch():
    from cppo_rl.data_plane import join_chunk
    from cppo_rl.rollout.engine import _to_batch

    def completion(tokens, text):
        flat = SimpleNamespace(
            start_indices=list(range(0, 2 * len(tokens), 2)),
            end_indices=list(range(2, 2 * len(tokens) + 1, 2)),
            token_ids=[t for token in tokens for t in (token, token + 1)],
            logprobs=[v for i in range(len(tokens)) for v in (-0.1 * i, -2.0)],
        )
        return SimpleNamespace(token_ids=tokens, logprobs=flat, text=text, finish_reason="stop")

    responses = [completion([5, 6, 7], "a"), completion([8], "b"), completion([2**31 - 2, 3], "c")]
    light, heavy = _to_batch([[1, 2], [3]], responses, torch.tensor([0, 0, 1]), slots=3, policy_version=4)
    assert heavy.topk_ids.dtype == np.int32 and heavy.prompt_ids == [[1, 2], [3]]
    assert light.response_lengths.tolist() == [3, 1, 2] and light.num_prompts == 2
    batch = join_chunk(light, heavy)
    assert batch.topk_ids.dtype == torch.int64 and int(batch.topk_ids.max()) == 2**31 - 1
    assert batch.prompt_ids == [[1, 2], [1, 2], [3]] and batch.response_texts == ["a", "b", "c"]
    assert batch.response_ids[2].tolist() == [2**31 - 2, 3, 0] and batch.topk_ids[1, 0].tolist() == [8, 9, -1]
    too_big = [completion([2**31], "d")]
    with pytest.raises(RuntimeError, match="does not fit int32"):
        _to_batch([[1]], too_big, torch.tensor([0]), slots=3, policy_version=0)
