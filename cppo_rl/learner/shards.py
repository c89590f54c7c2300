"""A rank's shards cut from a batch held by reference (cppo_rl/data_plane.py), without the whole batch.

`shards_from_source` gives what `step.split_shards` gives for the whole batch: the same mini-batches,
the same rank shares (trimmed to their longest response), the same global normalisers. The counts and
the padded width come from the per-row lengths, so each rank fetches only the engine chunks holding its
own rows, and widens their int32 token ids to int64 for those rows only.
"""

from __future__ import annotations

from collections.abc import Callable

from cppo_rl.data_plane import ChunkTensors, RolloutSource, gather_rows
from cppo_rl.learner.step import Shard, minibatch_normaliser


def shards_from_source(
    source: RolloutSource,
    updates: int,
    rank: int,
    world_size: int,
    horizon,
    get: Callable[[list[object]], list[ChunkTensors]] | None = None,
) -> list[Shard]:
    """`step.split_shards` of the batch `source` describes: this rank's share of each of `updates` contiguous
    mini-batches. `get` brings a list of chunk refs here (default ray.get); a chunk is fetched once."""
    if get is None:
        import ray

        get = ray.get
    size = source.num_responses // updates
    share = size // world_size
    cache: dict[int, ChunkTensors] = {}
    shards = []
    for update in range(updates):
        normaliser = minibatch_normaliser(source.response_lengths[update * size : (update + 1) * size], horizon)
        start = update * size + rank * share
        mine = gather_rows(source, start, start + share, get, cache)
        shards.append(Shard(batch=mine, normaliser=normaliser, first=update == 0))
    return shards
