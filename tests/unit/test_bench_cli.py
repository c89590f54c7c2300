"""`python -m bench`'s arguments: names first, then flags handed over whole (values included)."""

from __future__ import annotations

from bench.__main__ import BENCHMARKS, split_arguments


def test_flag_values_stay_with_their_flags():
    assert split_arguments(["trl_compare", "--models", "25m"]) == (["trl_compare"], ["--models", "25m"])


def test_no_names_means_every_benchmark():
    assert split_arguments(["--quick"]) == (list(BENCHMARKS), ["--quick"])
    assert split_arguments([]) == (list(BENCHMARKS), [])


def test_several_names_then_flags():
    assert split_arguments(["scaling", "weight_sync", "--quick"]) == (["scaling", "weight_sync"], ["--quick"])
