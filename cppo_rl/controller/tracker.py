"""Metrics sinks of a run: W&B and a local jsonl history (`metrics.jsonl`, the full record of every run).

W&B follows its own conventions: with `logging.mode=auto` the mode is `WANDB_MODE` when set, else online
when `WANDB_API_KEY` is set, else offline; an explicit `logging.mode` wins over `WANDB_MODE` (as `mode=`
wins over it in `wandb.init`). W&B never stops training: an online start that fails (timeout after
`logging.init_timeout_s`, refused or malformed key, no network) falls back to an offline run in the run
directory with one warning naming the `wandb sync` command; if even that fails, or a W&B call fails
mid-run, W&B is off for the rest of the run with one warning and `metrics.jsonl` keeps every step.

The W&B key is read by wandb itself from the environment; it is never printed, logged or put in
the run's config. A resumed run continues the same W&B run (`run_id`) and the same local history.
"""

from __future__ import annotations

import json
import os
import secrets
import string
import sys
from pathlib import Path

HISTORY = "metrics.jsonl"
MODES = ("auto", "online", "offline", "disabled")
# WANDB_MODE values wandb 0.31 accepts (wandb/sdk/wandb_settings.py `Settings.mode`) -> ours
ENV_MODES = {
    "online": "online",
    "run": "online",
    "shared": "online",
    "offline": "offline",
    "dryrun": "offline",
    "disabled": "disabled",
}


def _new_run_id() -> str:
    """A W&B run id as wandb makes them (wandb/sdk/lib/runid.py: 8 lowercase letters and digits)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def wandb_mode(requested: str, environ=None) -> str:
    """The W&B mode a run uses. An explicit online / offline / disabled wins; "auto" follows the
    environment: WANDB_DISABLED=true (transformers' old switch) -> disabled, else WANDB_MODE as wandb reads
    it (dryrun = offline, run / shared = online; a value wandb does not know -> disabled, since wandb
    itself refuses to start with it), else online when WANDB_API_KEY is set, else offline."""
    environ = os.environ if environ is None else environ
    if requested not in MODES:
        raise ValueError(f"logging.mode must be auto, online, offline or disabled, got {requested!r}")
    if requested != "auto":
        return requested
    if _truthy(environ.get("WANDB_DISABLED")):
        return "disabled"
    env_mode = (environ.get("WANDB_MODE") or "").strip().lower()
    if env_mode:
        return ENV_MODES.get(env_mode, "disabled")
    return "online" if environ.get("WANDB_API_KEY") else "offline"


def wandb_location(summary: dict) -> str:
    """Where a run's W&B data is, for the end-of-run screen: its directory, whether it is online or
    offline (and why it fell back or stopped), and the `wandb sync` command that uploads it."""
    where, fell_back, stopped = (summary.get(k) for k in ("wandb_dir", "wandb_offline_reason", "wandb_stopped_reason"))
    if not where:
        return "disabled" + (f"  (W&B failed: {stopped})" if stopped else "")
    notes = ["offline" if Path(where).name.startswith("offline-run-") else "online"]
    if fell_back:
        notes[0] += f": online failed ({fell_back})"
    if stopped:
        notes.append(f"W&B stopped at {stopped}; metrics.jsonl has every step")
    if notes[0].startswith("offline") or stopped:
        notes.append(f"upload: wandb sync {where}")
    return f"{where}  ({'; '.join(notes)})"


def _reason(error: BaseException) -> str:
    """One line saying why a W&B call failed, without the key."""
    text = " ".join(str(error).split()) or "no message"
    # wandb's own hint names its Python setting; here that is logging.init_timeout_s
    text = text.replace(
        "Consider increasing the init_timeout setting: wandb.init(settings=wandb.Settings(init_timeout=...))",
        "(a slow server: raise logging.init_timeout_s)",
    )
    key = os.environ.get("WANDB_API_KEY", "").strip()
    if len(key) >= 4:
        text = text.replace(key, "<WANDB_API_KEY>")
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(error).__name__}: {text}"


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _teardown_wandb() -> None:
    """Shut wandb's service down after a failure, so a retry starts clean (a failed online start keeps its
    run id "in use") and no atexit hook prints a traceback when the service is gone. Never raises."""
    try:
        import wandb

        wandb.teardown()
    except (Exception, SystemExit):  # wandb.teardown can sys.exit with the service's exit code
        pass


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
    """`log(metrics, step)` to W&B and to `<run_dir>/metrics.jsonl`; `table(...)` for sample completions.

    `mode`: the W&B mode in use ("online", "offline" or "disabled"; "offline" after a fallback);
    `offline_reason`: why the online start fell back to offline; `stopped_reason`: why W&B stopped mid-run
    (both None when nothing failed); `wandb_dir`: the W&B run's directory (None without W&B);
    `sync_command`: the command that uploads it."""

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
        init_timeout_s: float | None = None,
    ) -> None:
        self.history_path = run_dir / HISTORY
        self.mode = wandb_mode(mode)
        self.offline_reason: str | None = None
        self.stopped_reason: str | None = None
        self.run = None  # the live W&B run; None without W&B or once a W&B call failed
        self.run_id: str | None = None
        self.wandb_dir: str | None = None
        if init_timeout_s is None:  # the run config's logging section, when the caller does not pass it
            from cppo_rl.config import LoggingConfig

            init_timeout_s = (config.get("logging") or {}).get("init_timeout_s", LoggingConfig.init_timeout_s)
        env_mode = os.environ.get("WANDB_MODE", "").strip()
        if mode == "auto" and env_mode and env_mode.lower() not in ENV_MODES:
            _warn(f"WANDB_MODE={env_mode!r} is not a W&B mode ({', '.join(ENV_MODES)}); W&B is off for this run")
        if self.mode == "disabled":
            return
        import wandb

        # one id for the online attempt and its offline fallback; a resumed run passes its own
        fixed_id = run_id or _new_run_id()

        def start(wandb_mode: str):
            return wandb.init(
                project=project,
                entity=entity,
                name=name or run_dir.name,
                tags=tags,
                mode=wandb_mode,
                dir=str(run_dir),
                config=config,
                id=fixed_id,
                resume="allow" if run_id else None,
                settings=wandb.Settings(quiet=True, init_timeout=float(init_timeout_s)),
            )

        if self.mode == "online":
            try:
                self.run = start("online")
            except Exception as error:  # timeout, refused or malformed key, no network: go on offline
                self.offline_reason = _reason(error)
                self.mode = "offline"
                _teardown_wandb()  # else the failed start keeps the run id "in use" for the offline one
        if self.run is None:
            try:
                self.run = start("offline")
            except Exception as error:
                _teardown_wandb()
                self.mode = "disabled"
                before = f"online: {self.offline_reason}; offline: " if self.offline_reason else ""
                self.stopped_reason = f"start: {before}{_reason(error)}"
                _warn(
                    f"W&B could not start ({before}{_reason(error)}); "
                    f"W&B is off, every metric is in {self.history_path}"
                )
                return
        self.run_id = self.run.id
        self.wandb_dir = str(Path(self.run.dir).parent)
        if self.offline_reason:
            _warn(
                f"W&B online failed ({self.offline_reason}); logging offline instead, upload later with: "
                f"{self.sync_command}"
            )

    @property
    def sync_command(self) -> str | None:
        """`wandb sync <wandb_dir>`: uploads an offline run (or what an online one had not sent)."""
        return f"wandb sync {self.wandb_dir}" if self.wandb_dir else None

    def summary(self) -> dict:
        """The W&B part of `summary.json`: where the W&B run is, its mode, what failed, how to upload it."""
        return {
            "wandb_dir": self.wandb_dir,
            "wandb_mode": self.mode,
            "wandb_offline_reason": self.offline_reason,
            "wandb_stopped_reason": self.stopped_reason,
            "wandb_sync": self.sync_command if self.mode == "offline" or self.stopped_reason else None,
        }

    def _wandb(self, step: int, call) -> None:
        """One W&B call. The first failure (wandb's service process gone: ConnectionResetError; a data error)
        turns W&B off for the rest of the run with one warning; `metrics.jsonl` is written first and goes on."""
        if self.run is None:
            return
        try:
            call()
        except Exception as error:
            self.run, self.stopped_reason = None, f"step {step}: {_reason(error)}"
            _teardown_wandb()
            _warn(
                f"W&B failed at step {step} ({_reason(error)}); W&B is off for the rest of the run, every metric "
                f"is still written to {self.history_path}; what W&B got is in {self.wandb_dir} "
                f"(upload: {self.sync_command})"
            )

    def log(self, metrics: dict[str, float], step: int) -> None:
        with self.history_path.open("a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        self._wandb(step, lambda: self.run.log(metrics, step=step))

    def table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        if self.run is None:
            return
        import wandb

        self._wandb(step, lambda: self.run.log({name: wandb.Table(columns=columns, data=rows)}, step=step))

    def position_profile(self, metrics: dict[str, float], step: int) -> None:
        """A W&B chart of this step's mean divergence and mask rate per response-position decile (0 = the
        start of the response), from the learner's `actor/*_decile_*` metrics; nothing when absent."""
        if self.run is None:
            return
        import wandb

        series = {
            label: [metrics.get(f"actor/{name}_decile_{d}") for d in range(10)]
            for label, name in (("mean divergence", "divergence_mean"), ("masked fraction", "masked_frac"))
        }
        series = {label: values for label, values in series.items() if None not in values}
        if series:

            def chart():
                figure = wandb.plot.line_series(
                    xs=list(range(10)),
                    ys=list(series.values()),
                    keys=list(series),
                    title=f"by position decile, step {step}",
                    xname="position decile",
                )
                self.run.log({"charts/position_profile": figure}, step=step)

            self._wandb(step, chart)

    def staleness_chart(self, rows: list[list[float]], step: int) -> None:
        """A W&B scatter of the masked fraction against staleness (policy versions between generation and
        training), one point per trained step so far (`rows`: [step, staleness, masked fraction])."""
        if self.run is None or not rows:
            return
        import wandb

        def chart():
            table = wandb.Table(columns=["step", "staleness", "masked fraction"], data=rows)
            figure = wandb.plot.scatter(table, "staleness", "masked fraction", title="masked fraction by staleness")
            self.run.log({"charts/masked_frac_by_staleness": figure}, step=step)

        self._wandb(step, chart)

    def finish(self) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            run.finish()
        except Exception as error:
            _teardown_wandb()
            self.stopped_reason = self.stopped_reason or f"finish: {_reason(error)}"
            _warn(f"W&B could not finish its run ({_reason(error)}); every metric is in {self.history_path}")
