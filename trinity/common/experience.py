"""Alias of the original's ``trinity.common.experience`` (see ``trinity.compat``)."""

from trinity.compat.experience import EID, Experience

__all__ = ["EID", "Experience"]
