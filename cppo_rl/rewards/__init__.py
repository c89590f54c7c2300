"""Verifiable rewards: math-verify grading, in-process or in a process pool with a hard deadline.

`math_verify_reward(response, gold) -> float` grades one response in the caller's process;
`grade` also says why (`RewardOutcome.reason`, one of `REASONS`). `RewardPool` scores batches in
spawned worker processes with a per-sample timeout and memory limit: `submit` returns a handle at
once (scoring proceeds beside generation), `score` blocks. Importing this package loads math-verify
(sympy), never Ray, vLLM or DeepSpeed.
"""

from cppo_rl.rewards.base import REASONS, Grader, RewardOutcome
from cppo_rl.rewards.math_grader import grade, math_verify_reward
from cppo_rl.rewards.pool import DEFAULT_GRADER, RewardHandle, RewardPool, RewardStats

__all__ = [
    "DEFAULT_GRADER",
    "REASONS",
    "Grader",
    "RewardHandle",
    "RewardOutcome",
    "RewardPool",
    "RewardStats",
    "grade",
    "math_verify_reward",
]
