"""Alias of the original's ``trinity.buffer.operators.experience_operator`` (``trinity.compat``)."""

from trinity.compat.operators import EXPERIENCE_OPERATORS, ExperienceOperator, ExperienceOperatorV1

__all__ = ["EXPERIENCE_OPERATORS", "ExperienceOperator", "ExperienceOperatorV1"]
