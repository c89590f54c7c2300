"""Metrics sinks of a run: W&B (offline unless a key is set) and a local jsonl history.

The W&B key is read by wandb itself from the environment; it is never printed, logged or put in
the run's config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def wandb_mode(requested: str) -> str:
    """ "auto" -> online when WANDB_API_KEY is set, else offline; other values pass through."""
    if requested not in ("auto", "online", "offline", "disabled"):
        raise ValueError(f"logging.mode must be auto, online, offline or disabled, got {requested!r}")
    if requested != "auto":
        return requested
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class Tracker:
    """`log(metrics, step)` to W&B and to `<run_dir>/metrics.jsonl`; `table(...)` for sample completions."""

    def __init__(
        self,
        run_dir: Path,
        config: dict,
        *,
        project: str,
        entity: str | None,
        name: str | None,
        tags: list[str],
        mode: str,
    ) -> None:
        import wandb

        self.history_path = run_dir / "metrics.jsonl"
        self.mode = wandb_mode(mode)
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=name or run_dir.name,
            tags=tags,
            mode=self.mode,
            dir=str(run_dir),
            config=config,
        )
        self.wandb_dir = str(Path(self.run.dir).parent) if self.mode != "disabled" else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        with self.history_path.open("a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        self.run.log(metrics, step=step)

    def table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        import wandb

        self.run.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def finish(self) -> None:
        self.run.finish()
