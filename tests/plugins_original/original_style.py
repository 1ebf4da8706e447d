"""A plugin written for Trinity-RFT 0.6, as its users write them: nothing here knows our types.

- ``digit_count_reward``: a ``RewardFn`` class (a random model's text gives varied scores, so
  GRPO advantages are not all 0) plus a constant ``bonus`` from ``reward_fn_args``.
- ``two_turn_workflow``: async, two ``chat_async`` calls per run, one experience per turn.
- ``repeat_reset_workflow``: sync, ``can_repeat`` (one ``chat`` with ``n``) and ``can_reset``.
- ``raising_workflow``: raises on tasks with an odd answer (the explorer logs, counts, goes on).
- ``anchored_two_turn_workflow``: ``two_turn_workflow`` with GiGPO's ``env_state_hash`` / ``step_reward``.
"""

# ruff: noqa: UP006, UP035, UP045 - typing.List / Optional, as plugins for Python 3.10 write it
import threading
from typing import List, Optional

from trinity.common.experience import Experience
from trinity.common.models.model import ModelWrapper
from trinity.common.rewards import REWARD_FUNCTIONS, RewardFn
from trinity.common.workflows import WORKFLOWS, Task, Workflow

COUNTS = {"init": 0, "reset": 0, "threads": set()}


@REWARD_FUNCTIONS.register_module("digit_count_reward")
class DigitCountReward(RewardFn):
    def __init__(self, bonus: float = 0.0, **kwargs):
        self.bonus = bonus

    def __call__(self, response: str, truth: Optional[str] = None, **kwargs) -> dict:
        text = response or " "
        return {"digit_share": sum(c.isdigit() for c in text) / len(text), "bonus": self.bonus}


@WORKFLOWS.register_module("two_turn_workflow")
class TwoTurnWorkflow(Workflow):
    is_async = True

    def __init__(self, *, task: Task, model: ModelWrapper, auxiliary_models=None):
        super().__init__(task=task, model=model, auxiliary_models=auxiliary_models)
        self.reward_fn = task.reward_fn(**task.reward_fn_args)
        self.max_tokens = task.rollout_args.max_tokens

    async def run_async(self) -> List[Experience]:
        messages = [{"role": "user", "content": self.task.task_desc}]
        (first,) = await self.model.chat_async(messages, n=1, max_tokens=self.max_tokens)
        messages += [
            {"role": "assistant", "content": first.response_text},
            {"role": "user", "content": "Check it and answer again."},
        ]
        (second,) = await self.model.chat_async(messages, n=1, max_tokens=self.max_tokens)
        metrics = self.reward_fn(response=second.response_text, truth=self.task.truth)
        for step, exp in enumerate((first, second)):
            exp.reward = sum(metrics.values())
            exp.metrics = metrics
            exp.eid.step = step
        return [first, second]


@WORKFLOWS.register_module("repeat_reset_workflow")
class RepeatResetWorkflow(Workflow):
    can_repeat = True
    can_reset = True

    def __init__(self, *, task: Task, model: ModelWrapper, auxiliary_models=None):
        super().__init__(task=task, model=model, auxiliary_models=auxiliary_models)
        COUNTS["init"] += 1
        self.reward_fn = task.reward_fn(**task.reward_fn_args)

    def reset(self, task: Task):
        COUNTS["reset"] += 1
        self.task = task
        self.reward_fn = task.reward_fn(**task.reward_fn_args)

    def run(self) -> List[Experience]:
        COUNTS["threads"].add(threading.current_thread().name)
        messages = [{"role": "user", "content": self.task.task_desc}]
        args = self.task.rollout_args
        exps = self.model.chat(messages, n=self.repeat_times, temperature=args.temperature)
        for i, exp in enumerate(exps):
            exp.metrics = self.reward_fn(response=exp.response_text, truth=self.task.truth)
            exp.reward = sum(exp.metrics.values())
            exp.eid.run = self.run_id_base + i
        return exps


@WORKFLOWS.register_module("raising_workflow")
class RaisingWorkflow(TwoTurnWorkflow):
    async def run_async(self) -> List[Experience]:
        if int(self.task.truth) % 2:
            raise RuntimeError("odd answers are not supported")
        return await super().run_async()


@WORKFLOWS.register_module("anchored_two_turn_workflow")
class AnchoredTwoTurnWorkflow(TwoTurnWorkflow):
    """GiGPO's keys, set as the original's users set them: the first turn is taken in the task's
    state, the second in the state the first reply led to; the reward arrives on the second."""

    async def run_async(self) -> List[Experience]:
        first, second = await super().run_async()
        first.info.update(env_state_hash=f"asked {self.task.task_desc}", step_reward=0.0)
        second.info.update(
            env_state_hash=f"answered {first.response_text}", step_reward=second.reward
        )
        return [first, second]
