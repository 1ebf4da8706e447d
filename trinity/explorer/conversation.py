"""Chat prompts that hold the model's earlier replies as the very token ids it sampled.

An agent sends its whole conversation back each turn, the model's replies as text. Rendering that
text again through the chat template and tokenizing it would not, in general, give back the ids
the model sampled (a different BPE split, a parsed-out tool call rendered the template's way), so
the next prompt would condition on tokens the model never produced and a concatenated training
sequence would not be what was sampled. ``Conversations`` remembers each reply it handed out; a
request that continues one is built as that reply's exact ids, then only the *new* messages
rendered by the template (from the end of the reply's turn on). Whatever the template cannot
extend that way (one that rewrites earlier turns) is rendered plainly, and the history then says
so when it builds experiences (``trinity.explorer.history``).
"""

from __future__ import annotations

import json
from typing import Any

from trinity.explorer.tool_calls import tools_system_prompt


def _content(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, list):  # OpenAI content parts: only text is supported
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def _arguments(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def normalize(message: Any) -> dict[str, Any]:
    """A message as a plain dict the chat template can render (SDK objects, None content)."""
    if hasattr(message, "model_dump"):
        message = message.model_dump(exclude_none=True)
    out = {k: v for k, v in dict(message).items() if v is not None}
    out["content"] = _content(out.get("content"))
    if out.get("tool_calls"):
        out["tool_calls"] = [
            {
                "type": "function",
                "id": call.get("id"),
                "function": {
                    "name": call["function"]["name"],
                    "arguments": _arguments(call["function"].get("arguments")),
                },
            }
            for call in out["tool_calls"]
        ]
    return out


def _key(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
    """What identifies a conversation: roles, contents, tool calls (not their generated ids)."""
    core = [
        [
            m.get("role"),
            m["content"],
            [
                [c["function"]["name"], c["function"]["arguments"]]
                for c in m.get("tool_calls") or []
            ],
        ]
        for m in messages
    ]
    return json.dumps([core, tools], sort_keys=True, default=str)


class Conversations:
    """Chat rendering for one rollout model, plus the replies it may be asked to continue."""

    def __init__(
        self,
        tokenizer: Any,
        chat_template: str | None = None,
        enable_thinking: bool | None = None,
    ):
        """``enable_thinking`` (None: the template's default) is handed to the template, which
        Qwen3-style templates read to open or skip the reasoning block."""
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.template_args = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        self._replies: dict[str, tuple[list[int], bool]] = {}
        self._ignores_tools: bool | None = None

    def clear(self) -> None:
        self._replies.clear()

    def __len__(self) -> int:
        """How many replies are remembered."""
        return len(self._replies)

    def render(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, generate: bool
    ) -> str:
        if tools and self._template_ignores_tools():
            messages = self._with_tools_prompt(messages, tools)
            tools = None
        return self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=generate,
            chat_template=self.chat_template,
            **({"tools": tools} if tools else {}),
            **self.template_args,
        )

    def _template_ignores_tools(self) -> bool:
        if self._ignores_tools is None:
            probe = [{"role": "user", "content": "x"}]
            tool = {"type": "function", "function": {"name": "probe_tool", "parameters": {}}}
            text = self.tokenizer.apply_chat_template(
                probe, tools=[tool], tokenize=False, chat_template=self.chat_template
            )
            self._ignores_tools = "probe_tool" not in text
        return self._ignores_tools

    @staticmethod
    def _with_tools_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list:
        prompt = tools_system_prompt(tools)
        if messages and messages[0].get("role") == "system":
            system = {**messages[0], "content": f"{messages[0]['content']}\n\n{prompt}"}
            return [system, *messages[1:]]
        return [{"role": "system", "content": prompt}, *messages]

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_tokens(
        self, messages: list[Any], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """The prompt for ``messages``: a remembered reply's ids plus the new turns, if any."""
        messages = [normalize(m) for m in messages]
        for k in range(len(messages) - 1, -1, -1):
            if messages[k].get("role") != "assistant":
                continue
            remembered = self._replies.get(_key(messages[: k + 1], tools))
            if remembered is None:
                continue
            spliced = self._continue(messages, k, tools, *remembered)
            if spliced is not None:
                return spliced
            break
        return self.encode(self.render(messages, tools, generate=True))

    def _continue(
        self,
        messages: list[dict[str, Any]],
        k: int,
        tools: list[dict[str, Any]] | None,
        reply_ids: list[int],
        turn_closed: bool,
    ) -> list[int] | None:
        """``reply_ids`` (prompt + sampled) + the template's text after the reply's turn."""
        before = self.render(messages[:k], tools, generate=True)
        closed = self.render(messages[: k + 1], tools, generate=False)
        full = self.render(messages, tools, generate=True)
        end = getattr(self.tokenizer, "eos_token", None) or ""
        if not (end and closed.startswith(before) and full.startswith(closed)):
            return None  # the template rewrites earlier turns: no token-exact continuation
        block = closed[len(before) :]  # the reply as the template writes it, end of turn included
        cut = block.rfind(end)
        if cut < 0:
            return None
        tail = block[cut + len(end) :] if turn_closed else block[cut:]
        return reply_ids + self.encode(tail + full[len(closed) :])

    def remember(
        self,
        messages: list[Any],
        tools: list[dict[str, Any]] | None,
        reply: dict[str, Any],
        prompt_tokens: list[int],
        tokens: list[int],
    ) -> None:
        """``reply`` (as handed out) answered ``messages`` with these sampled ``tokens``."""
        conversation = [normalize(m) for m in messages] + [normalize(reply)]
        end = getattr(self.tokenizer, "eos_token", None)
        closed = bool(end and tokens) and self.tokenizer.decode(tokens[-1:]) == end
        self._replies[_key(conversation, tools)] = (list(prompt_tokens) + list(tokens), closed)
