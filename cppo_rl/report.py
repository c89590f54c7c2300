"""`python -m cppo_rl.report RUN_DIR [--out DIR]`: a run's key charts as PNG files, without W&B.

Reads the run's local history (`RUN_DIR/metrics.jsonl`, one JSON object per step) and writes to
`RUN_DIR/report/` (or `--out`):
  reward_accuracy.png         train reward per step, held-out accuracy at each evaluation
  masked_fraction.png         masked token fraction by cause (token rule, prefix budget) per step
  divergence_by_position.png  mean divergence and mask rate per position decile over training
  step_time.png               seconds per phase (generate, reward, learner, sync) per step, stacked
  training_health.png         entropy, grad norm, lr, response length, rollout/learner mismatch
A chart whose metrics the run did not log is skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DECILES = range(10)
PHASES = ("generate", "reward", "learner", "sync")
HEALTH = {
    "actor/entropy": "entropy (nats)",
    "actor/grad_norm": "grad norm",
    "actor/lr": "learning rate",
    "train/response_length_mean": "response length (tokens)",
    "actor/rollout_learner_logprob_mismatch": "|log mu - log pi| (first mini-batch)",
}


def load_history(run_dir: Path) -> list[dict]:
    """The records of `run_dir/metrics.jsonl`; raises ValueError naming the file (and line) when unusable."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: no such file; is {run_dir} a cppo_rl run directory?")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON: {error}") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}:{number}: each line must be an object with an integer 'step'")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: empty; the run logged no step yet")
    return records


def series(history: list[dict], name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of metric `name` over the records that have it."""
    points = [(r["step"], float(r[name])) for r in history if name in r]
    return [s for s, _ in points], [v for _, v in points]


def _figure(panels: int = 1, width: float = 7.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(panels, 1, figsize=(width, 3.2 * panels), squeeze=False)
    return figure, [axis for row in axes for axis in row]


def _lines(axis, history: list[dict], labelled: dict[str, str], *, marker: str | None = None) -> bool:
    drawn = False
    for name, label in labelled.items():
        steps, values = series(history, name)
        if steps:
            axis.plot(steps, values, label=label, marker=marker)
            drawn = True
    return drawn


def chart_reward_accuracy(history: list[dict]):
    figure, (axis,) = _figure()
    _lines(axis, history, {"train/reward": "train reward (mean over the step's samples)"})
    _lines(axis, history, {"eval/accuracy": "held-out accuracy (Avg@k)"}, marker="o")
    axis.set(title="Reward and held-out accuracy", xlabel="step", ylabel="reward / accuracy", ylim=(-0.02, 1.02))
    return figure, axis


def chart_masked_fraction(history: list[dict]):
    figure, (axis,) = _figure()
    _lines(
        axis,
        history,
        {
            "actor/masked_frac": "masked (all causes)",
            "actor/masked_by_token_frac": "by the token rule",
            "actor/masked_by_prefix_frac": "by the prefix budget",
        },
    )
    axis.set(title="Masked token fraction by cause", xlabel="step", ylabel="fraction of response tokens")
    return figure, axis


def chart_divergence_by_position(history: list[dict]):
    """Two heatmaps, x = step, y = position decile (0 = response start): mean divergence and mask rate."""
    figure, axes = _figure(2)
    for axis, prefix, title in (
        (axes[0], "actor/divergence_mean_decile_", "mean divergence D_t"),
        (axes[1], "actor/masked_frac_decile_", "masked fraction"),
    ):
        rows = [r for r in history if all(f"{prefix}{d}" in r for d in DECILES)]
        grid = [[r[f"{prefix}{d}"] for r in rows] for d in DECILES]
        steps = [r["step"] for r in rows]
        image = axis.imshow(
            grid, aspect="auto", origin="lower", interpolation="nearest", extent=(steps[0], steps[-1], -0.5, 9.5)
        )
        figure.colorbar(image, ax=axis, label=title)
        axis.set(title=f"{title} by position decile", xlabel="step", ylabel="position decile")
    return figure, axes


def chart_step_time(history: list[dict]):
    figure, (axis,) = _figure()
    rows = [r for r in history if all(f"time/{p}_s" in r for p in PHASES)]
    axis.stackplot([r["step"] for r in rows], [[r[f"time/{p}_s"] for r in rows] for p in PHASES], labels=PHASES)
    axis.set(title="Step time by phase", xlabel="step", ylabel="seconds")
    return figure, axis


def chart_training_health(history: list[dict]):
    present = {name: label for name, label in HEALTH.items() if series(history, name)[0]}
    figure, axes = _figure(len(present))
    for axis, (name, label) in zip(axes, present.items(), strict=True):
        _lines(axis, history, {name: label})
        axis.set(title=label, xlabel="step")
    return figure, axes


CHARTS = {
    "reward_accuracy.png": (chart_reward_accuracy, ("train/reward",)),
    "masked_fraction.png": (chart_masked_fraction, ("actor/masked_frac",)),
    "divergence_by_position.png": (
        chart_divergence_by_position,
        tuple(f"actor/{kind}_decile_{d}" for kind in ("divergence_mean", "masked_frac") for d in DECILES),
    ),
    "step_time.png": (chart_step_time, tuple(f"time/{p}_s" for p in PHASES)),
    "training_health.png": (chart_training_health, ()),
}
"""file name -> (chart function, the metrics it needs in at least one record)."""


def render_report(run_dir: Path, out_dir: Path | None = None, log=print) -> list[Path]:
    """Write every chart the run's history supports; returns the PNG paths written."""
    import matplotlib.pyplot as plt

    history = load_history(run_dir)
    out_dir = out_dir or run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, (chart, needed) in CHARTS.items():
        complete = any(all(name in record for name in needed) for record in history)
        if not complete or (chart is chart_training_health and not any(series(history, n)[0] for n in HEALTH)):
            log(f"skipped {file_name}: the run logged none of its metrics")
            continue
        figure, axes = chart(history)
        for axis in axes if isinstance(axes, list) else [axes]:
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize="small")
            if axis.lines:  # not over heatmaps
                axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(out_dir / file_name, dpi=110)
        plt.close(figure)
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
