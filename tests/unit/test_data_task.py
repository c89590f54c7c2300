"""The generated arithmetic task and the character tokenizer (fast, no model)."""

from __future__ import annotations

import collections
import json
import math
import re

import pytest

from cppo_rl.data.arithmetic_task import (
    SEPARATORS,
    ArithmeticTaskConfig,
    completion_entropy,
    extract_boxed_int,
    generate_splits,
    grade,
    write_dataset,
)
from cppo_rl.data.tokenizer import IM_END, build_tokenizer, check_text

SMALL = ArithmeticTaskConfig(train_size=300, test_size=50, max_operations=3, operators="+-", seed=3)


def test_splits_are_deterministic_disjoint_and_sized():
    first, second = generate_splits(SMALL), generate_splits(SMALL)
    assert first == second
    assert len(first["train"]) == 300 and len(first["test"]) == 50
    assert not {p.prompt for p in first["train"]} & {p.prompt for p in first["test"]}
    assert len({p.prompt for p in first["train"]}) == 300  # no duplicates


def test_test_split_does_not_depend_on_train_size():
    bigger = ArithmeticTaskConfig(**{**SMALL.to_dict(), "train_size": 600})
    assert generate_splits(bigger)["test"] == generate_splits(SMALL)["test"]


def test_completions_are_correct_worked_solutions():
    for problem in generate_splits(SMALL)["train"]:
        expression = problem.prompt.removeprefix("Compute ").removesuffix(".")
        assert eval(expression) == int(problem.answer)  # only digits, + and -
        assert problem.completion.endswith(f"\\boxed{{{problem.answer}}}")
        assert grade(problem.completion, problem.answer) == 1.0
        for step in problem.completion.split(" ")[:-1]:
            left, right = step.rstrip(".").split("=")
            assert eval(left) == int(right)
        assert int(problem.answer) >= 0  # allow_negative=False


def test_difficulty_knob_lengthens_the_working():
    short = generate_splits(ArithmeticTaskConfig(train_size=50, test_size=10))["train"]
    long = generate_splits(
        ArithmeticTaskConfig(train_size=50, test_size=10, min_operations=20, max_operations=20, operators="+-")
    )["train"]
    assert max(len(p.completion) for p in short) < 30
    assert min(len(p.completion) for p in long) > 150  # a few hundred tokens: one per character
    assert all(p.completion.count("=") == 20 for p in long)


ANY_ORDER = ArithmeticTaskConfig(
    train_size=300, test_size=50, min_operations=2, max_operations=6, operators="+", solution="any_order", seed=4
)


@pytest.mark.parametrize("free_format", [False, True])
def test_any_order_completions_add_every_term_once_in_some_order(free_format):
    config = ArithmeticTaskConfig(**{**ANY_ORDER.to_dict(), "free_format": free_format})
    separators = "|".join(re.escape(s) for s in SEPARATORS) if free_format else re.escape(". ")
    sentence = re.compile(rf"(\d+)( ?)\+( ?)(\d+)( ?)=( ?)(\d+)({separators})")
    orders, spaced = set(), 0
    for problem in generate_splits(config)["train"]:
        terms = collections.Counter(int(t) for t in problem.prompt.removeprefix("Compute ").rstrip(".").split("+"))
        body, box = problem.completion.rsplit("\\boxed", 1)
        assert box == f"{{{problem.answer}}}" and grade(problem.completion, problem.answer) == 1.0
        steps = list(sentence.finditer(body))
        assert "".join(m.group(0) for m in steps) == body  # nothing but sentences
        assert len(steps) == sum(terms.values()) - 1
        used, total = collections.Counter(), None
        for match in steps:
            a, b, result = int(match.group(1)), int(match.group(4)), int(match.group(7))
            assert a + b == result
            if total is None:  # the first sentence adds two terms
                used.update([a, b])
            else:  # each later one adds one new term to the running total, written on either side
                assert total in (a, b)
                used[b if a == total else a] += 1
            total = result
            spaced += any(match.group(i) for i in (2, 3, 5, 6))
        assert used == terms and total == int(problem.answer)
        orders.add(problem.completion.split("=")[0])
    assert len(orders) > 250  # the first sentence varies: not the prompt's order
    assert (spaced > 0) == free_format


@pytest.mark.parametrize(
    ("solution", "free_format", "operations", "outcomes"),
    [("any_order", False, 2, 3 * 2 * 2), ("chain", True, 1, 2**4 * len(SEPARATORS))],
)
def test_completion_entropy_is_the_demonstrations_entropy(solution, free_format, operations, outcomes):
    """The chain rule's count against the empirical entropy of many draws of one small problem."""
    import random

    from cppo_rl.data.arithmetic_task import _any_order_steps, _worked_text

    config = ArithmeticTaskConfig(
        min_operations=operations,
        max_operations=operations,
        operators="+",
        solution=solution,
        free_format=free_format,
        train_size=0,
        test_size=1,
        seed=1,
    )
    (problem,) = generate_splits(config)["test"]
    terms = [int(t) for t in problem.prompt.removeprefix("Compute ").rstrip(".").split("+")]
    assert len(set(terms)) == len(terms)  # distinct terms: every order is a different text
    rng, draws = random.Random(0), 100_000
    if solution == "any_order":
        texts = (_worked_text(rng, _any_order_steps(rng, terms), free_format) for _ in range(draws))
    else:
        texts = (_worked_text(rng, [(terms[0], "+", terms[1], sum(terms))], free_format) for _ in range(draws))
    counts = collections.Counter(texts)
    empirical = -sum(n / draws * math.log(n / draws) for n in counts.values())
    assert len(counts) == outcomes
    assert empirical == pytest.approx(completion_entropy(config) * (len(problem.completion) + 1), abs=0.01)
    assert completion_entropy(ArithmeticTaskConfig(test_size=5, train_size=0)) == 0.0  # one answer a problem


def test_dataset_rows_have_the_shared_schema(tmp_path):
    paths = write_dataset(SMALL, tmp_path)
    for split, path in paths.items():
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert len(rows) == (300 if split == "train" else 50)
        assert all(list(row) == ["prompt", "answer", "data_source", "id"] for row in rows)
        assert all(isinstance(v, str) for row in rows for v in row.values())
        assert [row["id"] for row in rows] == [str(i) for i in range(len(rows))]
        assert {row["data_source"] for row in rows} == {"arithmetic"}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"min_operand": 5, "max_operand": 2}, "`min_operand` <= `max_operand`"),
        ({"min_operations": 0}, "1 <= `min_operations`"),
        ({"operators": "*"}, "`operators` must be"),
        ({"train_size": -1}, "`train_size` and `test_size` must be >= 0"),
        ({"max_operand": 3, "train_size": 100}, "exceeds the"),
        ({"data_source": "a/b"}, "plain folder name"),
        ({"solution": "tree"}, "`solution` must be one of chain, any_order"),
        ({"solution": "any_order", "operators": "+-"}, "`operators` must be '\\+'"),
    ],
)
def test_bad_task_settings_name_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        ArithmeticTaskConfig(**change)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24+48=72. \\boxed{72}", 72),
        ("\\boxed{3} then \\boxed{ -5 }", -5),
        ("no box here", None),
        ("\\boxed{x}", None),
    ],
)
def test_boxed_answer_extraction(text, expected):
    assert extract_boxed_int(text) == expected


def test_tokenizer_round_trips_every_task_string_and_applies_the_chat_template():
    tokenizer = build_tokenizer()
    for problem in generate_splits(SMALL)["test"]:
        for text in (problem.prompt, problem.completion):
            ids = tokenizer.encode(text, add_special_tokens=False)
            assert len(ids) == len(text)  # one token per character
            assert tokenizer.decode(ids) == text
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Compute 1+2."}], add_generation_prompt=True)[
        "input_ids"
    ]
    assert tokenizer.decode(ids) == "<|im_start|>user\nCompute 1+2.<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == IM_END


def test_unknown_characters_are_reported():
    with pytest.raises(ValueError, match="é"):
        check_text("Compute é+1.")
    tokenizer = build_tokenizer()
    assert tokenizer.decode(tokenizer.encode("é", add_special_tokens=False), skip_special_tokens=True) == ""


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("24+16=40. \\boxed{40}", (1.0, "correct")),
        ("\\boxed{24+16}", (0.0, "parse_failure")),  # math-verify would accept it
        ("24+16.", (0.0, "no_answer")),
        ("\\boxed{40} \\boxed{41}", (0.0, "wrong")),
    ],
)
def test_the_task_reward_wants_a_boxed_integer(response, expected):
    from cppo_rl.data.arithmetic_task import boxed_integer_reward

    outcome = boxed_integer_reward(response, "40")
    assert (outcome.reward, outcome.reason) == expected
