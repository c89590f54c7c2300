"""In-process grading with math-verify: real gold formats from /work/shared/data, model-style outputs."""

import subprocess
import sys
import threading

import pytest
from math_verify.errors import TimeoutException

from cppo_rl.rewards import REASONS, RewardOutcome, RewardPool, grade, math_grader, math_verify_reward

# (gold as the dataset gives it, model output, expected reason). Golds are copied from
# gsm8k/test.jsonl, math500/test.jsonl and aime24/test.jsonl (ids in the comments).
CASES = [
    # plain numbers, GSM8K style (gsm8k 0, 611)
    ("18", "She has 16 - 3 - 4 = 9 eggs left and sells them for 9 * $2 = $18.\n#### 18", "correct"),
    ("18", "16 - 3 - 4 = 9 eggs, so she makes 9 * 2 = 18 dollars. The answer is 18.", "correct"),
    ("18", "16 - 3 - 4 = 9, and 9 * 2 = 20. The answer is 20.", "wrong"),
    ("1,450,000", "So the total is 1,450,000 dollars.", "correct"),
    ("1,450,000", "The total cost is $\\boxed{1450000}$.", "correct"),
    ("10,\\!080", "There are $7! \\cdot 2 = \\boxed{10080}$ arrangements.", "correct"),  # counting_and_probability/508
    ("204", "Hence $m + n = \\boxed{204}$.", "correct"),  # aime24 60
    # LaTeX vs plain; \frac vs decimal (precalculus/190, prealgebra/1742)
    ("\\frac{9}{256}", "The product equals $\\boxed{\\frac{9}{256}}$.", "correct"),
    ("\\frac{9}{256}", "Numerically the product is $\\boxed{0.03515625}$.", "correct"),
    ("\\frac{9}{256}", "The product is $\\boxed{\\frac{9}{128}}$.", "wrong"),
    ("\\dfrac{33}{100}", "So the probability is 33/100.", "correct"),
    ("\\dfrac{33}{100}", "The final answer is 0.33", "correct"),
    # \boxed first, then anchors: a later stray number does not override the box
    ("18", "Therefore $\\boxed{18}$. (Check: 17 + 1 = 18, not 19.)", "correct"),
    # \fbox, in and out of math mode
    ("\\frac{9}{256}", "Thus the answer is $\\fbox{\\frac{9}{256}}$.", "correct"),
    ("204", "Final: \\fbox{204}", "correct"),
    # tuples, complex numbers, expressions (precalculus/807, precalculus/779)
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "In polar form: $\\boxed{\\left(3, \\frac{\\pi}{2}\\right)}$.", "correct"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "In polar form: $\\boxed{(3, \\pi)}$.", "wrong"),
    ("-2 + 7i", "The image is $\\boxed{-2+7i}$.", "correct"),
    ("p - q", "The double sum equals $\\boxed{p - q}$.", "correct"),
    # sets (intermediate_algebra/428, intermediate_algebra/2015): order does not matter
    ("3, 5, 7", "The roots are $\\boxed{7, 3, 5}$.", "correct"),
    ("3, 5, 7", "The roots are $\\boxed{3, 5}$.", "wrong"),
    ("\\{1\\pm\\sqrt{5},-2\\}", "The roots are $\\boxed{-2, 1+\\sqrt{5}, 1-\\sqrt{5}}$.", "correct"),
    # intervals (intermediate_algebra/558, algebra/2043)
    ("(3,4]", "Therefore $\\lambda \\in \\boxed{(3,4]}$.", "correct"),
    ("(3,4]", "Therefore $\\lambda \\in \\boxed{[3,4]}$.", "wrong"),
    ("(-\\infty, 2) \\cup (3, \\infty)", "The domain is $\\boxed{(-\\infty,2)\\cup(3,\\infty)}$.", "correct"),
    # units and degrees (prealgebra/1044, geometry/846)
    ("5.4 \\text{ cents}", "The average price was $\\boxed{5.4}$ cents.", "correct"),
    ("5.4 \\text{ cents}", "The average price was $\\boxed{5.4 \\text{ cents}}$.", "correct"),
    ("90^\\circ", "So $\\angle BAC = \\boxed{90^\\circ}$.", "correct"),
    ("90^\\circ", "So $\\angle BAC = \\boxed{90}$.", "correct"),
    # percent outside a box: math-verify accepts 25% for both 25 and 0.25
    ("25", "The price dropped by 25%.", "correct"),
    ("0.25", "The price dropped by 25%.", "correct"),
    # known math-verify limit: it cannot parse a percent sign inside \boxed{}
    ("25", "The price dropped by $\\boxed{25\\%}$.", "parse_failure"),
    # text answers (algebra/1349, precalculus/819)
    ("\\text{Evelyn}", "The fastest runner is $\\boxed{\\text{Evelyn}}$.", "correct"),
    ("\\text{(C)}", "The shape is a plane, so the answer is $\\boxed{\\text{(C)}}$.", "correct"),
    # no answer / an answer math-verify cannot parse
    ("18", "", "no_answer"),
    ("18", "I am not sure how to solve this problem.", "no_answer"),
    ("18", "The answer is \\boxed{??}", "parse_failure"),
    # the gold itself is broken
    ("", "The answer is \\boxed{18}.", "gold_unparseable"),
]


@pytest.mark.parametrize(("gold", "response", "reason"), CASES)
def test_grades_model_outputs_like_math_verify(gold, response, reason):
    outcome = grade(response, gold)
    assert outcome.reason == reason
    assert outcome.reward == (1.0 if reason == "correct" else 0.0)
    assert math_verify_reward(response, gold) == outcome.reward


def test_bytes_and_lone_surrogates_are_decoded():
    assert grade(b"\xff\xfe so the answer is \\boxed{18} \x80", "18").reason == "correct"
    assert grade("\ud800 so the answer is \\boxed{18} \udfff", "18").reason == "correct"


def test_runs_off_the_main_thread_without_signal_errors():
    results = []
    thread = threading.Thread(target=lambda: results.append(grade("so \\boxed{\\frac{1}{2}}", "0.5")))
    thread.start()
    thread.join()
    assert results == [RewardOutcome(1.0, "correct")]


def test_math_verify_timeout_is_reason_timeout(monkeypatch):
    import time

    import math_verify.parser

    # math-verify's own (signal) timeout wraps its extraction step: make that step slower than the limit
    monkeypatch.setattr(math_verify.parser, "extract_target_from_pred", lambda *args, **kwargs: time.sleep(3))
    assert grade("\\boxed{1}", "2", timeout_s=1) == RewardOutcome(0.0, "timeout")


def test_verify_failures_are_timeout_or_error(monkeypatch):
    def times_out(*args, **kwargs):
        raise TimeoutException("slow")

    def breaks(*args, **kwargs):
        raise RuntimeError("sympy broke")

    monkeypatch.setattr(math_grader, "verify", times_out)
    assert grade("\\boxed{18}", "18") == RewardOutcome(0.0, "timeout")
    monkeypatch.setattr(math_grader, "verify", breaks)
    assert grade("\\boxed{18}", "18") == RewardOutcome(0.0, "error")


def test_every_reason_is_covered():
    covered = {reason for _, _, reason in CASES} | {"timeout", "error"}
    assert covered | {"crashed"} == set(REASONS)  # "crashed" needs a worker process: integration test


@pytest.mark.parametrize(
    ("call", "error", "names"),
    [
        (lambda: grade("x", 18), TypeError, "`gold`"),
        (lambda: grade(None, "18"), TypeError, "`response`"),
        (lambda: grade("x", "18", timeout_s=0), ValueError, "`timeout_s`"),
        (lambda: RewardOutcome(0.0, "maybe"), ValueError, "`reason`"),
        (lambda: RewardPool(num_workers=0), ValueError, "`num_workers`"),
        (lambda: RewardPool(timeout_s=float("inf")), ValueError, "`timeout_s`"),
        (lambda: RewardPool(memory_limit_mb=64), ValueError, "`memory_limit_mb`"),
        (lambda: RewardPool(grader="cppo_rl.rewards.grade"), TypeError, "`grader`"),
        (lambda: RewardPool(grader=lambda response, gold: None), TypeError, "`grader`"),
    ],
)
def test_bad_arguments_name_the_argument(call, error, names):
    with pytest.raises(error, match=names):
        call()


def test_import_is_light():
    code = "import sys, cppo_rl.rewards; print([m for m in ('ray', 'vllm', 'deepspeed', 'torch') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        ("24+16. \\. \\.....1....", "no_answer"),  # graded correct by `grade`'s expression fallback
        ("so the answer is 40", "no_answer"),
        ("\\boxed{40", "no_answer"),  # never closes
        ("work \\boxed{40} then \\boxed{\\frac{1}{2}}", "wrong"),  # the last box counts
        ("\\boxed{\\frac{1}{2}} then \\fbox{40}", "correct"),
        ("nested \\boxed{\\frac{80}{2}}", "correct"),
    ],
)
def test_grade_boxed_counts_only_the_last_box(response, reason):
    from cppo_rl.rewards.math_grader import grade_boxed

    assert grade_boxed(response, "40").reason == reason
    if reason == "no_answer" and response.startswith("24+16"):
        assert grade(response, "40").reason == "correct"  # the loophole the boxed grader closes
