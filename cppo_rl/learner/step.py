"""One learner step's tensor work: the batch cut into per-rank shards, the micro-step (log pi at mu's
token sets, the policy loss, backward) and the metrics reduced over ranks.

Normalisation is global: every rank sees the whole batch, so a mini-batch's token and sequence counts
are known without communication; each micro-batch loss is its *sum* over those global counts,
multiplied by the world size to undo DeepSpeed's averaging across ranks and backpropagated without
DeepSpeed's division by the accumulation steps. The gradient is then the exact gradient of the
mini-batch loss whatever the micro-batch size or world size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cppo_rl.algorithms import LossNormaliser, PolicyLossInputs, local_counts
from cppo_rl.algorithms.divergence import topk_tv
from cppo_rl.batch import RolloutBatch


@dataclass
class Shard:
    """One rank's part of one mini-batch, and the mini-batch's global counts."""

    batch: RolloutBatch
    normaliser: LossNormaliser
    first: bool  # the batch's first mini-batch (the weights still equal the rollout's)
    anchor: tuple[torch.Tensor, torch.Tensor] | None = field(default=None)


def split_shards(batch: RolloutBatch, updates: int, rank: int, world_size: int, horizon) -> list[Shard]:
    """`updates` contiguous mini-batches of `batch`, each cut into `world_size` contiguous shares; this
    rank's share of each. `horizon`: the loss config's (an int, or None for the mini-batch's padded width)."""
    size = batch.num_responses // updates
    share = size // world_size
    shards = []
    for update in range(updates):
        minibatch = batch.select(range(update * size, (update + 1) * size))
        tokens, sequences = local_counts(minibatch.response_mask)
        # seq-mean-token-sum-norm's horizon: the loss config's constant, else the mini-batch's padded width
        # (one width for every micro-batch and rank: micro-batches are trimmed to their own longest response)
        width = None if isinstance(horizon, int) else minibatch.response_mask.shape[1]
        normaliser = LossNormaliser(num_tokens=tokens, num_sequences=sequences, horizon=width)
        mine = minibatch.select(range(rank * share, (rank + 1) * share))
        shards.append(Shard(batch=mine, normaliser=normaliser, first=update == 0))
    return shards


def set_logprobs(
    engine, micro: RolloutBatch, temperature: float, return_entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """float32 [B, T, S] log pi at `micro.topk_ids` (slot 0: the sampled token), -inf at unused slots;
    with `return_entropy` also the float32 [valid tokens] entropy (nats) of pi at each valid response token.
    `engine`: the DeepSpeed engine around a cppo_rl.learner.logprobs.LogprobPolicy."""
    device = engine.device
    prompts = [len(p) for p in micro.prompt_ids]
    lengths = micro.response_lengths.tolist()
    width = max(p + r for p, r in zip(prompts, lengths, strict=True))
    input_ids = torch.zeros(len(prompts), width, dtype=torch.int64)
    attention = torch.zeros(len(prompts), width, dtype=torch.int64)
    for row, (prompt, length) in enumerate(zip(prompts, lengths, strict=True)):
        input_ids[row, :prompt] = torch.tensor(micro.prompt_ids[row])
        input_ids[row, prompt : prompt + length] = micro.response_ids[row, :length]
        attention[row, : prompt + length] = 1
    valid = micro.response_mask
    rows, columns = valid.nonzero(as_tuple=True)
    positions = torch.tensor(prompts)[rows] - 1 + columns  # the hidden state that predicts token t
    result = engine(
        input_ids.to(device),
        attention.to(device),
        rows.to(device),
        positions.to(device),
        micro.topk_ids[valid].to(device),
        temperature,
        return_entropy=return_entropy,
    )
    logprobs, entropy = result if return_entropy else (result, None)
    out = torch.full(micro.topk_ids.shape, -float("inf"), dtype=torch.float32, device=device)
    out[valid.to(device)] = logprobs
    out = out.cpu() if device.type != "cpu" else out
    return (out, entropy.detach().cpu()) if return_entropy else out


@dataclass(frozen=True)
class StepContext:
    """What a micro-step needs besides its data: the DeepSpeed engine, the loss and its config, the rank
    count, the rollout temperature and the router's aux-loss weight over the mini-batch's micro-steps."""

    engine: object
    loss_fn: object
    loss_config: object
    world_size: int
    temperature: float
    router_aux_coef: float
    micro_steps_total: int  # micro-batches per mini-batch, over all ranks


def micro_step(
    context: StepContext, micro: RolloutBatch, shard: Shard, anchor: tuple[torch.Tensor, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """Forward, loss, backward and DeepSpeed's step (which applies the update at the mini-batch's last
    micro-batch) of one micro-batch; returns its metrics as [value x weight, weight] pairs to sum."""
    engine = context.engine
    logprobs, entropy = set_logprobs(engine, micro, context.temperature, return_entropy=True)
    mu_sampled, mu_set = anchor if anchor is not None else (micro.rollout_logprobs, micro.topk_logprobs)
    inputs = PolicyLossInputs(
        logprobs=logprobs[..., 0],
        rollout_logprobs=mu_sampled,
        advantages=micro.advantages,
        response_mask=micro.response_mask,
        topk_logprobs=logprobs,
        rollout_topk_logprobs=mu_set,
    )
    output = context.loss_fn(inputs, context.loss_config, shard.normaliser)
    loss, router = output.loss, engine.module.router
    if router is not None and context.router_aux_coef:  # the mini-batch's mean aux loss, over micro-steps
        loss = loss + context.router_aux_coef * router.aux_loss / context.micro_steps_total
    engine.backward(loss * context.world_size, scale_wrt_gas=False)
    engine.step()
    tokens = micro.response_mask.sum().float()
    reported = {**output.metrics, **(router.metrics() if router is not None else {})}
    metrics = {
        name: torch.stack([value.detach().float() * tokens, tokens])
        for name, value in reported.items()
        if torch.isfinite(value)
    }
    metrics["entropy"] = torch.stack([entropy.sum(), tokens])
    # summed over micro-batches and ranks, then divided by the update count: the mean mini-batch loss
    metrics["loss"] = torch.stack([output.loss.detach().float(), torch.tensor(1.0 / context.micro_steps_total)])
    if shard.first:
        valid = micro.response_mask
        gap = (logprobs[..., 0].detach() - micro.rollout_logprobs).abs()[valid].sum()
        tv = topk_tv(micro.topk_logprobs, logprobs.detach())[valid].sum()
        metrics["rollout_learner_logprob_mismatch"] = torch.stack([gap, tokens])
        metrics["rollout_learner_topk_tv"] = torch.stack([tv, tokens])
    return metrics


def reduce_metrics(totals: dict[str, torch.Tensor], world_size: int) -> dict[str, float]:
    """Token-weighted means over all ranks (one all-reduce of the [value x weight, weight] pairs)."""
    import torch.distributed as dist

    names = sorted(totals)
    stacked = torch.stack([totals[name] for name in names]) if names else torch.zeros(0, 2)
    if world_size > 1:
        dist.all_reduce(stacked)
    return {
        name: float(value / count) for name, (value, count) in zip(names, stacked.tolist(), strict=True) if count > 0
    }
