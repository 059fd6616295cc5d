"""The LitServe side: :class:`AdapterAPI` (a ``LitAPI``) and :func:`adapter_server`, the
``LitServer`` with the adapter routes that ``lightning-peft serve`` runs.

LitServe runs ``setup`` and ``predict`` in a worker process and the HTTP routes in another.
``/predict`` bodies reach the worker through LitServe's request queue, batched; the adapter
routes (``GET``/``POST /adapters``, ``DELETE /adapters/{name}``) travel the same queue as
admin items carrying a per-server secret, so a load or unload happens between two batches
and no request can pose as one. Every item of a batch is answered alone: a bad request
gets its own 4xx and the rest of its batch is served.

With an ``api_key`` every route but ``/health`` needs ``Authorization: Bearer KEY``
(LitServe's own ``authorize`` mechanism, on the added routes too); the adapter routes can
need a key of their own or be left out, and they load adapters by name from one folder,
never from a path a client chooses.

A client that closes its connection has its work stopped: the route that waits for its
answer sees the disconnect and leaves a file named after the request in a folder the
worker can see (another process: a file is the cheapest thing both read), and the worker
stops the request's row between two decoding steps, or never starts it.
"""

import asyncio
import dataclasses
import json
import os
import secrets
import shutil
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import litserve as ls
from fastapi import Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from lightning_peft._compat import litserve_request_handler
from lightning_peft.serving.engine import AdapterEngine
from lightning_peft.serving.openai_routes import add_openai_routes
from lightning_peft.serving.requests import RequestError, parse_load, parse_predict, short

_ADMIN = "_lightning_peft_admin"
_BEARER = HTTPBearer(auto_error=False)
MAX_DEPTH = 16  # of a JSON body: /predict needs 3 ("choices": [[ids]]; "messages": [{...}])


def nesting(value: Any, limit: int) -> int:
    """How deep ``value`` nests lists and dicts, counted up to ``limit + 1`` (no deeper:
    the walk is bounded whatever the body)."""
    deepest, level = 0, [value] if isinstance(value, (list, dict)) else []
    while level and deepest <= limit:
        deepest += 1
        level = [
            child
            for item in level
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, (list, dict))
        ]
    return deepest


def _check_key(credentials: HTTPAuthorizationCredentials | None, key: str | None) -> None:
    """Refuse (401) unless ``credentials`` carry ``key``; compared in constant time."""
    if key is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not secrets.compare_digest(given.encode(), key.encode()):
        raise HTTPException(
            401,
            "send the server's API key as 'Authorization: Bearer KEY'",
            headers={"WWW-Authenticate": "Bearer"},
        )


class AdapterAPI(ls.LitAPI):
    """Serve ``base`` with named adapters; each request picks its own.

    Args:
        base: a transformers causal-LM folder (with its tokenizer for text prompts).
        adapters: ``{name: path}`` of PEFT folders or adapter checkpoints to load at start.
        precision: ``"nf4"``, ``"fp4"`` or ``"int8"`` to quantize the base (None: float).
            An adapter trained with QLoRA needs the 4-bit base it trained on.
        max_new_tokens: the most tokens a request may ask for.
        max_batch_size, batch_timeout: LitServe's batching (requests for any adapters).
        mix: one pass per batch whatever its adapters (False: one pass per adapter in it).
        max_score_tokens: the most tokens one scoring pass may hold (see ``AdapterEngine``).
        api_key: the key every route but ``/health`` needs as ``Authorization: Bearer``
            (None: none).
        admin_key: the key the adapter routes need instead (None: ``api_key``).
        admin: add the adapter routes (``GET``/``POST /adapters``, ``DELETE``).
        adapter_root: the folder ``POST /adapters`` loads from, by a name or a path relative
            to it (None: loading is refused).
        exact_4bit: keep a 4-bit base in the layout training used instead of bitsandbytes'
            faster CPU inference layout (see ``AdapterEngine``).

    In your own app, ``ls.LitServer(AdapterAPI(...))`` serves ``/predict``; build the server
    with :func:`adapter_server` to add the ``/adapters`` routes. Use one worker: each worker
    holds a copy of the base, and an adapter route reaches one of them.
    """

    def __init__(
        self,
        base: str | Path,
        adapters: Mapping[str, str | Path] | None = None,
        *,
        precision: str | None = None,
        max_new_tokens: int = 256,
        max_batch_size: int = 8,
        batch_timeout: float = 0.01,
        mix: bool = True,
        max_score_tokens: int = 2048,
        api_key: str | None = None,
        admin_key: str | None = None,
        admin: bool = True,
        adapter_root: str | Path | None = None,
        exact_4bit: bool = False,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.base = str(base)
        # What OpenAI requests call the base in "model": its folder's name.
        self.base_name = Path(self.base).name or self.base
        self.initial_adapters = {name: str(path) for name, path in (adapters or {}).items()}
        self.precision = precision
        self.max_new_tokens = max_new_tokens
        self.mix = mix
        self.max_score_tokens = max_score_tokens
        for what, key in (("api_key", api_key), ("admin_key", admin_key)):
            if key is not None and (len(key) < 16 or key != key.strip()):
                raise ValueError(
                    f"{what} must be at least 16 characters without surrounding spaces (a "
                    "blank key would let every request in)"
                )
        self.api_key = api_key
        self.admin_api_key = admin_key if admin_key is not None else api_key
        self.admin = admin
        self.adapter_root = None if adapter_root is None else Path(adapter_root).resolve()
        self.exact_4bit = exact_4bit
        # The secret admin items carry on the worker queue (not a client's credential).
        self.admin_key = secrets.token_hex(16)
        # Where the routes mark requests whose client left (set by adapter_server).
        self.departures: str | None = None

    def setup(self, device: str) -> None:
        self.engine = AdapterEngine.from_pretrained(
            self.base,
            precision=self.precision,
            device=device,
            max_new_tokens=self.max_new_tokens,
            mix=self.mix,
            max_score_tokens=self.max_score_tokens,
            exact_4bit=self.exact_4bit,
        )
        for name, path in self.initial_adapters.items():
            self.engine.load(name, path)  # a RequestError here stops the server, saying why

    async def authorize(
        self,
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(_BEARER),  # noqa: B008
    ) -> None:
        """LitServe's auth hook, run before every route it adds: the API key as a Bearer
        token, and a body LitServe can hand to its worker (it pickles the parsed JSON, which
        fails past Python's recursion limit: answered 400 here, not 500 there)."""
        if request.url.path != "/health":
            _check_key(credentials, self.api_key)
        if request.method == "POST":
            try:
                body = json.loads(await request.body() or b"null")
            except (ValueError, RecursionError):
                return  # malformed JSON: FastAPI's own 400 says so
            depth = nesting(body, MAX_DEPTH)
            if depth > MAX_DEPTH:
                raise HTTPException(
                    400, f"the body nests more than {MAX_DEPTH} levels deep; no field needs that"
                )

    # The annotation makes FastAPI parse the body as a JSON object (malformed JSON is a
    # validation error, answered 400 by adapter_server) and LitServe pass it on as a dict.
    def decode_request(self, request: dict) -> Any:
        detail, arrived, gone = False, None, None
        if secrets.compare_digest(str(request.get(_ADMIN, "")), self.admin_key):
            if request.get("op") != "complete":
                return ("admin", request)
            # A request from a route of adapter_server: a /predict body, when it arrived,
            # whether to answer with usage details (the OpenAI routes), and its ticket.
            detail, arrived = request["detail"], request["arrived"]
            if self.departures is not None:
                gone = os.path.join(self.departures, request["ticket"])
            request = request["request"]
        try:
            parsed = parse_predict(request, max_new_tokens_cap=self.max_new_tokens)
            # Whether the adapter is loaded is asked when the batch runs, after the loads and
            # deletes that arrived before this request.
            job = self.engine.job(parsed, check_adapter=False)
            # LitServe answers 504 to a request that waited past its timeout; the worker
            # stops generating for it then too (counted from here, or from arrival when the
            # route recorded it: the monotonic clock is the machine's).
            timeout = self.request_timeout
            deadline = None
            if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0:
                deadline = float(arrived if arrived is not None else time.monotonic()) + timeout
            return dataclasses.replace(job, detail=detail, deadline=deadline, gone=gone)
        except RequestError as error:  # answered alone in encode_response
            return error
        except Exception as error:  # raising here would fail the whole batch
            return RequestError(500, f"reading the request failed: {type(error).__name__}: {error}")

    def predict(self, items: Any) -> Any:
        if self.max_batch_size == 1:  # LitServe's unbatched loop: one item
            return self._answer([items])[0]
        return self._answer(items)

    def _answer(self, items: list[Any]) -> list[Any]:
        """Each item's answer; admin items run in arrival order between the generations."""
        answers: list[Any] = [None] * len(items)
        pending: list[int] = []

        def flush() -> None:
            for index in [i for i in pending if not self._loaded(items[i])]:
                answers[index] = RequestError(404, self.engine.unknown(items[index].adapter))
                pending.remove(index)
            jobs = [items[i] for i in pending]
            for index, job, output in zip(pending, jobs, self.engine.run(jobs), strict=True):
                try:
                    if isinstance(output, RequestError):  # a deadline, a client gone
                        answers[index] = output
                        continue
                    if isinstance(output, Exception):
                        raise output
                    answers[index] = self.engine.answer(job, output)
                except Exception as error:
                    reason = f"the model failed: {type(error).__name__}: {error}"
                    answers[index] = RequestError(500, " ".join(reason.split()))
            pending.clear()

        for index, item in enumerate(items):
            if isinstance(item, tuple):
                flush()
                answers[index] = self._admin(item[1])
            elif isinstance(item, RequestError):
                answers[index] = item
            else:
                pending.append(index)
        flush()
        return answers

    def _loaded(self, job: Any) -> bool:
        return job.adapter is None or job.adapter in self.engine.sources

    def _admin(self, request: dict[str, Any]) -> Any:
        try:
            if request["op"] == "list":
                return {"adapters": self.engine.adapters(), "served": self.engine.served}
            if request["op"] == "load":
                # Checked again here: the worker trusts no path it did not resolve itself.
                path = under_root(self.adapter_root, str(request["path"]))
                return self.engine.load(request["name"], path)
            self.engine.unload(request["name"])
            return {"deleted": request["name"]}
        except RequestError as error:
            return error
        except Exception as error:  # anything else a load hits: the server keeps serving
            return RequestError(500, f"{type(error).__name__}: {error}")

    def encode_response(self, output: Any) -> Any:
        if isinstance(output, RequestError):
            return JSONResponse({"detail": output.reason}, status_code=output.status)
        return output


def adapter_server(api: AdapterAPI, **litserver_kwargs: Any) -> ls.LitServer:
    """A ``LitServer`` for ``api`` (one worker) with the adapter routes and one-line 400s
    for bodies that are not JSON objects."""
    litserver_kwargs.setdefault("workers_per_device", 1)
    # Bodies past this are refused (413) before anything reads them: a 10 MB prompt would
    # cross to the worker and be parsed there, for nothing (no context is that long).
    if "max_payload_size" not in litserver_kwargs:
        litserver_kwargs["max_payload_size"] = body_limit(_context_of(api.base))
    litserver_kwargs.setdefault("devices", 1)
    server = ls.LitServer(api, **litserver_kwargs)
    # LitServe's own handler puts a body on the worker queue and awaits its answer.
    handler = litserve_request_handler(api, server)

    async def to_worker(op: str, **fields: Any) -> Any:
        return await handler.handle_request({_ADMIN: api.admin_key, "op": op, **fields}, dict)

    api.departures = tempfile.mkdtemp(prefix="lightning-peft-departures-")
    weakref.finalize(server, shutil.rmtree, api.departures, True)

    async def complete(request: Request, body: dict[str, Any], detail: bool) -> Any:
        """The worker's answer to ``body``; if the client leaves first (or this route is
        cancelled, as at shutdown), the worker is told and the marker goes with the work."""
        ticket = uuid.uuid4().hex
        marker = Path(cast(str, api.departures), ticket)
        fields = {"request": body, "arrived": time.monotonic(), "detail": detail}
        work = asyncio.ensure_future(to_worker("complete", ticket=ticket, **fields))
        work.add_done_callback(lambda _: marker.unlink(missing_ok=True))
        left = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, left}, return_when=asyncio.FIRST_COMPLETED)
            if left.done() and not left.cancelled() and left.exception() is None:
                _mark(marker)
            # Awaited even for a client that left: LitServe's handler holds a slot for it.
            return await work
        except asyncio.CancelledError:
            if not work.done():
                _mark(marker)
            raise
        finally:
            left.cancel()

    async def predict(request: Request, body: dict[str, Any]) -> Any:
        return await complete(request, body, False)

    # LitServe's own /predict cannot see its client leave: the same route through
    # complete() takes its place (same path, body, auth and answers).
    _replace_post_route(server.app, api.api_path, predict, [Depends(server.setup_auth(api))])

    async def list_adapters() -> Any:
        return await to_worker("list")

    async def load_adapter(request: Request) -> Any:
        try:
            name, path = parse_load(await request.json())
            source = under_root(api.adapter_root, path)
        except (ValueError, RecursionError) as error:
            reason = f"the body is not JSON: {type(error).__name__}: {error}"
            return JSONResponse({"detail": " ".join(reason.split())}, status_code=400)
        except RequestError as error:
            return JSONResponse({"detail": error.reason}, status_code=error.status)
        return await to_worker("load", name=name, path=str(source))

    async def unload_adapter(name: str) -> Any:
        return await to_worker("delete", name=name)

    if api.api_key is not None or api.admin_api_key is not None:
        # Before any route reads a body (LitServe's /predict parses up to the payload limit
        # first) and on FastAPI's own /docs and /openapi.json too.
        server.app.add_middleware(_KeysFirst, api=api)
    if api.admin:
        admin = [Depends(_key_check(api.admin_api_key))]
        server.app.add_api_route("/adapters", list_adapters, methods=["GET"], dependencies=admin)
        server.app.add_api_route("/adapters", load_adapter, methods=["POST"], dependencies=admin)
        server.app.add_api_route(
            "/adapters/{name}", unload_adapter, methods=["DELETE"], dependencies=admin
        )
    openai_auth = [Depends(_key_check(api.api_key))]
    add_openai_routes(
        server.app,
        to_worker,
        complete,
        api.base_name,
        openai_auth,
        default_max_tokens=api.max_new_tokens,
    )
    server.app.add_exception_handler(RequestValidationError, _one_line_400)
    return server


class _KeysFirst:
    """ASGI middleware: a request without the key its route needs gets a 401 before its
    body is read; ``/health`` stays open for probes."""

    def __init__(self, app: Any, api: AdapterAPI) -> None:
        self.app = app
        self.api = api

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path != "/health":
            admin = path == "/adapters" or path.startswith("/adapters/")
            key = self.api.admin_api_key if admin else self.api.api_key
            headers = dict(scope.get("headers") or [])
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if key is not None and not (
                scheme.lower() == "bearer"
                and secrets.compare_digest(token.strip().encode(), key.encode())
            ):
                reason = "send the server's API key as 'Authorization: Bearer KEY'"
                body: dict[str, Any] = {"detail": reason}
                if path.startswith("/v1/"):  # as OpenAI's API answers, for its clients
                    body = {"error": {"message": reason, "type": "authentication_error"}}
                response = JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def body_limit(context: int | None) -> int:
    """The largest body worth reading for a model of ``context`` tokens: 64 bytes a token
    (a prompt's text runs 3-5 bytes a token, 4 for a JSON-escaped UTF-8 character, 8 for
    a token id in a list), at least 1 MiB; 4 MiB when the context is not known."""
    if context is None:
        return 4 * 2**20
    return max(2**20, 64 * context)


def _context_of(base: str) -> int | None:
    """The base's context in tokens, read from its config (the main process loads no
    weights), or None."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(base)
    except Exception:  # no config here (the worker will say why it cannot load)
        return None
    config = getattr(config, "text_config", None) or config
    context = getattr(config, "max_position_embeddings", None)
    return context if isinstance(context, int) and context > 0 else None


def _mark(marker: Path) -> None:
    """Leave ``marker`` for the worker; a folder removed under the server (a tmp cleaner)
    is made again, and a marker that cannot be written costs the work, not the route."""
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:
        pass


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed its connection. The body is read by then, so
    the next message the server sends is the disconnect (uvicorn and Starlette wait for
    it); anything else is waited past without spinning."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)


def _replace_post_route(app: Any, path: str, endpoint: Any, dependencies: list[Any]) -> None:
    """``POST path`` served by ``endpoint`` instead of the route registered for it."""
    before = len(app.router.routes)
    app.router.routes[:] = [
        route
        for route in app.router.routes
        if not (
            isinstance(route, APIRoute) and route.path == path and "POST" in (route.methods or ())
        )
    ]
    if len(app.router.routes) != before - 1:
        raise RuntimeError(f"expected LitServe to have registered one POST {path} route")
    app.add_api_route(path, endpoint, methods=["POST"], dependencies=dependencies)


def _key_check(key: str | None) -> Callable[..., None]:
    def check(
        credentials: HTTPAuthorizationCredentials | None = Depends(_BEARER),  # noqa: B008
    ) -> None:
        _check_key(credentials, key)

    return check


def under_root(root: Path | None, given: str) -> Path:
    """The adapter ``given`` names inside ``root`` (a name or a relative path): the same
    refusal whether or not something exists elsewhere, so a client learns nothing of the
    server's files outside the root."""
    if root is None:
        raise RequestError(
            403,
            "this server loads no adapters over HTTP: start it with --adapter-root DIR to load "
            "them by name from DIR",
        )
    refusal = RequestError(404, f"no adapter {short(given)} under this server's adapter root")
    try:
        candidate = (root / given).resolve()
        if candidate == root or not candidate.is_relative_to(root) or not candidate.exists():
            raise refusal
    except (OSError, RuntimeError, ValueError) as error:  # a name too long, a link loop
        raise refusal from error
    return candidate


async def _one_line_400(request: Request, error: Exception) -> JSONResponse:
    problems = error.errors() if isinstance(error, RequestValidationError) else []
    first = problems[0] if problems else {}
    content_type = request.headers.get("content-type", "")
    if content_type and "json" not in content_type:
        reason = f"send the body as JSON (Content-Type: application/json), not {content_type}"
    elif first.get("type") == "json_invalid":
        reason = f"the body is not JSON: {first.get('ctx', {}).get('error', 'malformed')}"
    elif first.get("type") == "missing":
        reason = "the body is empty: send a JSON object"
    else:
        reason = f"the body must be a JSON object: {first.get('msg', error)}"
    return JSONResponse({"detail": reason}, status_code=400)
