"""The rollout model as an OpenAI-compatible endpoint on loopback, for agents and their frameworks.

``get_openai_client()`` / ``get_openai_async_client()`` (``trinity.explorer.sampler``) hand a
workflow real ``openai`` SDK clients whose ``base_url`` is ``http://127.0.0.1:PORT/<id>/v1``: one
FastAPI app per process, served by uvicorn in a daemon thread, routes each request by ``<id>`` to
the workflow's own ``PolicySampler``, so its history, seed and weights are that workflow's. The
sampler's backend (engine worker or Tinker sampling client) answers from whatever thread awaits
it, so a workflow that blocks its event loop on the sync client does not stall its own request.

A chat completion: the prompt is the conversation as ``Conversations`` builds it (earlier replies
as their sampled ids), the samples are the sampler's (recorded in its history), and the answer
is the SDK's own ``ChatCompletion``: content cut at a stop string as OpenAI does (the stop's
tokens stay in the recorded sample), tool calls parsed (``trinity.explorer.tool_calls``),
per-token logprobs, the reasoning split from the content as vLLM's ``reasoning_parser`` does
(``reasoning_content``), and vLLM's ``prompt_token_ids`` / ``token_ids`` extras. Bad requests (a
prompt past the context, unknown tools settings) answer 400 with one line.

``stream: true`` answers the same completion as server-sent events (``stream_events``): the
samplers return whole samples, so the chunks come once sampling is done, not token by token as
they are sampled; they exist for agents and frameworks that only speak the streaming API.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import openai
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from openai.types.chat import ChatCompletion
from tinker import types

from trinity.explorer.tool_calls import MalformedToolCall, parse_tool_calls, response_template

log = logging.getLogger(__name__)
UNSUPPORTED = ("top_logprobs",)
THINK_START, THINK_END = "<think>", "</think>"
# explorer.rollout_model.reasoning_parser -> whether a reply without </think> is all reasoning
# (deepseek_r1: the chat template opened <think> in the prompt) or all content (qwen3)
REASONING_PARSERS = {"deepseek_r1": True, "qwen3": False}


class RequestError(ValueError):
    """A request this endpoint refuses; its message is the 400 answer."""


def _error(status: int, message: str, kind: str) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "code": status}}
    return JSONResponse(body, status_code=status)


class Endpoint:
    """The process's endpoint: started on first use, serving every live rollout model."""

    _instance: Endpoint | None = None
    _lock = threading.Lock()

    def __init__(self):
        self.models: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self._app(), log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True, name="trinity-openai"
        )
        thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the OpenAI-compatible endpoint did not start")
            time.sleep(0.01)

    @classmethod
    def get(cls) -> Endpoint:
        with cls._lock:
            if cls._instance is None:
                cls._instance = Endpoint()
            return cls._instance

    def url(self, model: Any) -> str:
        """The ``base_url`` for one rollout model (registered while it lives)."""
        for key, value in self.models.items():
            if value is model:
                return f"http://127.0.0.1:{self.port}/{key}/v1"
        key = secrets.token_hex(8)
        self.models[key] = model
        return f"http://127.0.0.1:{self.port}/{key}/v1"

    def _app(self) -> FastAPI:
        app = FastAPI(title="trinity rollout model (OpenAI-compatible)")

        @app.get("/{key}/v1/models")
        async def models(key: str) -> Any:
            model = self.models.get(key)
            if model is None:
                return _error(404, f"no rollout model '{key}' in this process", "not_found")
            data = [{"id": model.model_path, "object": "model", "owned_by": "trinity"}]
            return {"object": "list", "data": data}

        @app.post("/{key}/v1/chat/completions")
        async def chat_completions(key: str, request: Request) -> Any:
            model = self.models.get(key)
            if model is None:
                return _error(404, f"no rollout model '{key}' in this process", "not_found")
            try:
                body = await request.json()
                completion = await chat_completion(model, body)
            except ValueError as exc:  # RequestError, a malformed body, a bad parser name
                log.warning("chat completion refused: %s", exc)
                return _error(400, str(exc), "invalid_request_error")
            except Exception as exc:  # noqa: BLE001 - the agent gets one line, the log the trace
                log.exception("chat completion failed")
                return _error(500, f"{type(exc).__name__}: {exc}", "internal_error")
            return answer(completion, body, model.tokenizer)

        return app


def openai_client(model: Any, *, is_async: bool) -> Any:
    """A real ``openai`` client for ``model`` (a ``PolicySampler``); ``.model_path`` names it."""
    if not model.enable_openai_api:
        raise ValueError("get_openai_client needs explorer.rollout_model.enable_openai_api: true")
    cls, http = (
        (openai.AsyncOpenAI, openai.DefaultAsyncHttpxClient)
        if is_async
        else (openai.OpenAI, openai.DefaultHttpxClient)
    )
    client = cls(
        base_url=Endpoint.get().url(model),
        api_key="EMPTY",
        max_retries=0,  # the explorer retries whole tasks; a refused request fails at once
        http_client=http(trust_env=False),  # loopback: never through a proxy
    )
    client.model_path = model.model_path
    return client


async def chat_completion(model: Any, body: dict[str, Any]) -> ChatCompletion:
    """Answer one ``/v1/chat/completions`` request body with ``model`` (a ``PolicySampler``)."""
    for key in UNSUPPORTED:
        if body.get(key):
            raise RequestError(f"'{key}' is not supported by this endpoint")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list")
    tools = body.get("tools") or None
    parser = _tool_parser(model, tools, body.get("tool_choice"))
    prompt = model.encode_chat(messages, tools)
    n = int(body.get("n") or 1)
    params = _sampling_params(model, body, len(prompt))
    responses = await model.sample(prompt, n, params)
    stops = _stop_strings(body.get("stop"))
    choices = []
    for index, response in enumerate(responses):
        message, finish = _message(model, response, stops, parser)
        model.conversations.remember(messages, tools, message, prompt, response.tokens)
        choice: dict[str, Any] = {
            "index": index,
            "message": message,
            "finish_reason": finish,
            "token_ids": response.tokens,
        }
        if body.get("logprobs"):
            choice["logprobs"] = {"content": _token_logprobs(model.tokenizer, response)}
        choices.append(choice)
    completion_tokens = sum(len(r.tokens) for r in responses)
    return ChatCompletion.model_validate(
        {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model.model_path,
            "choices": choices,
            "prompt_token_ids": prompt,
            "usage": {
                "prompt_tokens": len(prompt),
                "completion_tokens": completion_tokens,
                "total_tokens": len(prompt) + completion_tokens,
            },
        }
    )


def answer(completion: ChatCompletion, body: dict[str, Any], tokenizer: Any) -> Any:
    """The HTTP answer to ``body``: the completion as JSON, or as an event stream when
    ``body["stream"]``."""
    if not body.get("stream"):
        return completion.model_dump(exclude_none=True)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object")
    events = stream_events(completion, tokenizer, bool(options.get("include_usage")))
    return StreamingResponse(events, media_type="text/event-stream")


def stream_events(
    completion: ChatCompletion, tokenizer: Any, include_usage: bool = False
) -> Iterator[str]:
    """``completion`` as OpenAI's ``chat.completion.chunk`` events, then ``[DONE]``: per choice
    the role, the reasoning, the content one sampled token at a time (pieces that join to
    exactly the content), the tool calls, then a chunk with the finish reason, the logprobs and
    the sampled ``token_ids``; a last chunk with the usage when ``include_usage``."""
    head = {
        "id": completion.id,
        "object": "chat.completion.chunk",
        "created": completion.created,
        "model": completion.model,
    }

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

    for choice in completion.choices:
        message, extra = choice.message, choice.model_extra or {}
        tokens = extra.get("token_ids") or []

        def delta(index: int = choice.index, **fields: Any) -> str:
            return event([{"index": index, "delta": fields, "finish_reason": None}])

        yield delta(role="assistant", content="")
        reasoning = (message.model_extra or {}).get("reasoning_content")
        if reasoning:
            yield delta(reasoning_content=reasoning)
        for piece in _pieces(tokenizer, tokens, message.content or ""):
            yield delta(content=piece)
        if message.tool_calls:
            calls = [
                {"index": k, **call.model_dump(exclude_none=True)}
                for k, call in enumerate(message.tool_calls)
            ]
            yield delta(tool_calls=calls)
        last: dict[str, Any] = {
            "index": choice.index,
            "delta": {},
            "finish_reason": choice.finish_reason,
            "token_ids": tokens,
        }
        if choice.logprobs is not None:
            last["logprobs"] = choice.logprobs.model_dump(exclude_none=True)
        yield event([last])
    if include_usage and completion.usage is not None:
        yield event([], usage=completion.usage.model_dump())
    yield "data: [DONE]\n\n"


def _pieces(tokenizer: Any, tokens: list[int], content: str) -> Iterator[str]:
    """``content`` cut where each sampled token ends (a token that ends inside a character, or
    past a stop string, waits for the next), so the pieces join to ``content`` exactly."""
    sent = 0
    for end in range(1, len(tokens) + 1):
        text = tokenizer.decode(tokens[:end], skip_special_tokens=True)
        if len(text) > sent and content.startswith(text):
            yield content[sent : len(text)]
            sent = len(text)
    if sent < len(content):
        yield content[sent:]


def _tool_parser(model: Any, tools: Any, tool_choice: Any) -> dict[str, Any] | None:
    """The response template to parse tool calls with, or None when none may be called."""
    if not tools or tool_choice == "none":
        return None
    settings = model.settings
    if tool_choice in (None, "auto") and not settings.enable_auto_tool_choice:
        raise RequestError(
            '"auto" tool choice needs explorer.rollout_model.enable_auto_tool_choice: true'
        )
    return response_template(model.tokenizer, settings.tool_call_parser)


def _stop_strings(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise RequestError("'stop' must be a string or a list of non-empty strings")
    return stops


def _sampling_params(model: Any, body: dict[str, Any], prompt_length: int) -> types.SamplingParams:
    settings = model.settings
    limit = settings.max_model_len
    if limit and prompt_length >= limit:
        raise RequestError(
            f"the prompt has {prompt_length} tokens, at or past model.max_model_len={limit}"
        )
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    max_tokens = int(max_tokens or settings.max_response_tokens)
    if limit:
        max_tokens = min(max_tokens, limit - prompt_length)
    args = {
        "max_tokens": max_tokens,
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "seed": body.get("seed"),
        "stop": _stop_strings(body.get("stop")) or None,  # the sampler adds EOS back
    }
    return model.sampling_params(args)


def _message(
    model: Any, response: Any, stops: list[str], parser: dict[str, Any] | None
) -> tuple[dict[str, Any], str]:
    content: str | None = response.text
    for stop in stops:
        if content and stop in content:
            content = content[: content.index(stop)]
    finish = "length" if response.stop_reason == "length" else "stop"
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if parser is not None:
        try:
            content, calls = parse_tool_calls(model.tokenizer, response.tokens, parser)
        except MalformedToolCall as exc:
            log.warning("a malformed tool call is returned as text: %s", exc)
            return message, finish
        message["content"] = content
        if calls:
            message["tool_calls"] = calls
            finish = "tool_calls"
    if model.settings.reasoning_parser and message["content"]:
        reasoning, message["content"] = split_reasoning(
            message["content"], model.settings.reasoning_parser
        )
        message["reasoning_content"] = reasoning
    return message, finish


def split_reasoning(text: str, parser: str) -> tuple[str | None, str | None]:
    """(reasoning, content) of a reply, as vLLM's ``parser`` reasoning parser splits it: the
    text up to ``</think>`` (without ``<think>``) is the reasoning, the rest the content."""
    if THINK_END not in text:
        return (text.removeprefix(THINK_START), None) if REASONING_PARSERS[parser] else (None, text)
    reasoning, _, content = text.partition(THINK_END)
    return reasoning.strip().removeprefix(THINK_START).strip(), content.strip() or None


def _token_logprobs(tokenizer: Any, response: Any) -> list[dict[str, Any]]:
    out = []
    for token, logprob in zip(response.tokens, response.logprobs, strict=False):
        text = tokenizer.decode([token])
        out.append(
            {
                "token": text,
                "logprob": logprob,
                "bytes": list(text.encode()),
                "top_logprobs": [],
            }
        )
    return out
