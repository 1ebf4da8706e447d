"""Offline environments for agent training: pure Python, built from a taskset row, no download.

An ``Env`` answers the model's text with an observation, a reward and whether the episode is
over; ``trinity.workflows.agents.EnvWorkflow`` runs the dialogue. The rows come from the
procedural tasksets ``builtin:frozen_lake`` and ``builtin:sudoku`` (``trinity.buffer.procedural``)
or from any file holding the same keys.
"""

from __future__ import annotations

import ast
import operator
import re
from typing import Any, Protocol

MOVES = {"left": (0, -1), "down": (1, 0), "right": (0, 1), "up": (-1, 0)}


class Env(Protocol):
    system_prompt: str
    row_key: str  # the taskset column it is built from

    def __init__(self, raw: dict[str, Any], max_steps: int = ...): ...

    def reset(self) -> str:
        """The first observation."""

    def step(self, action: str) -> tuple[str, float, bool]:
        """(observation, reward, done) after the model's reply ``action``."""

    def state(self) -> str:
        """The environment's state as text: equal texts are the same state, whatever the
        episode (GiGPO groups the turns taken in one state: ``EnvWorkflow``)."""


class FrozenLake:
    """Walk from S to G on a grid of frozen tiles (F) without stepping into a hole (H).

    One move per turn, the last of ``left / down / right / up`` in the reply; reward 1 on the
    goal, 0 in a hole or when ``max_steps`` run out. Row keys: ``map`` (list of strings).
    """

    row_key = "map"
    system_prompt = (
        "You are walking on a frozen lake. S is the start, G the goal, H a hole, F frozen ice "
        "and P where you stand. Each turn, answer with one move: left, down, right or up."
    )

    def __init__(self, raw: dict[str, Any], max_steps: int = 8):
        self.grid = [str(line) for line in raw["map"]]
        self.max_steps = max_steps
        self.pos = next(
            (r, c) for r, line in enumerate(self.grid) for c, ch in enumerate(line) if ch == "S"
        )
        self.steps = 0

    def render(self) -> str:
        rows = []
        for r, line in enumerate(self.grid):
            rows.append("".join("P" if (r, c) == self.pos else ch for c, ch in enumerate(line)))
        return "\n".join(rows)

    def reset(self) -> str:
        return f"{self.render()}\nYour move?"

    def state(self) -> str:
        return f"{'/'.join(self.grid)} at {self.pos}"

    @staticmethod
    def move(reply: str) -> str | None:
        """The move a reply makes (its last of left / down / right / up), None if none."""
        found = re.findall(r"\b(left|down|right|up)\b", reply.lower())
        return found[-1] if found else None

    def step(self, action: str) -> tuple[str, float, bool]:
        self.steps += 1
        move = self.move(action)
        if move is None:
            out_of_steps = self.steps >= self.max_steps
            return "Invalid move: answer left, down, right or up.", 0.0, out_of_steps
        dr, dc = MOVES[move]
        r = min(max(self.pos[0] + dr, 0), len(self.grid) - 1)
        c = min(max(self.pos[1] + dc, 0), len(self.grid[0]) - 1)
        self.pos = (r, c)
        tile = self.grid[r][c]
        if tile == "G":
            return "You reached the goal.", 1.0, True
        if tile == "H":
            return "You fell into a hole.", 0.0, True
        return f"{self.render()}\nYour move?", 0.0, self.steps >= self.max_steps


class Sudoku:
    """Fill a small sudoku (4x4 with 2x2 boxes by default): each turn, placements ``row col
    value`` (1-based, one per line); a conflicting or out-of-range placement is refused.

    Reward 1 when the board is full and valid. Row keys: ``puzzle`` (rows of digits, ``.``
    for a blank), optional ``box`` ([rows, cols] of a box, [2, 2]).
    """

    row_key = "puzzle"
    system_prompt = (
        "You are solving a sudoku: every row, column and box must hold each digit once. Dots are "
        "blanks. Answer with placements, one per line, as: row column value (1-based)."
    )

    def __init__(self, raw: dict[str, Any], max_steps: int = 6):
        self.board = [[0 if ch == "." else int(ch) for ch in str(row)] for row in raw["puzzle"]]
        self.box = tuple(raw.get("box") or (2, 2))
        self.size = len(self.board)
        self.max_steps = max_steps
        self.steps = 0

    def render(self) -> str:
        return "\n".join("".join(str(v) if v else "." for v in row) for row in self.board)

    def reset(self) -> str:
        return f"{self.render()}\nYour placements?"

    def state(self) -> str:
        return f"{self.render()} box {self.box}"

    def allowed(self, r: int, c: int, v: int) -> bool:
        if not (0 <= r < self.size and 0 <= c < self.size and 1 <= v <= self.size):
            return False
        if self.board[r][c] or v in self.board[r] or v in (row[c] for row in self.board):
            return False
        br, bc = r - r % self.box[0], c - c % self.box[1]
        box = [
            self.board[i][j]
            for i in range(br, br + self.box[0])
            for j in range(bc, bc + self.box[1])
        ]
        return v not in box

    def step(self, action: str) -> tuple[str, float, bool]:
        self.steps += 1
        placed, refused = 0, 0
        for r, c, v in re.findall(r"(\d+)\s*[ ,]\s*(\d+)\s*[ ,]\s*(\d+)", action):
            r, c, v = int(r) - 1, int(c) - 1, int(v)
            if self.allowed(r, c, v):
                self.board[r][c] = v
                placed += 1
            else:
                refused += 1
        if all(all(row) for row in self.board):
            return "Solved.", 1.0, True
        note = f"Placed {placed}, refused {refused}."
        return f"{note}\n{self.render()}\nYour placements?", 0.0, self.steps >= self.max_steps


_ARITHMETIC = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def calculate(expression: str) -> float:
    """Evaluate + - * / and parentheses over numbers; anything else is a ``ValueError``."""

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
            return _ARITHMETIC[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _ARITHMETIC:
            return _ARITHMETIC[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")

    try:
        return value(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ZeroDivisionError) as exc:
        raise ValueError(str(exc)) from exc
