"""Built-in procedural tasksets (``path: builtin:<name>``, knobs in ``builtin_args``).

They make demos and tests run with no download: rows are generated from a seed, row ``i`` from
its own RNG, so a taskset is identical across machines and its first rows do not depend on
``size``. Rows use the usual ``question`` / ``answer`` keys, so ``prompt_key: question`` and
``response_key: answer`` work with every workflow.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from trinity.registry import BUILTIN_TASKSETS
from trinity.workflows.workflows import countdown_question

MAX_TRIES = 1000
_OPS: dict[str, Callable[[Fraction, Fraction], Fraction]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
}


def build_builtin(name: str, args: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return BUILTIN_TASKSETS.get(name)(**(args or {}))


def _row_rng(kind: str, seed: int, index: int) -> random.Random:
    return random.Random(f"{kind}:{seed}:{index}")  # str seeds hash with sha512: stable everywhere


def _evaluate(numbers: list[int], ops: list[str]) -> Fraction:
    """Left-to-right chain with the usual precedence of * and / over + and -."""
    terms: list[Fraction] = [Fraction(numbers[0])]
    signs: list[str] = []
    for op, number in zip(ops, numbers[1:], strict=True):
        if op in "*/":
            terms[-1] = _OPS[op](terms[-1], Fraction(number))
        else:
            signs.append(op)
            terms.append(Fraction(number))
    total = terms[0]
    for op, term in zip(signs, terms[1:], strict=True):
        total = _OPS[op](total, term)
    return total


@BUILTIN_TASKSETS.register("arithmetic")
def arithmetic(
    size: int = 1024,
    num_terms: int = 2,
    max_operand: int = 9,
    operators: str | list[str] = "+-",
    allow_negative: bool = False,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """``What is 3 + 7 * 2?`` -> ``17``. Operands are 0..max_operand (1.. after a ``/``); a ``/``
    only ever divides exactly, and results stay >= 0 unless ``allow_negative``.
    """
    ops = [op for op in operators if op.strip()]
    unknown = sorted(set(ops) - set(_OPS))
    if unknown or not ops or num_terms < 1 or max_operand < 1:
        raise ValueError(
            f"arithmetic taskset: operators must be from '+-*/' (got {operators!r}), "
            f"num_terms >= 1 and max_operand >= 1"
        )
    rows = []
    for index in range(size):
        rng = _row_rng("arithmetic", seed, index)
        for _ in range(MAX_TRIES):
            chosen = [rng.choice(ops) for _ in range(num_terms - 1)]
            numbers = [rng.randint(0, max_operand)]
            numbers += [rng.randint(1 if op == "/" else 0, max_operand) for op in chosen]
            value = _evaluate(numbers, chosen)
            if value.denominator == 1 and (allow_negative or value >= 0):
                break
        else:
            raise ValueError(f"arithmetic taskset: no exact integer result for args at row {index}")
        expression = " ".join(
            str(token) for pair in zip(numbers, [*chosen, ""], strict=True) for token in pair
        ).strip()
        rows.append({"question": f"What is {expression}?", "answer": str(value.numerator)})
    return rows


def _random_solution(rng: random.Random, numbers: list[int]) -> tuple[str, Fraction] | None:
    """Combine all numbers in a random order and random binary tree; None if a division fails."""
    items = [(str(n), Fraction(n)) for n in rng.sample(numbers, len(numbers))]
    while len(items) > 1:
        i = rng.randrange(len(items) - 1)
        (left, a), (right, b) = items[i], items[i + 1]
        op = rng.choice("+-*/")
        if op == "/" and (b == 0 or (a / b).denominator != 1):
            return None
        items[i : i + 2] = [(f"({left} {op} {right})", _OPS[op](a, b))]
    expression, value = items[0]
    return (expression[1:-1] if expression.startswith("(") else expression), value


@BUILTIN_TASKSETS.register("countdown")
def countdown(
    size: int = 1024,
    num_numbers: int = 3,
    max_number: int = 20,
    max_target: int = 100,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Reach ``target`` with ``nums`` (each exactly once, ``+ - * /``): a multi-step puzzle.

    Every row is solvable: the target comes from a random expression over the numbers, kept in
    ``answer`` as a reference solution (the reward checks any correct expression).
    """
    if num_numbers < 2 or max_number < 1 or max_target < 1:
        raise ValueError(
            "countdown taskset: need num_numbers >= 2, max_number >= 1, max_target >= 1"
        )
    rows = []
    for index in range(size):
        rng = _row_rng("countdown", seed, index)
        for _ in range(MAX_TRIES):
            nums = [rng.randint(1, max_number) for _ in range(num_numbers)]
            solved = _random_solution(rng, nums)
            if solved and solved[1].denominator == 1 and 0 < solved[1] <= max_target:
                break
        else:
            raise ValueError(f"countdown taskset: no target in 1..{max_target} at row {index}")
        expression, target = solved[0], int(solved[1])
        rows.append(
            {
                "question": countdown_question(nums, target),
                "nums": nums,
                "target": target,
                "answer": expression,
            }
        )
    return rows


def _reachable(grid: list[str]) -> bool:
    n = len(grid)
    seen, todo = {(0, 0)}, [(0, 0)]
    while todo:
        r, c = todo.pop()
        if grid[r][c] == "G":
            return True
        for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
            if 0 <= nr < n and 0 <= nc < n and (nr, nc) not in seen and grid[nr][nc] != "H":
                seen.add((nr, nc))
                todo.append((nr, nc))
    return False


@BUILTIN_TASKSETS.register("frozen_lake")
def frozen_lake(
    size: int = 1024, grid: int = 4, hole_prob: float = 0.2, seed: int = 0
) -> list[dict[str, Any]]:
    """Solvable ``grid`` x ``grid`` lakes (``map``: S start top-left, G goal bottom-right, H holes
    with probability ``hole_prob``) for ``frozen_lake_workflow``."""
    if grid < 2 or not 0 <= hole_prob < 1:
        raise ValueError("frozen_lake taskset: need grid >= 2 and 0 <= hole_prob < 1")
    rows = []
    for index in range(size):
        rng = _row_rng("frozen_lake", seed, index)
        for _ in range(MAX_TRIES):
            cells = [
                ["H" if rng.random() < hole_prob else "F" for _ in range(grid)] for _ in range(grid)
            ]
            cells[0][0], cells[-1][-1] = "S", "G"
            lake = ["".join(row) for row in cells]
            if _reachable(lake):
                break
        rows.append({"map": lake})
    return rows


@BUILTIN_TASKSETS.register("sudoku")
def sudoku(size: int = 1024, blanks: int = 6, seed: int = 0) -> list[dict[str, Any]]:
    """4x4 sudokus (2x2 boxes) with ``blanks`` cells to fill (``puzzle``, ``solution``) for
    ``sudoku_workflow``: a valid board shuffled by digit, band and column permutations."""
    if not 1 <= blanks <= 16:
        raise ValueError("sudoku taskset: blanks must be in 1..16")
    base = [[(2 * (r % 2) + r // 2 + c) % 4 + 1 for c in range(4)] for r in range(4)]
    rows = []
    for index in range(size):
        rng = _row_rng("sudoku", seed, index)
        digits = rng.sample(range(1, 5), 4)
        bands = rng.sample([0, 1], 2)
        order = [2 * band + r for band in bands for r in rng.sample([0, 1], 2)]
        stacks = rng.sample([0, 1], 2)
        cols = [2 * stack + c for stack in stacks for c in rng.sample([0, 1], 2)]
        board = [[digits[base[r][c] - 1] for c in cols] for r in order]
        hidden = set(rng.sample(range(16), blanks))
        rows.append(
            {
                "puzzle": [
                    "".join("." if 4 * r + c in hidden else str(board[r][c]) for c in range(4))
                    for r in range(4)
                ],
                "solution": ["".join(map(str, row)) for row in board],
            }
        )
    return rows
