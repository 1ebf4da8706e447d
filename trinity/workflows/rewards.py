"""Reward functions: ``(response_text, truth, **kwargs) -> dict[str, float]``.

A reward function returns its components (``accuracy``, ``format_score``, ...) rather than one
number so the explorer can log each one (``rollout/accuracy/mean``); the workflow sums them into
the scalar reward, as the original does. Names match the original's registry (``math_reward``,
``accuracy_reward``, ...) so its configs resolve; the short names (``math``) are aliases.

Equality of math answers goes through ``math_verify`` (the original's choice). Inputs are NFKC
normalised first so full-width digits and similar unicode variants compare equal.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import operator
import re
import threading
import unicodedata
from typing import Any

from trinity.registry import REWARD_FUNCTIONS

THINK_ANSWER_RE = re.compile(r".*?<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.S | re.M)
THINK_RE = re.compile(r"<think>.*?</think>", re.S)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.S)
NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")
THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
FORMAT_BONUS = 0.1


def normalize(text: Any) -> str:
    """NFKC (full-width digits, unicode minus lookalikes) and no thousands separators."""
    text = unicodedata.normalize("NFKC", str(text)).replace("\u2212", "-")
    return THOUSANDS_RE.sub("", text).strip()


def answer_span(text: str) -> str:
    """The first ``<answer>...</answer>`` content, else the whole text (the original's parser)."""
    match = ANSWER_RE.search(text)
    return match.group(1).strip() if match else text


def gsm8k_truth(truth: Any) -> str:
    """GSM8K answers end in ``#### N`` after the rationale: keep ``N``."""
    text = str(truth)
    return text.rsplit("####", 1)[1].strip() if "####" in text else text


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        rest = text[start + len("\\boxed") :].strip()  # "\boxed 5"
        return rest.split("$")[0].strip() or None
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : i]
    return None


def _math_timeout() -> int | None:
    # math_verify times out with SIGALRM, which only the main thread may install
    return 5 if threading.current_thread() is threading.main_thread() else None


def math_equal(prediction: str, truth: str) -> bool:
    """``math_verify`` equivalence of two answer strings; any failure counts as not equal."""
    from math_verify import verify

    timeout = _math_timeout()
    try:
        gold = _parse(normalize(truth), timeout)
        pred = _parse(normalize(prediction), timeout)
        if not gold or not pred:
            return False
        return bool(verify(list(gold), list(pred), timeout_seconds=timeout))
    except Exception:  # noqa: BLE001 - sympy/latex2sympy raise anything on odd input
        return False


@functools.lru_cache(maxsize=8192)
def _parse(text: str, timeout: int | None) -> tuple[Any, ...]:
    """Cached: a GRPO group shares one truth and often repeats the same short answers."""
    from math_verify import parse

    return tuple(parse(text, parsing_timeout=timeout))


def _as_number(text: str) -> float | None:
    try:
        if "/" in text:
            num, den = text.split("/")
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        return None


def format_score(response_text: str) -> float:
    return FORMAT_BONUS if THINK_ANSWER_RE.match(response_text) else -FORMAT_BONUS


@REWARD_FUNCTIONS.register("math_reward", "math")
def math_reward(response_text: str, truth: Any, **kwargs: Any) -> dict[str, float]:
    """The original's ``MathRewardFn``: math_verify accuracy of the ``<answer>`` span + format ±0.1.

    The truth may be a whole GSM8K answer (rationale and ``#### N``); only ``N`` is compared.
    """
    accuracy = math_equal(answer_span(response_text), gsm8k_truth(truth))
    return {"accuracy": float(accuracy), "format_score": format_score(response_text)}


@REWARD_FUNCTIONS.register("format_reward", "format")
def format_reward(response_text: str, truth: Any = None, **kwargs: Any) -> dict[str, float]:
    """+0.1 for ``<think>...</think> <answer>...</answer>``, else -0.1."""
    return {"format_score": format_score(response_text)}


@REWARD_FUNCTIONS.register("math_boxed_reward", "math_boxed")
def math_boxed_reward(
    response_text: str, truth: Any, with_think: bool = False, **kwargs: Any
) -> dict[str, float]:
    """Accuracy of the last ``\\boxed{}``; ``with_think`` costs 0.1 when the think block is missing."""
    predicted = last_boxed(response_text)
    truth_text = gsm8k_truth(truth)
    truth_text = last_boxed(truth_text) or truth_text
    accuracy = predicted is not None and math_equal(f"${predicted}$", f"${truth_text}$")
    penalty = -FORMAT_BONUS if with_think and not THINK_RE.search(response_text) else 0.0
    return {"accuracy": float(accuracy), "format_score": penalty}


@REWARD_FUNCTIONS.register("accuracy_reward", "accuracy")
def accuracy_reward(response_text: str, truth: Any, **kwargs: Any) -> dict[str, float]:
    """Short answers (the arithmetic taskset, plain GSM8K numbers): 1.0 when they match.

    The candidate is the ``<answer>`` span, else the last ``\\boxed{}``, else the whole text. A
    numeric truth is compared with the last number in the candidate (so "3 + 4 = 7" is right);
    LaTeX and non-numeric answers need a normalised string match or math_verify equivalence.
    """
    match = ANSWER_RE.search(response_text)
    candidate = match.group(1) if match else (last_boxed(response_text) or response_text)
    candidate, truth_text = normalize(candidate), normalize(gsm8k_truth(truth))
    target = _as_number(truth_text)
    if target is not None and "\\" not in candidate:  # LaTeX answers go to math_verify
        numbers = NUMBER_RE.findall(candidate)
        value = _as_number(numbers[-1]) if numbers else None
        correct = value is not None and math.isclose(value, target, rel_tol=1e-9, abs_tol=1e-9)
    else:
        same = " ".join(candidate.lower().split()) == " ".join(truth_text.lower().split())
        correct = same or math_equal(candidate, truth_text)
    return {"accuracy": float(correct)}


# countdown: an arithmetic expression over given numbers that must hit a target

_BIN_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


def eval_arithmetic(expression: str) -> tuple[float, list[int]]:
    """Evaluate ``+ - * /`` over integer literals with no ``eval``; returns (value, literals).

    Raises ValueError on anything else (names, calls, powers, floats), so a response cannot run
    code or sneak in numbers that were not given.
    """
    literals: list[int] = []

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.BinOp) and type(node.op) in _BIN_OPS:
            return _BIN_OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            literals.append(node.value)
            return node.value
        raise ValueError(f"not allowed in an arithmetic expression: {ast.dump(node)[:60]}")

    if len(expression) > 200:
        raise ValueError("expression too long")
    try:
        tree = ast.parse(expression.replace("×", "*").replace("÷", "/"), mode="eval")
        value = walk(tree.body)
    except (SyntaxError, ZeroDivisionError, RecursionError) as exc:
        raise ValueError(str(exc)) from exc
    return value, literals


def countdown_truth(truth: Any, **kwargs: Any) -> tuple[float, list[int]]:
    """(target, numbers) from a dict / JSON ``{"target", "numbers"|"nums"}``, or a solution."""
    if isinstance(truth, str) and truth.strip().startswith("{"):
        truth = json.loads(truth)
    if isinstance(truth, dict):
        return float(truth["target"]), [int(n) for n in truth.get("numbers", truth.get("nums"))]
    if "target" in kwargs and ("numbers" in kwargs or "nums" in kwargs):
        return float(kwargs["target"]), [int(n) for n in kwargs.get("numbers", kwargs.get("nums"))]
    return eval_arithmetic(str(truth))  # a reference solution fixes both target and numbers


@REWARD_FUNCTIONS.register("countdown_reward", "countdown")
def countdown_reward(
    response_text: str, truth: Any, format_bonus: float = FORMAT_BONUS, **kwargs: Any
) -> dict[str, float]:
    """TinyZero's countdown score: 1.0 for a correct equation using every number exactly once,
    ``format_bonus`` for a well-formed ``<answer>`` that misses, 0.0 when there is none.

    The truth is ``{"target": T, "numbers": [...]}`` (dict or JSON) or a reference solution
    expression; the last ``<answer>`` span is judged (the model may restate the question).
    """
    target, numbers = countdown_truth(truth, **kwargs)
    spans = ANSWER_RE.findall(normalize(response_text))
    if not spans:
        return {"accuracy": 0.0, "format_score": 0.0}
    expression = spans[-1].split("=")[0].strip()
    try:
        value, used = eval_arithmetic(expression)
    except ValueError:
        return {"accuracy": 0.0, "format_score": format_bonus}
    correct = sorted(used) == sorted(numbers) and abs(value - target) < 1e-5
    return {"accuracy": float(correct), "format_score": 0.0 if correct else format_bonus}
