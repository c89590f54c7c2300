"""The rollout batch: the one data contract between the rollout, reward, controller and learner roles.

N responses (prompts x samples per prompt), right-padded to T = the longest response in the batch,
with S = K + 1 token-set slots per position (mu's top-K plus the sampled token when it is outside
them). See ARCHITECTURE.md, "The data contract between the roles".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

PAD_TOKEN_SLOT = -1  # `topk_ids` value of an unused slot; its logprob is -inf


@dataclass
class RolloutBatch:
    """One batch of responses with the rollout policy's logprobs.

    prompt_ids:       N lists of prompt token ids (chat template applied)
    response_ids:     int64 [N, T], sampled tokens, right-padded with 0
    response_mask:    bool [N, T], valid response tokens (the EOS token included when sampled)
    rollout_logprobs: float32 [N, T], log mu(y_t) of the sampled token, processed (after temperature)
    topk_ids:         int64 [N, T, S], the token set; slot 0 is the sampled token; unused slots -1
    topk_logprobs:    float32 [N, T, S], log mu of those ids; unused slots and padding -inf
    group_index:      int64 [N], the prompt each response answers (samples of a prompt share it)
    finish_reason:    N strings, "stop" or "length"
    policy_version:   version of the weights that generated the batch (the oldest one, when joined batches differ)
    response_texts:   N decoded responses (for the reward)
    rewards:          float32 [N], filled by the reward pool
    advantages:       float32 [N] or [N, T], filled by the controller
    """

    prompt_ids: list[list[int]]
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    rollout_logprobs: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    group_index: torch.Tensor
    finish_reason: list[str]
    policy_version: int
    response_texts: list[str] = field(default_factory=list)
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n, t = self.response_ids.shape
        expected = {
            "response_mask": (n, t),
            "rollout_logprobs": (n, t),
            "topk_ids": (n, t, self.topk_ids.shape[-1]),
            "topk_logprobs": (n, t, self.topk_ids.shape[-1]),
            "group_index": (n,),
        }
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(
                    f"RolloutBatch: `{name}` has shape {tuple(getattr(self, name).shape)}, expected {shape} "
                    f"(N={n} responses, T={t} positions)"
                )
        for name, values in (("prompt_ids", self.prompt_ids), ("finish_reason", self.finish_reason)):
            if len(values) != n:
                raise ValueError(f"RolloutBatch: `{name}` has {len(values)} entries, expected N={n}")
        if self.response_texts and len(self.response_texts) != n:
            raise ValueError(f"RolloutBatch: `response_texts` has {len(self.response_texts)} entries, expected N={n}")

    @property
    def num_responses(self) -> int:
        return self.response_ids.shape[0]

    @property
    def response_lengths(self) -> torch.Tensor:
        """int64 [N]: valid tokens per response."""
        return self.response_mask.sum(dim=-1)

    def select(self, indices: Sequence[int] | torch.Tensor) -> RolloutBatch:
        """The responses at `indices` (in that order), trimmed to their own longest response."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        width = int(self.response_lengths[index].max()) if index.numel() else 0
        picked = index.tolist()

        def rows(tensor: torch.Tensor | None) -> torch.Tensor | None:
            if tensor is None:
                return None
            chosen = tensor[index]
            return chosen[:, :width] if chosen.dim() >= 2 else chosen

        return replace(
            self,
            prompt_ids=[self.prompt_ids[i] for i in picked],
            response_ids=rows(self.response_ids),
            response_mask=rows(self.response_mask),
            rollout_logprobs=rows(self.rollout_logprobs),
            topk_ids=rows(self.topk_ids),
            topk_logprobs=rows(self.topk_logprobs),
            group_index=rows(self.group_index),
            finish_reason=[self.finish_reason[i] for i in picked],
            response_texts=[self.response_texts[i] for i in picked] if self.response_texts else [],
            rewards=rows(self.rewards),
            advantages=rows(self.advantages),
        )

    @staticmethod
    def concat(batches: Sequence[RolloutBatch]) -> RolloutBatch:
        """Join batches in order, re-padding to the longest response; group ids are made distinct
        across batches (each batch's groups are shifted past the previous ones); the joined batch's
        policy_version is the oldest of theirs."""
        if not batches:
            raise ValueError("RolloutBatch.concat: no batches given")
        width = max(b.response_ids.shape[1] for b in batches)
        slots = batches[0].topk_ids.shape[-1]
        if any(b.topk_ids.shape[-1] != slots for b in batches):
            raise ValueError("RolloutBatch.concat: batches have different numbers of token-set slots (top-K)")

        def pad(tensor: torch.Tensor, value: float) -> torch.Tensor:
            extra = width - tensor.shape[1]
            if tensor.dim() == 3:
                return F.pad(tensor, (0, 0, 0, extra), value=value)
            return F.pad(tensor, (0, extra), value=value)

        return RolloutBatch(
            prompt_ids=[p for b in batches for p in b.prompt_ids],
            response_ids=torch.cat([pad(b.response_ids, 0) for b in batches]),
            response_mask=torch.cat([pad(b.response_mask, False) for b in batches]),
            rollout_logprobs=torch.cat([pad(b.rollout_logprobs, 0.0) for b in batches]),
            topk_ids=torch.cat([pad(b.topk_ids, PAD_TOKEN_SLOT) for b in batches]),
            topk_logprobs=torch.cat([pad(b.topk_logprobs, -float("inf")) for b in batches]),
            group_index=join_group_index([b.group_index for b in batches]),
            finish_reason=[r for b in batches for r in b.finish_reason],
            policy_version=min(b.policy_version for b in batches),
            response_texts=[t for b in batches for t in b.response_texts],
        )


def join_group_index(groups: Sequence[torch.Tensor]) -> torch.Tensor:
    """Group ids of consecutive batches made distinct: each batch's groups are renumbered densely (in
    sorted order) and shifted past the previous batches' (RolloutBatch.concat, RolloutRefs)."""
    joined, offset = [], 0
    for group_index in groups:
        if group_index.numel():
            _, dense = torch.unique(group_index, return_inverse=True)
            joined.append(dense + offset)
            offset += int(dense.max()) + 1
        else:
            joined.append(group_index)
    return torch.cat(joined)
