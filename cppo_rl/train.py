"""`python -m cppo_rl.train [overrides]`: the main job, a Hydra app over conf/.

Examples: `python -m cppo_rl.train algorithm=dppo trainer.total_steps=20`,
`python -m cppo_rl.train --cfg job` (print the resolved config), `--multirun algorithm=cppo,dppo`,
`python -m cppo_rl.train experiment=qwen3_8b_base --plan-only` (the GPU memory plan, nothing started),
`--help` (the groups, presets and flags). Every check that needs no running actor runs first
(cppo_rl.preflight); a refusal prints the problems, exits with status 2 and leaves no run directory.
The last line printed is the run directory. SIGINT / SIGTERM checkpoint and stop after the current
step (exit status 128 + the signal); `trainer.resume=auto` with the same run directory continues.
"""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path

import hydra
import yaml
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cppo_rl.config import ConfigError, TrainConfig

ConfigStore.instance().store(name="train_schema", node=TrainConfig)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
FLAGS = (
    ("--plan-only", "print the placement and GPU memory plan of the composed config and exit (1: it does not fit)"),
    ("--cfg job", "print the composed config and exit"),
    ("--multirun", "one run per combination of comma-separated values (algorithm=cppo,dppo)"),
    ("--hydra-help", "Hydra's own flags"),
    ("--help", "this text"),
)


def usage() -> str:
    """The groups with their options (the default marked), the experiment presets and the flags."""
    from cppo_rl.preflight import groups

    defaults = {}
    for entry in yaml.safe_load((CONF_DIR / "config.yaml").read_text())["defaults"]:
        if isinstance(entry, dict):
            ((group, option),) = entry.items()
            defaults[group.removeprefix("optional ")] = option
    lines = [
        "usage: python -m cppo_rl.train [GROUP=OPTION ...] [KEY=VALUE ...] [FLAGS]",
        "",
        "Trains a policy with CPPO or a baseline on Ray, vLLM and DeepSpeed; prints the run directory last.",
        "Everything is checked before anything starts; a refusal exits with status 2.",
        "",
        "groups (GROUP=OPTION picks a preset; * the default):",
    ]
    options = groups()
    for group, names in options.items():
        if group != "experiment":
            lines.append(f"  {group:<10} " + ", ".join(n + ("*" if n == defaults.get(group) else "") for n in names))
    lines += ["", "experiment presets (experiment=NAME):"]
    for name in options["experiment"]:
        first = (CONF_DIR / "experiment" / f"{name}.yaml").read_text().splitlines()[1].lstrip("# ")
        lines.append(f"  {name:<20} {first}")
    lines += ["", "flags:", *(f"  {flag:<12} {text}" for flag, text in FLAGS)]
    lines += ["", "every key and its default: python -m cppo_rl.train --cfg job; docs/training.md explains them."]
    return "\n".join(lines)


def _refuse(error: ConfigError) -> None:
    print(f"cppo_rl.train: refused, nothing was started.\n{error}", file=sys.stderr)
    raise SystemExit(2)


def main() -> None:
    """The entry point: `--help`; `--plan-only` prints the preflight plan of the composed config and exits
    (status 1 when it does not fit); otherwise every check runs, then the Hydra app trains."""
    from cppo_rl.preflight import check_overrides, compose, preflight

    args = sys.argv[1:]
    if "--help" in args or "-h" in args:
        print(usage())
        return
    if "--plan-only" in args:
        from cppo_rl.plan import main as plan_main

        raise SystemExit(plan_main([a for a in args if a != "--plan-only"]))
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        if any(a.startswith("-") for a in args):  # Hydra's flags (--cfg, --multirun, ...): Hydra runs them
            check_overrides(overrides)
        else:
            preflight(*compose(overrides))
    except ConfigError as error:
        _refuse(error)
    train()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def train(cfg: DictConfig) -> None:
    from cppo_rl.preflight import preflight

    config: TrainConfig = OmegaConf.to_object(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if HydraConfig.get().mode == RunMode.MULTIRUN:  # each run of a sweep is checked as it starts
        try:
            preflight(config, run_dir)
        except ConfigError as error:
            if {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log"}:
                shutil.rmtree(run_dir)
            _refuse(error)
    from cppo_rl.controller.progress import summary_screen
    from cppo_rl.controller.startup import StartupTimeout
    from cppo_rl.controller.trainer import run_with_restarts

    try:
        summary, trainer = run_with_restarts(config, run_dir)
    except StartupTimeout as error:  # a message naming the phase and the fix, not a traceback
        print(f"cppo_rl.train: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print("\n" + summary_screen(summary, str(run_dir), trainer.resume_command()))
    print(run_dir)
    if summary["interrupted_by"]:  # stopped early by a signal, after checkpointing: exit as the signal asks
        raise SystemExit(128 + signal.Signals[summary["interrupted_by"]].value)


if __name__ == "__main__":
    main()
