"""Chunked top-K logprobs vs the naive way (full [T, V] logits -> log_softmax -> gather), forward + backward.

Each side runs in its own process; its peak extra memory is the rise of the process's peak RSS over
the forward + backward (inputs allocated before). Goal: >= 10x less peak memory at T >= 4096, time no
worse than 1.1x. T = 16384 is measured for the chunked side only when the naive one cannot fit in this
machine's memory (it needs at least the logits, their log-softmax and its gradient: 3 x T x V x 4
bytes, 30 GB at T = 16384): that row records the naive side as infeasible with the bytes it needs.

    python -m bench.chunked_logprobs [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from bench.common import peak_rss_mib, print_table, run_child, write_result
from cppo_rl.learner.logprobs import chunked_token_logprobs

VOCAB, SLOTS = 151_936, 21


def naive_logprobs(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(hidden @ weight.T, dim=-1).gather(-1, ids)


def _inputs(positions: int, hidden_size: int, vocab: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(positions, hidden_size, generator=generator) / hidden_size**0.5).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=generator) / hidden_size**0.5).requires_grad_()
    ids = torch.randint(0, vocab, (positions, SLOTS), generator=generator)
    return hidden, weight, ids


def check_same_result() -> float:
    """Max abs difference of values and gradients between the two sides on a small problem."""
    hidden, weight, ids = _inputs(300, 64, 5000)
    worst = 0.0
    outputs = [naive_logprobs(hidden, weight, ids), chunked_token_logprobs(hidden, weight, ids, 1.0, 128)]
    grads = [torch.autograd.grad(out.sum(), (hidden, weight)) for out in outputs]
    worst = max(worst, float((outputs[0] - outputs[1]).detach().abs().max()))
    for a, b in zip(grads[0], grads[1], strict=True):
        worst = max(worst, float((a - b).abs().max()))
    return worst


def naive_floor_bytes(positions: int) -> int:
    """What the naive side needs at least: [T, V] float32 logits, their log-softmax and its gradient."""
    return 3 * positions * VOCAB * 4


def fits_in_memory(nbytes: int) -> bool:
    """Whether `nbytes` fit in 70% of this machine's RAM (the rest: inputs, the interpreter, other work)."""
    return nbytes < 0.7 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def child(side: str, positions: int, hidden_size: int, repeats: int) -> dict:
    """Measure one side in this process: peak extra MiB of one forward + backward, median seconds."""
    torch.manual_seed(0)
    hidden, weight, ids = _inputs(positions, hidden_size, VOCAB)
    before = peak_rss_mib()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = naive_logprobs(hidden, weight, ids) if side == "naive" else chunked_token_logprobs(hidden, weight, ids)
        out.sum().backward()
        seconds.append(time.perf_counter() - start)
        hidden.grad = weight.grad = None
        del out
    return {"peak_extra_mib": peak_rss_mib() - before, "seconds": statistics.median(seconds), "all_seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T = 1024 only, hidden 256 (under a minute)")
    parser.add_argument("--child", nargs=4, metavar=("SIDE", "T", "H", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        side, positions, hidden_size, repeats = args.child
        print(json.dumps(child(side, int(positions), int(hidden_size), int(repeats))))
        return
    difference = check_same_result()
    if difference > 1e-4:
        sys.exit(f"the two sides disagree (max abs difference {difference:.2e}); not timing them")
    # repeats per T: one at T = 16384 (about 3 minutes per forward + backward here)
    hidden_size, repeats_at = (256, {1024: 2}) if args.quick else (1024, {1024: 3, 4096: 3, 16384: 1})
    sizes = list(repeats_at)
    rows, figures = [], {}
    for positions in sizes:
        repeats, sides = repeats_at[positions], {}
        for side in ("naive", "chunked"):  # separate processes: each side's own peak
            if side == "naive" and not fits_in_memory(naive_floor_bytes(positions)):
                sides[side] = {"infeasible": True, "needs_bytes_at_least": naive_floor_bytes(positions)}
                continue
            sides[side] = run_child(
                "bench.chunked_logprobs", "--child", side, str(positions), str(hidden_size), str(repeats)
            )
        if sides["naive"].get("infeasible"):
            needs = f"infeasible (>= {sides['naive']['needs_bytes_at_least'] / 2**30:.0f} GiB)"
            chunked = sides["chunked"]
            at_least = sides["naive"]["needs_bytes_at_least"] / 2**20 / chunked["peak_extra_mib"]
            rows.append(
                [positions, needs, chunked["peak_extra_mib"], f">= {at_least:.0f}", needs, chunked["seconds"], "-"]
            )
            figures[f"T{positions}"] = {
                **sides,
                "memory_ratio": None,
                "memory_ratio_at_least": at_least,
                "time_ratio": None,
            }
            continue
        memory_ratio = sides["naive"]["peak_extra_mib"] / max(sides["chunked"]["peak_extra_mib"], 1.0)
        time_ratio = sides["chunked"]["seconds"] / sides["naive"]["seconds"]
        rows.append(
            [
                positions,
                sides["naive"]["peak_extra_mib"],
                sides["chunked"]["peak_extra_mib"],
                memory_ratio,
                sides["naive"]["seconds"],
                sides["chunked"]["seconds"],
                time_ratio,
            ]
        )
        figures[f"T{positions}"] = {**sides, "memory_ratio": memory_ratio, "time_ratio": time_ratio}
    print_table(
        f"chunked vs naive top-K logprobs, V={VOCAB}, H={hidden_size}, S={SLOTS}, fwd+bwd, fp32 "
        f"(max |difference| {difference:.1e})",
        ["T", "naive MiB", "chunked MiB", "memory ratio", "naive s", "chunked s", "time ratio"],
        rows,
    )
    measured = [figures[f"T{t}"] for t in sizes if figures[f"T{t}"]["memory_ratio"] is not None]
    last = measured[-1]  # the largest T both sides could run; beyond it only the chunked side fits at all
    met = last["memory_ratio"] >= 10 and last["time_ratio"] <= 1.1
    path = write_result(
        "chunked_logprobs" + ("_quick" if args.quick else ""),
        ratio=last["memory_ratio"],
        goal=">= 10x less peak memory at T >= 4096, time ratio <= 1.1",
        met=met,
        hidden_size=hidden_size,
        vocab=VOCAB,
        slots=SLOTS,
        max_abs_difference=difference,
        sizes=figures,
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
