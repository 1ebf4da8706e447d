"""A judge that blocks like a remote LLM-judge call: ``delay`` seconds per response."""

import time

from trinity.workflows import REWARD_FUNCTIONS


@REWARD_FUNCTIONS.register("slow_judge_reward")
def slow_judge_reward(response_text: str, truth: str, delay: float = 1.0, **_) -> dict[str, float]:
    """Waits (a blocking call, as most judge clients make), then scores the digit share."""
    time.sleep(delay)
    text = response_text or " "
    return {"digit_share": sum(ch.isdigit() for ch in text) / len(text)}
