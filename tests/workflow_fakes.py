"""A character-level tokenizer and a scripted sampler: workflows run end to end with no model."""

from __future__ import annotations

from typing import Any

from trinity.workflows.types import Response


class CharTokenizer:
    """One token per character (its code point); a readable stand-in chat template."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, tokens: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(t) for t in tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        tokenize: bool = False,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> str:
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")


class ScriptedSampler:
    """Answers every call with the given texts (cycled to ``n``) and records what it was asked.

    A text ending in ``...`` comes back with ``stop_reason="length"`` (a truncated sample).
    """

    def __init__(self, texts: list[str]):
        self.texts = texts
        self.tokenizer = CharTokenizer()
        self.calls: list[dict[str, Any]] = []

    async def chat(
        self, messages: list[dict[str, str]], n: int, **sampling_args: Any
    ) -> list[Response]:
        self.calls.append({"kind": "chat", "messages": messages, "n": n, "args": sampling_args})
        prompt = self.tokenizer.encode(self.tokenizer.apply_chat_template(messages))
        return self._responses(prompt, n)

    async def generate(
        self, prompt_tokens: list[int], n: int, **sampling_args: Any
    ) -> list[Response]:
        self.calls.append(
            {"kind": "generate", "prompt_tokens": prompt_tokens, "n": n, "args": sampling_args}
        )
        return self._responses(list(prompt_tokens), n)

    def _responses(self, prompt_tokens: list[int], n: int) -> list[Response]:
        responses = []
        for i in range(n):
            text = self.texts[i % len(self.texts)]
            tokens = self.tokenizer.encode(text)
            responses.append(
                Response(
                    prompt_tokens=prompt_tokens,
                    tokens=tokens,
                    logprobs=[-0.25 - 0.01 * j for j in range(len(tokens))],
                    text=text,
                    stop_reason="length" if text.endswith("...") else "stop",
                )
            )
        return responses
