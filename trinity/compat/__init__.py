"""The original Trinity-RFT 0.6 plugin interface, implemented on our types.

A plugin written for the original (``WORKFLOWS.register_module``, ``Workflow(task=..., model=...,
auxiliary_models=...)``, ``RewardFn`` classes, ``self.model.chat`` / ``generate``, its
``Experience``) runs unmodified: its classes land in our registries (``trinity/registry.py``)
behind adapters, so the explorer sees one kind of workflow. The original's import paths
(``trinity.common.*``) only re-export from here.

- ``experience``: ``Experience`` and ``EID``, converted to and from ours.
- ``model``: ``ModelWrapper`` over our ``PolicySampler``.
- ``rewards``: ``RewardFn`` and ``REWARD_FUNCTIONS``.
- ``workflow``: ``Task``, ``Workflow``, ``WORKFLOWS`` and the adapter the explorer runs.
"""

from trinity.compat.experience import EID, Experience
from trinity.compat.model import ModelWrapper
from trinity.compat.rewards import REWARD_FUNCTIONS, RewardFn
from trinity.compat.workflow import WORKFLOWS, Task, Workflow

__all__ = [
    "EID",
    "REWARD_FUNCTIONS",
    "WORKFLOWS",
    "Experience",
    "ModelWrapper",
    "RewardFn",
    "Task",
    "Workflow",
]
