"""Rewards from an auxiliary model (``explorer.auxiliary_models``): LLM-as-judge and RULER.

The policy answers the task's question ``repeat_times`` times, as ``simple_workflow`` asks it; a
judge (``self.auxiliary_models[workflow_args.judge_model or 0]``, an ``openai`` client) scores
the answers from 0 to 10, and the reward is the score / 10 (component ``judge``).

- ``math_judge_workflow``: one judge call per answer, against the reference answer.
- ``math_ruler_workflow``: RULER-style, one judge call per group: the judge sees every answer
  and ranks them relative to each other with one score each (no reference needed).
- ``rubric_judge_workflow``: one judge call per answer against the task's rubric (named criteria
  with weights, as Rubrics as Rewards, arXiv 2507.17746; see ``Rubric``), component ``rubric``.

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
RUBRIC_IMPLICIT_PROMPT = (
    "You rate a response against a rubric: weighted criteria (a negative weight is a pitfall to "
    "avoid). Weigh them all and rate the response from 0 (fails them) to 10 (meets them all)."
    "\n\nQuestion: {question}\n\nResponse: {answer}\n\nRubric:\n{criteria}\n\n"
    "Reply with 'Score: N'."
)
RUBRIC_EXPLICIT_PROMPT = (
    "You check a response against each criterion of a rubric and score how well it meets it, "
    "from 0 (not at all) to 10 (fully).\n\nQuestion: {question}\n\nResponse: {answer}\n\n"
    "Criteria:\n{criteria}\n\nReply with one line per criterion, its name then its score: "
    "'NAME: N'."
)
_NUMBER = r"(-?\d+(?:\.\d+)?)"


def parse_score(text: str) -> float | None:
    """A judge's score scaled to [0, 1]: the number after 'score' (or 'rating', the original's
    JSON key), or a reply that is only a number; None when there is none or it is outside 0..10."""
    match = re.search(rf"(?:score|rating)\W*{_NUMBER}", text, re.IGNORECASE) or re.fullmatch(
        rf"\s*{_NUMBER}\s*", text
    )
    if match is None:
        return None
    score = float(match.group(1))
    return score / TOP_SCORE if 0.0 <= score <= TOP_SCORE else None


def parse_named(text: str, names: list[str]) -> list[float] | None:
    """Scores 'NAME: N' for each of ``names``, scaled to [0, 1]; None unless every name has
    exactly one in 0..10 (a name is not matched inside a longer word or number; its spaces
    match any, or no, white space)."""
    scores = []
    for name in names:
        words = r"\s*".join(map(re.escape, name.split()))
        pattern = rf"(?<!\w){words}(?!\w)\W*{_NUMBER}"
        found = [float(n) for n in re.findall(pattern, text, re.IGNORECASE)]
        if len(found) != 1 or not 0.0 <= found[0] <= TOP_SCORE:
            return None
        scores.append(found[0] / TOP_SCORE)
    return scores


def parse_ranking(text: str, count: int) -> list[float] | None:
    """RULER scores 'Answer K: N' for K = 1..count, scaled to [0, 1]; None unless every answer
    has exactly one in range."""
    return parse_named(text, [f"answer {k}" for k in range(1, count + 1)])


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

    def scored(
        self, responses: list[Response], scores: list[float | None], component: str = "judge"
    ) -> list[Experience]:
        prompt_text = self.sampler.tokenizer.decode(responses[0].prompt_tokens)
        return [
            self.experience(response, {component: score}, prompt_text=prompt_text)
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


class Rubric:
    """A task's rubric: criteria, each ``{"title" (or "name"), "description", "weight"}``
    (weight 1 if absent, negative for a pitfall; an untitled one is 'criterion K').

    ``weighted`` is the explicit reward: sum(weight * score) / sum of the positive weights, with
    scores in [0, 1]; 1 when every criterion is met and no pitfall is, below 0 when pitfalls
    outweigh the rest.
    """

    def __init__(self, criteria: Any, where: str):
        if not isinstance(criteria, list) or not criteria:
            raise ValueError(f"{where}: the rubric must be a non-empty list of criteria")
        self.names, self.descriptions, self.weights = [], [], []
        for k, item in enumerate(criteria, 1):
            item = item if isinstance(item, dict) else {"description": item}
            try:
                weight = float(item.get("weight", 1.0))
            except (TypeError, ValueError):
                raise ValueError(f"{where}: criterion {k}'s weight must be a number") from None
            self.names.append(str(item.get("title") or item.get("name") or f"criterion {k}"))
            self.descriptions.append(str(item.get("description", "")))
            self.weights.append(weight)
        if len(set(map(str.lower, self.names))) != len(self.names):
            raise ValueError(f"{where}: the rubric's criterion names must be distinct")
        if not any(w > 0 for w in self.weights):
            raise ValueError(f"{where}: the rubric needs a criterion of positive weight")

    def text(self) -> str:
        return "\n".join(
            f"- {name} (weight {weight:g}): {description}"
            for name, weight, description in zip(
                self.names, self.weights, self.descriptions, strict=True
            )
        )

    def weighted(self, scores: list[float]) -> float:
        total = sum(w * s for w, s in zip(self.weights, scores, strict=True))
        return total / sum(w for w in self.weights if w > 0)


@WORKFLOWS.register("rubric_judge_workflow")
class RubricJudgeWorkflow(JudgedWorkflow):
    """Each answer judged against the task's rubric (the row's ``rubric_key``, default
    ``rubric``, or ``workflow_args.rubric`` for every task).

    ``workflow_args.rubric_mode``: ``implicit`` (the original's: the judge weighs the criteria
    itself and gives one 0..10 score) or ``explicit`` (the judge scores each criterion by name,
    and ``Rubric.weighted`` combines them here, so weights count exactly as written).
    """

    def rubric(self) -> Rubric:
        args = self.task.workflow_args
        key = args.get("rubric_key", "rubric")
        criteria = self.task.raw.get(key, args.get("rubric"))
        return Rubric(criteria, f"task {self.task.task_id} ('{key}')")

    def mode(self) -> str:
        mode = self.task.workflow_args.get("rubric_mode", "implicit")
        if mode not in ("implicit", "explicit"):
            raise ValueError(
                f"workflow_args.rubric_mode must be 'implicit' or 'explicit', got {mode!r}"
            )
        return mode

    async def run(self) -> list[Experience]:
        rubric, mode = self.rubric(), self.mode()
        responses = await self.sample()
        if not responses:
            return []
        default = RUBRIC_EXPLICIT_PROMPT if mode == "explicit" else RUBRIC_IMPLICIT_PROMPT
        template = self.template(default)
        replies = await asyncio.gather(
            *(
                self.ask_judge(
                    template.format(question=self.prompt(), answer=r.text, criteria=rubric.text())
                )
                for r in responses
            )
        )
        scores: list[float | None] = []
        for reply in replies:
            if mode == "explicit":
                named = parse_named(reply, rubric.names)
                scores.append(None if named is None else rubric.weighted(named))
            else:
                scores.append(parse_score(reply))
            if scores[-1] is None:
                log.warning(
                    "task %s: the judge gave no 0..10 score %s (%r); the answer is skipped",
                    self.task.task_id,
                    "for each criterion" if mode == "explicit" else "for the rubric",
                    reply[:200],
                )
        return self.scored(responses, scores, "rubric")
