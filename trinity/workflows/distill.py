"""On-policy distillation workflows: the student samples, the teacher scores every sampled token.

The teacher is ``explorer.auxiliary_models[0]`` (the original's convention), called through its
``logprobs`` (the engine's prompt logprobs locally, a Tinker sampling client's
``compute_logprobs`` remotely). It must share the student's tokenizer: it scores the student's
token ids. The reward (the task's reward function, if any) is only reported; the advantages come
from the teacher (``algorithm_type: on_policy_distill`` or ``jsd``, ``algorithms/distill.py``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from trinity.workflows.types import Experience, Sampler, Task
from trinity.workflows.workflows import WORKFLOWS, MathWorkflow, SimpleWorkflow, Workflow


class _TeacherScored(SimpleWorkflow):
    """Adds ``teacher_logprobs`` to the experiences of the workflow it is mixed into."""

    def __init__(self, task: Task, sampler: Sampler):
        if task.reward_fn or self.default_reward_fn:
            super().__init__(task, sampler)
        else:  # no reward to report: the teacher grades
            Workflow.__init__(self, task, sampler)
            self.format, self.reward_fn = task.format or {}, None

    def reward(self, response_text: str) -> dict[str, float]:
        return super().reward(response_text) if self.reward_fn else {}

    @classmethod
    def required_fields(cls, fmt: dict[str, Any]) -> dict[str, tuple[str, ...]]:
        fields = super().required_fields(fmt)
        if cls.default_reward_fn:
            return fields
        # without a reward function the truth is optional: the teacher grades
        return {what: keys for what, keys in fields.items() if "response_key" not in what}

    def teacher(self) -> Any:
        if not self.auxiliary_model_wrappers:
            raise ValueError(
                f"{self.task.workflow} needs the teacher as explorer.auxiliary_models[0]; "
                "none is configured"
            )
        teacher = self.auxiliary_model_wrappers[0]
        if len(teacher.tokenizer) != len(self.sampler.tokenizer):
            raise ValueError(
                f"{self.task.workflow}: the teacher (explorer.auxiliary_models[0]) has a "
                f"vocabulary of {len(teacher.tokenizer)} tokens, the student "
                f"{len(self.sampler.tokenizer)}; distillation needs the same tokenizer"
            )
        return teacher

    async def run(self) -> list[Experience]:
        experiences = await super().run()
        if self.task.is_eval or not experiences:
            return experiences
        teacher = self.teacher()
        temperature = float(self.task.workflow_args.get("temperature") or 1.0)
        scored = await asyncio.gather(
            *(teacher.logprobs(exp.tokens, temperature) for exp in experiences)
        )
        for exp, logprobs in zip(experiences, scored, strict=True):
            exp.teacher_logprobs = logprobs[exp.prompt_length - 1 :]
        return experiences


@WORKFLOWS.register("on_policy_distill_workflow")
class OnPolicyDistillWorkflow(_TeacherScored):
    """``simple_workflow``'s prompt and sampling; the teacher's logprobs on every response."""


@WORKFLOWS.register("on_policy_distill_math_workflow")
class OnPolicyDistillMathWorkflow(_TeacherScored, MathWorkflow):
    """``math_workflow``'s prompt and reward (reported), the teacher's logprobs."""
