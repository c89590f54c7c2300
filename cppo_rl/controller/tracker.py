"""Metrics sinks of a run: W&B (offline unless a key is set) and a local jsonl history.

The W&B key is read by wandb itself from the environment; it is never printed, logged or put in
the run's config. A resumed run continues the same W&B run (`run_id`) and the same local history.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

HISTORY = "metrics.jsonl"


def wandb_mode(requested: str) -> str:
    """ "auto" -> online when WANDB_API_KEY is set, else offline; other values pass through."""
    if requested not in ("auto", "online", "offline", "disabled"):
        raise ValueError(f"logging.mode must be auto, online, offline or disabled, got {requested!r}")
    if requested != "auto":
        return requested
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def read_history(path: Path, log=lambda note: print(f"warning: {note}")) -> list[tuple[int, str, dict]]:
    """The (line number, line, record) of each record of a jsonl history, in order. A last line cut short
    by a crash (no final newline, not JSON) is dropped with a note to `log`; any other line that is not
    JSON raises a ValueError naming `file:line`."""
    text = path.read_text() if path.is_file() else ""
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append((number, line, json.loads(line)))
        except json.JSONDecodeError as error:
            if number == len(lines) and not text.endswith("\n"):
                log(f"{path}:{number}: skipped a truncated last line (the run stopped mid-write)")
                break
            raise ValueError(f"{path}:{number}: not JSON: {error}") from None
    return records


def rewind_history(path: Path, last_step: int, source: Path | None = None) -> int:
    """Keep only the records of `path` (or of `source`, copied to `path`) with step <= `last_step`:
    what a run resumed from checkpoint `last_step` must not repeat (`read_history` reads it). Returns the
    records kept."""
    kept = [line for _, line, record in read_history(source or path) if record["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))
    return len(kept)


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
        run_id: str | None = None,
    ) -> None:
        import wandb

        self.history_path = run_dir / HISTORY
        self.mode = wandb_mode(mode)
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=name or run_dir.name,
            tags=tags,
            mode=self.mode,
            dir=str(run_dir),
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(quiet=True),
        )
        self.run_id = self.run.id if self.mode != "disabled" else None
        self.wandb_dir = str(Path(self.run.dir).parent) if self.mode != "disabled" else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        with self.history_path.open("a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        self.run.log(metrics, step=step)

    def table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        import wandb

        self.run.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def position_profile(self, metrics: dict[str, float], step: int) -> None:
        """A W&B chart of this step's mean divergence and mask rate per response-position decile (0 = the
        start of the response), from the learner's `actor/*_decile_*` metrics; nothing when absent."""
        import wandb

        series = {
            label: [metrics.get(f"actor/{name}_decile_{d}") for d in range(10)]
            for label, name in (("mean divergence", "divergence_mean"), ("masked fraction", "masked_frac"))
        }
        series = {label: values for label, values in series.items() if None not in values}
        if series and self.mode != "disabled":
            chart = wandb.plot.line_series(
                xs=list(range(10)),
                ys=list(series.values()),
                keys=list(series),
                title=f"by position decile, step {step}",
                xname="position decile",
            )
            self.run.log({"charts/position_profile": chart}, step=step)

    def finish(self) -> None:
        self.run.finish()
