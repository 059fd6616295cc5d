"""OpenAI-compatible routes beside ``/predict``: ``GET /v1/models``, ``POST /v1/completions``
and ``POST /v1/chat/completions``, where ``model`` names an adapter (or the base by its own
name). Every client library, agent framework and eval harness speaks this API.

The routes reach the same worker, the same queue and the same mixed-adapter batches as
``/predict``. LitServe's ``OpenAISpec`` is not used: a LitAPI with a spec serves only its
spec's route, and a second LitAPI would load a second copy of the base in a worker of its
own. Answers are computed whole, so ``stream: true`` sends them as server-sent events once
they are complete (one content chunk, then the finish reason and usage).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from lightning_peft.serving.requests import RequestError, short

# Fields a client may send with a value this server does not honour: refused unless null
# or OpenAI's default, so nothing is silently ignored.
_UNSUPPORTED = {
    "n": 1,
    "best_of": 1,
    "echo": False,
    "logprobs": False,
    "top_logprobs": None,
    "suffix": None,
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "response_format": None,
    "logit_bias": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
}
# Fields that change nothing here (who the user is, metadata, ...).
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options"}

ToWorker = Callable[..., Awaitable[Any]]
Complete = Callable[[Request, dict[str, Any], bool], Awaitable[Any]]


def add_openai_routes(
    app: Any,
    to_worker: ToWorker,
    complete: Complete,
    base_id: str,
    deps: list[Any],
    *,
    default_max_tokens: int,
) -> None:
    """Add the three routes to ``app``; ``to_worker(op, **fields)`` answers an adapter
    route from the worker, ``complete(request, predict_body, True)`` a generation (with
    usage details; stopped if the client leaves), ``base_id`` is the name ``model`` gives
    the base, ``deps`` the routes' auth, and a chat without ``max_tokens`` may run to
    ``default_max_tokens`` (the server's cap)."""

    async def models() -> Any:
        listed = await to_worker("list")
        names = [base_id] + [adapter["name"] for adapter in listed["adapters"]]
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "lightning-peft"}
                for name in names
            ],
        }

    async def completions(request: Request) -> Any:
        return await _complete(request, complete, base_id, False, default_max_tokens)

    async def chat(request: Request) -> Any:
        return await _complete(request, complete, base_id, True, default_max_tokens)

    app.add_api_route("/v1/models", models, methods=["GET"], dependencies=deps)
    app.add_api_route("/v1/completions", completions, methods=["POST"], dependencies=deps)
    app.add_api_route("/v1/chat/completions", chat, methods=["POST"], dependencies=deps)


async def _complete(
    request: Request, complete: Complete, base_id: str, chat: bool, default_max_tokens: int
) -> Any:
    try:
        try:
            body = await request.json()
        except (ValueError, RecursionError) as error:
            raise RequestError(400, f"the body is not JSON: {type(error).__name__}") from error
        predict, stream = predict_body(body, base_id, chat, default_max_tokens)
    except RequestError as error:
        return _error(error.status, error.reason)
    answer = await complete(request, predict, True)
    if isinstance(answer, JSONResponse):  # the worker refused it (4xx) or failed (500)
        return _error(answer.status_code, json.loads(bytes(answer.body))["detail"])
    reply = _reply(answer, body["model"], chat)
    if not stream:
        return reply
    return StreamingResponse(_events(reply, chat), media_type="text/event-stream")


def predict_body(
    body: Any, base_id: str, chat: bool, default_max_tokens: int = 16
) -> tuple[dict[str, Any], bool]:
    """The ``/predict`` body an OpenAI request stands for, and whether to stream it."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(body).__name__}")
    known = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream"}
    known |= {"messages", "max_completion_tokens"} if chat else {"prompt"}
    for name, value in body.items():
        if name in _UNSUPPORTED and value is not None and value != _UNSUPPORTED[name]:
            raise RequestError(400, f'"{name}": {short(value)} is not supported by this server')
        if name not in known | set(_UNSUPPORTED) | _IGNORED:
            raise RequestError(400, f"unknown field {short(name)}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, f'"model" must name an adapter or the base, got {short(model)}')
    predict: dict[str, Any] = {"adapter": None if model == base_id else model}
    if chat:
        predict["messages"] = _messages(body.get("messages"))
    else:
        predict.update(_prompt(body.get("prompt")))
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is None:  # OpenAI's defaults: 16 for completions, as many as allowed for chat
        limit = default_max_tokens if chat else min(16, default_max_tokens)
    predict["max_new_tokens"] = limit
    # OpenAI samples at temperature 1 unless told otherwise; 0 is greedy.
    predict["temperature"] = 1.0 if body.get("temperature") is None else body["temperature"]
    for name in ("top_p", "seed", "stop"):
        if body.get(name) is not None:
            predict[name] = body[name]
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise RequestError(400, f'"stream" must be true or false, got {short(stream)}')
    return predict, stream


def _prompt(prompt: Any) -> dict[str, Any]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return {"input_ids": prompt}
    raise RequestError(
        400, f'"prompt" must be a string or a list of token ids (one prompt), got {short(prompt)}'
    )


def _messages(messages: Any) -> list[dict[str, str]]:
    """``messages`` with content parts joined into text (``[{"type": "text", ...}]``)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, f'"messages" must be a non-empty list, got {short(messages)}')
    out = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(400, f'each message needs a "role", got {short(message)}')
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise RequestError(400, "message content parts must be text on this server")
            content = "".join(str(part.get("text", "")) for part in content)
        if not isinstance(content, str):
            raise RequestError(400, f'"content" must be text, got {short(content)}')
        out.append({"role": message["role"], "content": content})
    return out


def _reply(answer: dict[str, Any], model: str, chat: bool) -> dict[str, Any]:
    generated = len(answer["output_ids"])
    text = answer["text"] if answer["text"] is not None else ""
    choice: dict[str, Any] = {"index": 0, "finish_reason": answer["finish_reason"]}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice.update(text=text, logprobs=None)
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": answer["prompt_tokens"],
            "completion_tokens": generated,
            "total_tokens": answer["prompt_tokens"] + generated,
        },
    }


def _events(reply: dict[str, Any], chat: bool) -> Iterator[str]:
    """The reply as server-sent events: a content chunk, a finish chunk with the usage,
    then ``[DONE]``."""
    choice = reply["choices"][0]
    head = {k: reply[k] for k in ("id", "created", "model")}
    head["object"] = "chat.completion.chunk" if chat else "text_completion"
    if chat:
        content = {"delta": {"role": "assistant", "content": choice["message"]["content"]}}
        end: dict[str, Any] = {"delta": {}}
    else:
        content, end = {"text": choice["text"]}, {"text": ""}
    yield _event({**head, "choices": [{"index": 0, **content, "finish_reason": None}]})
    finish = {"index": 0, **end, "finish_reason": choice["finish_reason"]}
    yield _event({**head, "choices": [finish], "usage": reply["usage"]})
    yield "data: [DONE]\n\n"


def _event(chunk: dict[str, Any]) -> str:
    return f"data: {json.dumps(chunk)}\n\n"


def _error(status: int, message: str) -> JSONResponse:
    """An error as OpenAI's API sends one (the client libraries read ``error.message``)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 404:
        kind = "not_found_error"
    if status == 401:
        kind = "authentication_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": status}},
        status_code=status,
    )
