"""Micro-batches by a token budget, and mini-batches balanced across data-parallel ranks by tokens.

With `learner.max_tokens_per_micro_batch` = B > 0 the learner does not cut a rank's share of a mini-batch into
micro-batches of `micro_batch_size` responses (each padded to its longest member) but plans them from the
rows' token counts (prompt + response), which every rank knows for the whole batch without communication:

1. `balance_ranks`: the mini-batch's rows are dealt to the ranks longest first, each to the rank with the
   fewest tokens so far among those with room (every rank takes the same number of rows), so no rank holds
   the others at ZeRO-3's collectives with all the long responses.
2. `budget_micro_batches`: a rank's rows, longest first, fill micro-batches while rows x longest row <= B
   (the padded tokens a forward computes); a row longer than B gets a micro-batch alone. With
   `learner.pack_sequences` the forward packs several sequences per row (`pack_rows`, first-fit decreasing
   into rows of the longest one's length) and the budget counts those packed rows.
3. `plan_minibatch`: ZeRO-3 gathers parameters in every forward and backward, so every rank must run the
   same number of micro-steps: a rank with fewer splits its largest micro-batch until the counts agree.

With `learner.share_prompts` a forward row holds one prompt once and its responses after it (`step.model_inputs`),
so the plan keeps each prompt's responses together: every rank takes a contiguous share of the mini-batch's rows
(the samples of a prompt are contiguous), and `budget_shared_micro_batches` cuts it into micro-batches of whole
prompt groups (a group longer than the budget in parts, each with its own copy of the prompt).

Normalisation is unchanged (cppo_rl/learner/step.py): the loss of each micro-batch is its sum over the
mini-batch's global counts, so any plan gives the same update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


def balance_ranks(tokens: Sequence[int], world_size: int) -> list[list[int]]:
    """Row indices per rank (ascending): rows dealt longest first to the rank with the fewest tokens so far
    among those with fewer than len(tokens) / world_size rows (ties: the lower rank, the lower row)."""
    share, remainder = divmod(len(tokens), world_size)
    if remainder:
        raise ValueError(f"balance_ranks: {len(tokens)} rows do not split over {world_size} ranks")
    loads, ranks = [0] * world_size, [[] for _ in range(world_size)]
    for row in sorted(range(len(tokens)), key=lambda r: (-tokens[r], r)):
        rank = min((r for r in range(world_size) if len(ranks[r]) < share), key=lambda r: (loads[r], r))
        ranks[rank].append(row)
        loads[rank] += tokens[row]
    return [sorted(rows) for rows in ranks]


def pack_rows(totals: Sequence[int]) -> list[list[int]]:
    """Sequences of `totals` tokens packed first-fit decreasing into forward rows as long as the longest one
    (ties: the lower index first): each row's sequences, in placement order."""
    capacity = max(totals, default=0)
    rows: list[list[int]] = []
    free: list[int] = []
    for sequence in sorted(range(len(totals)), key=lambda i: (-totals[i], i)):
        row = next((r for r, room in enumerate(free) if totals[sequence] <= room), None)
        if row is None:
            rows.append([])
            free.append(capacity)
            row = len(rows) - 1
        rows[row].append(sequence)
        free[row] -= totals[sequence]
    return rows


def padded_tokens(rows: Sequence[int], tokens: Sequence[int], packed: bool = False) -> int:
    """Tokens a forward of `rows` computes: forward rows x the longest row, with one row per sequence, or
    packed (`pack_rows`)."""
    lengths = [tokens[r] for r in rows]
    return (len(pack_rows(lengths)) if packed else len(lengths)) * max(lengths, default=0)


def prompt_groups(rows: Sequence[int], groups: Sequence[int]) -> list[list[int]]:
    """`rows` (in order) by their prompt group `groups[row]`, groups in order of first appearance."""
    by_group: dict[int, list[int]] = {}
    for row in rows:
        by_group.setdefault(groups[row], []).append(row)
    return list(by_group.values())


def shared_tokens(rows: Sequence[int], tokens: Sequence[int], prompts: Sequence[int], groups: Sequence[int]) -> int:
    """Tokens a shared-prompt forward of `rows` computes: one forward row per prompt group (its prompt once, then
    its responses; `tokens` - `prompts` is a row's response), x the longest forward row."""
    widths = [prompts[g[0]] + sum(tokens[r] - prompts[r] for r in g) for g in prompt_groups(rows, groups)]
    return len(widths) * max(widths, default=0)


def budget_shared_micro_batches(
    rows: Sequence[int], tokens: Sequence[int], prompts: Sequence[int], groups: Sequence[int], max_tokens: int
) -> list[list[int]]:
    """`rows` cut into micro-batches of whole prompt groups, each computing at most `max_tokens` tokens
    (`shared_tokens`): a group is first cut, rows in order, into parts of at most `max_tokens` (a part of one
    row may exceed it), then the parts fill micro-batches largest first (`budget_micro_batches` over parts)."""
    parts: list[list[int]] = []
    for group in prompt_groups(rows, groups):
        part: list[int] = []
        for row in group:
            if part and shared_tokens([*part, row], tokens, prompts, groups) > max_tokens:
                parts.append(part)
                part = []
            part.append(row)
        parts.append(part)
    widths = [shared_tokens(part, tokens, prompts, groups) for part in parts]
    return [
        sorted(row for p in batch for row in parts[p])
        for batch in budget_micro_batches(range(len(parts)), widths, max_tokens)
    ]


def budget_micro_batches(
    rows: Sequence[int], tokens: Sequence[int], max_tokens: int, packed: bool = False
) -> list[list[int]]:
    """`rows` cut into micro-batches of at most `max_tokens` computed tokens (`padded_tokens`; a longer row
    alone), longest rows first; each micro-batch's rows ascending. Packed, a micro-batch's forward rows are
    first-fit bins of its longest row's length, grown row by row as `pack_rows` would place them."""
    batches: list[list[int]] = []
    current: list[int] = []
    free: list[int] = []  # the current micro-batch's forward rows' room (packed)
    for row in sorted(rows, key=lambda r: (-tokens[r], r)):
        fits = next((i for i, room in enumerate(free) if tokens[row] <= room), None)
        forward_rows = (len(free) + (fits is None)) if packed else len(current) + 1
        if current and forward_rows * tokens[current[0]] > max_tokens:
            batches.append(sorted(current))
            current, free, fits = [], [], None
        if packed:
            if fits is None:  # a new forward row as long as the micro-batch's longest (first) row
                free.append(tokens[current[0]] if current else tokens[row])
                fits = len(free) - 1
            free[fits] -= tokens[row]
        current.append(row)
    if current:
        batches.append(sorted(current))
    return batches


def _split_largest(batches: list[list[int]], tokens: Sequence[int], cost: Callable[[list[int]], int]) -> None:
    """Split the micro-batch with the most computed tokens (`cost`; of those with two rows or more) into its longer
    and shorter halves, in place."""
    candidates = [i for i, b in enumerate(batches) if len(b) > 1]
    index = max(candidates, key=lambda i: (cost(batches[i]), -i))
    ordered = sorted(batches[index], key=lambda r: (-tokens[r], r))
    half = len(ordered) // 2
    batches[index : index + 1] = [sorted(ordered[:half]), sorted(ordered[half:])]


def _equal_micro_steps(plan: list[list[list[int]]], tokens: Sequence[int], cost: Callable[[list[int]], int]) -> None:
    """Split micro-batches (`_split_largest`) until every rank of `plan` has as many as the longest, in place;
    a rank holds >= that many rows when every rank holds as many rows (each micro-batch has one)."""
    steps = max(len(batches) for batches in plan)
    for batches in plan:
        while len(batches) < steps:
            _split_largest(batches, tokens, cost)


def plan_minibatch(
    tokens: Sequence[int], world_size: int, max_tokens: int, packed: bool = False
) -> list[list[list[int]]]:
    """The micro-batches (row indices of the mini-batch) of every rank: balanced ranks, token-budget
    micro-batches (of packed forward rows when `packed`), the same count on every rank (module docstring).
    `tokens`: each row's prompt + response tokens."""
    shares = balance_ranks(tokens, world_size)
    plan = [budget_micro_batches(rows, tokens, max_tokens, packed) for rows in shares]
    _equal_micro_steps(plan, tokens, lambda rows: padded_tokens(rows, tokens, packed))
    return plan


def plan_shared_minibatch(
    tokens: Sequence[int], prompts: Sequence[int], groups: Sequence[int], world_size: int, max_tokens: int
) -> list[list[list[int]]]:
    """`plan_minibatch` for shared-prompt forwards: every rank a contiguous 1/world share of the rows, cut into
    micro-batches of whole prompt groups (`budget_shared_micro_batches`), the same count on every rank.
    `prompts`: each row's prompt tokens; `groups`: each row's prompt group."""
    share = len(tokens) // world_size
    plan = [
        budget_shared_micro_batches(range(r * share, (r + 1) * share), tokens, prompts, groups, max_tokens)
        for r in range(world_size)
    ]
    _equal_micro_steps(plan, tokens, lambda rows: shared_tokens(rows, tokens, prompts, groups))
    return plan


@dataclass(frozen=True)
class Batching:
    """How a rank cuts its share of a mini-batch: `max_tokens` > 0, by that token budget over balanced ranks
    (`plan_minibatch`); 0, into contiguous micro-batches of `micro_batch_size` responses of a contiguous
    1/world share."""

    micro_batch_size: int
    max_tokens: int = 0
    packed: bool = False  # the forwards pack several sequences per row (the budget counts packed rows)
    shared: bool = False  # the forwards hold each prompt once with its responses (the budget counts those rows)

    def rank_plan(
        self,
        tokens: Sequence[int],
        rank: int,
        world_size: int,
        prompts: Sequence[int] | None = None,
        groups: Sequence[int] | None = None,
    ) -> tuple[list[int], list[list[int]], int]:
        """For a mini-batch whose rows have `tokens` (prompt + response): the rows this rank trains (ascending),
        its micro-batches as positions in those rows, and the mini-batch's micro-steps over all ranks.
        `prompts`, `groups`: each row's prompt tokens and prompt group (needed when `shared`)."""
        if self.max_tokens:
            if self.shared:
                if prompts is None or groups is None:
                    raise ValueError("Batching.rank_plan: a shared-prompt plan needs the rows' `prompts` and `groups`")
                plan = plan_shared_minibatch(tokens, prompts, groups, world_size, self.max_tokens)
            else:
                plan = plan_minibatch(tokens, world_size, self.max_tokens, self.packed)
            batches = plan[rank]
            mine = sorted(row for batch in batches for row in batch)
            position = {row: i for i, row in enumerate(mine)}
            return mine, [[position[row] for row in batch] for batch in batches], len(batches) * world_size
        share = len(tokens) // world_size
        size = self.micro_batch_size
        micro = [list(range(start, min(start + size, share))) for start in range(0, share, size)]
        return list(range(rank * share, (rank + 1) * share)), micro, len(micro) * world_size
