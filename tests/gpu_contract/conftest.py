"""The GPU path's contracts, checked on the CPU machine (docs/gpu.md): every test in this folder is
marked `gpu_contract` (`pytest -m gpu_contract` runs them; `make test` runs them with the rest)."""

from __future__ import annotations

import pathlib

import pytest

HERE = pathlib.Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in pathlib.Path(item.fspath).parents:
            item.add_marker(pytest.mark.gpu_contract)
