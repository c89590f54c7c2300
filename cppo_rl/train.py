"""`python -m cppo_rl.train [overrides]`: the main job, a Hydra app over conf/.

Examples: `python -m cppo_rl.train algorithm=dppo trainer.total_steps=20`,
`python -m cppo_rl.train --cfg job` (print the resolved config), `--multirun algorithm=cppo,dppo`,
`python -m cppo_rl.train experiment=qwen3_8b_base --plan-only` (the GPU memory plan, nothing started).
The last line printed is the run directory. SIGINT / SIGTERM checkpoint and stop after the current
step (exit status 128 + the signal); `trainer.resume=auto` with the same run directory continues.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cppo_rl.config import TrainConfig, validate

ConfigStore.instance().store(name="train_schema", node=TrainConfig)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def main() -> None:
    """The entry point: `--plan-only` prints the preflight plan of the composed config and exits (status 1
    when it does not fit); otherwise the Hydra app trains."""
    if "--plan-only" in sys.argv:
        from cppo_rl.plan import main as plan_main

        raise SystemExit(plan_main([a for a in sys.argv[1:] if a != "--plan-only"]))
    train()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def train(cfg: DictConfig) -> None:
    config: TrainConfig = OmegaConf.to_object(cfg)
    validate(config)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    from cppo_rl.controller.progress import summary_screen
    from cppo_rl.controller.trainer import run_with_restarts

    summary, trainer = run_with_restarts(config, run_dir)
    print("\n" + summary_screen(summary, str(run_dir), trainer.resume_command()))
    print(run_dir)
    if summary["interrupted_by"]:  # stopped early by a signal, after checkpointing: exit as the signal asks
        raise SystemExit(128 + signal.Signals[summary["interrupted_by"]].value)


if __name__ == "__main__":
    main()
