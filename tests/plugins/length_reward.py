"""A test plugin: a reward that is never 0 for a random model's text (its length, capped)."""

from trinity.workflows import REWARD_FUNCTIONS


@REWARD_FUNCTIONS.register("length_share_reward")
def length_share_reward(response_text: str, truth: str, **_) -> dict[str, float]:
    """Characters in the response over 100, at most 1."""
    return {"length_share": min(len(response_text or ""), 100) / 100}
