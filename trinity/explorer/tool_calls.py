"""Tool calls: described to the model in its chat template, parsed back out of what it sampled.

Parsing is transformers' maintained response parser (``tokenizer.parse_response``) driven by a
response template: the model's own (``tokenizer.response_template``) when it ships one, else the
one ``explorer.rollout_model.tool_call_parser`` names. The templates below are the formats
``transformers serve`` uses for the same model families; the names are vLLM's parser names, which
configs written for the original already use.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

_CLOSE_TURN = r"\s*(?:<\|im_end\|>|<\|endoftext\|>|<\|eot_id\|>|<\|eom_id\|>|</s>)"


def _template(tool_calls: dict[str, Any]) -> dict[str, Any]:
    """A response template: optional <think> reasoning, ``tool_calls`` as given, then content."""
    return {
        "defaults": {"role": "assistant"},
        "start_anchor_pattern": r"\A",  # parsed from the sampled tokens alone (prefix="")
        "fields": {
            "reasoning_content": {"open": "<think>", "close": "</think>", "content": "text"},
            "tool_calls": {"repeats": True, **tool_calls},
            "content": {"close_pattern": _CLOSE_TURN, "content": "text"},
        },
    }


RESPONSE_TEMPLATES: dict[str, dict[str, Any]] = {
    # Qwen2/2.5/3, Hermes, and any ChatML model we describe tools to (TOOLS_PROMPT below):
    # <tool_call>{"name": ..., "arguments": {...}}</tool_call>
    "hermes": _template(
        {
            "open_pattern": r"\s*<tool_call>",
            "close": "</tool_call>",
            "content": "json",
            "transform": {"type": "function", "function": "{content}"},
        }
    ),
    # Qwen3-Coder / Qwen3.5: <tool_call><function=NAME><parameter=KEY>VALUE</parameter>...
    "qwen3_coder": _template(
        {
            "open_pattern": r"\s*<tool_call>\s*<function=(?P<name>[^>\n]+)>",
            "close_pattern": r"</function>\s*</tool_call>",
            "content": "xml-inline",
            "content_args": {
                "tag_pattern": r"<parameter=(?P<key>[^>\n]+)>\s*(?P<value>.*?)\s*</parameter>"
            },
            "transform": {
                "type": "function",
                "function": {"name": "{name}", "arguments": "{content}"},
            },
        }
    ),
}
DEFAULT_PARSER = "hermes"

# For chat templates that ignore ``tools`` (SmolLM2's, Llama 2's): the Hermes instructions Qwen2.5's
# template writes, so the hermes parser reads the answer back.
TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


class MalformedToolCall(ValueError):
    """The model opened a tool call it did not finish as the format wants (bad JSON, say)."""


def response_template(tokenizer: Any, parser: str | None) -> dict[str, Any]:
    """The model's own response template, else the named one (``hermes`` by default)."""
    own = getattr(tokenizer, "response_template", None)
    if own is not None and parser in (None, "auto"):
        return own
    name = DEFAULT_PARSER if parser in (None, "auto") else parser
    if name not in RESPONSE_TEMPLATES:
        known = ", ".join(sorted(RESPONSE_TEMPLATES))
        raise ValueError(f"explorer.rollout_model.tool_call_parser '{name}' is unknown ({known})")
    return RESPONSE_TEMPLATES[name]


def parse_tool_calls(
    tokenizer: Any, tokens: list[int], template: dict[str, Any]
) -> tuple[str | None, list[dict[str, Any]]]:
    """``(content, tool_calls)`` of sampled ``tokens``, tool calls in the OpenAI shape."""
    try:
        parsed = tokenizer.parse_response(list(tokens), template, prefix="")
    except ValueError as exc:
        raise MalformedToolCall(str(exc).splitlines()[0]) from exc
    calls = []
    for call in parsed.get("tool_calls") or []:
        function = call.get("function") or {}
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise MalformedToolCall(f"a tool call without a function name: {call!r}")
        arguments = function.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        calls.append(
            {
                "id": f"call_{secrets.token_hex(8)}",
                "type": "function",
                "function": {"name": function["name"], "arguments": arguments},
            }
        )
    content = parsed.get("content")
    return (content or None) if calls else (content or ""), calls


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    return TOOLS_PROMPT.format(tools="\n".join(json.dumps(tool) for tool in tools))
