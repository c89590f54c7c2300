"""`python -m bench [NAME ...] [--quick]`: run the named benchmarks (default: all) one after another."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ("chunked_logprobs", "policy_mask_cost", "weight_sync", "rollout_throughput", "scaling", "trl_compare")


def main() -> None:
    names = [a for a in sys.argv[1:] if not a.startswith("-")] or list(BENCHMARKS)
    flags = [a for a in sys.argv[1:] if a.startswith("-")]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    for name in names:
        importlib.import_module(f"bench.{name}").main(flags)


if __name__ == "__main__":
    main()
