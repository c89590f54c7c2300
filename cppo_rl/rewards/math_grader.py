"""Grade one response against a gold answer with math-verify: 1.0 if the final answer verifies, else 0.0.

The response's final answer is extracted the way math-verify grades MATH: a `\\boxed{}` answer first,
then an anchored answer ("the final answer is ...", "answer: ..."), then the last LaTeX or plain
expression. `\\fbox{` is read as `\\boxed{` (math-verify only finds `\\fbox` inside `$...$`). The gold
answer (a dataset's answer string, e.g. "34", "1,450,000", "\\frac{1}{2}", "[2, 5)") is parsed as
LaTeX wrapped in `$...$`, then as it stands. Comparison is math-verify's `verify`: numbers to 6
decimals, fractions vs decimals, symbolic equality, sets, intervals, tuples, matrices; units in
`\\text{}` and `^\\circ` are dropped by its normalisation.

`grade_boxed` is the training reward: only the last `\\boxed{}` of the response counts (no fallback to
the last expression in the text, which a policy learns to exploit: an untrained model that echoes the
problem "24+16." is graded correct for 40 by the fallback).

Timeouts: math-verify's own timeout is signal-based (SIGALRM, whole seconds), so it is used only on
the main thread; elsewhere grading runs without a time limit. Untrusted outputs belong in
`RewardPool`, whose hard per-sample deadline kills the worker process.
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache
from itertools import product

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException

from cppo_rl.rewards.base import RewardOutcome, as_text, check_gold

RESPONSE_TARGETS = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
GOLD_TARGETS = (LatexExtractionConfig(), ExprExtractionConfig())


def grade(response: str | bytes, gold: str, *, timeout_s: int | None = 5) -> RewardOutcome:
    """Grade `response` against `gold` and say why (see `REASONS`).

    `response` may be bytes (decoded as UTF-8, invalid bytes replaced). `timeout_s` is math-verify's
    limit per parse / comparison step in whole seconds, applied only on the main thread; None disables it.
    """
    caller = "grade"
    text = as_text(response, "response", caller)
    check_gold(gold, "gold", caller)
    if timeout_s is not None and (not isinstance(timeout_s, int) or isinstance(timeout_s, bool) or timeout_s < 1):
        raise ValueError(f"{caller}: `timeout_s` must be an int >= 1 (whole seconds) or None, got {timeout_s!r}")
    if threading.current_thread() is not threading.main_thread():
        timeout_s = None
    try:
        gold_parsed = _parse_gold(gold, timeout_s)
        if not gold_parsed:
            return RewardOutcome(0.0, "gold_unparseable")
        extracted = parse(
            text.replace("\\fbox{", "\\boxed{"), RESPONSE_TARGETS, parsing_timeout=timeout_s, raise_on_error=True
        )
    except TimeoutException:
        return RewardOutcome(0.0, "timeout")
    except Exception:
        return RewardOutcome(0.0, "error")
    if not extracted:
        return RewardOutcome(0.0, "no_answer")
    return _compare(gold_parsed, extracted, timeout_s)


def grade_boxed(response: str | bytes, gold: str, *, timeout_s: int | None = 5) -> RewardOutcome:
    """`grade` of the response's last `\\boxed{...}` (or `\\fbox{...}`) alone; "no_answer" without one."""
    box = last_boxed(as_text(response, "response", "grade_boxed"))
    if box is None:
        check_gold(gold, "gold", "grade_boxed")
        return RewardOutcome(0.0, "no_answer")
    return grade(box, gold, timeout_s=timeout_s)


def last_boxed(text: str) -> str | None:
    """The last `\\boxed{...}` / `\\fbox{...}` of `text` (balanced braces) as `\\boxed{...}`; None if none closes."""
    for start in sorted((m.start() for m in re.finditer(r"\\(?:boxed|fbox)\{", text)), reverse=True):
        opening = text.index("{", start)
        depth = 0
        for index in range(opening, len(text)):
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            if depth == 0:
                return "\\boxed{" + text[opening + 1 : index] + "}"
    return None


def math_verify_reward(response: str | bytes, gold: str) -> float:
    """1.0 if `response`'s final answer verifies against `gold`, else 0.0. Runs in the caller's process.

    Uses math-verify's 5 s step timeout on the main thread and no timeout on other threads.
    """
    return grade(response, gold).reward


@lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout_s: int | None) -> tuple[object, ...]:
    """Parsed gold candidates (sympy objects and math-verify's string fallback); () if none. Cached:
    the samples of one prompt share their gold."""
    for candidate in (f"${gold}$", gold):
        parsed = parse(candidate, GOLD_TARGETS, parsing_timeout=timeout_s, raise_on_error=True)
        if parsed:
            return tuple(parsed)
    return ()


def _compare(gold: tuple[object, ...], extracted: list[object], timeout_s: int | None) -> RewardOutcome:
    """Correct if any (gold, extracted) pair verifies, as math-verify's `verify` on the two lists; a pair
    that times out or raises counts as not matching, and names the reason if no pair matches."""
    failure = None
    for gold_item, answer in product(gold, extracted):
        try:
            if verify(gold_item, answer, timeout_seconds=timeout_s, raise_on_error=True):
                return RewardOutcome(1.0, "correct")
        except TimeoutException:
            failure = failure or "timeout"
        except Exception:
            failure = failure or "error"
    if failure is not None:
        return RewardOutcome(0.0, failure)
    parsed = any(not isinstance(answer, str) for answer in extracted)
    return RewardOutcome(0.0, "wrong" if parsed else "parse_failure")
