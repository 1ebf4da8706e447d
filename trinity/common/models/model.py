"""Alias of the original's ``trinity.common.models.model`` (see ``trinity.compat``)."""

from trinity.compat.model import ModelWrapper

__all__ = ["ModelWrapper"]
