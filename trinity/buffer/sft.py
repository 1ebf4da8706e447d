"""Datasets for ``mode: train``: SFT chats, CPT text, DPO preference pairs, as experiences.

The trainer only reads experiences, so these runs are the usual trainer fed from a file instead of
an explorer. Each row becomes one unit the feeder keeps together in a batch:

- sft: one ``Experience`` whose loss mask covers the last assistant turn (``messages_key``, or
  ``prompt_key`` + ``response_key``);
- cpt: one ``Experience`` of raw text (``prompt_key``, else ``text``) trained on every token after
  the first (``prompt_length`` 1, as the original);
- dpo: the chosen then the rejected completion of one prompt (``chosen_key`` / ``rejected_key``:
  a string, or messages; the prompt from ``messages_key`` or ``prompt_key``).
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


def preference_chats(
    row: dict[str, Any], fmt: FormatConfig
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """A DPO row as (chosen chat, rejected chat), each ending with the compared assistant turn."""
    missing = [key for key in (fmt.chosen_key, fmt.rejected_key) if key not in row]
    if missing:
        raise TasksetError(
            f"DPO row has no '{missing[0]}' (buffer.trainer_input.experience_buffer.format."
            f"{'chosen_key' if missing[0] == fmt.chosen_key else 'rejected_key'}; keys: "
            f"{', '.join(sorted(row))})"
        )

    def prompt() -> list[dict[str, str]]:
        messages = row.get(fmt.messages_key)
        if messages:
            return [{"role": m["role"], "content": m["content"]} for m in messages]
        if fmt.prompt_key not in row:
            raise TasksetError(
                f"DPO row has neither '{fmt.messages_key}' nor '{fmt.prompt_key}' for its prompt"
            )
        system = [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt else []
        return [*system, {"role": "user", "content": str(row[fmt.prompt_key])}]

    def chat(answer: Any) -> list[dict[str, str]]:
        if isinstance(answer, str):
            return [*prompt(), {"role": "assistant", "content": answer}]
        answer = [{"role": m["role"], "content": m["content"]} for m in answer]
        return answer if any(m["role"] == "user" for m in answer) else [*prompt(), *answer]

    return chat(row[fmt.chosen_key]), chat(row[fmt.rejected_key])


def cpt_experience(text: str, tokenizer: Any, *, max_len: int) -> Experience:
    tokens = tokenizer(text)["input_ids"][:max_len]
    if len(tokens) < 2:
        raise TasksetError(f"a CPT text needs at least 2 tokens, got {len(tokens)}: {text!r}")
    n = len(tokens) - 1
    return Experience(
        tokens=tokens, prompt_length=1, logprobs=[0.0] * n, loss_mask=[1] * n, reward=0.0
    )


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
    exp_cfg: ExperienceBufferConfig,
    tokenizer: Any,
    *,
    chat_template: str | None,
    max_len: int,
    schema: str = "sft",
) -> list[list[Experience]]:
    """Every row of ``buffer.trainer_input.experience_buffer`` (path, split, format) tokenized,
    one unit per row (see the module doc)."""
    source = TasksetConfig(
        name=exp_cfg.name, path=exp_cfg.path, split=exp_cfg.split, subset_name=exp_cfg.subset_name
    )
    rows = load_rows(source)
    if len(rows) == 0:
        raise TasksetError(f"{schema.upper()} dataset '{exp_cfg.path}' has no rows")
    fmt = exp_cfg.format

    def chat(messages: list[dict[str, str]]) -> Experience:
        return sft_experience(
            messages,
            tokenizer,
            chat_template=chat_template,
            max_len=max_len,
            enable_thinking=fmt.enable_thinking,
        )

    def unit(row: dict[str, Any]) -> list[Experience]:
        if schema == "cpt":
            text = row[fmt.prompt_key] if fmt.prompt_key in row else row.get("text")
            if not isinstance(text, str):
                raise TasksetError(f"CPT row has no text in '{fmt.prompt_key}' or 'text'")
            return [cpt_experience(text, tokenizer, max_len=max_len)]
        if schema == "dpo":
            return [chat(messages) for messages in preference_chats(row, fmt)]
        return [chat(chat_messages(row, fmt))]

    return [unit(dict(rows[i])) for i in range(len(rows))]


def sft_sequence(dataset: list[list[Experience]], seed: int) -> Iterator[list[Experience]]:
    """The dataset's units epoch after epoch, shuffled per epoch by seed (a resumed run skips
    ahead)."""
    for epoch in itertools.count():
        order = list(range(len(dataset)))
        random.Random(seed + epoch).shuffle(order)
        yield from (dataset[i] for i in order)
