"""CPPO against the baselines and its ablations under real drift: over policy staleness, updates per rollout and
seeds (issue 21's study; issue 8's first study varied the updates per rollout only).

    python -m cppo_rl.experiments.compare [--methods ...] [--staleness 0 2 4] [--updates 1] [--seeds 0 .. 7]
        [--steps 40] [--variant NAME] [--experiment drift_stress] [--model DIR] [--prompts 8] [--eval-every 10]
        [--out runs/drift] [--archive DIR] [--report docs/results.md] [--report-only] [-- OVERRIDE ...]

(the defaults are issue 21's grid). Each cell (method, staleness k, updates per rollout, seed) is one run of the
main job on the warmed-up tiny model (or on `--model DIR`, one model directory for every cell),
in `OUT/<method>[@<variant>]-k<k>-u<updates>-s<seed>/`, with the same experiment preset (task, response length,
batch), data and step budget. Staleness k is the number of policy versions between the policy that generated a
batch and the one trained on it (`trainer.max_staleness=k`, in the deterministic lockstep schedule); updates per
rollout set the mini-batch (`prompts / updates` prompts). `--variant NAME` labels every cell of one invocation whose
overrides after `--` change the methods, e.g. the calibrated pair

    python -m cppo_rl.experiments.compare --variant cal --methods cppo dppo -- algorithm.delta_b=0.004 \\
        algorithm.delta=0.03

whose cells the report shows as `cppo@cal` and `dppo@cal`, `dppo@cal` paired with `cppo@cal`. The grid is
resumable: a finished run (its summary.json has every step) is skipped, an interrupted one continues from its
latest checkpoint. The report (markdown tables, and PNG plots beside it under img/) is built from whatever runs
have finished; the first study's folders (`<method>-u<updates>-s<seed>`: k = 0, no variant) are read too (its
archives, results/compare and results/compare_scaled, hold 20-step runs: `--report-only --steps 20`).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

METHODS = (
    "cppo", "dppo", "grpo", "cispo", "trm_max", "trm_avg", "minpro",
    "cppo_no_position_weight", "cppo_no_prefix_budget", "cppo_shuffled_weights",
)  # fmt: skip
STUDY_METHODS = (
    "cppo", "dppo", "grpo", "cispo", "minpro", "trm_avg", "cppo_no_prefix_budget", "cppo_no_position_weight",
)  # fmt: skip
COLLAPSE_POINTS = 0.05  # a run "collapsed" when its final held-out accuracy is this far below its start
# a cell's folder: method[@variant]-k<staleness>-u<updates>-s<seed>; the first study's had no variant and no -k
CELL_NAME = re.compile(r"(?P<method>\w+)(@(?P<variant>\w+))?(-k(?P<staleness>\d+))?-u(?P<updates>\d+)-s(?P<seed>\d+)")
TABLE_COLUMNS = (
    "method", "staleness k", "updates / rollout", "seeds", "final accuracy", "final − start", "best accuracy",
    "final − cppo (paired)", "below cppo", "p (paired t)", "p (Holm)", "collapsed",
)  # fmt: skip
# the table's last columns: each metric's mean over training (first over each run's steps, then over seeds)
TABLE_METRICS = {
    "masked tokens": "actor/masked_frac",
    "mean divergence": "actor/divergence_mean",
    "mean Top-K TV": "actor/topk_tv",  # rollout policy vs the learner's, whatever the method's own divergence
    "entropy": "actor/entropy",
}
MASK_CAUSES = [  # (metric, y label) of the masked-fraction plots
    ("actor/masked_frac", "masked tokens, all causes"),
    ("actor/masked_by_token_frac", "masked: w_t D_t > delta (CPPO)"),
    ("actor/masked_by_prefix_frac", "masked: prefix budget (CPPO)"),
]

Setting = tuple[str, int, int]  # (variant, staleness, updates): what a method's seeds share in one table row


def method_label(method: str, variant: str) -> str:
    """A method as the report shows it: `cppo`, or `cppo@cal` in variant `cal`."""
    return f"{method}@{variant}" if variant else method


@dataclass(frozen=True)
class Cell:
    method: str
    updates: int
    seed: int
    staleness: int = 0
    variant: str = ""  # "" in the main grid

    @property
    def name(self) -> str:
        return f"{method_label(self.method, self.variant)}-k{self.staleness}-u{self.updates}-s{self.seed}"

    @property
    def setting(self) -> Setting:
        return self.variant, self.staleness, self.updates

    @property
    def reference(self) -> Cell:
        """The CPPO cell this one is paired with: same variant, staleness, updates and seed."""
        return replace(self, method="cppo")

    @classmethod
    def parse(cls, name: str) -> Cell | None:
        """The cell of a folder name in either format; None for another folder."""
        if not (match := CELL_NAME.fullmatch(name)):
            return None
        staleness, updates, seed = (int(match[key] or 0) for key in ("staleness", "updates", "seed"))
        return cls(match["method"], updates, seed, staleness, match["variant"] or "")


def run_overrides(cell: Cell, out: Path, experiment: str, prompts: int, steps: int, eval_every: int) -> list[str]:
    """The main job's overrides for one cell."""
    if prompts % cell.updates:
        raise ValueError(f"--prompts {prompts} is not a multiple of {cell.updates} updates per rollout")
    tags = ["compare", cell.method, f"k{cell.staleness}", f"u{cell.updates}", *([cell.variant] if cell.variant else [])]
    return [
        f"experiment={experiment}",
        f"algorithm={cell.method}",
        f"trainer.prompts_per_step={prompts}",
        f"trainer.minibatch_prompts={prompts // cell.updates}",
        f"trainer.max_staleness={cell.staleness}",
        "trainer.rollout_mode=lockstep",  # each batch trained k policy versions after it was generated: deterministic
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
        f"logging.tags=[{','.join(tags)}]",
    ]


def finished(run_dir: Path, steps: int) -> bool:
    summary = run_dir / "summary.json"
    return summary.is_file() and json.loads(summary.read_text())["steps"] >= steps


def load_runs(out: Path) -> list[dict]:
    """Every run under `out` in a folder named after its cell (either format): its cell, folder, summary and
    metrics history. Two folders of one cell (`cppo-u8-s0` and `cppo-k0-u8-s0`) are refused."""
    runs, folders = [], {}
    for summary_file in sorted(out.glob("*/summary.json")):
        folder = summary_file.parent
        if (cell := Cell.parse(folder.name)) is None:
            continue
        if cell in folders:
            raise ValueError(f"{out}: {folders[cell].name} and {folder.name} are runs of one cell; keep one")
        folders[cell] = folder
        history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        runs.append(
            {"cell": cell, "folder": folder, "summary": json.loads(summary_file.read_text()), "history": history}
        )
    return runs


def archive(runs: list[dict], target: Path) -> None:
    """Copy the files the report reads (summary.json, metrics.jsonl) of each run, and its resolved config
    (Hydra's .hydra/config.yaml, as config.yaml), to a folder of the same name under `target`."""
    for run in runs:
        source, folder = run["folder"], target / run["folder"].name
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


def holm_adjust(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the given order: with the m non-nan p-values sorted ascending, the
    i-th (from 0) is multiplied by m - i, raised to the largest adjusted value before it (monotone) and capped at
    1. A nan stays nan and does not count in m."""
    ranked = sorted((i for i, p in enumerate(p_values) if not math.isnan(p)), key=lambda i: p_values[i])
    adjusted, running = [float("nan")] * len(p_values), 0.0
    for rank, index in enumerate(ranked):
        running = max(running, min(1.0, (len(ranked) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def table(runs: list[dict]) -> list[str]:
    """Markdown rows: per (variant, staleness, updates, method), final held-out accuracy, its change from the run's
    start and best held-out accuracy (mean ± std over seeds); the final accuracy minus the paired CPPO run's
    (`Cell.reference`: same prompts, sampling seeds and warm start), in how many seeds it is below CPPO's, the
    two-sided p-value of a paired t-test of that difference and the same p-value Holm-Bonferroni adjusted over
    every comparison against CPPO in the table; collapsed runs; and the mean over training of the masked-token
    fraction, the method's divergence, the rollout/learner Top-K TV and the policy entropy ('-' when not logged)."""
    groups = _groups(runs)
    keys = sorted(groups, key=lambda key: (key[0], _method_order(key[1])))
    final = _final_accuracy(runs)
    paired = {key: _paired_differences(groups[key], final) for key in keys if key[1] != "cppo"}
    p_values = {key: paired_p_value(differences) for key, differences in paired.items()}
    holm = dict(zip(p_values, holm_adjust(list(p_values.values())), strict=True))
    columns = [*TABLE_COLUMNS, *TABLE_METRICS]
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for key in keys:
        (variant, staleness, updates), method = key
        members = groups[key]
        summaries = [r["summary"] for r in members]
        gains = [s["eval_accuracy_end"] - s["eval_accuracy_start"] for s in summaries]
        collapsed = sum(s["eval_accuracy_end"] < s["eval_accuracy_start"] - COLLAPSE_POINTS for s in summaries)
        against_cppo = "- | - | - | -"  # the paired difference, seeds below cppo, p-value, Holm's
        if key in paired:
            differences = paired[key]
            below = sum(d < 0 for d in differences)
            against_cppo = f"{_mean_std(differences)} | {below}/{len(differences)} | "
            against_cppo += f"{_number(p_values[key], 3)} | {_number(holm[key], 3)}"
        metrics = (statistics.mean(_history_mean([r], metric) for r in members) for metric in TABLE_METRICS.values())
        rows.append(
            f"| {method_label(method, variant)} | {staleness} | {updates} | {len(members)} | "
            f"{_mean_std([s['eval_accuracy_end'] for s in summaries])} | {_mean_std(gains)} | "
            f"{_mean_std([s['eval_accuracy_best'] for s in summaries])} | {against_cppo} | "
            f"{collapsed}/{len(members)} | " + " | ".join(_number(value, 4) for value in metrics) + " |"
        )
    return rows


def seed_table(runs: list[dict], updates: int, staleness: int = 0, variant: str = "") -> list[str]:
    """Markdown rows: each method's final held-out accuracy per seed in one setting (variant, staleness, updates),
    under a row of each seed's starting accuracy (seeds may start from different warm starts)."""
    members = [r for r in runs if r["cell"].setting == (variant, staleness, updates)]
    seeds = sorted({r["cell"].seed for r in members})
    start = {r["cell"].seed: r["summary"]["eval_accuracy_start"] for r in members}
    final = _final_accuracy(members)
    title = f"k = {staleness}, {updates} updates / rollout" + (f", variant {variant}" if variant else "")
    return [
        f"| {title} | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
        "|---|" + "---|" * len(seeds),
        f"| start (all methods) | {_accuracy_cells(start[seed] for seed in seeds)} |",
        *(
            f"| {method_label(method, variant)} | "
            f"{_accuracy_cells(final.get(Cell(method, updates, seed, staleness, variant)) for seed in seeds)} |"
            for method in sorted({r["cell"].method for r in members}, key=_method_order)
        ),
    ]


def _method_order(method: str) -> tuple[int, str]:
    """The study's order of methods (METHODS), any other after them by name."""
    return (METHODS.index(method) if method in METHODS else len(METHODS)), method


def _groups(runs: list[dict]) -> dict[tuple[Setting, str], list[dict]]:
    """The runs of each (setting, method): its seeds."""
    groups: dict[tuple[Setting, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["cell"].setting, run["cell"].method), []).append(run)
    return groups


def _final_accuracy(runs: list[dict]) -> dict[Cell, float]:
    """Each run's final held-out accuracy, by its cell."""
    return {r["cell"]: r["summary"]["eval_accuracy_end"] for r in runs}


def _paired_differences(runs: list[dict], final: dict[Cell, float]) -> list[float]:
    """Each run's final accuracy minus its paired CPPO run's, for the runs whose CPPO run finished."""
    return [final[r["cell"]] - final[r["cell"].reference] for r in runs if r["cell"].reference in final]


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def _number(value: float, digits: int) -> str:
    """A table cell: '-' for nan (not logged, no test)."""
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def _accuracy_cells(values) -> str:
    """Table cells of accuracies, '-' where a run is missing."""
    return " | ".join("-" if value is None else f"{value:.3f}" for value in values)


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


def _line_style(method: str, variant: str) -> dict:
    """A method's line in every plot: its label, one colour per method, solid for CPPO and its ablations, dashed
    for the baselines, dotted in a variant."""
    linestyle = ":" if variant else "-" if method.startswith("cppo") else "--"
    return {
        "label": method_label(method, variant),
        "color": f"C{_method_order(method)[0] % 10}",
        "linestyle": linestyle,
    }


def plot(runs: list[dict], img_dir: Path, study: str = "compare") -> list[Path]:
    """`img_dir/<study>_*.png`, one line per method (mean over seeds): held-out accuracy and masked fraction by
    cause vs step, masked fraction by cause vs staleness k (mean over training; only with several k), and mean
    divergence and mask rate by position decile (second half of training). The step and position plots have one
    column per (staleness, updates) present, the staleness plot one per updates."""
    groups = _groups(runs)
    lines = sorted(
        {(r["cell"].variant, r["cell"].method) for r in runs}, key=lambda line: (line[0], _method_order(line[1]))
    )
    drifts = sorted({(r["cell"].staleness, r["cell"].updates) for r in runs})
    levels = sorted({staleness for staleness, _ in drifts})

    def runs_of(variant: str, method: str, staleness: int, updates: int) -> list[dict]:
        return groups.get(((variant, staleness, updates), method), [])

    def over_steps(axis, metric: str, drift: tuple[int, int]) -> None:
        for variant, method in lines:
            steps, values = _curve(runs_of(variant, method, *drift), metric)
            if steps:
                axis.plot(steps, values, **_line_style(method, variant))

    def over_staleness(axis, metric: str, updates: int) -> None:
        for variant, method in lines:
            means = [_history_mean(runs_of(variant, method, staleness, updates), metric) for staleness in levels]
            if not all(math.isnan(mean) for mean in means):
                axis.plot(levels, means, marker="o", **_line_style(method, variant))
        axis.set_xticks(levels)

    def over_positions(axis, prefix: str, drift: tuple[int, int]) -> None:
        for variant, method in lines:
            if group := runs_of(variant, method, *drift):
                deciles = [_history_mean(group, f"{prefix}{decile}", second_half=True) for decile in range(10)]
                axis.plot(range(10), deciles, marker="o", **_line_style(method, variant))

    columns = [(drift, f"staleness k = {drift[0]}, {drift[1]} updates per rollout") for drift in drifts]
    charts = [  # name, draw, x label, rows of (metric, y label), columns of (key, title)
        ("accuracy", over_steps, "step", [("eval/accuracy", "held-out accuracy (Avg@k)")], columns),
        ("masked_by_cause", over_steps, "step", MASK_CAUSES, columns),
    ]
    if len(levels) > 1:
        per_updates = [
            (updates, f"{updates} updates per rollout, mean over training")
            for updates in sorted({u for _, u in drifts})
        ]
        charts.append(("masked_by_staleness", over_staleness, "staleness k", MASK_CAUSES, per_updates))
    for name, prefix, label in (
        ("divergence_by_position", "actor/divergence_mean_decile_", "mean divergence"),
        ("masked_by_position", "actor/masked_frac_decile_", "masked fraction"),
    ):
        rows = [(prefix, f"{label} (second half of training)")]
        charts.append((name, over_positions, "position decile", rows, columns))
    img_dir.mkdir(parents=True, exist_ok=True)
    return [_save_grid(img_dir / f"{study}_{name}.png", *chart) for name, *chart in charts]


def _save_grid(path: Path, draw, xlabel: str, rows: list[tuple], columns: list[tuple]) -> Path:
    """A PNG of one axis per (row, column), drawn by `draw(axis, row key, column key)`; rows are (key, y label),
    columns (key, title); the first axis has the legend of all."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry to manage

    figure = Figure(figsize=(6 * len(columns), 4 * len(rows)), layout="tight")
    axes = figure.subplots(len(rows), len(columns), squeeze=False)
    for axis_row, (row, ylabel) in zip(axes, rows, strict=True):
        for axis, (column, title) in zip(axis_row, columns, strict=True):
            draw(axis, row, column)
            axis.set(xlabel=xlabel, ylabel=ylabel, title=title)
    legend: dict[str, object] = {}  # label: line, over every axis (a variant may have runs in one column only)
    for axis in axes.flat:
        for line, label in zip(*axis.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, line)
    if legend:
        axes[0][0].legend(legend.values(), legend.keys(), fontsize=7)
    figure.savefig(path, dpi=110)
    return path


def _variant_name(text: str) -> str:
    """--variant's value: part of each cell's folder name, so letters, digits and '_' only ("": the main grid)."""
    if not re.fullmatch(r"\w*", text):
        raise argparse.ArgumentTypeError(f"{text!r}: use letters, digits and '_' only (it names the cells' folders)")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(STUDY_METHODS), choices=METHODS)
    parser.add_argument(
        "--staleness", nargs="+", type=int, default=[0, 2, 4], help="policy versions between generation and training"
    )
    parser.add_argument("--updates", nargs="+", type=int, default=[1], help="updates (mini-batches) per rollout")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(8)))
    parser.add_argument("--steps", type=int, default=40, help="steps per run; the report takes the runs that have them")
    parser.add_argument(
        "--variant",
        type=_variant_name,
        default="",
        help="label every cell of this invocation (the overrides after -- change its methods); paired with cppo@NAME",
    )
    parser.add_argument("--experiment", default="drift_stress", help="conf/experiment/ preset of every run")
    parser.add_argument(
        "--model", type=Path, help="train every cell from this model directory (model.path; one warm start for all)"
    )
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("runs/drift"))
    parser.add_argument("--report", type=Path, help="write the markdown tables here (plots into its img/ folder)")
    parser.add_argument("--report-only", action="store_true", help="build the report from finished runs only")
    parser.add_argument(
        "--archive",
        type=Path,
        help="copy each finished run's summary.json, metrics.jsonl and resolved config to ARCHIVE/<cell>/ (small, "
        "committable; `--report-only --out ARCHIVE` rebuilds the report from them); a cell archived there is not "
        "run again",
    )
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every run")
    args = parser.parse_args(argv)
    cells = [
        Cell(method, updates, seed, staleness, args.variant)
        for staleness in args.staleness
        for updates in args.updates
        for method in args.methods
        for seed in args.seeds
    ]
    failed = []
    for index, cell in enumerate(cells if not args.report_only else [], start=1):
        done = [folder for folder in (args.out, args.archive) if folder and finished(folder / cell.name, args.steps)]
        if done:
            print(f"[{index}/{len(cells)}] {cell.name}: finished earlier ({done[0]}), skipped", flush=True)
            continue
        print(f"[{index}/{len(cells)}] {cell.name}: running", flush=True)
        command = [sys.executable, "-m", "cppo_rl.train"]
        command += run_overrides(cell, args.out, args.experiment, args.prompts, args.steps, args.eval_every)
        command += [f"model.path={args.model.resolve()}"] if args.model else []
        command += args.overrides
        args.out.mkdir(parents=True, exist_ok=True)
        with (args.out / f"{cell.name}.log").open("a") as log:
            if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                failed.append(cell.name)
                print(f"  failed: see {args.out / f'{cell.name}.log'}", flush=True)
    loaded = load_runs(args.out)
    runs = [r for r in loaded if r["summary"]["steps"] >= args.steps]
    if len(runs) < len(loaded):
        print(f"{len(loaded) - len(runs)} runs with fewer than {args.steps} steps left out (unfinished, or --steps)")
    if args.archive:
        archive(runs, args.archive)
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
                for variant, staleness, updates in sorted({r["cell"].setting for r in runs})
                for line in [*seed_table(runs, updates, staleness, variant), ""]
            ),
            *[f"![{image.stem}](img/{image.name})" for image in images],
        ]
        write_report(args.report, study, generated)
        print(f"wrote {args.report}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
