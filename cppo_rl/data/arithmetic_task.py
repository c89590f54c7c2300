"""A generated arithmetic task with verifiable answers, for the tiny model.

A problem is a left-to-right chain of + / - on integers, phrased like the real datasets (the problem
text only, no instruction): prompt `Compute 24+48-13.`, answer `59`, and a worked completion that
evaluates one operation per sentence and ends in a boxed answer: `24+48=72. 72-13=59. \\boxed{59}`.
Difficulty: the operand range and the number of operations (each operation adds about 10 response
tokens, so 30 operations give responses of a few hundred tokens).

With `solution="any_order"` (sums only) a worked completion adds the terms in a random order, each
sentence adding one more to the running total, the two written in either order (`Compute 7+12+3.` ->
`12+3=15. 7+15=22. \\boxed{22}` or `3+7=10. 10+12=22. \\boxed{22}`, ...); `free_format` also draws
a space or none around each `+` and `=` and the separator after each sentence. So one problem has
many correct worked answers, and a model trained on them is uncertain at many tokens of its own
responses (`completion_entropy` counts the demonstrations' entropy), yet graded on the boxed result.

Splits are deterministic in the config and disjoint: problems are drawn from one seeded stream,
duplicates dropped, the first `test_size` form the test split and the next `train_size` the train
split (so the test split does not depend on `train_size`). Files follow the schema of the real
datasets (`/work/shared/data/README.md`): one JSON object per line with exactly the keys `prompt`,
`answer`, `data_source`, `id` (all strings; `id` is the 0-based row index).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

from cppo_rl.rewards.base import RewardOutcome

SPLITS = ("train", "test")
_BOXED = re.compile(r"\\boxed\{\s*([+-]?\d+)\s*\}")
_MAX_DRAWS_PER_PROBLEM = 100
SOLUTIONS = ("chain", "any_order")
SEPARATORS = (". ", ".\n", "; ", ";\n", ", ", ",\n")
"""The sentence separators `free_format` draws from (the last sentence's is followed by the box)."""


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
    solution: str = "chain"  # or "any_order": the worked answer adds the numbers in a random order
    free_format: bool = False  # random spaces around + and =, and random sentence separators

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
        if self.solution not in SOLUTIONS:
            raise ValueError(f"{caller}: `solution` must be one of {', '.join(SOLUTIONS)}, got {self.solution!r}")
        if self.solution == "any_order" and self.operators != "+":
            raise ValueError(
                f"{caller}: `solution`='any_order' reorders a sum, so `operators` must be '+', got {self.operators!r}"
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
    expression, terms, steps = str(value), [value], []
    for _ in range(rng.randint(config.min_operations, config.max_operations)):
        operator, operand = rng.choice(config.operators), rng.randint(low, high)
        if operator == "-" and operand > value and not config.allow_negative:
            if value < low:
                operator = "+"
            else:
                operand = rng.randint(low, value)
        result = value + operand if operator == "+" else value - operand
        steps.append((value, operator, operand, result))
        expression += f"{operator}{operand}"
        terms.append(operand)
        value = result
    if config.solution == "any_order":
        steps = _any_order_steps(rng, terms)
    return expression, str(value), _worked_text(rng, steps, config.free_format) + f"\\boxed{{{value}}}"


def _any_order_steps(rng: random.Random, terms: list[int]) -> list[tuple[int, str, int, int]]:
    """The sentences of a sum worked in a random order: the first adds two terms, each later one adds a
    term not yet used to the running total, the term drawn uniformly and the two written in either order."""
    remaining = list(terms)
    rng.shuffle(remaining)
    total = remaining.pop()
    steps = []
    while remaining:
        term = remaining.pop()
        a, b = (total, term) if rng.random() < 0.5 else (term, total)
        total = a + b
        steps.append((a, "+", b, total))
    return steps


def _worked_text(rng: random.Random, steps: list[tuple[int, str, int, int]], free_format: bool) -> str:
    """`a+b=c. ` per step; with `free_format` a random space or none on each side of the operator and of
    `=`, and a random separator from SEPARATORS."""
    text = ""
    for a, operator, b, result in steps:
        spaces = [rng.choice(("", " ")) if free_format else "" for _ in range(4)]
        separator = rng.choice(SEPARATORS) if free_format else ". "
        text += f"{a}{spaces[0]}{operator}{spaces[1]}{b}{spaces[2]}={spaces[3]}{result}{separator}"
    return text


def completion_entropy(config: ArithmeticTaskConfig) -> float:
    """Mean entropy in nats per token (character, plus the closing `<|im_end|>`) of the worked completions
    the config draws for one problem, averaged over its test split: the uncertainty a model that learned
    the demonstrations exactly would have on them (the chain rule over the random choices)."""
    problems = generate_splits(dataclasses.replace(config, train_size=0))["test"]
    if not problems:
        return 0.0
    nats = tokens = 0.0
    for problem in problems:
        terms = len(problem.prompt.split("+"))
        if config.solution == "any_order":  # the first pair: n (n - 1); then a term of r left, either order
            nats += math.log(terms * (terms - 1)) + sum(math.log(2 * r) for r in range(1, terms - 1))
        if config.free_format:
            nats += (terms - 1) * (4 * math.log(2) + math.log(len(SEPARATORS)))
        tokens += len(problem.completion) + 1
    return nats / tokens


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
