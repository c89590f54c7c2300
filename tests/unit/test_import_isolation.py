"""The algorithm core is pure torch: importing it must not pull in the distributed stack."""

import subprocess
import sys

HEAVY_MODULES = ("ray", "vllm", "deepspeed", "transformers", "hydra", "wandb")


def test_algorithm_core_imports_no_heavy_stack():
    code = (
        "import sys\n"
        "from cppo_rl.algorithms import cppo_mask, topk_tv\n"
        f"loaded = [m for m in {HEAVY_MODULES!r} if m in sys.modules]\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"cppo_rl.algorithms imported {result.stdout.strip()}"
