"""CPPO against every baseline and its ablations, at two off-policy degrees, over seeds (issue 8's study).

    python -m cppo_rl.experiments.compare [--methods ...] [--updates 2 8] [--seeds 0 1 2] [--steps 20]
        [--experiment offpolicy_stress] [--out runs/compare] [--report docs/results.md] [--report-only]
        [-- OVERRIDE ...]

Each cell (method, updates per rollout, seed) is one run of the main job on the warmed-up tiny model,
in `OUT/<method>-u<updates>-s<seed>/`, with the same experiment preset (task, response length, batch),
data and step budget; updates per rollout set the mini-batch (`prompts / updates` prompts). The grid is
resumable: a finished run (its summary.json has every step) is skipped, an interrupted one continues from
its latest checkpoint. The report (a markdown table, and PNG plots beside it under img/) is built from
whatever runs have finished.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

METHODS = (
    "cppo", "dppo", "grpo", "cispo", "trm_max", "trm_avg", "minpro",
    "cppo_no_position_weight", "cppo_no_prefix_budget", "cppo_shuffled_weights",
)  # fmt: skip
COLLAPSE_POINTS = 0.05  # a run "collapsed" when its final held-out accuracy is this far below its start


@dataclass(frozen=True)
class Cell:
    method: str
    updates: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-u{self.updates}-s{self.seed}"


def run_overrides(cell: Cell, out: Path, experiment: str, prompts: int, steps: int, eval_every: int) -> list[str]:
    """The main job's overrides for one cell."""
    if prompts % cell.updates:
        raise ValueError(f"--prompts {prompts} is not a multiple of {cell.updates} updates per rollout")
    return [
        f"experiment={experiment}",
        f"algorithm={cell.method}",
        f"trainer.prompts_per_step={prompts}",
        f"trainer.minibatch_prompts={prompts // cell.updates}",
        f"trainer.total_steps={steps}",
        f"trainer.eval_every={eval_every}",
        f"trainer.seed={cell.seed}",
        f"data.seed={cell.seed}",
        f"trainer.output_dir={out}",
        f"trainer.run_name={cell.name}",
        "trainer.resume=auto",  # an interrupted cell continues
        "trainer.checkpoint_every=10",
        "trainer.progress_bar=false",
        "logging.mode=offline",
        f"logging.tags=[compare,{cell.method},u{cell.updates}]",
    ]


def finished(run_dir: Path, steps: int) -> bool:
    summary = run_dir / "summary.json"
    return summary.is_file() and json.loads(summary.read_text())["steps"] >= steps


def load_runs(out: Path) -> list[dict]:
    """Every finished cell under `out`: its cell, summary and metrics history."""
    runs = []
    for summary_file in sorted(out.glob("*-u*-s*/summary.json")):
        method, updates, seed = summary_file.parent.name.rsplit("-", 2)
        history = [json.loads(line) for line in (summary_file.parent / "metrics.jsonl").read_text().splitlines()]
        runs.append(
            {
                "cell": Cell(method, int(updates[1:]), int(seed[1:])),
                "summary": json.loads(summary_file.read_text()),
                "history": history,
            }
        )
    return runs


def archive(runs: list[dict], out: Path, target: Path) -> None:
    """Copy the files the report reads (summary.json, metrics.jsonl) of each run, and its resolved config
    (Hydra's .hydra/config.yaml, as config.yaml), to `target/<cell>/`."""
    for run in runs:
        source, folder = out / run["cell"].name, target / run["cell"].name
        folder.mkdir(parents=True, exist_ok=True)
        for file_name in ("summary.json", "metrics.jsonl"):
            shutil.copyfile(source / file_name, folder / file_name)
        if (source / ".hydra" / "config.yaml").is_file():
            shutil.copyfile(source / ".hydra" / "config.yaml", folder / "config.yaml")


def report_markers(study: str) -> tuple[str, str]:
    """The lines around a study's generated part of a report (one report can hold several studies)."""
    return f"<!-- {study}: generated, begin -->", f"<!-- {study}: generated, end -->"


def write_report(path: Path, study: str, generated: list[str]) -> None:
    """Put the `generated` lines between the study's markers, keeping the hand-written text around them
    (a new file gets a title and the markers)."""
    begin, end = report_markers(study)
    text = path.read_text() if path.is_file() else f"# CPPO against the baselines\n\n{begin}\n{end}\n"
    if text.count(begin) != 1 or text.count(end) != 1:
        raise ValueError(f"{path}: expected one {begin!r} and one {end!r} line around the generated part")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([head + begin, *generated, end + tail]))


def paired_p_value(differences: list[float]) -> float:
    """Two-sided p-value of a one-sample t-test that the mean of `differences` is 0 (nan with fewer than
    two values or no spread): P(|T| >= |t|) for Student's t with n - 1 degrees of freedom, which is the
    regularized incomplete beta function I_x(df / 2, 1 / 2) at x = df / (df + t^2)."""
    spread = statistics.stdev(differences) if len(differences) > 1 else 0.0
    if spread == 0:
        return float("nan")
    df = len(differences) - 1
    t = statistics.mean(differences) / (spread / math.sqrt(len(differences)))
    return _regularized_incomplete_beta(df / (df + t * t), df / 2, 0.5)


def _regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) for 0 <= x <= 1, by its continued fraction (modified Lentz), on the side where it converges."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):
        return 1 - _regularized_incomplete_beta(1 - x, b, a)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny, c, d = 1e-300, 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 300):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d, c = 1 + numerator * d, 1 + numerator / c
            d, c = 1 / (d if abs(d) > tiny else tiny), c if abs(c) > tiny else tiny
            fraction *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return math.exp(log_front) * fraction / a


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def table(runs: list[dict]) -> list[str]:
    """Markdown rows: per (method, updates), final held-out accuracy, its change from the run's start and
    best held-out accuracy (mean ± std over seeds); the final accuracy minus CPPO's in the same seed's run
    (same prompts, sampling seeds and warm start: a paired difference), in how many seeds it is below
    CPPO's and the two-sided p-value of a paired t-test of that difference; collapsed runs, and the mean
    masked-token fraction and divergence over training."""
    rows = [
        "| method | updates / rollout | seeds | final accuracy | final − start | best accuracy | final − cppo (paired) "
        "| below cppo | p (paired t) | collapsed | masked tokens | mean divergence |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups = _by_method_and_degree(runs)
    final = _final_accuracy(runs)
    order = {method: index for index, method in enumerate(METHODS)}
    for (method, updates), members in sorted(groups.items(), key=lambda g: (g[0][1], order.get(g[0][0], 99))):
        finals = [r["summary"]["eval_accuracy_end"] for r in members]
        gains = [r["summary"]["eval_accuracy_end"] - r["summary"]["eval_accuracy_start"] for r in members]
        bests = [r["summary"]["eval_accuracy_best"] for r in members]
        paired = [
            final[r["cell"]] - final[Cell("cppo", updates, r["cell"].seed)]
            for r in members
            if Cell("cppo", updates, r["cell"].seed) in final
        ]
        collapsed = sum(
            r["summary"]["eval_accuracy_end"] < r["summary"]["eval_accuracy_start"] - COLLAPSE_POINTS for r in members
        )
        masked, divergence = (
            statistics.mean(_history_mean([r], metric) for r in members)
            for metric in ("actor/masked_frac", "actor/divergence_mean")
        )
        against_cppo = "- | - | -"  # the paired difference, seeds below cppo, p-value
        if method != "cppo":
            p_value = paired_p_value(paired)
            p_text = "-" if math.isnan(p_value) else f"{p_value:.3f}"
            against_cppo = f"{_mean_std(paired)} | {sum(d < 0 for d in paired)}/{len(paired)} | {p_text}"
        rows.append(
            f"| {method} | {updates} | {len(members)} | {_mean_std(finals)} | {_mean_std(gains)} | "
            f"{_mean_std(bests)} | {against_cppo} | {collapsed}/{len(members)} | {masked:.4f} | "
            f"{'-' if math.isnan(divergence) else f'{divergence:.4f}'} |"
        )
    return rows


def seed_table(runs: list[dict], updates: int) -> list[str]:
    """Markdown rows: each method's final held-out accuracy per seed at one off-policy degree, under a row
    of each seed's starting accuracy (seeds may start from different warm starts)."""
    members = [r for r in runs if r["cell"].updates == updates]
    seeds = sorted({r["cell"].seed for r in members})
    start = {r["cell"].seed: r["summary"]["eval_accuracy_start"] for r in members}
    final = _final_accuracy(members)
    return [
        f"| {updates} updates / rollout | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
        "|---|" + "---|" * len(seeds),
        f"| start (all methods) | {_accuracy_cells(start[seed] for seed in seeds)} |",
        *(
            f"| {method} | {_accuracy_cells(final.get(Cell(method, updates, seed)) for seed in seeds)} |"
            for method in _methods_present(members)
        ),
    ]


def _final_accuracy(runs: list[dict]) -> dict[Cell, float]:
    """Each run's final held-out accuracy, by its cell."""
    return {r["cell"]: r["summary"]["eval_accuracy_end"] for r in runs}


def _methods_present(runs: list[dict]) -> list[str]:
    """The methods that have runs, in the study's order."""
    return [m for m in METHODS if any(r["cell"].method == m for r in runs)]


def _accuracy_cells(values) -> str:
    """Table cells of accuracies, '-' where a run is missing."""
    return " | ".join("-" if value is None else f"{value:.3f}" for value in values)


def _by_method_and_degree(runs: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """The runs of each (method, updates per rollout): its seeds."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["cell"].method, run["cell"].updates), []).append(run)
    return groups


def _history_mean(runs: list[dict], metric: str, second_half: bool = False) -> float:
    """The mean of `metric` over the runs' logged steps (or the second half of each run's history); nan
    when none logged it (GRPO and CISPO compute no divergence)."""
    values = [
        h[metric] for r in runs for h in r["history"][len(r["history"]) // 2 if second_half else 0 :] if metric in h
    ]
    return statistics.mean(values) if values else float("nan")


def _curve(runs: list[dict], metric: str) -> tuple[list[int], list[float]]:
    """Mean over runs of `metric` per step (steps where every run logged it)."""
    per_step: dict[int, list[float]] = {}
    for run in runs:
        for h in run["history"]:
            if metric in h:
                per_step.setdefault(h["step"], []).append(h[metric])
    steps = sorted(s for s, values in per_step.items() if len(values) == len(runs))
    return steps, [statistics.mean(per_step[s]) for s in steps]


def plot(runs: list[dict], img_dir: Path, study: str = "compare") -> list[Path]:
    """Accuracy vs step, masked fraction by cause vs step, divergence by position decile, as
    `img_dir/<study>_*.png`; one column per off-policy degree, one line per method (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    degrees = sorted({r["cell"].updates for r in runs})
    methods = _methods_present(runs)
    color = {method: f"C{index}" for index, method in enumerate(METHODS)}  # one colour per method everywhere
    groups = _by_method_and_degree(runs)

    charts = {  # file: rows of (metric, y label); x is the step
        f"{study}_accuracy.png": [("eval/accuracy", "held-out accuracy (Avg@k)")],
        f"{study}_masked_by_cause.png": [
            ("actor/masked_frac", "masked tokens, all causes"),
            ("actor/masked_by_token_frac", "masked: w_t D_t > delta (CPPO)"),
            ("actor/masked_by_prefix_frac", "masked: prefix budget (CPPO)"),
        ],
    }
    written = []
    for file_name, rows in charts.items():
        figure, axes = plt.subplots(len(rows), len(degrees), figsize=(6 * len(degrees), 4 * len(rows)), squeeze=False)
        for row, (metric, label) in enumerate(rows):
            for axis, updates in zip(axes[row], degrees, strict=True):
                for method in methods:
                    steps, values = _curve(groups.get((method, updates), []), metric)
                    if steps:
                        style = "-" if method.startswith("cppo") else "--"
                        axis.plot(steps, values, label=method, linestyle=style, color=color[method])
                axis.set(xlabel="step", ylabel=label, title=f"{updates} updates per rollout")
        axes[0][0].legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(img_dir / file_name, dpi=110)
        plt.close(figure)
        written.append(img_dir / file_name)
    figure, axes = plt.subplots(1, len(degrees), figsize=(6 * len(degrees), 4.5), squeeze=False)
    for axis, updates in zip(axes[0], degrees, strict=True):
        for method in methods:
            members = groups.get((method, updates), [])
            deciles = [_history_mean(members, f"actor/divergence_mean_decile_{d}", second_half=True) for d in range(10)]
            axis.plot(range(10), deciles, marker="o", label=method, color=color[method])
        axis.set(
            xlabel="position decile", ylabel="mean divergence (second half of training)", title=f"{updates} updates"
        )
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(img_dir / f"{study}_divergence_by_position.png", dpi=110)
    plt.close(figure)
    return [*written, img_dir / f"{study}_divergence_by_position.png"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--updates", nargs="+", type=int, default=[2, 8])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--experiment", default="offpolicy_stress", help="conf/experiment/ preset of every run")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--report", type=Path, help="write the markdown table here (plots into its img/ folder)")
    parser.add_argument("--report-only", action="store_true", help="build the report from finished runs only")
    parser.add_argument(
        "--archive",
        type=Path,
        help="copy each finished run's summary.json, metrics.jsonl and resolved config to ARCHIVE/<cell>/ (small, "
        "committable; `--report-only --out ARCHIVE` rebuilds the report from them)",
    )
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every run")
    args = parser.parse_args(argv)
    cells = [Cell(m, u, s) for u in args.updates for m in args.methods for s in args.seeds]
    failed = []
    for index, cell in enumerate(cells if not args.report_only else [], start=1):
        if finished(args.out / cell.name, args.steps):
            print(f"[{index}/{len(cells)}] {cell.name}: finished earlier, skipped", flush=True)
            continue
        print(f"[{index}/{len(cells)}] {cell.name}: running", flush=True)
        command = [sys.executable, "-m", "cppo_rl.train"]
        command += run_overrides(cell, args.out, args.experiment, args.prompts, args.steps, args.eval_every)
        command += args.overrides
        args.out.mkdir(parents=True, exist_ok=True)
        with (args.out / f"{cell.name}.log").open("a") as log:
            if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                failed.append(cell.name)
                print(f"  failed: see {args.out / f'{cell.name}.log'}", flush=True)
    runs = [r for r in load_runs(args.out) if r["summary"]["steps"] >= args.steps]
    if args.archive:
        archive(runs, args.out, args.archive)
    rows = table(runs)
    print("\n".join(rows))
    if args.report and runs:
        study = args.out.name  # runs/compare and its archive results/compare share one section and plot names
        images = plot(runs, args.report.parent / "img", study)
        command = " ".join(["python -m cppo_rl.experiments.compare", *(argv if argv is not None else sys.argv[1:])])
        generated = [
            f"Regenerate: `{command}`. Runs: `{args.out}` ({len(runs)} finished).",
            "",
            *rows,
            "",
            "Final held-out accuracy per seed:",
            "",
            *(
                line
                for updates in sorted({r["cell"].updates for r in runs})
                for line in [*seed_table(runs, updates), ""]
            ),
            *[f"![{image.stem}](img/{image.name})" for image in images],
        ]
        write_report(args.report, study, generated)
        print(f"wrote {args.report}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
