"""Scaling: learner step time and peak memory as the response length doubles and as the batch doubles.

One learner step on the tiny Qwen3 (3.2M parameters): for every micro-batch of 8 responses, the
chunked logprob forward (sampled token + top-20), Top-K TV, the CPPO mask and loss, backward; then
one AdamW step. Each size runs in its own process (its own peak RSS). Two sweeps:
  length: responses of 64, 128, ..., 1024 tokens at 32 responses per step
  batch:  8, 16, 32, 64 responses (prompts x samples) per step at 128 tokens
For each sweep, a least-squares fit of log(seconds) = a + b log(tokens per step) gives the exponent
b: 1 is linear in the work. Goal: b <= 1.1 in both sweeps (attention is quadratic in length, so the
length sweep may exceed 1 once attention dominates the tiny model's cost).

    python -m bench.scaling [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from bench.common import peak_rss_mib, print_table, run_child, write_result
from bench.policy_mask_cost import MODELS, build, micro_batch, policy_loss

MICRO_BATCH = 8
TINY = "tiny (3.2M)"


def child(responses: int, length: int, repeats: int) -> dict:
    """Median seconds of one learner step over `responses` x `length` tokens, and this process's peak MiB."""
    torch.manual_seed(0)
    fields = MODELS[TINY][0]
    model = build(fields)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    micro_batches = [
        micro_batch(fields["vocab_size"], MICRO_BATCH, 32, length) for _ in range(responses // MICRO_BATCH)
    ]
    before = peak_rss_mib()
    seconds = []
    for _ in range(repeats + 1):  # the first step warms up
        start = time.perf_counter()
        for batch in micro_batches:
            policy_loss(model(*batch["model"]), batch, length).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    return {
        "seconds": statistics.median(seconds[1:]),
        "all_seconds": seconds[1:],
        "peak_mib": peak_rss_mib(),
        "peak_rise_mib": peak_rss_mib() - before,
    }


def exponent(work: list[float], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) against log(work)."""
    xs, ys = [math.log(w) for w in work], [math.log(s) for s in seconds]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum((x - mean_x) ** 2 for x in xs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="lengths 64-256 and batches 8-32, 1 repeat")
    parser.add_argument(
        "--child", nargs=3, type=int, metavar=("RESPONSES", "LENGTH", "REPEATS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    repeats = 1 if args.quick else 3
    sweeps = {
        "length": [(32, length) for length in ((64, 128, 256) if args.quick else (64, 128, 256, 512, 1024))],
        "batch": [(responses, 128) for responses in ((8, 16, 32) if args.quick else (8, 16, 32, 64))],
    }
    rows, figures, exponents = [], {}, {}
    for sweep, sizes in sweeps.items():
        points = []
        for responses, length in sizes:
            result = run_child("bench.scaling", "--child", str(responses), str(length), str(repeats))
            points.append({"responses": responses, "length": length, "tokens": responses * length, **result})
        exponents[sweep] = exponent([p["tokens"] for p in points], [p["seconds"] for p in points])
        for previous, point in zip([None, *points], points, strict=False):
            growth = point["seconds"] / previous["seconds"] if previous else "-"
            rows.append(
                [
                    sweep,
                    point["responses"],
                    point["length"],
                    point["tokens"],
                    point["seconds"],
                    growth,
                    point["peak_mib"],
                ]
            )
        figures[sweep] = points
    print_table(
        "learner step (tiny Qwen3, micro-batch 8, chunked logprobs + CPPO loss + AdamW), one process per size",
        ["sweep", "responses", "length", "tokens", "step s", "x previous", "peak MiB"],
        rows,
    )
    print("\nexponent b of seconds ~ tokens^b: " + ", ".join(f"{k} {v:.2f}" for k, v in exponents.items()))
    worst = max(exponents.values())
    path = write_result(
        "scaling" + ("_quick" if args.quick else ""),
        ratio=worst,
        goal="time grows at most linearly with the tokens per step: fitted exponent b <= 1.1 in both sweeps",
        met=worst <= 1.1,
        exponents=exponents,
        sweeps=figures,
        threads=torch.get_num_threads(),
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
