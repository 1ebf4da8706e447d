"""A test plugin: a judge that takes its time, and can hang once (the first call anywhere)."""

import os
import time

from trinity.workflows import REWARD_FUNCTIONS


@REWARD_FUNCTIONS.register("slow_digit_share_reward")
def slow_digit_share_reward(
    response_text: str, truth: str, delay: float = 0.0, hang_once: str | None = None, **_
) -> dict[str, float]:
    """``hang_once``: a file path; the call that creates it hangs (every process sees the file)."""
    if hang_once:
        try:
            os.close(os.open(hang_once, os.O_CREAT | os.O_EXCL))
            time.sleep(3600)
        except FileExistsError:
            pass
    time.sleep(delay)
    text = response_text or " "
    return {"digit_share": sum(ch.isdigit() for ch in text) / len(text)}
