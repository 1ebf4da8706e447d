"""SFT data for ``mode: train``: a dataset of chats (or prompt / response pairs) as experiences.

The trainer only reads experiences, so an SFT run is the usual trainer fed from a file instead of
an explorer: each row becomes one ``Experience`` whose loss mask covers the last assistant turn.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterator
from typing import Any

from trinity.buffer.tasksets import TasksetError, load_rows
from trinity.config.schema import ExperienceBufferConfig, FormatConfig, TasksetConfig
from trinity.workflows.types import Experience


def chat_messages(row: dict[str, Any], fmt: FormatConfig) -> list[dict[str, str]]:
    """The row as chat messages: ``messages_key`` if present, else system + prompt + response."""
    messages = row.get(fmt.messages_key)
    if messages:
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    prompt_key, response_key = fmt.prompt_key, fmt.response_key
    if prompt_key not in row or response_key not in row:
        raise TasksetError(
            f"SFT row has neither '{fmt.messages_key}' nor "
            f"'{prompt_key}' + '{response_key}' (keys: {', '.join(sorted(row))})"
        )
    system = fmt.system_prompt
    head = [{"role": "system", "content": system}] if system else []
    return [
        *head,
        {"role": "user", "content": str(row[prompt_key])},
        {"role": "assistant", "content": str(row[response_key])},
    ]


def sft_experience(
    messages: list[dict[str, str]],
    tokenizer: Any,
    *,
    chat_template: str | None,
    max_len: int,
    enable_thinking: bool | None = None,
) -> Experience:
    """``enable_thinking`` (``format.enable_thinking``; None: the template's default) is handed
    to the chat template."""
    if messages[-1]["role"] != "assistant":
        raise TasksetError("an SFT chat must end with an assistant message")

    def encode(msgs: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(
            msgs,
            tokenize=False,
            add_generation_prompt=generation_prompt,
            chat_template=chat_template,
            **({} if enable_thinking is None else {"enable_thinking": enable_thinking}),
        )
        return tokenizer.encode(text, add_special_tokens=False)

    prompt = encode(messages[:-1], True)
    tokens = encode(messages, False)
    # train on what follows the shared prefix (a template may render the history differently)
    prompt = os.path.commonprefix([prompt, tokens])
    tokens = tokens[:max_len]
    response_length = max(len(tokens) - len(prompt), 0)
    return Experience(
        tokens=tokens,
        prompt_length=len(prompt),
        logprobs=[0.0] * response_length,
        loss_mask=[1] * response_length,
        reward=0.0,
        response_text=messages[-1]["content"],
    )


def sft_dataset(
    exp_cfg: ExperienceBufferConfig, tokenizer: Any, *, chat_template: str | None, max_len: int
) -> list[Experience]:
    """Every row of ``buffer.trainer_input.experience_buffer`` (path, split, format) tokenized."""
    source = TasksetConfig(
        name=exp_cfg.name, path=exp_cfg.path, split=exp_cfg.split, subset_name=exp_cfg.subset_name
    )
    rows = load_rows(source)
    if len(rows) == 0:
        raise TasksetError(f"SFT dataset '{exp_cfg.path}' has no rows")
    return [
        sft_experience(
            chat_messages(dict(rows[i]), exp_cfg.format),
            tokenizer,
            chat_template=chat_template,
            max_len=max_len,
            enable_thinking=exp_cfg.format.enable_thinking,
        )
        for i in range(len(rows))
    ]


def sft_sequence(dataset: list[Experience], seed: int) -> Iterator[Experience]:
    """The dataset epoch after epoch, shuffled per epoch by seed (a resumed run skips ahead)."""
    for epoch in itertools.count():
        order = list(range(len(dataset)))
        random.Random(seed + epoch).shuffle(order)
        yield from (dataset[i] for i in order)
