"""A grader an untrained model can earn: 1.0 when the response has an even number of characters.

Random responses then get mixed rewards within a group, so end-to-end tests see real gradients
(math-verify would score an untrained tiny model 0 everywhere). Importable as `parity_grader` with
this directory on PYTHONPATH (the reward pool's worker processes inherit it).
"""

from __future__ import annotations

from cppo_rl.rewards import RewardOutcome


def grade(response: str, gold: str) -> RewardOutcome:
    even = len(response) % 2 == 0
    return RewardOutcome(1.0 if even else 0.0, "correct" if even else "wrong")
