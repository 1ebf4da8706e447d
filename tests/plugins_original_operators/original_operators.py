"""Experience operators written for Trinity-RFT 0.6, as its users write them.

- ``keep_top_reward``: sync ``ExperienceOperator`` from the package path; keeps the best
  ``keep`` experiences of each task group (``eid.tid``) and records its rank in ``info``.
- ``async_length_penalty``: ``ExperienceOperatorV1`` from the module path; ``prepare`` then an
  async ``process`` that subtracts ``weight`` x response length from the reward and masks the
  last response token.
"""

# ruff: noqa: UP006, UP035 - typing.List / Tuple, as plugins for Python 3.10 write it
from collections import defaultdict
from typing import Dict, List, Tuple

from trinity.buffer.operators import EXPERIENCE_OPERATORS, ExperienceOperator
from trinity.buffer.operators.experience_operator import ExperienceOperatorV1
from trinity.common.experience import Experience


@EXPERIENCE_OPERATORS.register_module("keep_top_reward")
class KeepTopReward(ExperienceOperator):
    def __init__(self, keep: int = 1):
        self.keep = keep

    def process(self, exps: List[Experience]) -> Tuple[List[Experience], Dict]:
        by_task = defaultdict(list)
        for exp in exps:
            by_task[exp.eid.tid].append(exp)
        kept = []
        for group in by_task.values():
            ranked = sorted(group, key=lambda e: e.reward, reverse=True)[: self.keep]
            for rank, exp in enumerate(ranked):
                exp.info["rank"] = rank
            kept += ranked
        return kept, {"dropped": len(exps) - len(kept)}


@EXPERIENCE_OPERATORS.register_module("async_length_penalty")
class AsyncLengthPenalty(ExperienceOperatorV1):
    def __init__(self, weight: float = 0.1):
        self.weight = weight
        self.prepared = 0

    async def prepare(self):
        self.prepared += 1

    async def process(self, exps: List[Experience]) -> Tuple[List[Experience], Dict]:
        for exp in exps:
            response_length = len(exp.tokens) - exp.prompt_length
            exp.reward -= self.weight * response_length
            exp.metrics["length"] = float(response_length)
            exp.action_mask[-1] = False
        return exps, {"prepared": self.prepared}
