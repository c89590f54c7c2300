"""A rank's shards cut from a batch held by reference (cppo_rl/data_plane.py), without the whole batch.

`shards_from_source` gives what `step.split_shards` gives for the whole batch: the same mini-batches,
the same rank shares and micro-batches (trimmed to their longest response), the same global normalisers.
The counts, the padded width and the token-budget plan come from the per-row lengths, so each rank
fetches only the engine chunks holding its own rows, and widens their int32 token ids to int64 for those
rows only.
"""

from __future__ import annotations

from collections.abc import Callable

from cppo_rl.data_plane import ChunkTensors, RolloutSource, gather_rows
from cppo_rl.learner.micro_batches import Batching
from cppo_rl.learner.step import Shard, minibatch_normaliser


def shards_from_source(
    source: RolloutSource,
    updates: int,
    rank: int,
    world_size: int,
    horizon,
    batching: Batching,
    get: Callable[[list[object]], list[ChunkTensors]] | None = None,
) -> list[Shard]:
    """`step.split_shards` of the batch `source` describes: this rank's shard of each of `updates` contiguous
    mini-batches, shared by `batching`. `get` brings a list of chunk refs here (default ray.get); a chunk is
    fetched once."""
    if get is None:
        import ray

        get = ray.get
    size = source.num_responses // updates
    tokens = (source.response_lengths + source.prompt_lengths).tolist()
    prompts, groups = source.prompt_lengths.tolist(), source.group_index.tolist()
    cache: dict[int, ChunkTensors] = {}
    shards = []
    for update in range(updates):
        first = update * size
        normaliser = minibatch_normaliser(source.response_lengths[first : first + size], horizon)
        window = slice(first, first + size)
        rows, micro_batches, total = batching.rank_plan(
            tokens[window], rank, world_size, prompts[window], groups[window]
        )
        mine = gather_rows(source, [first + row for row in rows], get, cache)
        shards.append(Shard(mine, normaliser, update == 0, micro_batches, total))
    return shards
