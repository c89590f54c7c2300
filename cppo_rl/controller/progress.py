"""The console view of a run: a live bar over steps (plain lines when not on a terminal), the
signal handling that turns Ctrl-C / SIGTERM into "checkpoint, then stop", and the end summary."""

from __future__ import annotations

import signal
import sys
import time


class Progress:
    """One update per step: reward, held-out accuracy (when evaluated), step seconds and ETA.

    On a terminal (and `enabled`) a tqdm bar on stderr; otherwise one line per step on stdout, which is
    what log files and `ray job logs` keep.
    """

    def __init__(self, total_steps: int, first_step: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.total, self.done_at_start = total_steps, first_step - 1
        self.started = time.perf_counter()
        live = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=first_step - 1, unit="step", dynamic_ncols=True) if live else None
        self.accuracy: float | None = None

    def update(self, step: int, metrics: dict[str, float]) -> None:
        self.accuracy = metrics.get("eval/accuracy", self.accuracy)
        fields = {"reward": f"{metrics['train/reward']:.3f}", "step_s": f"{metrics['time/step_s']:.1f}"}
        if self.accuracy is not None:
            fields["eval"] = f"{self.accuracy:.3f}"
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)
            self.bar.update(1)
            return
        elapsed = time.perf_counter() - self.started
        eta = elapsed / (step - self.done_at_start) * (self.total - step)
        print(f"step {step}/{self.total}  " + "  ".join(f"{k} {v}" for k, v in fields.items()) + f"  eta {eta:.0f}s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StopRequests:
    """While active, the first SIGINT/SIGTERM only sets `requested` (the loop checkpoints and stops after
    the current step); a second one of the same kind acts as it normally would (abort)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = signal.Signals(signum).name
        print(
            f"\n{self.requested}: finishing this step, then writing a checkpoint and stopping "
            f"(send it again to abort without a checkpoint)",
            file=sys.stderr,
            flush=True,
        )
        signal.signal(signum, self._previous[signum])

    def __enter__(self) -> StopRequests:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def summary_screen(summary: dict, run_dir: str, resume_command: str) -> str:
    """The one-screen end-of-run summary: accuracy start -> end (best), time per phase, where files are."""
    from cppo_rl.controller.tracker import wandb_location

    phase_seconds = summary["mean_step_seconds"]
    status = "stopped early by " + summary["interrupted_by"] if summary.get("interrupted_by") else "finished"
    lines = [
        f"run {status}: {summary['algorithm']}, {summary['steps']} steps in {summary['wall_seconds']:.0f} s",
        f"  held-out accuracy  start {summary['eval_accuracy_start']:.3f}  ->  end {summary['eval_accuracy_end']:.3f}"
        f"  (best {summary['eval_accuracy_best']:.3f})",
        "  mean step time     " + "  ".join(f"{phase} {seconds:.2f}s" for phase, seconds in phase_seconds.items())
        if phase_seconds
        else "  mean step time     (no step run)",
        f"  run directory      {run_dir}",
        f"  metrics            {run_dir}/metrics.jsonl  (charts: python -m cppo_rl.report {run_dir})",
        f"  checkpoint         {summary['checkpoint']}",
        f"  W&B                {wandb_location(summary)}",
    ]
    if summary.get("interrupted_by"):
        lines.append(f"  resume with        {resume_command}")
    return "\n".join(lines)
