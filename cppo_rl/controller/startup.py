"""Start-up in named phases, each with progress output and a deadline: never a silent wait.

`Startup(timeout_s).phase(name, waiting_for, fix)` is a context manager: it prints the phase as it starts
and ends, and gives the code inside `remaining()`, the seconds left before the phase's deadline, to pass as
the timeout of every blocking call. When the phase outlives its deadline (a call timed out, or time ran
out while it raised), it fails with `StartupTimeout` naming the phase, what it was waiting for and the
likely fix, instead of whatever the timed-out call raised.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator


class StartupTimeout(RuntimeError):
    """A start-up phase did not finish within its deadline; the message names it and the fix."""


class Startup:
    """The start-up phases of one run; `timeout_s` is each phase's deadline (`cluster.startup_timeout_s`)."""

    def __init__(self, timeout_s: float, log: Callable[[str], None] = lambda line: print(line, flush=True)) -> None:
        self.timeout_s, self.log = timeout_s, log
        self.seconds: dict[str, float] = {}  # phase -> seconds it took

    @contextlib.contextmanager
    def phase(self, name: str, waiting_for: str, fix: str, timeout_s: float | None = None) -> Iterator[Callable]:
        """Run one phase (see the module docstring); yields `remaining()`. `timeout_s` overrides the deadline
        (a phase bounded by a key of its own)."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        started = time.monotonic()
        deadline = started + limit

        def remaining() -> float:
            return max(0.0, deadline - time.monotonic())

        self.log(f"start-up: {name} ...")
        try:
            yield remaining
        except Exception as error:
            if time.monotonic() >= deadline - 0.5:  # the phase's time ran out while it waited
                raise StartupTimeout(
                    f"start-up phase '{name}' did not finish within {limit:g} s: it was waiting for {waiting_for} "
                    f"(last error: {type(error).__name__}: {str(error)[:300]}). Likely fix: {fix}"
                ) from error
            self.log(f"start-up: {name} failed after {time.monotonic() - started:.1f} s")
            raise
        self.seconds[name] = round(time.monotonic() - started, 2)
        self.log(f"start-up: {name} done in {self.seconds[name]:.1f} s")
