"""Attention for shared-prompt forward rows (learner.share_prompts) in O(L x (P + 2W)) work and memory, not O(L^2).

A shared row holds a prompt group's prompt once, then each of its responses in turn (`step.shared_prompt_inputs`).
`branch` (int64 [B, L]) names each position's part: 0 the prompt, j >= 1 the row's j-th response, -1 padding. A
prompt token attends to the prompt's earlier tokens; a response token to the whole prompt and to its own earlier
tokens, never to a sibling; a padding token to itself (its outputs are never read).

With P the micro-batch's longest prompt and W its longest response, every key a query may see lies in the row's
first P positions (the prompt) or in the query's own block of W positions or the block before it (its own
response, at most W long, ends at the query). So each row is cut into blocks of W queries, and each block
attends to the P prefix keys and its 2W local keys under one boolean mask [B x blocks, 1, W, P + 2W], built once
per forward (`shared_prefix_layout`): a single SDPA call per layer over the same keys with the same softmax as
the L x L block mask, which it replaces (a group of G responses of length R: L = P + G R queries see P + 2R keys
each instead of L).

`SHARED_PREFIX_ATTENTION` is registered with transformers (5.19 `AttentionInterface`, with sdpa's mask function
in `AttentionMaskInterface`) when this module is imported: a model loaded with it computes a forward given
`shared_layout=` this way, and any other forward (ordinary rows: the recompute anchor's `batch_logprobs`)
exactly as sdpa does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

SHARED_PREFIX_ATTENTION = "cppo_shared_prefix"

_BLOCK_PADDING, _BEFORE_ROW = -2, -3  # branches of the positions the blocks add: never equal to a real query's


@dataclass(frozen=True)
class SharedPrefixLayout:
    """prefix: P, the longest prompt (keys 0..P-1 of every row); window: W, the longest response (the block
    size); mask: bool [B x blocks, 1, W, P + 2W], True where a block's query may attend to a key (P prefix keys,
    then the 2W positions of the block before and the block itself)."""

    prefix: int
    window: int
    mask: torch.Tensor


def shared_prefix_layout(branch: torch.Tensor) -> SharedPrefixLayout:
    """The blocks and their mask for shared rows described by `branch` (int64 [B, L], on the forward's device)."""
    rows, width = branch.shape
    device = branch.device
    prefix = int((branch == 0).sum(dim=1).max())
    row_of = torch.arange(rows, device=device)[:, None].expand_as(branch)
    responses = branch > 0
    lengths = torch.bincount(row_of[responses] * (width + 1) + branch[responses])
    window = max(1, int(lengths.max())) if lengths.numel() else 1
    blocks = -(-width // window)
    padded = F.pad(branch, (0, blocks * window - width), value=_BLOCK_PADDING)
    query = padded.view(rows, blocks, window, 1)
    query_index = torch.arange(blocks * window, device=device).view(1, blocks, window, 1)
    prefix_branch = branch[:, :prefix].view(rows, 1, 1, prefix)
    prefix_index = torch.arange(prefix, device=device).view(1, 1, 1, prefix)
    sees_prefix = (prefix_branch == 0) & ((query > 0) | ((query == 0) & (prefix_index <= query_index)))
    # local keys of block i: positions (i - 1) W .. (i + 1) W - 1; before the row's start they belong to no branch
    local_branch = F.pad(padded, (window, 0), value=_BEFORE_ROW).unfold(1, 2 * window, window)
    local_index = (
        torch.arange(2 * window, device=device) + window * torch.arange(-1, blocks - 1, device=device)[:, None]
    )
    local_index = local_index.view(1, blocks, 1, 2 * window)
    own = (local_branch.unsqueeze(2) == query) & (local_index <= query_index)
    sees_local = torch.where(query > 0, own, (query < 0) & (local_index == query_index))
    mask = torch.cat([sees_prefix.expand(rows, blocks, window, prefix), sees_local], dim=-1)
    return SharedPrefixLayout(prefix, window, mask.view(rows * blocks, 1, window, prefix + 2 * window))


def _block_keys(x: torch.Tensor, layout: SharedPrefixLayout, heads: int) -> torch.Tensor:
    """Keys or values [B, kv_heads, L, D] -> each block's P prefix and 2W local ones, [B x blocks, heads, P + 2W, D]."""
    rows, kv_heads, width, dim = x.shape
    window, blocks = layout.window, layout.mask.shape[0] // rows
    local = F.pad(x, (0, 0, window, blocks * window - width)).unflatten(2, (blocks + 1, window))
    local = torch.cat([local[:, :, :-1], local[:, :, 1:]], dim=3)  # [B, kv_heads, blocks, 2W, D]
    prefix = x[:, :, None, : layout.prefix].expand(rows, kv_heads, blocks, layout.prefix, dim)
    keys = torch.cat([prefix, local], dim=3).transpose(1, 2).reshape(rows * blocks, kv_heads, -1, dim)
    # repeated, not enable_gqa: as transformers' sdpa_attention_forward does under a mask (use_gqa_in_sdpa, 5.19)
    return repeat_kv(keys, heads // kv_heads)


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    shared_layout: SharedPrefixLayout | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract (query [B, H, L, D], key / value [B, kv_heads, L, D]) ->
    ([B, L, H, D], None). With `shared_layout` the shared-prompt attention above; without, sdpa's."""
    if shared_layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    rows, heads, width, dim = query.shape
    window, blocks = shared_layout.window, shared_layout.mask.shape[0] // rows
    queries = F.pad(query, (0, 0, 0, blocks * window - width)).unflatten(2, (blocks, window))
    queries = queries.transpose(1, 2).reshape(rows * blocks, heads, window, dim)
    out = F.scaled_dot_product_attention(
        queries,
        _block_keys(key, shared_layout, heads),
        _block_keys(value, shared_layout, heads),
        attn_mask=shared_layout.mask,
        dropout_p=dropout,
        scale=scaling,
    )
    out = out.view(rows, blocks, heads, window, dim).transpose(2, 3).reshape(rows, blocks * window, heads, dim)
    return out[:, :width].contiguous(), None


AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)
AttentionMaskInterface.register(SHARED_PREFIX_ATTENTION, sdpa_mask)
