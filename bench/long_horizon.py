"""Long horizons: one learner step on long-tailed response lengths: fixed micro-batches, a token budget, packing.

The real learner (DeepSpeed ZeRO-3 over gloo, two ranks in Ray actors, the CPPO loss) on the tiny Qwen3
(3.2M parameters, positions widened to the cap) trains one synthetic batch: 32 responses after a 32-token
prompt, log-normal lengths (median cap / 8) with 10% at the cap. Sides, each in fresh actors (their own
peak memory):
- fixed:  micro-batches of `learner.micro_batch_size` = 4 responses, each padded to its longest member, a
          contiguous half of each mini-batch per rank (today's default);
- budget: `learner.max_tokens_per_micro_batch` = 4 x (prompt + cap), the same worst-case micro-batch:
          rows balanced across the ranks by tokens, micro-batches filled up to the budget
          (cppo_rl/learner/micro_batches.py);
- packed: the same budget with `learner.pack_sequences`: several sequences per forward row (first-fit
          decreasing into rows of the micro-batch's longest sequence), attention kept inside each.
Reported per side: the median step seconds (after a warm-up step), seconds per real (prompt + response)
token, the share of computed tokens that is padding (from the plan), and the ranks' peak RSS.
`ratio` = fixed s/real token / the best other side's; goal >= 2 with that side's padding <= 10%.

    python -m bench.long_horizon [--quick] [--cap 2048] [--only budget|packed] [--budget TOKENS]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

from bench.common import print_table, write_result

PROMPT = 32
RESPONSES = 32
SLOTS = 5
MICRO = 4


def lengths(cap: int, count: int, seed: int = 0) -> list[int]:
    """Long-tailed response lengths: log-normal around cap / 8, every tenth at the cap, in 1..cap."""
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.exp(torch.randn(count, generator=generator) * 0.8 + math.log(cap / 8)).round().clamp(1, cap)
    drawn[: max(1, count // 10)] = cap
    return drawn[torch.randperm(count, generator=generator)].long().tolist()


def synthetic_batch(response_lengths: list[int], vocab: int, seed: int = 0):
    """A RolloutBatch of random tokens with valid mu logprobs over SLOTS-token sets and GRPO-like advantages."""
    from cppo_rl.batch import RolloutBatch

    generator = torch.Generator().manual_seed(seed)
    n, width = len(response_lengths), max(response_lengths)
    lengths_tensor = torch.tensor(response_lengths)
    mask = torch.arange(width).expand(n, width) < lengths_tensor.unsqueeze(-1)
    topk_ids = torch.stack([torch.randperm(vocab, generator=generator)[:SLOTS] for _ in range(n * width)])
    topk_ids = topk_ids.view(n, width, SLOTS)
    logits = torch.randn(n, width, SLOTS, generator=generator)
    topk_logprobs = torch.log_softmax(logits, dim=-1) - 0.1  # the set holds most, not all, of the mass
    topk_ids = torch.where(mask.unsqueeze(-1), topk_ids, torch.full_like(topk_ids, -1))
    topk_logprobs = torch.where(mask.unsqueeze(-1), topk_logprobs, torch.full_like(topk_logprobs, -float("inf")))
    response_ids = torch.where(mask, topk_ids[..., 0], torch.zeros_like(topk_ids[..., 0]))
    return RolloutBatch(
        prompt_ids=[torch.randint(0, vocab, (PROMPT,), generator=generator).tolist() for _ in range(n)],
        response_ids=response_ids,
        response_mask=mask,
        rollout_logprobs=torch.where(mask, topk_logprobs[..., 0], torch.zeros(())),
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
        group_index=torch.arange(n) // 4,
        finish_reason=["length" if length == width else "stop" for length in response_lengths],
        policy_version=0,
        advantages=torch.randn(n, generator=generator),
    )


def _peak_rss_mib(_worker) -> float:
    """Run inside a learner actor (`__ray_call__`): its peak resident memory, MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def computed_tokens(batching, tokens: list[int], world_size: int) -> int:
    """Tokens the forwards compute under `batching`: per micro-batch, forward rows x its longest row."""
    from cppo_rl.learner.micro_batches import padded_tokens

    total = 0
    for rank in range(world_size):
        rows, micro, _ = batching.rank_plan(tokens, rank, world_size)
        total += sum(padded_tokens([rows[i] for i in batch], tokens, batching.packed) for batch in micro)
    return total


def measure(model_dir: str, batch, max_tokens: int, pack: bool, repeats: int) -> dict:
    """One side in fresh learner actors: median step seconds and each rank's peak MiB."""
    from cppo_rl.algorithms import default_config
    from cppo_rl.learner.worker import LearnerConfig, LearnerGroup

    config = LearnerConfig(
        model_path=model_dir,
        responses_per_step=batch.num_responses,
        micro_batch_size=MICRO,
        max_tokens_per_micro_batch=max_tokens,
        pack_sequences=pack,
        lr=1e-6,
    )
    learner = LearnerGroup(config, "cppo", default_config("cppo"), 2, num_cpus_per_rank=1)
    try:
        seconds = []
        for _ in range(repeats + 1):  # the first step warms up
            start = time.perf_counter()
            learner.train_on_batch(batch)
            seconds.append(time.perf_counter() - start)
        peaks = ray.get([w.__ray_call__.remote(_peak_rss_mib) for w in learner.workers])
    finally:
        learner.shutdown()
    return {"seconds": statistics.median(seconds[1:]), "all_seconds": seconds[1:], "peak_rss_mib": peaks}


def main(argv: list[str] | None = None) -> None:
    from cppo_rl.data.tiny_model import TinyModelConfig, build_tiny_model
    from cppo_rl.learner.micro_batches import Batching

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a cap of 256 tokens, one repeat")
    parser.add_argument("--cap", type=int, default=2048, help="the longest response, tokens")
    parser.add_argument(
        "--only", choices=("budget", "packed"), help="one side (a cap too long for the others), to its own result file"
    )
    parser.add_argument("--budget", type=int, help="the token budget (default: 4 x (prompt + cap))")
    args = parser.parse_args(argv)
    cap = 256 if args.quick else args.cap
    repeats = 1 if args.quick else 2
    response_lengths = lengths(cap, RESPONSES)
    tokens = [PROMPT + n for n in response_lengths]
    real = sum(tokens)
    budget = args.budget or MICRO * (PROMPT + cap)
    sides = {"fixed": (0, False), "budget": (budget, False), "packed": (budget, True)}
    if args.only:
        sides = {args.only: sides[args.only]}
    with tempfile.TemporaryDirectory() as scratch:
        model_config = TinyModelConfig(max_position_embeddings=PROMPT + cap)
        model_dir = str(build_tiny_model(model_config, Path(scratch) / "model"))
        batch = synthetic_batch(response_lengths, vocab=128)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            results = {name: measure(model_dir, batch, *side, repeats) for name, side in sides.items()}
        finally:
            ray.shutdown()
    for name, side in sides.items():
        computed = computed_tokens(Batching(MICRO, *side), tokens, 2)
        results[name].update(
            computed_tokens=computed,
            padding_fraction=1 - real / computed,
            s_per_real_token=results[name]["seconds"] / real,
        )
    best = min((name for name in results if name != "fixed"), key=lambda name: results[name]["s_per_real_token"])
    ratio = results["fixed"]["s_per_real_token"] / results[best]["s_per_real_token"] if "fixed" in results else None
    print_table(
        f"one learner step, 2 ZeRO-3 ranks, {RESPONSES} responses (cap {cap}, {real} real tokens); "
        + (f"fixed / {best} s per real token = {ratio:.3g}" if ratio else f"the {best} side alone, budget {budget}"),
        ["side", "s/step", "us/real token", "computed tokens", "padding", "peak MiB (ranks)"],
        [
            [
                name,
                r["seconds"],
                r["s_per_real_token"] * 1e6,
                r["computed_tokens"],
                r["padding_fraction"],
                " / ".join(f"{p:.0f}" for p in r["peak_rss_mib"]),
            ]
            for name, r in results.items()
        ],
    )
    name = "long_horizon" + ("_quick" if args.quick else f"_{cap}_{args.only}" if args.only else "")
    path = write_result(
        name,
        ratio=ratio,
        goal="fixed micro-batches' learner seconds per real token / the best new path's >= 2, padding <= 10%",
        met=ratio is not None and ratio >= 2 and results[best]["padding_fraction"] <= 0.10,
        best_side=best,
        budget=budget,
        cap=cap,
        response_lengths=response_lengths,
        real_tokens=real,
        sides=results,
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
