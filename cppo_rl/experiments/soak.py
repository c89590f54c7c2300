"""A soak run: one long training run watched from outside for growing memory, file descriptors and leaked
processes, optionally with chaos: processes of the run killed at random.

    python -m cppo_rl.experiments.soak [--steps 200] [--every 20] [--out runs/soak] [-- OVERRIDE ...]
    python -m cppo_rl.experiments.soak --chaos 6 --seed 0 --every 10 [--reference-accuracy A] [...]

It starts `python -m cppo_rl.train` (the tiny model on the generated task, evaluations and checkpoints every
`--every` steps) and samples every process the run starts (driver, Ray's daemons, rollout engines,
learner ranks, reward workers) every few seconds: resident memory (RSS) and open file descriptors. It
reports, per role, the least-squares slope over the second half of the run (after warm-up), and after
the run ends lists any process it started that is still alive. Writes `soak.json` and `soak.png` into
`--out`.

With `--chaos N` it SIGKILLs N processes during the run (`chaos_plan`: a rollout engine, a learner rank
and a reward worker in turn, shuffled, each when the run reaches a step drawn at random, after a random
delay within the step; seeded), lets the run heal itself (`trainer.max_restarts` and
`rollout.max_engine_restarts` set to N), and checks at the end (`chaos_checks`): the run finished, every
step was logged once, the data cursor is where N steps put it (nothing trained twice or skipped), the
engines and learner were restarted as often as they were killed, no process or /dev/shm segment is left,
and the final held-out accuracy is within noise of an undisturbed run's (`--reference-accuracy`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROLES = ("RolloutWorker", "LearnerWorker", "raylet", "gcs_server", "driver", "reward worker", "other")
VICTIMS = ("RolloutWorker", "LearnerWorker", "reward worker")  # the roles chaos kills


def role(process: psutil.Process, driver_pid: int) -> str:
    """What a process of the run is, from its command line."""
    if process.pid == driver_pid:
        return "driver"
    command = " ".join(process.cmdline())
    for name in ("RolloutWorker", "LearnerWorker", "raylet", "gcs_server"):
        if name in command:
            return name
    if "multiprocessing" in command and process.ppid() == driver_pid:
        return "reward worker"
    return "other"


def sample(driver: psutil.Process) -> dict[str, dict[str, float]]:
    """Summed RSS (MiB), open file descriptors and process count per role, now."""
    totals = {}
    for process in [driver, *driver.children(recursive=True)]:
        try:
            with process.oneshot():
                name = role(process, driver.pid)
                rss, fds = process.memory_info().rss / 2**20, process.num_fds()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        entry = totals.setdefault(name, {"rss_mib": 0.0, "fds": 0, "processes": 0})
        entry["rss_mib"] += rss
        entry["fds"] += fds
        entry["processes"] += 1
    return totals


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 with fewer than two distinct xs)."""
    if len(set(xs)) < 2:
        return 0.0
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum((x - mean_x) ** 2 for x in xs)


def current_step(history: Path) -> int:
    """The last step logged in a run's metrics.jsonl (0 before the first)."""
    if not history.is_file():
        return 0
    lines = history.read_text().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


def summarise(samples: list[dict], total_steps: int) -> dict[str, dict[str, float]]:
    """Per role: memory and descriptors at the middle and near the end, and their slopes per 100 steps over
    the second half of the run (up to the last step: the final evaluation and shutdown are left out)."""
    late = [s for s in samples if total_steps // 2 <= s["step"] < total_steps]
    report = {}
    for name in ROLES:
        points = [(s["step"], s["roles"][name]) for s in late if name in s["roles"]]
        if not points:
            continue
        steps = [float(step) for step, _ in points]
        report[name] = {
            "processes": points[-1][1]["processes"],
            "rss_mib_mid": round(points[0][1]["rss_mib"], 1),
            "rss_mib_end": round(points[-1][1]["rss_mib"], 1),
            "rss_mib_per_100_steps": round(100 * slope(steps, [p["rss_mib"] for _, p in points]), 2),
            "fds_mid": points[0][1]["fds"],
            "fds_end": points[-1][1]["fds"],
            "fds_per_100_steps": round(100 * slope(steps, [p["fds"] for _, p in points]), 2),
        }
    return report


def chaos_plan(kills: int, steps: int, seed: int) -> list[dict]:
    """`kills` strikes, sorted by step: the roles of VICTIMS in turn (shuffled), each at a step drawn from
    5 .. steps - 5 (distinct) and a delay of 0-3 s into it."""
    rng = random.Random(seed)
    roles = [VICTIMS[i % len(VICTIMS)] for i in range(kills)]
    rng.shuffle(roles)
    at = sorted(rng.sample(range(5, steps - 4), kills))
    return [
        {"step": step, "role": name, "delay_s": round(rng.uniform(0, 3), 2)}
        for step, name in zip(at, roles, strict=True)
    ]


def strike(driver: psutil.Process, target: dict, rng: random.Random, patience_s: float = 120.0) -> dict:
    """SIGKILL one process of role `target["role"]` under `driver` (a random one if several; waiting up to
    `patience_s` for one to exist, e.g. while the run restarts); the strike's record."""
    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline:
        try:
            children = driver.children(recursive=True)
        except psutil.NoSuchProcess:  # the driver is gone
            break
        victims = []
        for process in children:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):  # it ended meanwhile
                if role(process, driver.pid) == target["role"]:
                    victims.append(process)
        if victims:
            victim = rng.choice(victims)
            try:
                victim.kill()
            except psutil.NoSuchProcess:
                continue
            return {**target, "pid": victim.pid, "killed": True}
        time.sleep(1.0)
    return {**target, "killed": False}


def expected_cursor(train_size: int, batch_size: int, batches: int) -> dict:
    """The prompt loader's state after `batches` batches (cppo_rl.data.dataset.PromptLoader's arithmetic)."""
    from cppo_rl.data.dataset import PromptLoader

    loader = PromptLoader(list(range(train_size)), batch_size, shuffle=False)
    for _ in range(batches):
        loader.next_batch()
    return loader.state_dict()


def chaos_checks(run_dir: Path, steps: int, strikes: list[dict], shm_before: set[str], reference: float | None) -> dict:
    """What a healed run must satisfy (see the module docstring): each check's outcome and its figures."""
    import yaml

    from cppo_rl.learner.checkpoint import latest_checkpoint, read_marker

    checks = {}
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [h["step"] for h in history]
    checks["every step logged once"] = {"ok": logged == list(range(steps + 1)), "steps": len(logged)}
    summary = json.loads((run_dir / "summary.json").read_text())
    killed = {name: sum(s["killed"] and s["role"] == name for s in strikes) for name in VICTIMS}
    checks["learner restarts = learner kills"] = {
        "ok": summary["restarts"] == killed["LearnerWorker"],
        "restarts": summary["restarts"],
        "kills": killed["LearnerWorker"],
    }
    # summary.json counts engine restarts since the last learner restart only: count the controller's warnings
    replaced = (run_dir.parent / "train.log").read_text().count("restarting rollout engines")
    checks["an engine replaced per engine kill"] = {
        "ok": replaced >= killed["RolloutWorker"],
        "replacements": replaced,
        "kills": killed["RolloutWorker"],
    }
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    trains = sorted((run_dir / "data").glob("*/train.jsonl"))
    if trains:
        size = sum(len(path.read_text().splitlines()) for path in trains) - summary["skipped_long_prompts"]["train"]
        batches = steps + config["trainer"].get("max_staleness", 0)
        expected = expected_cursor(size, config["trainer"]["prompts_per_step"], batches)
        cursor = read_marker(latest_checkpoint(run_dir / "checkpoints"))["trainer"]["loader"]
        checks["data cursor at the consumed frontier"] = {
            "ok": cursor == expected,
            "cursor": cursor,
            "expected": expected,
        }
    shm_left = sorted(set(os.listdir("/dev/shm")) - shm_before) if os.path.isdir("/dev/shm") else []
    checks["no /dev/shm segment left"] = {"ok": not shm_left, "left": shm_left}
    if reference is not None:  # three standard errors of the difference of two Avg@k estimates
        final = summary["eval_accuracy_end"]
        samples = config["data"]["eval_prompts"] * config["rollout"]["eval_samples"]
        noise = 3 * math.sqrt(2 * reference * (1 - reference) / samples)
        checks["final accuracy within noise of an undisturbed run"] = {
            "ok": abs(final - reference) <= noise,
            "final": final,
            "reference": reference,
            "bound": round(noise, 4),
        }
    return checks


def plot(samples: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory, descriptors) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in ROLES:
        points = [(s["step"], s["roles"][name]) for s in samples if name in s["roles"]]
        if points:
            memory.plot([p[0] for p in points], [p[1]["rss_mib"] for p in points], label=name)
            descriptors.plot([p[0] for p in points], [p[1]["fds"] for p in points], label=name)
    memory.set(xlabel="step", ylabel="RSS, MiB (sum per role)", title="memory")
    descriptors.set(xlabel="step", ylabel="open file descriptors (sum per role)", title="file descriptors")
    memory.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=20, help="evaluation and checkpoint interval, steps")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--out", type=Path, default=Path("runs/soak"))
    parser.add_argument("--chaos", type=int, default=0, metavar="N", help="processes to kill during the run")
    parser.add_argument("--seed", type=int, default=0, help="of the chaos plan")
    parser.add_argument(
        "--reference-accuracy", type=float, help="an undisturbed run's final held-out accuracy, to compare with"
    )
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for the run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    healing = [f"trainer.max_restarts={args.chaos}", f"rollout.max_engine_restarts={args.chaos}"] if args.chaos else []
    command = [
        sys.executable, "-m", "cppo_rl.train", f"trainer.total_steps={args.steps}", f"trainer.eval_every={args.every}",
        f"trainer.checkpoint_every={args.every}", "trainer.progress_bar=false", "logging.mode=offline",
        f"trainer.output_dir={args.out}", "trainer.run_name=run", *healing, *args.overrides,
    ]  # fmt: skip
    plan, strikes, rng = chaos_plan(args.chaos, args.steps, args.seed), [], random.Random(args.seed + 1)
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    started = time.monotonic()
    log = (args.out / "train.log").open("w")
    run = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    driver, seen, samples = psutil.Process(run.pid), {}, []
    history = args.out / "run" / "metrics.jsonl"
    while run.poll() is None:
        try:
            children = driver.children(recursive=True)
        except psutil.NoSuchProcess:  # the driver is gone
            break
        for process in children:  # a child may end between the listing and the look (chaos kills them)
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                seen.setdefault(process.pid, (process.create_time(), " ".join(process.cmdline())[:120]))
        try:
            roles = sample(driver)
        except psutil.NoSuchProcess:
            break
        step = current_step(history)
        samples.append({"seconds": round(time.monotonic() - started, 1), "step": step, "roles": roles})
        if plan and step >= plan[0]["step"]:
            target = plan.pop(0)
            time.sleep(target["delay_s"])
            strikes.append({**strike(driver, target, rng), "seconds": round(time.monotonic() - started, 1)})
            print(f"chaos: {strikes[-1]}", flush=True)
            continue
        time.sleep(min(args.interval, 1.0) if plan else args.interval)
    run.wait()
    time.sleep(10)  # Ray's daemons stop shortly after the driver exits
    leaked = []
    for pid, (created, command_line) in seen.items():
        try:
            if psutil.Process(pid).create_time() == created:
                leaked.append({"pid": pid, "command": command_line})
        except psutil.NoSuchProcess:
            continue
    result = {
        "command": " ".join(command),
        "returncode": run.returncode,
        "steps": current_step(history),
        "wall_seconds": round(time.monotonic() - started, 1),
        "samples": len(samples),
        "roles": summarise(samples, args.steps),
        "leaked_processes": leaked,
        "history": samples,
    }
    if args.chaos:
        result["chaos"] = {"plan_seed": args.seed, "strikes": strikes, "not_reached": plan}
        if run.returncode == 0:
            result["chaos"]["checks"] = chaos_checks(
                args.out / "run", args.steps, strikes, shm_before, args.reference_accuracy
            )
    (args.out / "soak.json").write_text(json.dumps(result, indent=1))
    plot(samples, args.out / "soak.png")
    print(f"soak: {result['steps']} steps in {result['wall_seconds']:.0f} s, exit status {run.returncode}")
    header = ("procs", 6), ("RSS mid", 10), ("RSS end", 10), ("MiB/100 steps", 15), ("fds mid", 9), ("fds end", 9)
    print(f"{'role':<15}" + "".join(f"{title:>{width}}" for title, width in header) + f"{'fds/100':>9}")
    for name, r in result["roles"].items():
        print(
            f"{name:<15}{r['processes']:>6}{r['rss_mib_mid']:>10}{r['rss_mib_end']:>10}{r['rss_mib_per_100_steps']:>15}"
            f"{r['fds_mid']:>9}{r['fds_end']:>9}{r['fds_per_100_steps']:>9}"
        )
    print(f"processes left after the run: {len(leaked)}" + "".join(f"\n  {p['pid']}: {p['command']}" for p in leaked))
    checks = result.get("chaos", {}).get("checks", {})
    for name, check in checks.items():
        print(
            f"chaos check: {'ok  ' if check['ok'] else 'FAIL'} {name}: "
            + json.dumps({k: v for k, v in check.items() if k != "ok"})
        )
    print(args.out)
    return 0 if run.returncode == 0 and not leaked and all(c["ok"] for c in checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
