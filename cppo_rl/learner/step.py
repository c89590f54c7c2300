"""One learner step's tensor work: the batch cut into per-rank shards, the micro-step (log pi at mu's
token sets, the policy loss, backward) and the metrics reduced over ranks.

Normalisation is global: every rank sees the whole batch, so a mini-batch's token and sequence counts
are known without communication; each micro-batch loss is its *sum* over those global counts,
multiplied by the world size to undo DeepSpeed's averaging across ranks and backpropagated without
DeepSpeed's division by the accumulation steps. The gradient is then the exact gradient of the
mini-batch loss whatever the micro-batch size or world size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from cppo_rl.algorithms import LossNormaliser, PolicyLossInputs
from cppo_rl.algorithms.divergence import topk_tv
from cppo_rl.batch import RolloutBatch
from cppo_rl.learner.micro_batches import Batching, pack_rows


@dataclass
class Shard:
    """One rank's part of one mini-batch, its micro-batches, and the mini-batch's global counts."""

    batch: RolloutBatch
    normaliser: LossNormaliser
    first: bool  # the batch's first mini-batch (the weights still equal the rollout's)
    micro_batches: list[list[int]]  # rows of `batch` per micro-step, in order
    micro_steps_total: int  # the mini-batch's micro-steps over all ranks
    anchor: tuple[torch.Tensor, torch.Tensor] | None = field(default=None)


def minibatch_normaliser(lengths: torch.Tensor, horizon) -> LossNormaliser:
    """The global normaliser of a mini-batch from its responses' lengths (int [M]): valid tokens, responses
    with >= 1 token and, unless `horizon` is the loss config's constant (an int), seq-mean-token-sum-norm's
    horizon: the mini-batch's padded width, its longest response (one width for every micro-batch and rank:
    micro-batches are trimmed to their own longest response)."""
    width = None if isinstance(horizon, int) else (int(lengths.max()) if lengths.numel() else 0)
    return LossNormaliser(num_tokens=int(lengths.sum()), num_sequences=int((lengths > 0).sum()), horizon=width)


def split_shards(
    batch: RolloutBatch, updates: int, rank: int, world_size: int, horizon, batching: Batching
) -> list[Shard]:
    """`updates` contiguous mini-batches of `batch`, each shared over `world_size` ranks by `batching`
    (cppo_rl/learner/micro_batches.py); this rank's shard of each. `horizon`: the loss config's (an int, or
    None for the mini-batch's padded width)."""
    size = batch.num_responses // updates
    shards = []
    for update in range(updates):
        minibatch = batch.select(range(update * size, (update + 1) * size))
        normaliser = minibatch_normaliser(minibatch.response_lengths, horizon)
        prompts = [len(p) for p in minibatch.prompt_ids]
        tokens = (minibatch.response_lengths + torch.tensor(prompts)).tolist()
        groups = minibatch.group_index.tolist()
        rows, micro_batches, total = batching.rank_plan(tokens, rank, world_size, prompts, groups)
        shards.append(Shard(minibatch.select(rows), normaliser, update == 0, micro_batches, total))
    return shards


def to_device(micro: RolloutBatch, device: torch.device) -> RolloutBatch:
    """A shallow copy of `micro` whose tensors live on `device` (one host-to-device copy each; non_blocking
    is safe in that direction: the batch's host tensors are not written again while the copy runs)."""
    moved = copy.copy(micro)  # no __post_init__: the shapes were checked when the batch was made
    for name in ("response_ids", "response_mask", "rollout_logprobs", "topk_ids", "topk_logprobs", "advantages"):
        tensor = getattr(micro, name)
        if tensor is not None:
            setattr(moved, name, tensor.to(device, non_blocking=True))
    return moved


def model_inputs(micro: RolloutBatch, pack: bool, share_prompts: bool = False) -> dict[str, torch.Tensor]:
    """The policy's inputs for `micro` (host tensors): int64 input_ids [R, L], attention_mask [R, L] (1 at real
    tokens), position_ids [R, L] when packed or shared, and for each valid response token (micro.response_mask's
    nonzero order) the row and position of the hidden state that predicts it. Unpacked: one right-padded
    sequence per row. Packed (`pack_rows`): several sequences per row, positions restarting at 0 at each
    (trailing padding too), so attention never crosses a sequence. Shared (`shared_prompt_inputs`): each
    prompt group's prompt once per row, followed by its responses, with a block attention mask."""
    if share_prompts:
        return shared_prompt_inputs(micro)
    prompts = [len(p) for p in micro.prompt_ids]
    lengths = micro.response_lengths.tolist()
    totals = [p + r for p, r in zip(prompts, lengths, strict=True)]
    layout = pack_rows(totals) if pack else [[i] for i in range(len(totals))]
    width = max(totals)
    input_ids = torch.zeros(len(layout), width, dtype=torch.int64)
    attention = torch.zeros(len(layout), width, dtype=torch.int64)
    position_ids = torch.zeros(len(layout), width, dtype=torch.int64)
    row_of, start_of = torch.zeros(len(totals), dtype=torch.int64), torch.zeros(len(totals), dtype=torch.int64)
    for row, sequences in enumerate(layout):
        offset = 0
        for i in sequences:
            prompt, length = prompts[i], lengths[i]
            input_ids[row, offset : offset + prompt] = torch.tensor(micro.prompt_ids[i])
            input_ids[row, offset + prompt : offset + totals[i]] = micro.response_ids[i, :length]
            attention[row, offset : offset + totals[i]] = 1
            position_ids[row, offset : offset + totals[i]] = torch.arange(totals[i])
            row_of[i], start_of[i] = row, offset
            offset += totals[i]
        position_ids[row, offset:] = torch.arange(width - offset)  # the padding: a sequence of its own
    sequences, columns = micro.response_mask.nonzero(as_tuple=True)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "rows": row_of[sequences],
        # the hidden state that predicts response token t: the one at its sequence's prompt end - 1 + t
        "positions": start_of[sequences] + torch.tensor(prompts)[sequences] - 1 + columns,
    }
    if pack:
        inputs["position_ids"] = position_ids
    return inputs


def shared_prompt_inputs(micro: RolloutBatch) -> dict[str, torch.Tensor]:
    """`model_inputs` with each prompt group of `micro` computed once: forward row f holds group f's prompt, then
    each of its responses in turn, positions continuing from the prompt's end in every response. `branch` (int64
    [R, L]: 0 the prompt, j the row's j-th response, -1 padding) is what the shared-prompt attention
    (`shared_prefix.py`) needs: a prompt token sees the prompt's earlier tokens, a response token the whole prompt
    and its own response's earlier tokens, never another response. Each response's logprobs are then those of its
    own sequence alone, and the prompt's share of the forward and backward is computed once instead of once per
    sample."""
    lengths = micro.response_lengths.tolist()
    # a row per prompt group (as the token-budget plan counts them: micro_batches.shared_tokens), whose samples
    # share their prompt's tokens
    families: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for i, (group, prompt) in enumerate(zip(micro.group_index.tolist(), micro.prompt_ids, strict=True)):
        families.setdefault((group, tuple(prompt)), []).append(i)
    widths = [len(prompt) + sum(lengths[i] for i in members) for (_, prompt), members in families.items()]
    width = max(widths)
    input_ids = torch.zeros(len(families), width, dtype=torch.int64)
    position_ids = torch.zeros(len(families), width, dtype=torch.int64)
    branch = torch.full((len(families), width), -1, dtype=torch.int64)  # 0: prompt, j > 0: response j, -1: padding
    start_of = torch.zeros(len(lengths), dtype=torch.int64)  # where each response starts in its row
    row_of = torch.zeros(len(lengths), dtype=torch.int64)
    prompt_of = torch.zeros(len(lengths), dtype=torch.int64)
    for row, ((_, prompt), members) in enumerate(families.items()):
        p = len(prompt)
        input_ids[row, :p], position_ids[row, :p], branch[row, :p] = torch.tensor(prompt), torch.arange(p), 0
        offset = p
        for j, i in enumerate(members, start=1):
            length = lengths[i]
            input_ids[row, offset : offset + length] = micro.response_ids[i, :length]
            position_ids[row, offset : offset + length] = torch.arange(p, p + length)
            branch[row, offset : offset + length] = j
            row_of[i], start_of[i], prompt_of[i] = row, offset, p
            offset += length
        position_ids[row, offset:] = torch.arange(width - offset)
    sequences, columns = micro.response_mask.nonzero(as_tuple=True)
    # response token t is predicted by its response's token t - 1, the first one by the prompt's last token
    positions = torch.where(columns == 0, prompt_of[sequences] - 1, start_of[sequences] + columns - 1)
    return {
        "input_ids": input_ids,
        "attention_mask": (branch >= 0).to(torch.int64),
        "rows": row_of[sequences],
        "positions": positions,
        "position_ids": position_ids,
        "branch": branch,
    }


def set_logprobs(
    engine,
    micro: RolloutBatch,
    temperature: float,
    return_entropy: bool = False,
    device_mask=None,
    pack=False,
    share_prompts=False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """float32 [B, T, S] log pi at `micro.topk_ids` (slot 0: the sampled token), -inf at unused slots;
    with `return_entropy` also the float32 [valid tokens] entropy (nats) of pi at each valid response token.
    Both on the engine's device. `engine`: the DeepSpeed engine around a cppo_rl.learner.logprobs.LogprobPolicy;
    `micro`: host tensors (the inputs are built there and copied once); `device_mask`: `micro.response_mask`
    already on the device, if the caller has it; `pack`: several sequences per forward row, `share_prompts`: each
    prompt once per row with its responses (`model_inputs`).
    The result is per sequence either way, so every per-sequence quantity downstream (CPPO's prefix sums,
    the loss's normalisers) sees one sequence per row."""
    device = engine.device
    valid = micro.response_mask
    inputs = {name: t.to(device, non_blocking=True) for name, t in model_inputs(micro, pack, share_prompts).items()}
    result = engine(
        inputs["input_ids"],
        inputs["attention_mask"],
        inputs["rows"],
        inputs["positions"],
        micro.topk_ids[valid].to(device, non_blocking=True),
        temperature,
        return_entropy=return_entropy,
        position_ids=inputs.get("position_ids"),
        branch=inputs.get("branch"),
    )
    logprobs, entropy = result if return_entropy else (result, None)
    out = torch.full(micro.topk_ids.shape, -float("inf"), dtype=torch.float32, device=device)
    out[device_mask if device_mask is not None else valid.to(device, non_blocking=True)] = logprobs
    return (out, entropy.detach()) if return_entropy else out


@torch.no_grad()
def batch_logprobs(engine, batch: RolloutBatch, micro_batch_size: int, temperature: float) -> torch.Tensor:
    """float32 [N, T, S] log pi at `batch.topk_ids` with the current weights, on the engine's device, computed
    in micro-batches (eval mode; every rank computes the whole batch: ZeRO-3 forwards are collective)."""
    engine.eval()
    width = batch.response_ids.shape[1]
    pieces = [
        set_logprobs(engine, batch.select(range(s, min(s + micro_batch_size, batch.num_responses))), temperature)
        for s in range(0, batch.num_responses, micro_batch_size)
    ]
    return torch.cat([torch.nn.functional.pad(p, (0, 0, 0, width - p.shape[1]), value=-float("inf")) for p in pieces])


@dataclass(frozen=True)
class StepContext:
    """What a micro-step needs besides its data: the DeepSpeed engine, the loss and its config, the rank
    count, the rollout temperature, the router's aux-loss weight and the forward rows' layout."""

    engine: object
    loss_fn: object
    loss_config: object
    world_size: int
    temperature: float
    router_aux_coef: float
    pack_sequences: bool = False  # several sequences per forward row (`model_inputs`)
    share_prompts: bool = False  # each prompt once per forward row, with its responses (`model_inputs`)


def micro_step(
    context: StepContext, micro: RolloutBatch, shard: Shard, anchor: tuple[torch.Tensor, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """Forward, loss, backward and DeepSpeed's step (which applies the update at the mini-batch's last
    micro-batch) of one micro-batch (host tensors, copied to the engine's device once); returns its metrics
    as [value x weight, weight] pairs to sum, float32 tensors on the device (no host sync)."""
    engine = context.engine
    on_device = to_device(micro, engine.device)
    valid = on_device.response_mask
    logprobs, entropy = set_logprobs(
        engine,
        micro,
        context.temperature,
        return_entropy=True,
        device_mask=valid,
        pack=context.pack_sequences,
        share_prompts=context.share_prompts,
    )
    mu_sampled, mu_set = anchor if anchor is not None else (on_device.rollout_logprobs, on_device.topk_logprobs)
    inputs = PolicyLossInputs(
        logprobs=logprobs[..., 0],
        rollout_logprobs=mu_sampled,
        advantages=on_device.advantages,
        response_mask=valid,
        topk_logprobs=logprobs,
        rollout_topk_logprobs=mu_set,
    )
    output = context.loss_fn(inputs, context.loss_config, shard.normaliser)
    loss, router = output.loss, engine.module.router
    if router is not None and context.router_aux_coef:  # the mini-batch's mean aux loss, over micro-steps
        loss = loss + context.router_aux_coef * router.aux_loss / shard.micro_steps_total
    engine.backward(loss * context.world_size, scale_wrt_gas=False)
    engine.step()
    tokens = valid.sum().float()
    zero = torch.zeros((), device=tokens.device)
    reported = {**output.metrics, **(router.metrics() if router is not None else {})}
    metrics = {}
    for name, value in reported.items():  # a non-finite value weighs 0 (no host sync to test it here)
        value = value.detach().float()
        finite = torch.isfinite(value)
        metrics[name] = torch.stack([torch.where(finite, value, zero) * tokens, torch.where(finite, tokens, zero)])
    metrics["entropy"] = torch.stack([entropy.sum(), tokens])
    # summed over micro-batches and ranks, then divided by the update count: the mean mini-batch loss
    metrics["loss"] = torch.stack(
        [output.loss.detach().float(), torch.full_like(tokens, 1.0 / shard.micro_steps_total)]
    )
    # the drift from the sampler, whatever the method masks with: top-K TV between mu and the current pi
    tv = topk_tv(on_device.topk_logprobs, logprobs.detach())[valid].sum()
    metrics["topk_tv"] = torch.stack([tv, tokens])
    if shard.first:
        gap = (logprobs[..., 0].detach() - on_device.rollout_logprobs).abs()[valid].sum()
        metrics["rollout_learner_logprob_mismatch"] = torch.stack([gap, tokens])
        metrics["rollout_learner_topk_tv"] = torch.stack([tv, tokens])
        # the first mini-batch trains on the weights that sampled it: what its trust region masks there, the
        # engine/learner numerical mismatch alone masked (bf16 kernels can spend CPPO's prefix budget by themselves)
        for name in ("masked_frac", "masked_by_prefix_frac"):
            if name in metrics:
                metrics[f"mismatch_{name}"] = metrics[name]
    return metrics


def reduce_metrics(
    totals: dict[str, torch.Tensor], world_size: int, device: torch.device | None = None
) -> dict[str, float]:
    """Token-weighted means over all ranks: one all-reduce of the [value x weight, weight] pairs, on `device`
    (the learner's; NCCL has no CPU backend), then one copy of the results to the host.
    `device`: where the pairs live (default: the first pair's device)."""
    import torch.distributed as dist

    names = sorted(totals)
    if device is None:
        device = totals[names[0]].device if names else torch.device("cpu")
    stacked = torch.stack([totals[name].to(device) for name in names]) if names else torch.zeros(0, 2, device=device)
    if world_size > 1:
        dist.all_reduce(stacked)
    return {name: value / count for name, (value, count) in zip(names, stacked.tolist(), strict=True) if count > 0}
