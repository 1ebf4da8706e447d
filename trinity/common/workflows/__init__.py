"""Alias of the original's ``trinity.common.workflows`` (see ``trinity.compat``)."""

from trinity.compat.workflow import WORKFLOWS, Task, Workflow

__all__ = ["WORKFLOWS", "Task", "Workflow"]
