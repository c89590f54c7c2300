"""What a grader returns, and the text every grader receives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

REASONS = ("correct", "wrong", "no_answer", "parse_failure", "gold_unparseable", "timeout", "crashed", "error")
"""Why a response got its reward.

correct:          the final answer verifies against the gold answer (reward 1.0)
wrong:            an answer was extracted and parsed, and it does not match
no_answer:        no final answer could be extracted from the response
parse_failure:    an answer was extracted but could not be parsed into math (and does not match as a string)
gold_unparseable: the gold answer itself could not be parsed (a dataset problem, not the model's)
timeout:          grading ran out of time (math-verify's own timeout, or the pool's hard deadline)
crashed:          the pool's worker died while grading (killed, out of memory in native code), or
                  no worker could be started to grade it
error:            grading raised an exception (MemoryError under the pool's memory limit included)
"""


@dataclass(frozen=True, slots=True)
class RewardOutcome:
    """The reward of one response (1.0 or 0.0 for math-verify) and why, one of `REASONS`."""

    reward: float
    reason: str

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"RewardOutcome: `reason` must be one of {REASONS}, got {self.reason!r}")


Grader = Callable[[str, str], RewardOutcome]
"""(response text, gold answer) -> RewardOutcome; what `RewardPool` runs in its workers."""


def as_text(response: str | bytes, name: str, caller: str) -> str:
    """Valid UTF-8 text of `response`: bytes are decoded and lone surrogates replaced, both with U+FFFD."""
    if isinstance(response, bytes):
        return response.decode("utf-8", errors="replace")
    if isinstance(response, str):
        return response.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")
    raise TypeError(f"{caller}: `{name}` must be str or bytes, got {type(response).__name__}")


def check_gold(gold: object, name: str, caller: str) -> None:
    """Raise TypeError unless `gold` is a str (a dataset's answer column, e.g. "34" or "\\frac{1}{2}")."""
    if not isinstance(gold, str):
        raise TypeError(
            f"{caller}: `{name}` must be a str, got {type(gold).__name__}; convert numeric answers with str()"
        )
