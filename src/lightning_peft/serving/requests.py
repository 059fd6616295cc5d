"""What a client may ask the server, checked before any work: one line per refusal.

Kept free of LitServe and of the model so the rules read (and test) on their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lightning_peft.errors import LightningPeftError

PREDICT_FIELDS = (
    "adapter",
    "prompt",
    "messages",
    "input_ids",
    "max_new_tokens",
    "choices",
    "temperature",
    "top_p",
    "seed",
    "stop",
)
MAX_STOPS = 4  # as OpenAI's API allows
DEFAULT_MAX_NEW_TOKENS = 16
MAX_CHOICES = 64
MAX_NAME = 64  # adapter names are echoed in refusals and listings


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: a refusal names what it got without
    sending a megabyte back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


class RequestError(LightningPeftError):
    """A request the server refuses: ``status`` is the HTTP code, the message its reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Job:
    """One request: ``adapter`` (None: the base alone) continues ``input_ids`` greedily for
    at most ``max_new_tokens`` tokens or, given ``choices`` (token ids of each), scores
    each choice as a continuation of ``input_ids`` (rank classification)."""

    adapter: str | None
    input_ids: tuple[int, ...]
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    choices: tuple[tuple[int, ...], ...] | None = None
    #: Sampling (OpenAI's meaning): 0 is greedy; ``seed`` makes a sample repeatable.
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    #: Texts that end the answer where they first appear (not included).
    stop: tuple[str, ...] = ()
    #: ``time.monotonic()`` after which the work is abandoned (None: none).
    deadline: float | None = None
    #: A file that exists once the client has closed its connection: the work stops then
    #: (None: the client is not watched).
    gone: str | None = None
    #: Answer with ``finish_reason`` and ``prompt_tokens`` too (the OpenAI routes need them).
    detail: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class PredictRequest:
    """A ``POST /predict`` body, checked but not yet tokenized."""

    adapter: str | None
    prompt: str | None
    input_ids: tuple[int, ...] | None
    max_new_tokens: int
    choices: tuple[str | tuple[int, ...], ...] | None = None
    #: A conversation, rendered with the chat template the adapter trained with.
    messages: tuple[dict[str, str], ...] | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


def parse_predict(body: Any, *, max_new_tokens_cap: int) -> PredictRequest:
    """The fields of a ``/predict`` body, or a :class:`RequestError` (400) naming what is wrong."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(PREDICT_FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field(s) {short(unknown)}; known: {list(PREDICT_FIELDS)}")
    if "adapter" not in body:
        raise RequestError(400, 'missing field "adapter" (a name from GET /adapters, or null)')
    adapter = body["adapter"]
    if adapter is not None and not isinstance(adapter, str):
        raise RequestError(400, f'"adapter" must be a name or null, got {short(adapter)}')
    prompt, input_ids, messages = body.get("prompt"), body.get("input_ids"), body.get("messages")
    if [prompt, input_ids, messages].count(None) != 2:
        raise RequestError(
            400,
            'give exactly one of "prompt" (text), "messages" (a conversation) or "input_ids" '
            "(token ids)",
        )
    if messages is not None:
        if not (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict)
                and set(m) == {"role", "content"}
                and isinstance(m["role"], str)
                and isinstance(m["content"], str)
                for m in messages
            )
        ):
            raise RequestError(
                400,
                '"messages" must be a non-empty list of {"role": str, "content": str}, got '
                f"{short(messages)}",
            )
        messages = tuple(messages)
    if prompt is not None and not isinstance(prompt, str):
        raise RequestError(400, f'"prompt" must be a string, got {type(prompt).__name__}')
    if input_ids is not None:
        if (
            not isinstance(input_ids, list)
            or not input_ids
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in input_ids)
        ):
            raise RequestError(
                400, f'"input_ids" must be a non-empty int list, got {short(input_ids)}'
            )
        input_ids = tuple(input_ids)
    if prompt == "":
        raise RequestError(400, '"prompt" is empty')
    choices = _choices(body.get("choices"))
    if choices is not None and "max_new_tokens" in body:
        raise RequestError(400, 'give "max_new_tokens" (generate) or "choices" (score), not both')
    count = body.get("max_new_tokens", min(DEFAULT_MAX_NEW_TOKENS, max_new_tokens_cap))
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        raise RequestError(400, f'"max_new_tokens" must be a positive int, got {short(count)}')
    if count > max_new_tokens_cap:
        raise RequestError(
            400,
            f'"max_new_tokens" is at most {max_new_tokens_cap} on this server '
            f"(--max-new-tokens), got {short(count)}",
        )
    temperature, top_p, seed, stop = _sampling(body)
    if choices is not None and (temperature or stop):
        raise RequestError(400, '"choices" are scored, not sampled: drop "temperature" and "stop"')
    return PredictRequest(
        adapter, prompt, input_ids, count, choices, messages, temperature, top_p, seed, stop
    )


def _sampling(body: dict[str, Any]) -> tuple[float, float, int | None, tuple[str, ...]]:
    """``temperature``, ``top_p``, ``seed`` and ``stop``, checked as OpenAI's API does."""
    temperature = body.get("temperature", 0.0)
    if temperature is None:
        temperature = 0.0
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise RequestError(400, f'"temperature" must be a number, got {short(temperature)}')
    if not 0 <= temperature <= 2:
        raise RequestError(400, f'"temperature" must lie in [0, 2], got {short(temperature)}')
    top_p = body.get("top_p", 1.0)
    if top_p is None:
        top_p = 1.0
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise RequestError(400, f'"top_p" must be a number in (0, 1], got {short(top_p)}')
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, f'"seed" must be an int, got {short(seed)}')
    if seed is not None and not 0 <= seed < 2**63:
        raise RequestError(400, f'"seed" must lie in [0, 2**63), got {short(seed)}')
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if (
        not isinstance(stop, (list, tuple))
        or len(stop) > MAX_STOPS
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise RequestError(
            400, f'"stop" must be a string or a list of 1 to {MAX_STOPS}, got {short(stop)}'
        )
    return float(temperature), float(top_p), seed, tuple(stop)


def _choices(value: Any) -> tuple[str | tuple[int, ...], ...] | None:
    """``"choices"``: continuations to score, as texts or as lists of token ids."""
    if value is None:
        return None
    problem = (
        not isinstance(value, list)
        or not 1 <= len(value) <= MAX_CHOICES
        or not all(
            (isinstance(c, str) and c)
            or (
                isinstance(c, list)
                and c
                and all(isinstance(i, int) and not isinstance(i, bool) for i in c)
            )
            for c in value
        )
    )
    if problem:
        raise RequestError(
            400,
            f'"choices" must be a list of 1 to {MAX_CHOICES} non-empty strings or token-id '
            f"lists, got {short(value)}",
        )
    return tuple(c if isinstance(c, str) else tuple(c) for c in value)


def check_name(name: Any, field: str) -> str:
    """``name`` if it can name an adapter: an identifier of at most ``MAX_NAME`` characters."""
    if not isinstance(name, str) or not name.isidentifier() or len(name) > MAX_NAME:
        raise RequestError(
            400,
            f"{field} must be an identifier of at most {MAX_NAME} characters, got {short(name)}",
        )
    return name


def parse_load(body: Any) -> tuple[str, str]:
    """``(name, path)`` of a ``POST /adapters`` body ``{"name": ..., "path": ...}``: ``path``
    (default: the name) is relative to the server's adapter root."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - {"name", "path"})
    if unknown:
        raise RequestError(400, f'unknown field(s) {short(unknown)}; known: ["name", "path"]')
    name = check_name(body.get("name"), '"name"')
    path = body.get("path", name)
    if not isinstance(path, str) or not path or path.startswith(("/", "~")) or "\0" in path:
        raise RequestError(
            400,
            '"path" must be a PEFT folder or adapter checkpoint relative to the server\'s '
            f"adapter root, got {short(path)}",
        )
    return name, path
