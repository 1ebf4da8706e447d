"""Rewards from an auxiliary model (``explorer.auxiliary_models``): LLM-as-judge and RULER.

The policy answers the task's question ``repeat_times`` times, as ``simple_workflow`` asks it; a
judge (``self.auxiliary_models[workflow_args.judge_model or 0]``, an ``openai`` client) scores
the answers from 0 to 10, and the reward is the score / 10 (component ``judge``).

- ``math_judge_workflow``: one judge call per answer, against the reference answer.
- ``math_ruler_workflow``: RULER-style, one judge call per group: the judge sees every answer
  and ranks them relative to each other with one score each (no reference needed).

A judge reply without a usable score is a logged skip (of the answer, or of the group for
RULER): no reward beats a made-up one, and the run goes on. workflow_args: ``judge_model``,
``judge_prompt`` (a ``str.format`` template with the fields of the defaults below),
``judge_max_tokens``, ``judge_temperature``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from trinity.registry import WORKFLOWS
from trinity.workflows.types import Experience, Response, Sampler, Task
from trinity.workflows.workflows import SimpleWorkflow, Workflow

log = logging.getLogger(__name__)
TOP_SCORE = 10.0
JUDGE_PROMPT = (
    "You grade answers to math questions.\n\nQuestion: {question}\n\nReference answer: "
    "{reference}\n\nStudent answer: {answer}\n\nIs the student's final answer correct and its "
    "reasoning sound? Reply with a score from 0 (wrong) to 10 (correct) as 'Score: N'."
)
RULER_PROMPT = (
    "You compare {count} answers to the same math question and score each from 0 (worst) to 10 "
    "(best), relative to the others: correctness first, then clarity.\n\nQuestion: {question}"
    "\n\n{answers}\n\nReply with one line per answer, 'Answer K: N', for K = 1 to {count}."
)
_NUMBER = r"(-?\d+(?:\.\d+)?)"


def parse_score(text: str) -> float | None:
    """A judge's score scaled to [0, 1]: the number after 'score', or a reply that is only a
    number; None when there is none or it is outside 0..10."""
    match = re.search(rf"score\W*{_NUMBER}", text, re.IGNORECASE) or re.fullmatch(
        rf"\s*{_NUMBER}\s*", text
    )
    if match is None:
        return None
    score = float(match.group(1))
    return score / TOP_SCORE if 0.0 <= score <= TOP_SCORE else None


def parse_ranking(text: str, count: int) -> list[float] | None:
    """RULER scores 'Answer K: N' for K = 1..count, scaled to [0, 1]; None unless every answer
    has exactly one in range."""
    found: dict[int, list[float]] = {}
    for k, score in re.findall(rf"answer\s*(\d+)\W*{_NUMBER}", text, re.IGNORECASE):
        found.setdefault(int(k), []).append(float(score))
    scores = [found.get(k, []) for k in range(1, count + 1)]
    if any(len(s) != 1 or not 0.0 <= s[0] <= TOP_SCORE for s in scores):
        return None
    return [s[0] / TOP_SCORE for s in scores]


class JudgedWorkflow(SimpleWorkflow):
    """The policy's side as ``simple_workflow``; the reward comes from ``judge`` (see the
    module doc), so no reward function is needed."""

    def __init__(self, task: Task, sampler: Sampler):
        Workflow.__init__(self, task, sampler)
        self.format = task.format or {}

    def judge_client(self) -> Any:
        index = int(self.task.workflow_args.get("judge_model", 0))
        if not 0 <= index < len(self.auxiliary_model_wrappers):
            raise ValueError(
                f"{self.task.workflow} needs explorer.auxiliary_models[{index}] (the judge); "
                f"{len(self.auxiliary_model_wrappers)} configured"
            )
        return self.auxiliary_models[index]

    async def ask_judge(self, prompt: str) -> str:
        args = self.task.workflow_args
        client = self.judge_client()
        completion = await client.chat.completions.create(
            model=client.model_path,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=args.get("judge_max_tokens"),
            temperature=args.get("judge_temperature", 0.0),
        )
        return completion.choices[0].message.content or ""

    def template(self, default: str) -> str:
        return str(self.task.workflow_args.get("judge_prompt") or default)

    def scored(self, responses: list[Response], scores: list[float | None]) -> list[Experience]:
        prompt_text = self.sampler.tokenizer.decode(responses[0].prompt_tokens)
        return [
            self.experience(response, {"judge": score}, prompt_text=prompt_text)
            for response, score in zip(responses, scores, strict=True)
            if score is not None
        ]


@WORKFLOWS.register("math_judge_workflow")
class MathJudgeWorkflow(JudgedWorkflow):
    """Each answer graded by the judge against the reference answer."""

    async def run(self) -> list[Experience]:
        responses = await self.sample()
        if not responses:
            return []
        template = self.template(JUDGE_PROMPT)
        replies = await asyncio.gather(
            *(
                self.ask_judge(
                    template.format(
                        question=self.prompt(), reference=self.truth(), answer=response.text
                    )
                )
                for response in responses
            )
        )
        scores = [parse_score(reply) for reply in replies]
        for reply, score in zip(replies, scores, strict=True):
            if score is None:
                log.warning(
                    "task %s: the judge gave no score in 0..10 (%r); the answer is skipped",
                    self.task.task_id,
                    reply[:200],
                )
        return self.scored(responses, scores)


@WORKFLOWS.register("math_ruler_workflow")
class MathRulerWorkflow(JudgedWorkflow):
    """RULER: the group's answers scored relative to each other in one judge call."""

    async def run(self) -> list[Experience]:
        responses = await self.sample()
        if not responses:
            return []
        answers = "\n\n".join(f"Answer {k}:\n{r.text}" for k, r in enumerate(responses, 1))
        prompt = self.template(RULER_PROMPT).format(
            count=len(responses), question=self.prompt(), answers=answers
        )
        reply = await self.ask_judge(prompt)
        scores = parse_ranking(reply, len(responses))
        if scores is None:
            log.warning(
                "task %s: the judge's ranking has no single 0..10 score per answer (%r); "
                "the group is skipped",
                self.task.task_id,
                reply[:200],
            )
            return []
        return self.scored(responses, scores)
