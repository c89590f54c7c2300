"""`python -m cppo_rl.train [overrides]`: the main job, a Hydra app over conf/.

Examples: `python -m cppo_rl.train algorithm=dppo trainer.total_steps=20`,
`python -m cppo_rl.train --cfg job` (print the resolved config), `--multirun algorithm=cppo,dppo`.
The last line printed is the run directory.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cppo_rl.config import TrainConfig, validate

ConfigStore.instance().store(name="train_schema", node=TrainConfig)


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    config: TrainConfig = OmegaConf.to_object(cfg)
    validate(config)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    from cppo_rl.controller.trainer import Trainer

    summary = Trainer(config, run_dir).run()
    print(
        f"\naccuracy: start {summary['eval_accuracy_start']:.3f} -> end {summary['eval_accuracy_end']:.3f} "
        f"(best {summary['eval_accuracy_best']:.3f}) in {summary['steps']} steps, {summary['wall_seconds']} s\n"
        f"metrics: {run_dir / 'metrics.jsonl'}  checkpoint: {summary['checkpoint']}  wandb: {summary['wandb_dir']}"
    )
    print(run_dir)


if __name__ == "__main__":
    main()
