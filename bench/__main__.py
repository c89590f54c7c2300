"""`python -m bench [NAME ...] [FLAG ...]`: run the named benchmarks (default: all) one after another.

Everything from the first argument that starts with "-" on is handed to each benchmark as it is, values included
(`python -m bench trl_compare --models 25m`).
"""

from __future__ import annotations

import importlib
import json
import sys
import time

from bench.common import RESULTS, machine

BENCHMARKS = (
    "chunked_logprobs",
    "policy_mask_cost",
    "weight_sync",
    "rollout_throughput",
    "scaling",
    "trl_compare",
    "driver_bytes",
    "async_pipeline",
    "long_horizon",
)


def split_arguments(args: list[str]) -> tuple[list[str], list[str]]:
    """(benchmark names, flags for each): the names before the first "-" argument (all when none), the rest."""
    first_flag = next((i for i, arg in enumerate(args) if arg.startswith("-")), len(args))
    return args[:first_flag] or list(BENCHMARKS), args[first_flag:]


def main() -> None:
    names, flags = split_arguments(sys.argv[1:])
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    seconds = {}
    for name in names:
        started = time.perf_counter()
        importlib.import_module(f"bench.{name}").main(flags)
        seconds[name] = round(time.perf_counter() - started, 1)
    total = sum(seconds.values())
    print(
        "\nwall seconds: "
        + ", ".join(f"{name} {value:.0f}" for name, value in seconds.items())
        + f"; total {total:.0f}"
    )
    if set(names) == set(BENCHMARKS):  # the whole suite: record how long `make bench` takes
        suite = "suite" + ("_quick" if "--quick" in flags else "")
        (RESULTS / f"{suite}.json").write_text(
            json.dumps({"name": suite, "seconds": seconds, "total_seconds": total, "machine": machine()}, indent=2)
        )


if __name__ == "__main__":
    main()
