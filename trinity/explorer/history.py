"""A rollout model's recorded calls -> experiences, from the recorded token ids only.

Each recorded call is a ``Response``: the prompt ids it was given, the ids it sampled and their
sampler logprobs. Step-wise, each call is one experience (``info["step"]`` its order).
Concatenated, a call whose prompt starts token-for-token with an earlier call's prompt + sampled
ids continues that sequence: the new prompt ids in between (tool results, the user's turn, the
template's turn markers) are added with loss mask 0, the sampled ids with mask 1 and their
logprobs. Nothing is re-tokenized, so the ids trained on are the ids sampled. A call that extends
no earlier sequence starts a new one (logged: the chat template rewrote earlier turns, or the
agent edited its history); each sequence no later call extended is one experience.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from trinity.workflows.types import Experience, Response

log = logging.getLogger(__name__)


@dataclass
class _Sequence:
    tokens: list[int]
    prompt_length: int
    logprobs: list[float] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    turns: int = 0
    truncated: bool = False

    def extended(self, response: Response) -> _Sequence:
        delta = list(response.prompt_tokens[len(self.tokens) :])
        return _Sequence(
            tokens=self.tokens + delta + list(response.tokens),
            prompt_length=self.prompt_length,
            logprobs=self.logprobs + [0.0] * len(delta) + list(response.logprobs),
            loss_mask=self.loss_mask + [0] * len(delta) + [1] * len(response.tokens),
            turns=self.turns + 1,
            truncated=response.stop_reason == "length",
        )


def _starts(response: Response) -> _Sequence:
    return _Sequence(list(response.prompt_tokens), len(response.prompt_tokens)).extended(response)


def concatenate(history: list[Response]) -> list[_Sequence]:
    """The token-exact sequences of a conversation (see the module doc), in order of start."""
    sequences: list[_Sequence] = []
    extended: set[int] = set()
    for turn, response in enumerate(history):
        prompt = response.prompt_tokens
        best = max(
            (
                i
                for i, seq in enumerate(sequences)
                if len(seq.tokens) <= len(prompt) and list(prompt[: len(seq.tokens)]) == seq.tokens
            ),
            key=lambda i: len(sequences[i].tokens),
            default=None,
        )
        if best is None:
            if sequences:
                log.info(
                    "turn %d's prompt does not extend the conversation token for token (the chat "
                    "template or the agent rewrote earlier turns): it starts a new experience",
                    turn,
                )
            sequences.append(_starts(response))
            continue
        extended.add(best)
        sequences.append(sequences[best].extended(response))
    return [seq for i, seq in enumerate(sequences) if i not in extended]


def experiences_from_history(
    history: list[Response], *, concatenated: bool, tokenizer: Any = None
) -> list[Experience]:
    """Concatenated: one experience per conversation; else one per call (``info["step"]``)."""
    if concatenated:
        sequences = concatenate(history)
    else:
        sequences = [_starts(response) for response in history]
    experiences = []
    for step, seq in enumerate(sequences):
        experiences.append(
            Experience(
                tokens=seq.tokens,
                prompt_length=seq.prompt_length,
                logprobs=seq.logprobs,
                loss_mask=seq.loss_mask,
                reward=0.0,
                truncated=seq.truncated,
                prompt_text=tokenizer.decode(seq.tokens[: seq.prompt_length]) if tokenizer else "",
                response_text=tokenizer.decode(seq.tokens[seq.prompt_length :])
                if tokenizer
                else "",
                info={"turns": seq.turns} if concatenated else {"step": step},
            )
        )
    return experiences
