"""Alias of the original's ``trinity.common.rewards`` (see ``trinity.compat``)."""

from trinity.compat.rewards import REWARD_FUNCTIONS, RewardFn

__all__ = ["REWARD_FUNCTIONS", "RewardFn"]
