"""A test plugin: a reward that varies across a random model's samples, so advantages are not 0."""

from trinity.workflows import REWARD_FUNCTIONS


@REWARD_FUNCTIONS.register("digit_share_reward")
def digit_share_reward(response_text: str, truth: str, **_) -> dict[str, float]:
    """Share of digit characters in the response (a random model's text gives varied scores)."""
    text = response_text or " "
    return {"digit_share": sum(ch.isdigit() for ch in text) / len(text)}
