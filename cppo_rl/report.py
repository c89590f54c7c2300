"""`python -m cppo_rl.report RUN_DIR [--out DIR]`: a run's key charts as PNG files, without W&B.

Reads the run's local history (`RUN_DIR/metrics.jsonl`, one JSON object per step) and writes to
`RUN_DIR/report/` (or `--out`):
  reward_accuracy.png         train reward per step, held-out accuracy at each evaluation
  masked_fraction.png         masked token fraction by cause (token rule, prefix budget) per step
  divergence_by_position.png  mean divergence and mask rate per position decile over training
  step_time.png               seconds per phase (generate, reward, learner, sync) per step, stacked
  training_health.png         entropy, grad norm, lr, response length, rollout/learner mismatch
A chart whose metrics the run did not log is skipped with a note, and so is a last line cut short by
a crash mid-write (no final newline, not JSON); any other bad line is refused, naming `file:line`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry to manage

from cppo_rl.controller.tracker import read_history

DECILES = range(10)
PHASES = ("generate", "reward", "learner", "sync")
HEALTH = {  # panel title -> (y label, {metric: line label})
    "policy entropy": ("nats per token", {"actor/entropy": "entropy"}),
    "gradient norm": ("L2 norm, before clipping", {"actor/grad_norm": "grad norm"}),
    "learning rate": ("lr", {"actor/lr": "lr"}),
    "response length": ("tokens", {"train/response_length_mean": "mean", "train/response_length_max": "max"}),
    "rollout/learner mismatch": ("|log mu - log pi| (nats)", {"actor/rollout_learner_logprob_mismatch": "mismatch"}),
}


def _note(note: str) -> None:
    print(note, file=sys.stderr)


def load_history(run_dir: Path, log=_note) -> list[dict]:
    """The records of `run_dir/metrics.jsonl`; raises ValueError naming the file (and line) when unusable.

    A truncated last line (no final newline and not JSON: the run died mid-write) is dropped with a note to `log`.
    """
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: no such run directory")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: no such file; is {run_dir} a cppo_rl run directory?")
    records = []
    for number, _, record in read_history(path, log):
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}:{number}: each line must be an object with an integer 'step'")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: empty; the run logged no step yet")
    return records


def _lines(axis, history: list[dict], labelled: dict[str, str], **style) -> None:
    """One line per metric over the records that logged it."""
    for name, label in labelled.items():
        if rows := [r for r in history if name in r]:
            axis.plot([r["step"] for r in rows], [float(r[name]) for r in rows], label=label, **style)


def _logged(history: list[dict], *names: str) -> bool:
    return any(name in record for record in history for name in names)


def _finish(axis, title: str, ylabel: str, legend: bool = True) -> None:
    axis.set(title=title, xlabel="step", ylabel=ylabel)
    axis.grid(alpha=0.3)
    if legend and axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize="small")


def chart_reward_accuracy(history: list[dict]) -> Figure | None:
    """Train reward per step; held-out accuracy with a marker at each evaluation."""
    if not _logged(history, "train/reward", "eval/accuracy"):
        return None
    figure = Figure(figsize=(7, 3.2))
    axis = figure.subplots()
    _lines(axis, history, {"train/reward": "train reward (mean over the step's samples)"})
    _lines(axis, history, {"eval/accuracy": "held-out accuracy (Avg@k)"}, marker="o")
    axis.set_ylim(-0.02, 1.02)
    _finish(axis, "Reward and held-out accuracy", "reward / accuracy (0-1)")
    return figure


def chart_masked_fraction(history: list[dict]) -> Figure | None:
    """Masked fraction of response tokens: all causes, the token rule, the prefix budget."""
    causes = {
        "actor/masked_frac": ("masked (all causes)", {"color": "black", "linewidth": 2.5}),
        "actor/masked_by_token_frac": ("by the token rule", {"linestyle": "--"}),
        "actor/masked_by_prefix_frac": ("by the prefix budget", {"linestyle": ":"}),
    }
    if not _logged(history, *causes):
        return None
    figure = Figure(figsize=(7, 3.2))
    axis = figure.subplots()
    for name, (label, style) in causes.items():
        _lines(axis, history, {name: label}, **style)
    axis.set_ylim(-0.02 * axis.get_ylim()[1], axis.get_ylim()[1])  # fractions: no negative axis, zero stays visible
    _finish(axis, "Masked token fraction by cause", "fraction of response tokens")
    return figure


def chart_divergence_by_position(history: list[dict]) -> Figure | None:
    """Heatmaps, x = step, y = position decile (0 = response start): mean divergence, mask rate."""
    panels = []
    for prefix, label in (
        ("actor/divergence_mean_decile_", "mean divergence D_t"),
        ("actor/masked_frac_decile_", "masked fraction"),
    ):
        rows = [r for r in history if all(f"{prefix}{d}" in r for d in DECILES)]
        if rows:
            panels.append((label, [r["step"] for r in rows], [[r[f"{prefix}{d}"] for r in rows] for d in DECILES]))
    if not panels:
        return None
    figure = Figure(figsize=(7, 3.2 * len(panels)))
    axes = figure.subplots(len(panels), 1, squeeze=False)
    for axis, (label, steps, grid) in zip(axes[:, 0], panels, strict=True):
        peak = max(max(row) for row in grid)
        mesh = axis.pcolormesh(steps, list(DECILES), grid, shading="nearest", vmin=0, vmax=peak or 1.0)
        figure.colorbar(mesh, ax=axis, label=label)
        axis.set(title=f"{label} by position decile", xlabel="step", ylabel="position decile (0 = start)")
    return figure


def chart_step_time(history: list[dict]) -> Figure | None:
    """Seconds per phase, stacked, over the steps that logged every phase."""
    rows = [r for r in history if all(f"time/{p}_s" in r for p in PHASES)]
    if not rows:
        return None
    figure = Figure(figsize=(7, 3.2))
    axis = figure.subplots()
    axis.stackplot([r["step"] for r in rows], [[r[f"time/{p}_s"] for r in rows] for p in PHASES], labels=PHASES)
    axis.set_ylim(0, 1.25 * max(sum(r[f"time/{p}_s"] for p in PHASES) for r in rows))  # room for the legend
    _finish(axis, "Step time by phase", "seconds", legend=False)
    axis.legend(loc="upper left", ncol=len(PHASES), fontsize="small")
    return figure


def chart_training_health(history: list[dict]) -> Figure | None:
    """One small panel per health metric the run logged."""
    present = {title: panel for title, panel in HEALTH.items() if _logged(history, *panel[1])}
    if not present:
        return None
    figure = Figure(figsize=(7, 2.6 * len(present)))
    axes = figure.subplots(len(present), 1, squeeze=False)
    for axis, (title, (ylabel, labelled)) in zip(axes[:, 0], present.items(), strict=True):
        _lines(axis, history, labelled)
        _finish(axis, title, ylabel, legend=len(axis.lines) > 1)
    return figure


CHARTS = {
    "reward_accuracy.png": chart_reward_accuracy,
    "masked_fraction.png": chart_masked_fraction,
    "divergence_by_position.png": chart_divergence_by_position,
    "step_time.png": chart_step_time,
    "training_health.png": chart_training_health,
}


def render_report(run_dir: Path, out_dir: Path | None = None, log=_note) -> list[Path]:
    """Write every chart the run's history supports (`log` gets a note per skipped one); returns the PNG paths."""
    history = load_history(run_dir, log)
    out_dir = out_dir or run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, chart in CHARTS.items():
        figure = chart(history)
        if figure is None:
            log(f"skipped {file_name}: its metrics are not in the run's history")
            continue
        figure.tight_layout()
        figure.savefig(out_dir / file_name, dpi=110)
        written.append(out_dir / file_name)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cppo_rl.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (it holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the PNGs (default RUN_DIR/report)")
    args = parser.parse_args(argv)
    try:
        paths = render_report(args.run_dir, args.out)
    except ValueError as error:
        sys.exit(f"error: {error}")
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
