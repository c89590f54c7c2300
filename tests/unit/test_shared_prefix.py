"""The shared-prompt attention (cppo_rl/learner/shared_prefix.py) against its definition: for random rows of a
prompt, responses and padding, its outputs and the gradients of query, key and value equal dense SDPA under an L x L
mask built by the rule itself, one (query, key) pair at a time; without a layout it is sdpa."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cppo_rl.learner.shared_prefix import shared_prefix_attention, shared_prefix_layout


def _rows(shapes: list[tuple[int, list[int], int]]) -> torch.Tensor:
    """branch [B, L] for rows of (prompt length, response lengths, trailing padding), right-padded to one width."""
    rows = [
        [0] * p + [j for j, r in enumerate(responses, 1) for _ in range(r)] + [-1] * pad for p, responses, pad in shapes
    ]
    width = max(map(len, rows))
    return torch.tensor([row + [-1] * (width - len(row)) for row in rows])


def _oracle_mask(branch: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, L, L] by the rule, a pair at a time: a prompt query sees earlier prompt keys; a response query
    the prompt and its own earlier tokens; a padding query itself."""
    rows, width = branch.shape
    mask = torch.zeros(rows, 1, width, width, dtype=torch.bool)
    for b in range(rows):
        for q in range(width):
            for k in range(q + 1):
                bq, bk = int(branch[b, q]), int(branch[b, k])
                mask[b, 0, q, k] = (bq >= 0 and bk == 0) or (bq > 0 and bk == bq) or (bq < 0 and k == q)
    return mask


class Attention(torch.nn.Module):
    """What transformers hands an attention function: a module with its GQA group count."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


row_shapes = st.lists(
    st.tuples(st.integers(1, 7), st.lists(st.integers(1, 9), min_size=1, max_size=5), st.integers(0, 12)),
    min_size=1,
    max_size=3,
)


@settings(max_examples=60, deadline=None)
@given(shapes=row_shapes, groups=st.sampled_from([1, 2]), seed=st.integers(0, 1000))
def test_equals_dense_attention_under_the_rules_mask_with_its_gradients(shapes, groups, seed):
    branch = _rows(shapes)
    rows, width = branch.shape
    kv_heads, dim = 2, 8
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(rows, kv_heads * groups, width, dim, generator=generator, dtype=torch.float64)
    key, value = (torch.randn(rows, kv_heads, width, dim, generator=generator, dtype=torch.float64) for _ in "kv")
    weights = torch.randn(rows, width, kv_heads * groups, dim, generator=generator, dtype=torch.float64)

    def run(shared: bool):
        q, k, v = (t.clone().requires_grad_() for t in (query, key, value))
        if shared:
            out, _ = shared_prefix_attention(
                Attention(groups), q, k, v, None, scaling=0.3, shared_layout=shared_prefix_layout(branch)
            )
        else:
            keys, values = (x.repeat_interleave(groups, dim=1) for x in (k, v))
            mask = _oracle_mask(branch)
            out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=0.3)
            out = out.transpose(1, 2)
        (out * weights).sum().backward()
        return out.detach(), q.grad, k.grad, v.grad

    for got, expected in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_blocks_are_as_wide_as_the_longest_response_and_see_only_their_keys():
    branch = _rows([(3, [2, 5, 1], 0), (2, [4], 6)])  # longest prompt 3, longest response 5; width 12
    layout = shared_prefix_layout(branch)
    assert (layout.prefix, layout.window) == (3, 5)
    assert layout.mask.shape == (2 * 3, 1, 5, 3 + 10)  # 3 blocks of 5 per row, 3 prefix + 10 local keys
    # row 0, position 7 (response 2's third token: block 1, offset 2): the prompt, then its own tokens 5..7 of
    # the local keys, positions 0..9 (blocks 0 and 1)
    keys = layout.mask[1, 0, 2]
    assert keys[:3].tolist() == [True] * 3
    assert [i for i in range(10) if keys[3 + i]] == [5, 6, 7]


def test_without_a_layout_it_is_sdpa():
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    ours, _ = shared_prefix_attention(Attention(2), query, key, value, mask)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(2, dim=1), value.repeat_interleave(2, dim=1), attn_mask=mask
    )
    torch.testing.assert_close(ours, expected.transpose(1, 2), rtol=0, atol=0)


@pytest.mark.parametrize("prompt", [1, 6])
def test_every_query_sees_a_key(prompt):
    """No all-masked row (SDPA would return NaN there): padding sees itself, a prompt token itself."""
    layout = shared_prefix_layout(_rows([(prompt, [3, 1], 9)]))
    assert layout.mask.any(dim=-1).all()
