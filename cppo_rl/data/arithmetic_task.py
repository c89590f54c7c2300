"""A generated arithmetic task with verifiable answers, for the tiny model.

A problem is a left-to-right chain of + / - on integers, phrased like the real datasets (the problem
text only, no instruction): prompt `Compute 24+48-13.`, answer `59`, and a worked completion that
evaluates one operation per sentence and ends in a boxed answer: `24+48=72. 72-13=59. \\boxed{59}`.
Difficulty: the operand range and the number of operations (each operation adds about 10 response
tokens, so 30 operations give responses of a few hundred tokens).

Splits are deterministic in the config and disjoint: problems are drawn from one seeded stream,
duplicates dropped, the first `test_size` form the test split and the next `train_size` the train
split (so the test split does not depend on `train_size`). Files follow the schema of the real
datasets (`/work/shared/data/README.md`): one JSON object per line with exactly the keys `prompt`,
`answer`, `data_source`, `id` (all strings; `id` is the 0-based row index).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from cppo_rl.rewards.base import RewardOutcome

SPLITS = ("train", "test")
_BOXED = re.compile(r"\\boxed\{\s*([+-]?\d+)\s*\}")
_MAX_DRAWS_PER_PROBLEM = 100


@dataclass
class ArithmeticTaskConfig:
    """Which problems to generate; `data_source` names the dataset (and its folder). It is the main job's
    `data.task` section (so not frozen: Hydra overrides it), validated when built."""

    min_operand: int = 0
    max_operand: int = 49
    min_operations: int = 1
    max_operations: int = 1
    operators: str = "+"
    allow_negative: bool = False
    train_size: int = 2300
    test_size: int = 200
    seed: int = 0
    data_source: str = "arithmetic"

    def __post_init__(self) -> None:
        caller = "ArithmeticTaskConfig"
        if not 0 <= self.min_operand <= self.max_operand:
            raise ValueError(
                f"{caller}: need 0 <= `min_operand` <= `max_operand`, got {self.min_operand}, {self.max_operand}"
            )
        if not 1 <= self.min_operations <= self.max_operations:
            raise ValueError(
                f"{caller}: need 1 <= `min_operations` <= `max_operations`, "
                f"got {self.min_operations}, {self.max_operations}"
            )
        if not self.operators or set(self.operators) - {"+", "-"} or len(set(self.operators)) != len(self.operators):
            raise ValueError(f"{caller}: `operators` must be '+', '-' or '+-' (no repeats), got {self.operators!r}")
        if self.train_size < 0 or self.test_size < 0:
            raise ValueError(
                f"{caller}: `train_size` and `test_size` must be >= 0, got {self.train_size}, {self.test_size}"
            )
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.data_source):
            raise ValueError(f"{caller}: `data_source` must be a plain folder name, got {self.data_source!r}")
        if self.train_size + self.test_size > self.max_distinct_problems():
            raise ValueError(
                f"{caller}: `train_size` + `test_size` = {self.train_size + self.test_size} exceeds the "
                f"{self.max_distinct_problems()} distinct problems these settings allow; widen the operand "
                "range, allow more operations, or ask for fewer problems"
            )

    def max_distinct_problems(self) -> int:
        """An upper bound on the number of distinct problems (exact when negatives are allowed)."""
        values = self.max_operand - self.min_operand + 1
        ops = len(self.operators)
        return sum(values ** (k + 1) * ops**k for k in range(self.min_operations, self.max_operations + 1))

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Problem:
    """One problem: `prompt` (the text), `answer` (the integer as a string), a worked `completion`."""

    id: str
    prompt: str
    answer: str
    completion: str


def _draw(rng: random.Random, config: ArithmeticTaskConfig) -> tuple[str, str, str]:
    """One random problem as (expression, answer, worked completion)."""
    low, high = config.min_operand, config.max_operand
    value = rng.randint(low, high)
    expression, steps = str(value), []
    for _ in range(rng.randint(config.min_operations, config.max_operations)):
        operator, operand = rng.choice(config.operators), rng.randint(low, high)
        if operator == "-" and operand > value and not config.allow_negative:
            if value < low:
                operator = "+"
            else:
                operand = rng.randint(low, value)
        result = value + operand if operator == "+" else value - operand
        steps.append(f"{value}{operator}{operand}={result}.")
        expression += f"{operator}{operand}"
        value = result
    return expression, str(value), " ".join(steps) + f" \\boxed{{{value}}}"


def generate_splits(config: ArithmeticTaskConfig) -> dict[str, list[Problem]]:
    """The `train` and `test` problems of `config`; deterministic, disjoint, no duplicates."""
    rng = random.Random(config.seed)
    sizes = {"test": config.test_size, "train": config.train_size}
    splits: dict[str, list[Problem]] = {"test": [], "train": []}
    seen: set[str] = set()
    budget = _MAX_DRAWS_PER_PROBLEM * (config.test_size + config.train_size) + 1000
    for split in ("test", "train"):
        while len(splits[split]) < sizes[split]:
            budget -= 1
            if budget < 0:
                raise ValueError(
                    f"generate_splits: found only {len(seen)} distinct problems for train_size + test_size = "
                    f"{config.train_size + config.test_size}; widen the operand range or ask for fewer problems"
                )
            expression, answer, completion = _draw(rng, config)
            if expression in seen:
                continue
            seen.add(expression)
            row = str(len(splits[split]))
            splits[split].append(Problem(id=row, prompt=f"Compute {expression}.", answer=answer, completion=completion))
    return {split: splits[split] for split in SPLITS}


def to_row(problem: Problem, config: ArithmeticTaskConfig) -> dict[str, str]:
    """The dataset row of `problem`: exactly `prompt`, `answer`, `data_source`, `id`, in that order."""
    return {"prompt": problem.prompt, "answer": problem.answer, "data_source": config.data_source, "id": problem.id}


def write_dataset(config: ArithmeticTaskConfig, out_dir: str | Path) -> dict[str, Path]:
    """Write `<out_dir>/<data_source>/{train,test}.jsonl` (UTF-8, one row a line); return the paths."""
    folder = Path(out_dir) / config.data_source
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, problems in generate_splits(config).items():
        path = folder / f"{split}.jsonl"
        lines = (json.dumps(to_row(problem, config), ensure_ascii=False) + "\n" for problem in problems)
        path.write_text("".join(lines), encoding="utf-8")
        paths[split] = path
    return paths


def extract_boxed_int(text: str) -> int | None:
    """The integer in the last `\\boxed{...}` of `text`, or None when the last box holds no integer."""
    boxes = list(re.finditer(r"\\boxed\{([^{}]*)\}", text))
    if not boxes:
        return None
    match = _BOXED.fullmatch(boxes[-1].group(0))
    return int(match.group(1)) if match else None


def grade(completion: str, answer: str) -> float:
    """1.0 when the last boxed integer of `completion` equals the integer `answer`, else 0.0."""
    return float(extract_boxed_int(completion) == int(answer))


def boxed_integer_reward(response: str, gold: str) -> RewardOutcome:
    """The task's training reward (a `reward.grader`): `grade` with the reason. Stricter than
    math-verify on purpose: `\\boxed{24+16}` is not an answer to "Compute 24+16." here."""
    if not re.search(r"\\boxed\{[^{}]*\}", response):
        return RewardOutcome(0.0, "no_answer")
    if extract_boxed_int(response) is None:
        return RewardOutcome(0.0, "parse_failure")
    return RewardOutcome(1.0, "correct") if grade(response, gold) else RewardOutcome(0.0, "wrong")
