"""The rollout data plane: engine -> Ray object store -> learner ranks, by reference.

An engine's `generate` yields two parts per chunk of prompts (`split_batch` / the engine build them):

- `RolloutChunk`, the light part the caller (the driver) receives: texts, finish reasons, response
  lengths, group index, policy version, prompt count. Its size does not depend on top-K nor on the
  response length (beyond the texts).
- `ChunkTensors`, the heavy part, left in Ray's object store as one object: prompt ids (once per
  prompt), sampled ids, rollout logprobs and the token sets [n, t, S] (ids as int32: vocabularies are
  < 2^31; the learner widens them to int64 for its own rows only). numpy arrays, so a reader on the
  object's node maps them zero-copy.

The actor returns both as the two return values of one task (`num_returns=2`), so the driver owns
both objects: a chunk's heavy object outlives the engine that made it (engine replacement keeps the
finished chunks).

`RolloutRefs` is the driver's handle on one batch: the light parts in order, the heavy parts' refs,
and the rewards / advantages the driver adds. It answers what the driver needs (lengths, group ids,
texts...) without the tensors; `fetch()` assembles the whole `RolloutBatch` (tests, diagnostics).
`source()` is what each learner rank receives: the refs nested in a small dataclass (Ray does not
resolve them at the call) plus per-row data; `cppo_rl.learner.shards.shards_from_source` cuts a rank's
shards from it, fetching only the chunks holding its rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from cppo_rl.batch import PAD_TOKEN_SLOT, RolloutBatch, join_group_index

INT32_MAX = np.iinfo(np.int32).max


@dataclass
class RolloutChunk:
    """The light part of one engine chunk: what the driver receives from `generate`.

    response_texts:   n decoded responses
    finish_reason:    n strings, "stop" or "length"
    response_lengths: int64 [n], valid tokens per response
    group_index:      int64 [n], the chunk-local prompt each response answers (0 .. num_prompts-1)
    policy_version:   version of the weights that generated the chunk
    num_prompts:      prompts in the chunk
    prompt_lengths:   int64 [n], tokens of the prompt each response answers (the learner plans its
                      micro-batches by prompt + response tokens without fetching the heavy part)
    """

    response_texts: list[str]
    finish_reason: list[str]
    response_lengths: torch.Tensor
    group_index: torch.Tensor
    policy_version: int
    num_prompts: int
    prompt_lengths: torch.Tensor

    @property
    def num_responses(self) -> int:
        return len(self.finish_reason)


@dataclass
class ChunkTensors:
    """The heavy part of one engine chunk, left in the object store; rows as in its RolloutChunk.

    prompt_ids:       the chunk's prompts, once each; row r answers prompt_ids[prompt_index[r]]
    prompt_index:     int32 [n]
    response_ids:     int32 [n, t], sampled tokens, right-padded with 0 (t: the chunk's longest response)
    rollout_logprobs: float32 [n, t], log mu of the sampled token, padded with 0
    topk_ids:         int32 [n, t, S], the token set (RolloutBatch's layout); unused slots -1
    topk_logprobs:    float32 [n, t, S], unused slots and padding -inf
    """

    prompt_ids: list[list[int]]
    prompt_index: np.ndarray
    response_ids: np.ndarray
    rollout_logprobs: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray

    @property
    def nbytes(self) -> int:
        arrays = (self.prompt_index, self.response_ids, self.rollout_logprobs, self.topk_ids, self.topk_logprobs)
        return sum(a.nbytes for a in arrays)


def split_batch(batch: RolloutBatch, num_prompts: int | None = None) -> tuple[RolloutChunk, ChunkTensors]:
    """A (one engine chunk's) RolloutBatch as its light and heavy parts. Prompts are stored once per
    group (`group_index`); `num_prompts` defaults to the number of distinct groups."""
    if batch.topk_ids.numel() and int(batch.topk_ids.max()) > INT32_MAX:
        raise ValueError("split_batch: token ids beyond int32 (a vocabulary of 2^31 tokens?)")
    groups, dense = torch.unique(batch.group_index, return_inverse=True)
    prompts: list[list[int]] = [[] for _ in range(len(groups))]
    for row, group in enumerate(dense.tolist()):
        prompts[group] = list(batch.prompt_ids[row])
    chunk = RolloutChunk(
        response_texts=list(batch.response_texts),
        finish_reason=list(batch.finish_reason),
        response_lengths=batch.response_lengths.to(torch.int64),
        group_index=batch.group_index.clone(),
        policy_version=batch.policy_version,
        num_prompts=len(groups) if num_prompts is None else num_prompts,
        prompt_lengths=torch.tensor([len(p) for p in batch.prompt_ids], dtype=torch.int64),
    )
    tensors = ChunkTensors(
        prompt_ids=prompts,
        prompt_index=dense.numpy().astype(np.int32),
        response_ids=batch.response_ids.numpy().astype(np.int32),
        rollout_logprobs=batch.rollout_logprobs.numpy().astype(np.float32),
        topk_ids=batch.topk_ids.numpy().astype(np.int32),
        topk_logprobs=batch.topk_logprobs.numpy().astype(np.float32),
    )
    return chunk, tensors


def join_chunk(chunk: RolloutChunk, tensors: ChunkTensors) -> RolloutBatch:
    """The whole RolloutBatch of one chunk (token ids widened back to int64)."""
    n, width = tensors.response_ids.shape
    mask = torch.arange(width).expand(n, width) < chunk.response_lengths.unsqueeze(-1)
    return RolloutBatch(
        prompt_ids=[list(tensors.prompt_ids[i]) for i in tensors.prompt_index.tolist()],
        response_ids=torch.from_numpy(tensors.response_ids.astype(np.int64)),
        response_mask=mask,
        rollout_logprobs=torch.from_numpy(tensors.rollout_logprobs.copy()),
        topk_ids=torch.from_numpy(tensors.topk_ids.astype(np.int64)),
        topk_logprobs=torch.from_numpy(tensors.topk_logprobs.copy()),
        group_index=chunk.group_index.clone(),
        finish_reason=list(chunk.finish_reason),
        policy_version=chunk.policy_version,
        response_texts=list(chunk.response_texts),
    )


@dataclass
class ChunkRef:
    """One finished engine chunk on the driver: its light part and the ref of its heavy part."""

    chunk: RolloutChunk
    tensors: object  # ray.ObjectRef[ChunkTensors], owned by the driver


@dataclass
class RolloutSource:
    """What a learner rank receives for one batch: the heavy parts by reference and the per-row data.

    tensors:        one ref per chunk (ChunkTensors), in row order; nested here so Ray does not resolve them
    chunk_rows:     rows per chunk
    response_lengths, prompt_lengths, group_index (global), finish_reason, rewards, advantages: per row,
    all N rows
    """

    tensors: list[object]
    chunk_rows: list[int]
    response_lengths: torch.Tensor
    prompt_lengths: torch.Tensor
    group_index: torch.Tensor
    finish_reason: list[str]
    policy_version: int
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None

    @property
    def num_responses(self) -> int:
        return int(self.response_lengths.shape[0])


@dataclass
class RolloutRefs:
    """The driver's handle on one rollout batch: light parts in row order, heavy parts by reference.

    Has RolloutBatch's light attributes (num_responses, response_lengths, group_index, finish_reason,
    response_texts, policy_version, rewards, advantages); `fetch()` returns the whole RolloutBatch.
    """

    chunks: list[ChunkRef]
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    _group_index: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.chunks:
            raise ValueError("RolloutRefs: no chunks given")

    @property
    def num_responses(self) -> int:
        return sum(c.chunk.num_responses for c in self.chunks)

    @property
    def policy_version(self) -> int:
        """The oldest version that generated a row (free-running rollouts mix versions in one batch)."""
        return min(c.chunk.policy_version for c in self.chunks)

    @property
    def row_versions(self) -> torch.Tensor:
        """int64 [N]: the policy version that generated each row."""
        return torch.cat([torch.full((c.chunk.num_responses,), c.chunk.policy_version) for c in self.chunks])

    @property
    def response_lengths(self) -> torch.Tensor:
        """int64 [N]: valid tokens per response."""
        return torch.cat([c.chunk.response_lengths for c in self.chunks])

    @property
    def group_index(self) -> torch.Tensor:
        """int64 [N]: the prompt each response answers, distinct across chunks (as RolloutBatch.concat)."""
        if self._group_index is None:
            self._group_index = join_group_index([c.chunk.group_index for c in self.chunks])
        return self._group_index

    @property
    def finish_reason(self) -> list[str]:
        return [r for c in self.chunks for r in c.chunk.finish_reason]

    @property
    def response_texts(self) -> list[str]:
        return [t for c in self.chunks for t in c.chunk.response_texts]

    @property
    def tensor_refs(self) -> list[object]:
        return [c.tensors for c in self.chunks]

    def fetch(self, get: Callable[[list[object]], list[ChunkTensors]] | None = None) -> RolloutBatch:
        """The whole RolloutBatch (every chunk's tensors brought to this process; `get`: ray.get)."""
        if get is None:
            import ray

            get = ray.get
        tensors = get(self.tensor_refs)
        batch = RolloutBatch.concat([join_chunk(c.chunk, t) for c, t in zip(self.chunks, tensors, strict=True)])
        batch.rewards, batch.advantages = self.rewards, self.advantages
        return batch

    def source(self) -> RolloutSource:
        """What each learner rank receives (see RolloutSource): refs and per-row data, no tensors [N, T]."""
        return RolloutSource(
            tensors=self.tensor_refs,
            chunk_rows=[c.chunk.num_responses for c in self.chunks],
            response_lengths=self.response_lengths,
            prompt_lengths=torch.cat([c.chunk.prompt_lengths for c in self.chunks]),
            group_index=self.group_index,
            finish_reason=self.finish_reason,
            policy_version=self.policy_version,
            rewards=self.rewards,
            advantages=self.advantages,
        )


def gather_rows(
    source: RolloutSource,
    rows: Sequence[int],
    get: Callable[[list[object]], list[ChunkTensors]],
    cache: dict[int, ChunkTensors] | None = None,
) -> RolloutBatch:
    """The rows `rows` (global indices, in that order) of the batch `source` describes, as
    `RolloutBatch.select(rows)` of the whole batch would give them (trimmed to their longest response; no
    texts). Only the chunks holding these rows are fetched with `get` (a list of refs -> their ChunkTensors),
    each once per `cache`."""
    cache = {} if cache is None else cache
    index = np.asarray(list(rows), dtype=np.int64)
    picked = torch.from_numpy(index)
    lengths = source.response_lengths[picked]
    n = len(index)
    width = int(lengths.max()) if n else 0
    offsets = np.cumsum([0, *source.chunk_rows])
    chunk_of = np.searchsorted(offsets, index, side="right") - 1  # the chunk holding each row
    needed = sorted(set(chunk_of.tolist()))
    missing = [i for i in needed if i not in cache]
    if missing:
        cache.update(zip(missing, get([source.tensors[i] for i in missing]), strict=True))
    slots = cache[needed[0]].topk_ids.shape[-1] if needed else 1
    response_ids = np.zeros((n, width), dtype=np.int64)
    rollout_logprobs = np.zeros((n, width), dtype=np.float32)
    topk_ids = np.full((n, width, slots), PAD_TOKEN_SLOT, dtype=np.int64)
    topk_logprobs = np.full((n, width, slots), -np.inf, dtype=np.float32)
    prompt_ids: list[list[int]] = [[] for _ in range(n)]
    for i in needed:
        part = cache[i]
        if part.topk_ids.shape[-1] != slots:
            raise ValueError("gather_rows: chunks have different numbers of token-set slots (top-K)")
        out = np.nonzero(chunk_of == i)[0]  # positions in the result
        local = index[out] - offsets[i]  # rows of chunk i
        w = min(width, part.response_ids.shape[1])
        response_ids[out, :w] = part.response_ids[local, :w]
        rollout_logprobs[out, :w] = part.rollout_logprobs[local, :w]
        topk_ids[out, :w] = part.topk_ids[local, :w]
        topk_logprobs[out, :w] = part.topk_logprobs[local, :w]
        for position, prompt in zip(out.tolist(), part.prompt_index[local].tolist(), strict=True):
            prompt_ids[position] = list(part.prompt_ids[prompt])

    def rows_of(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        chosen = tensor[picked].clone()
        return chosen[:, :width] if chosen.dim() >= 2 else chosen

    return RolloutBatch(
        prompt_ids=prompt_ids,
        response_ids=torch.from_numpy(response_ids),
        response_mask=torch.arange(width).expand(n, width) < lengths.unsqueeze(-1),
        rollout_logprobs=torch.from_numpy(rollout_logprobs),
        topk_ids=torch.from_numpy(topk_ids),
        topk_logprobs=torch.from_numpy(topk_logprobs),
        group_index=source.group_index[picked].clone(),
        finish_reason=[source.finish_reason[r] for r in index.tolist()],
        policy_version=source.policy_version,
        rewards=rows_of(source.rewards),
        advantages=rows_of(source.advantages),
    )


@dataclass
class SavedRollouts:
    """The scored rollouts generated ahead of the learner, as a checkpoint carries them (learner rank 0
    fetches the heavy parts by reference and writes them: `write_rollouts`). Each item is one file,
    `{item["name"]}.pt`: its chunks (the light parts), tensors (refs, nested here so Ray does not resolve
    them), outcomes and version, plus what its pipeline needs (a lockstep batch: its step, rewards and
    advantages; a free-running chunk: its prompts). `state`: the pipeline's own state besides the items
    (free-running rollouts: the prompts drawn but not finished), written to `state.pt`."""

    items: list[dict]
    state: dict | None = None

    def __bool__(self) -> bool:
        return bool(self.items) or self.state is not None


STATE_FILE = "state.pt"


def write_rollouts(directory, saved: SavedRollouts, get: Callable[[object], ChunkTensors]) -> int:
    """Write what a checkpoint carries of the pipeline (SavedRollouts) into `directory`: one file per item,
    its heavy parts fetched one item at a time with `get` (ray.get), and the state. Returns the bytes
    written."""
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = 0
    for item in saved.items:
        path = directory / f"{item['name']}.pt"
        torch.save({**item, "tensors": [get(ref) for ref in item["tensors"]]}, path)
        written += path.stat().st_size
    if saved.state is not None:
        torch.save(saved.state, directory / STATE_FILE)
        written += (directory / STATE_FILE).stat().st_size
    return written


def read_rollouts(directory) -> SavedRollouts:
    """What `write_rollouts` wrote (heavy parts as ChunkTensors), items in name order; empty when none."""
    from pathlib import Path

    directory = Path(directory)
    if not directory.is_dir():
        return SavedRollouts([])
    paths = sorted(p for p in directory.glob("*.pt") if p.name != STATE_FILE)
    state = torch.load(directory / STATE_FILE, weights_only=False) if (directory / STATE_FILE).is_file() else None
    return SavedRollouts([torch.load(path, weights_only=False) for path in paths], state)
