"""Reward functions on real GSM8K-style responses: what counts as right, and the format bonus."""

from __future__ import annotations

import json

import pytest

from trinity.workflows import REWARD_FUNCTIONS
from trinity.workflows.rewards import (
    accuracy_reward,
    countdown_reward,
    eval_arithmetic,
    format_reward,
    last_boxed,
    math_boxed_reward,
    math_reward,
)

NATALIA = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)
JAMES = "So he makes 22500*20=$<<22500*20=450000>>450,000 in 20 weeks\n#### 448000"
WENG = "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"

MATH_CASES = [
    # (response, truth, accuracy, format_score)
    ("<think>48/2 = 24 in May; 48 + 24 = 72</think> <answer>72</answer>", NATALIA, 1.0, 0.1),
    ("<think>\nMay: 24\n</think>\n<answer>\n72\n</answer>\n", NATALIA, 1.0, 0.1),
    ("She sold 72 clips altogether.", NATALIA, 1.0, -0.1),  # no tags: whole text is parsed
    ("<think>48 + 48 = 96</think> <answer>96</answer>", NATALIA, 0.0, 0.1),  # wrong, well formed
    ("<think>unfinished <answer>72</answer>", NATALIA, 1.0, -0.1),  # malformed think block
    ("<think>24 + 48</think> <answer>72</answer> and that is final", NATALIA, 1.0, -0.1),
    ("<think>hmm</think> <answer>I am not sure</answer>", NATALIA, 0.0, 0.1),
    ("I don't know.", NATALIA, 0.0, -0.1),
    ("", NATALIA, 0.0, -0.1),
    ("<answer>５</answer>", "#### 5", 1.0, -0.1),  # full-width digits
    ("<think>.</think><answer>448,000</answer>", JAMES, 1.0, 0.1),  # thousands separators
    ("<answer>$448,000</answer>", JAMES, 1.0, -0.1),
    ("<answer>$1,234</answer>", "#### 1234", 1.0, -0.1),
    ("<answer>$10</answer>", WENG, 1.0, -0.1),
    ("<answer>10.00</answer>", WENG, 1.0, -0.1),
    ("<answer>-5</answer>", "#### -5", 1.0, -0.1),  # negative numbers
    ("<answer>\u22125</answer>", "#### -5", 1.0, -0.1),  # unicode minus sign
    ("<answer>5</answer>", "#### -5", 0.0, -0.1),
    ("<answer>\\frac{1}{2}</answer>", "#### 0.5", 1.0, -0.1),  # LaTeX
    ("<answer>$\\frac{3}{4}$</answer>", "\\frac{3}{4}", 1.0, -0.1),
    ("<answer>\\boxed{72}</answer>", NATALIA, 1.0, -0.1),
    ("<answer>72 clips</answer>", "72", 1.0, -0.1),
    ("<answer>5</answer> wait <answer>72</answer>", NATALIA, 0.0, -0.1),  # first answer counts
]


@pytest.mark.parametrize("response,truth,accuracy,fmt", MATH_CASES)
def test_math_reward(response, truth, accuracy, fmt):
    assert math_reward(response, truth) == {"accuracy": accuracy, "format_score": fmt}


def test_math_reward_sums_to_the_originals_four_values():
    totals = {round(sum(math_reward(r, t).values()), 6) for r, t, *_ in MATH_CASES}
    assert totals == {-0.1, 0.1, 0.9, 1.1}


@pytest.mark.parametrize(
    "response,ok",
    [
        ("<think>a</think><answer>b</answer>", True),
        ("prefix <think>a</think>\n\n<answer>b</answer>  \n", True),
        ("<answer>b</answer>", False),
        ("<think>a</think>", False),
        ("<answer>b</answer><think>a</think>", False),
    ],
)
def test_format_reward(response, ok):
    assert format_reward(response, None) == {"format_score": 0.1 if ok else -0.1}


BOXED_CASES = [
    ("So the total is \\boxed{72}.", NATALIA, 1.0),
    ("$\\boxed{\\frac{1}{2}}$", "0.5", 1.0),
    ("\\boxed{\\frac{3}{4}}", "\\boxed{\\frac{3}{4}}", 1.0),  # nested braces
    ("First \\boxed{3}, no wait: \\boxed{4}", "4", 1.0),  # the last box counts
    ("\\boxed{1,234}", "#### 1234", 1.0),
    ("\\boxed{-7}", "-7", 1.0),
    ("\\boxed{7}", "-7", 0.0),
    ("The answer is 72.", NATALIA, 0.0),  # no box
    ("\\boxed{72", NATALIA, 0.0),  # unbalanced
]


@pytest.mark.parametrize("response,truth,accuracy", BOXED_CASES)
def test_math_boxed_reward(response, truth, accuracy):
    assert math_boxed_reward(response, truth) == {"accuracy": accuracy, "format_score": 0.0}


def test_math_boxed_with_think_penalises_a_missing_think_block():
    assert math_boxed_reward("\\boxed{4}", "4", with_think=True)["format_score"] == -0.1
    assert math_boxed_reward("<think>2+2</think> \\boxed{4}", "4", with_think=True) == {
        "accuracy": 1.0,
        "format_score": 0.0,
    }


def test_last_boxed():
    assert last_boxed("a \\boxed{x^{2}} b") == "x^{2}"
    assert last_boxed("\\fbox{5}") == "5"
    assert last_boxed("nothing") is None


ACCURACY_CASES = [
    ("12", "12", 1.0),
    ("The answer is 12.", "12", 1.0),
    ("3 + 9 = 12", "12", 1.0),
    ("12.0", "12", 1.0),
    ("13", "12", 0.0),
    ("", "12", 0.0),
    ("-3", "-3", 1.0),
    ("3", "-3", 0.0),
    ("1,234", "1234", 1.0),
    ("１２", "12", 1.0),
    ("<answer>7</answer> or maybe 8", "7", 1.0),
    ("\\boxed{7}, not 8", "7", 1.0),
    ("She sold 72 clips.", NATALIA, 1.0),
    ("paris", "Paris", 1.0),
    ("London", "Paris", 0.0),
    ("\\frac{1}{2}", "\\frac{1}{2}", 1.0),
    ("$\\frac{1}{2}$", "0.5", 1.0),
    ("\\frac{1}{3}", "0.5", 0.0),
]


@pytest.mark.parametrize("response,truth,accuracy", ACCURACY_CASES)
def test_accuracy_reward(response, truth, accuracy):
    assert accuracy_reward(response, truth) == {"accuracy": accuracy}


NUMS = {"target": 56, "numbers": [13, 4, 4]}
COUNTDOWN_CASES = [
    ("<think>13*4=52, +4</think> <answer>(13 * 4) + 4</answer>", NUMS, 1.0, 0.0),
    ("<answer>13*4+4 = 56</answer>", NUMS, 1.0, 0.0),  # "= target" is tolerated
    ("<answer>4 * 13 + 4</answer>", json.dumps(NUMS), 1.0, 0.0),  # JSON truth
    ("<answer>4 + 4 * 13</answer>", "(13 * 4) + 4", 1.0, 0.0),  # reference-solution truth
    ("<answer>13 + 4 + 4</answer>", NUMS, 0.0, 0.1),  # wrong value
    ("<answer>13 * 4 + 4 + 4</answer>", NUMS, 0.0, 0.1),  # a number used twice
    ("<answer>52 + 4</answer>", NUMS, 0.0, 0.1),  # numbers not given
    ("<answer>__import__('os').getcwd()</answer>", NUMS, 0.0, 0.1),  # no code runs
    ("<answer>13 ** 4</answer>", NUMS, 0.0, 0.1),
    ("(13 * 4) + 4", NUMS, 0.0, 0.0),  # no answer tags
    ("<answer>6 / 3 * 2</answer>", {"target": 4, "nums": [6, 3, 2]}, 1.0, 0.0),
    ("<answer>6 / 0 + 3 + 2</answer>", {"target": 4, "nums": [6, 0, 3, 2]}, 0.0, 0.1),
]


@pytest.mark.parametrize("response,truth,accuracy,fmt", COUNTDOWN_CASES)
def test_countdown_reward(response, truth, accuracy, fmt):
    assert countdown_reward(response, truth) == {"accuracy": accuracy, "format_score": fmt}


def test_eval_arithmetic_rejects_anything_but_integer_arithmetic():
    assert eval_arithmetic("(1 + 2) * 3 - -4") == (13, [1, 2, 3, 4])
    for bad in ("x + 1", "1.5 + 2", "2 ** 3", "abs(-1)", "1 +", "9" * 300):
        with pytest.raises(ValueError):
            eval_arithmetic(bad)


def test_registry_names_match_the_original():
    for name in (
        "math_reward",
        "math_boxed_reward",
        "format_reward",
        "countdown_reward",
        "accuracy_reward",
        "math",
        "math_boxed",
        "format",
        "countdown",
        "accuracy",
    ):
        assert name in REWARD_FUNCTIONS
    with pytest.raises(KeyError, match="did you mean 'math_reward'"):
        REWARD_FUNCTIONS.get("math_rewrd")
