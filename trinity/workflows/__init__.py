"""Workflows and reward functions: the pure layer between a taskset row and an ``Experience``."""

from trinity.workflows.agents import (
    AgentWorkflow,
    EnvWorkflow,
    MultiTurnWorkflow,
    agent_workflow,
)
from trinity.workflows.distill import OnPolicyDistillMathWorkflow, OnPolicyDistillWorkflow
from trinity.workflows.judges import MathJudgeWorkflow, MathRulerWorkflow
from trinity.workflows.rewards import REWARD_FUNCTIONS
from trinity.workflows.types import Experience, Response, Sampler, Task
from trinity.workflows.workflows import (
    WORKFLOWS,
    CountdownWorkflow,
    MathBoxedWorkflow,
    MathWorkflow,
    SimpleWorkflow,
    Workflow,
)

__all__ = [
    "REWARD_FUNCTIONS",
    "AgentWorkflow",
    "EnvWorkflow",
    "MultiTurnWorkflow",
    "OnPolicyDistillMathWorkflow",
    "OnPolicyDistillWorkflow",
    "agent_workflow",
    "WORKFLOWS",
    "CountdownWorkflow",
    "Experience",
    "MathBoxedWorkflow",
    "MathJudgeWorkflow",
    "MathRulerWorkflow",
    "MathWorkflow",
    "Response",
    "Sampler",
    "SimpleWorkflow",
    "Task",
    "Workflow",
]
