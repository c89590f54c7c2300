"""Shared pieces of the benchmarks: machine facts, a results file, a table, peak memory of a child.

Benchmarks compare two sides measured in the same run (these machines are noisy); each writes
`bench/results/<name>.json` with at least name, ratio, goal, met, date, machine and both sides' raw
figures.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """CPU model, cores, memory and the load average when the benchmark started."""
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
    }


def date_now() -> str:
    """The current UTC time, as the result files write it."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def write_result(name: str, ratio: float, goal: str, met: bool, **figures: object) -> Path:
    """Write `bench/results/<name>.json` and return its path."""
    RESULTS.mkdir(exist_ok=True)
    record = {
        "name": name,
        "ratio": ratio,
        "goal": goal,
        "met": met,
        "date": date_now(),
        "machine": machine(),
        **figures,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    """A plain aligned table on stdout."""
    cells = [header] + [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for index, row in enumerate(cells):
        print("  ".join(value.rjust(width) for value, width in zip(row, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def run_child(module: str, *args: str, timeout: int = 1800) -> dict:
    """Run `python -m <module> args...` in a fresh process and parse the JSON of its last stdout line
    (so each measured side has its own process: clean peak memory, its own thread settings)."""
    result = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB: VmHWM of /proc/self/status. (Not getrusage's
    ru_maxrss: Linux carries the parent's peak into it across fork + exec, so every child of a big
    `python -m bench` process reported the parent's 4.4 GiB.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")
