"""The HTTP side of ``softprompt serve``: OpenAI's completions and chat APIs over the engine.

Only HTTP lives here: requests are checked and turned into engine submissions, and engine
outputs into OpenAI's JSON and server-sent events. The engine runs its steps on its own thread;
each request's outputs come back to the event loop through a queue. Every adapter is a model
named after its folder; the base model is served under its own name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine, RequestError, SamplingParams
from ..engine.engine import QueueFull, ShuttingDown
from ..engine.sampling import TokenLogprobs
from ..engine.sequence import Output
from ..errors import UserError
from ..layout import chat_layout
from .adapters import AdapterFolder
from .metrics import Metrics
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ErrorResponse,
    LegacyLogprobs,
    ModelCard,
    ModelList,
    TokenLogprob,
    TopLogprob,
    Usage,
)

log = logging.getLogger(__name__)

_Body = TypeVar("_Body", bound=BaseModel)

CHAT_MAX_TOKENS = 256
"""Chat's default ``max_tokens`` (lowered to the server's cap when that is lower)."""

# Engine parameter names as a client knows them.
PARAM_NAMES = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "repetition_penalty": "repetition_penalty",
    "stop": "stop",
    "seed": "seed",
    "prompt": "prompt",
    "adapter": "model",
}


@dataclass
class ServerConfig:
    """What ``softprompt serve`` decides beyond the engine's own settings."""

    model_name: str
    """The base model's name in the API (adapters are named after their folders)."""
    adapters_dir: Path | None = None
    fixed_adapters: dict[str, Path] = field(default_factory=dict)
    """Adapters named at start-up (``--adapter NAME=REF``), served beside the folder's."""
    api_key: str | None = None
    """When set, /v1 requests need ``Authorization: Bearer <key>``."""
    poll_seconds: float = 1.0
    """How often the adapters folder is scanned for added, changed and removed adapters."""
    max_body_bytes: int = 1 << 20
    """Request bodies above this are refused (413)."""
    allowed_hosts: frozenset[str] | None = None
    """When set, requests whose ``Host`` names another host are refused (400): ``serve`` sets
    the loopback names when it binds to loopback with no API key, so a web page on another
    site cannot reach it through DNS rebinding."""
    rescan_seconds: float = 1.0
    """A request for an unknown model rescans the adapters folder at most this often."""
    retry_after_seconds: int = 1
    """What a 429 (queue full) asks the client to wait before retrying."""
    max_messages: int = 128
    """Chat messages per request at most. Laying a conversation out as it was trained renders
    the template once per assistant turn (work that grows with the square of the messages), so
    the count is refused before any of it is done."""
    public_metrics: bool = False
    """With an API key: answer ``/metrics`` without it (for a scraper that cannot send one)."""

    def __post_init__(self) -> None:
        if self.max_messages < 1:
            raise ValueError("max_messages must be at least 1")


class APIError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = (
            status,
            message,
            kind,
            param,
            code,
        )
        self.retry_after = retry_after

    def response(self, headers: Mapping[str, str] | None = None) -> JSONResponse:
        if self.retry_after is not None:
            headers = {**(headers or {}), "Retry-After": str(self.retry_after)}
        body = {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }
        return JSONResponse(body, status_code=self.status, headers=headers)


STREAMED: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the completion; with stream: true, server-sent events ending with "
        "data: [DONE]",
        "content": {
            "text/event-stream": {
                "schema": {
                    "description": "one event: a JSON chunk, or [DONE]",
                    "type": "object",
                    "properties": {"data": {"type": "string"}},
                    "required": ["data"],
                }
            }
        },
    }
}

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "invalid request"),
        (401, "missing or wrong API key"),
        (404, "unknown model"),
        (413, "request body too large"),
        (429, "the queue is full; retry after Retry-After seconds"),
        (503, "the server is shutting down"),
    )
}


class BodyLimit:
    """ASGI middleware refusing request bodies above ``limit`` bytes, declared or streamed.

    The body is read here, up to the limit, and handed on whole: a chunked body that grows past
    the limit is answered 413 before the app sees any of it (memory held: ``limit`` at most).
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = APIError(413, f"request body above {self.limit} bytes", code="body_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await too_big.response()(scope, receive, send)
            return
        parts, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            part = message.get("body", b"")
            seen += len(part)
            if seen > self.limit:
                await too_big.response()(scope, receive, send)
                return
            parts.append(part)
            if not message.get("more_body", False):
                break
        body = b"".join(parts)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # from here on: the disconnect, when it comes

        await self.app(scope, replay, send)


class HostCheck:
    """ASGI middleware answering 400 to requests whose ``Host`` header names a host outside
    ``allowed`` (the port is ignored; IPv6 literals in brackets are understood)."""

    def __init__(self, app: Any, allowed: frozenset[str]) -> None:
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            host = _hostname(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.allowed:
                error = APIError(
                    400,
                    f"Host {host!r} is not served here (this server answers only to "
                    f"{', '.join(sorted(self.allowed))}; set an API key to serve other names)",
                    code="host_not_allowed",
                )
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def key_matches(header: str, key: str) -> bool:
    """Whether an ``Authorization`` header value carries ``Bearer <key>`` (constant time)."""
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(
        token.strip().encode(), key.encode()
    )


def _wrong_key() -> APIError:
    return APIError(
        401, "missing or wrong API key (send Authorization: Bearer <key>)", code="invalid_api_key"
    )


class KeyGuard:
    """ASGI middleware answering 401 to requests for ``paths`` without the API key: what the
    /v1 routes' own check does not cover (metrics, the API docs and their schema)."""

    def __init__(self, app: Any, key: str, paths: frozenset[str]) -> None:
        self.app, self.key, self.paths = app, key, paths

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope.get("path") in self.paths:
            headers = dict(scope.get("headers") or [])
            if not key_matches(headers.get(b"authorization", b"").decode("latin-1"), self.key):
                await _wrong_key().response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class WatchLoop:
    """ASGI middleware that starts the event loop's lag readings (``Metrics.watch_loop``) on
    the loop serving the first request."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        self.metrics.watch_loop()
        await self.app(scope, receive, send)


def _hostname(header: str) -> str:
    """The host of a ``Host`` header value, without its port, lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def create_app(engine: Engine, config: ServerConfig, start_engine: bool = True) -> FastAPI:
    """The server's FastAPI app; the caller runs it (uvicorn) and calls ``app.state.close()``.

    ``start_engine``: run the engine's steps on a background thread; ``serve`` passes False and
    runs them in its main thread instead (``Engine.run``).
    """
    folder = (
        AdapterFolder(engine, config.adapters_dir, {config.model_name}, config.fixed_adapters)
        if config.adapters_dir is not None or config.fixed_adapters
        else None
    )
    metrics = Metrics(engine, lambda: folder.names() if folder else [])
    started = int(time.time())

    app = FastAPI(
        title="softprompt",
        summary="OpenAI-compatible completions for a base model and its soft-prompt adapters",
        version="1",
        responses=ERRORS,  # type: ignore[arg-type]
    )
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)  # type: ignore[arg-type]
    app.add_middleware(WatchLoop, metrics=metrics)  # type: ignore[arg-type]
    if config.api_key is not None:
        guarded = {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
        if not config.public_metrics:
            guarded.add("/metrics")
        app.add_middleware(
            KeyGuard,  # type: ignore[arg-type]
            key=config.api_key,
            paths=frozenset(guarded),
        )
    if config.allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=config.allowed_hosts)  # type: ignore[arg-type]
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.adapters = folder

    def close() -> None:
        if folder is not None:
            folder.close()
        engine.stop()

    app.state.close = close
    if folder is not None:
        folder.scan()
        folder.watch(config.poll_seconds)
    if start_engine:
        engine.start()

    ctx = _Context(engine, config, folder, metrics, started, app)
    _add_openapi_examples(app, config.model_name)
    _add_error_handlers(app)
    _add_service_routes(app, ctx)
    _add_openai_routes(app, ctx)
    return app


@dataclass
class _Context:
    """What the routes share: the engine, the settings, the adapter folder and the metrics."""

    engine: Engine
    config: ServerConfig
    folder: AdapterFolder | None
    metrics: Metrics
    started: int
    app: FastAPI

    async def authorize(self, request: Request) -> None:  # async: no thread hop per request
        if self.config.api_key is None:
            return
        if not key_matches(request.headers.get("authorization", ""), self.config.api_key):
            raise _wrong_key()

    def outputs(self) -> _Outputs:
        return _outputs(self.app.state)

    async def parse(self, request: Request, model: type[_Body], endpoint: str) -> _Body:
        """The request's body as ``model``, decoded and validated on a worker thread; the counts
        a limit bounds (messages, prompts x n) are read from the decoded JSON first, so a body
        at the size limit costs no validation of what is refused anyway."""
        raw = await request.body()  # read already, up to the limit (BodyLimit)
        return await run_in_threadpool(self._parse, raw, model, endpoint)

    def _parse(self, raw: bytes, model: type[_Body], endpoint: str) -> _Body:
        try:
            data = json.loads(raw)
        except ValueError as exc:  # not JSON, or not UTF-8
            self.metrics.request(endpoint, 400)
            raise APIError(400, "the request body is not valid JSON") from exc
        if isinstance(data, dict):
            self._check_before_validation(endpoint, data)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from exc

    def _check_before_validation(self, endpoint: str, data: dict[str, Any]) -> None:
        """Refuse from the decoded JSON what a limit refuses whatever the rest holds: too many
        messages or content parts, too many prompts x n, unsupported lists and maps."""
        for name in ("logit_bias", "tools"):
            if data.get(name):
                self.metrics.request(endpoint, 400)
                raise APIError(400, f"{name} is not supported by this server", param=name)
        n = data.get("n", 1)
        n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
        if endpoint == "chat":
            messages = data.get("messages")
            if isinstance(messages, list):
                self.check_messages(messages)
            self.check_counts(endpoint, n, n)
            return
        prompt = data.get("prompt")
        count = 1
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            count = len(prompt)  # a list of prompts (one list of ints is one prompt)
        self.check_counts(endpoint, count * n, n)

    def check_messages(self, messages: list[Any]) -> None:
        """Refuse a chat over ``max_messages`` messages, or content parts, before any work (the
        template's work grows with the square of the messages)."""
        limit = self.config.max_messages
        parts = sum(
            len(m["content"]) if isinstance(m, dict) and isinstance(m.get("content"), list) else 1
            for m in messages
        )
        if len(messages) <= limit and parts <= limit:
            return
        self.metrics.request("chat", 400)
        said = (
            f"{len(messages)} messages is"
            if len(messages) > limit
            else f"{parts} content parts in the messages is"
        )
        raise APIError(
            400,
            f"{said} above this server's limit of {limit} (--max-messages)",
            param="messages",
            code="too_many_messages",
        )

    def check_counts(self, endpoint: str, count: int, n: int) -> None:
        """Refuse a request of ``count`` sequences (prompts x n) from the counts alone, before
        any work: 400 when it is above the queue, 429 when the queue has no room for it now."""
        limit = self.engine.config.max_queue
        if limit is None:
            return
        if count > limit:
            self.metrics.request(endpoint, 400)
            raise APIError(
                400,
                f"{count} sequences (prompts x n) in one request is above this server's queue "
                f"of {limit} (--max-queue)",
                param="n" if n > 1 else "prompt",
            )
        room = self.engine.room()
        if room is not None and count > room:
            self.metrics.request(endpoint, 429)
            raise APIError(
                429,
                f"the queue is full ({limit - room} of {limit} places taken); retry later",
                "rate_limit_error",
                code="queue_full",
                retry_after=self.config.retry_after_seconds,
            )

    def served(self) -> list[str]:
        return self.folder.names() if self.folder is not None else []

    async def resolve(self, model: str) -> str | None:
        """The adapter for ``model`` (None: the base model); 404 when nothing has that name."""
        if model == self.config.model_name:
            return None
        if model not in self.served() and self.folder is not None:
            # A folder added a moment ago is served at once; the scan runs off the event loop,
            # at most once per ``rescan_seconds`` however many unknown names are asked for.
            await run_in_threadpool(self.folder.scan, self.config.rescan_seconds)
        if model in self.served():
            return model
        raise APIError(
            404, f"the model {model!r} does not exist", param="model", code="model_not_found"
        )


def _add_openapi_examples(app: FastAPI, model_name: str) -> None:
    """The generated schema, with working example bodies (this server's base model)."""

    def openapi() -> dict[str, Any]:
        """The generated schema, with working example bodies (this server's base model)."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema["components"]["schemas"]
            for model in (CompletionRequest, ChatCompletionRequest):  # read by _Context.parse
                found = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(found.pop("$defs", {}))
                components[model.__name__] = found
            examples = {
                "CompletionRequest": {
                    "model": model_name,
                    "prompt": "I want you to act as a motivational coach.",
                    "max_tokens": 8,
                    "temperature": 0,
                },
                "ChatCompletionRequest": {
                    "model": model_name,
                    "messages": [{"role": "user", "content": "Say something kind."}],
                    "max_tokens": 8,
                },
            }
            for name, example in examples.items():
                body = schema["components"]["schemas"][name]
                body["examples"] = [example]
                body["properties"]["model"]["examples"] = [model_name]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's error object: ours, validation, HTTP (404, 405) and crashes."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            return APIError(400, "the request body is not valid JSON").response()
        param = location[0] if location else None
        where = ".".join(location)
        message = f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg")
        return APIError(400, str(message), param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        error = APIError(exc.status_code, str(exc.detail), code=code)
        return error.response(exc.headers)  # keeps Allow on 405

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return APIError(
            500, "internal server error (see the server log)", "server_error"
        ).response()


def _add_service_routes(app: FastAPI, ctx: _Context) -> None:
    """Health, Prometheus metrics and the playground page."""

    @app.get(
        "/health",
        summary="200 while the server serves; 503 while it shuts down or if its engine died",
        responses={503: {"model": ErrorResponse, "description": "not serving"}},
    )
    async def health() -> dict[str, str]:
        if ctx.engine.failure is not None:
            raise APIError(503, ctx.engine.failure, "server_error", code="engine_dead")
        if ctx.engine.draining:
            raise APIError(503, "the server is shutting down", "server_error", code="shutting_down")
        return {"status": "ok"}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        body, content_type = ctx.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/", response_class=HTMLResponse, summary="the playground page")
    async def playground() -> HTMLResponse:
        page = resources.files(__package__).joinpath("playground.html").read_text("utf-8")
        return HTMLResponse(page)


def _add_openai_routes(app: FastAPI, ctx: _Context) -> None:
    """The OpenAI API: models, completions and chat completions, behind the API key."""

    @app.get("/v1/models", response_model=ModelList, dependencies=[Depends(ctx.authorize)])
    async def models() -> ModelList:
        if ctx.folder is not None:
            await run_in_threadpool(ctx.folder.scan, ctx.config.rescan_seconds)
        cards = [ModelCard(id=ctx.config.model_name, created=ctx.started)]
        for name in ctx.served():
            try:
                length = ctx.engine.registry.length(name)
            except RequestError:
                continue  # removed between the scan and now
            cards.append(
                ModelCard(
                    id=name,
                    created=ctx.started,
                    parent=ctx.config.model_name,
                    virtual_tokens=length,
                )
            )
        return ModelList(data=cards)

    @app.post(
        "/v1/completions",
        response_model=Completion,
        responses=STREAMED,
        dependencies=[Depends(ctx.authorize)],
        summary="complete prompts (stream: true for server-sent events)",
        openapi_extra=_request_body(CompletionRequest),
    )
    async def completions(request: Request) -> Any:
        body = await ctx.parse(request, CompletionRequest, "completions")
        prompts = _prompts(body.prompt)
        adapter = await ctx.resolve(body.model)
        job = _Job(
            ctx.engine, ctx.metrics, "completions", body, adapter, len(prompts), 16, ctx.outputs()
        )
        await job.submit(ctx.config.retry_after_seconds, lambda: prompts)
        if body.stream:
            return _EventStream(job, job.completion_chunks(request))
        await job.wait(request)
        return Completion(
            id=job.id,
            created=job.created,
            model=body.model,
            choices=await run_in_threadpool(job.completion_choices),  # detokenizing: off the loop
            usage=job.usage(),
        )

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses=STREAMED,
        dependencies=[Depends(ctx.authorize)],
        summary="chat with the base model's chat template (the adapter's virtual tokens first)",
        openapi_extra=_request_body(ChatCompletionRequest),
    )
    async def chat(request: Request) -> Any:
        body = await ctx.parse(request, ChatCompletionRequest, "chat")
        adapter = await ctx.resolve(body.model)
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        # Chat's default length, under the server's cap (a chat without max_tokens still runs).
        default = min(CHAT_MAX_TOKENS, ctx.engine.config.max_new_tokens_cap)
        job = _Job(ctx.engine, ctx.metrics, "chat", body, adapter, 1, default, ctx.outputs())
        await job.submit(ctx.config.retry_after_seconds, lambda: [_chat_prompt(ctx.engine, body)])
        if body.stream:
            return _EventStream(job, job.chat_chunks(request))
        await job.wait(request)
        return ChatCompletion(
            id=job.id,
            created=job.created,
            model=body.model,
            choices=await run_in_threadpool(job.chat_choices),  # detokenizing: off the loop
            usage=job.usage(),
        )


def _request_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI entry of a JSON body that a route reads itself (``_Context.parse``)."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _prompts(prompt: Any) -> list[str | list[int]]:
    """One engine prompt per completion: text or token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


def _chat_prompt(engine: Engine, body: ChatCompletionRequest) -> list[int]:
    tokenizer = engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(
            400,
            "this model has no chat template; use /v1/completions",
            param="messages",
        )
    # The same layout a prompt trained on conversations was trained on (``layout``).
    messages = [(m.role, m.text()) for m in body.messages]
    try:
        return chat_layout(tokenizer, messages, add_generation_prompt=True).ids
    except UserError as exc:
        raise APIError(400, str(exc), param="messages") from exc


class _EventStream(StreamingResponse):
    """A job's server-sent events. Whatever ends the response (the last event, or a client that
    left before its first byte, when the events' generator never ran and so never cleans up),
    the job ends with it."""

    def __init__(self, job: _Job, events: AsyncIterator[str]) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.close()


class _Outputs:
    """Carries engine outputs from the engine's thread to the event loop, a step at a time.

    The engine hands out each request's output as it goes; waking the event loop once per output
    costs a system call each. Outputs are collected under a lock instead, and one wake-up per
    engine step moves them all to their requests' queues.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[tuple[asyncio.Queue, int, Output]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def sink(self, queue: asyncio.Queue, index: int) -> Callable[[Output], None]:
        def put(out: Output) -> None:
            with self._lock:
                self._items.append((queue, index, out))
                if self._scheduled:
                    return
                self._scheduled = True
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is left to read
                self.loop.call_soon_threadsafe(self._drain)

        return put

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for queue, index, out in items:
            queue.put_nowait((index, out))


def _outputs(app_state: Any) -> _Outputs:
    loop = asyncio.get_running_loop()
    outputs = getattr(app_state, "outputs", None)
    if outputs is None or outputs.loop is not loop:
        outputs = app_state.outputs = _Outputs(loop)
    return outputs


@dataclass
class _Choice:
    text: str = ""
    tokens: int = 0
    reason: str | None = None
    error: str | None = None


class _Job:
    """One HTTP request: its engine submissions (prompts x n) and what came back."""

    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        endpoint: str,
        body: Any,
        adapter: str | None,
        prompt_count: int,
        default_max_tokens: int,
        outputs: _Outputs,
    ) -> None:
        bad = body.unsupported()
        if bad is not None:
            raise APIError(400, f"{bad} is not supported by this server", param=bad)
        self.engine, self.metrics, self.endpoint = engine, metrics, endpoint
        self.outputs = outputs
        self.body, self.adapter = body, adapter
        self.prompts: list[str | list[int]] = []
        """One engine prompt per prompt of the request (text or token ids), set by ``submit``."""
        self.max_tokens = default_max_tokens if body.max_tokens is None else body.max_tokens
        self.echo = bool(getattr(body, "echo", False))
        self.top: int | None = None
        """Alternatives per token when log-probabilities are asked for (None: not asked)."""
        if endpoint == "chat":
            if body.top_logprobs is not None and not body.logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            self.top = (body.top_logprobs or 0) if body.logprobs else None
        else:
            self.top = body.logprobs
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens 0 needs echo (to score the prompt)", param="max_tokens")
        self.id = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.choices = [_Choice() for _ in range(prompt_count * body.n)]
        self.sent = [0] * len(self.choices)
        """Per choice, how many of its tokens (the echoed prompt's included) have been streamed,
        and the length of their text pieces (where the next piece's ``text_offset`` starts)."""
        self.sent_chars = [0] * len(self.choices)
        self.handles: list[Any] = []
        self.queue: asyncio.Queue[tuple[int, Output | None]] = asyncio.Queue()
        """Each choice's outputs; ``(-1, None)`` when the client has gone."""
        self.prompt_tokens = 0
        self.submitted = 0.0
        self.first_token = False
        self.open = len(self.choices)
        self.counted = False
        """Whether the request's outcome is in the metrics."""

    def _params(self, choice: int) -> SamplingParams:
        body = self.body
        seed = None if body.seed is None else body.seed + choice % body.n
        try:
            return SamplingParams(
                # max_tokens 0 (echo alone: score the prompt) runs one token and drops it
                max_new_tokens=max(1, self.max_tokens),
                min_new_tokens=body.min_tokens,
                logprobs=self.top,
                prompt_logprobs=self.echo and self.top is not None,
                temperature=body.temperature,
                top_p=body.top_p,
                repetition_penalty=body.repetition_penalty,
                stop=body.stops(),
                ignore_eos=body.ignore_eos,
                seed=seed,
            )
        except RequestError as exc:
            raise _bad_request(exc) from exc

    async def submit(self, retry_after: int, prompts: Callable[[], list[str | list[int]]]) -> None:
        """Make the request's prompts (``prompts``: chat templates, tokenizing) and queue every
        choice with the engine, or none of them, on a worker thread, never on the event loop:
        400 when one cannot run, 429 when the queue has no room for all of them, 503 while
        shutting down."""
        self.submitted = time.perf_counter()
        try:
            await run_in_threadpool(self._submit, retry_after, prompts)
        except asyncio.CancelledError:  # the thread has finished: what it queued is cancelled
            self.cancel()
            raise

    def _submit(self, retry_after: int, prompts: Callable[[], list[str | list[int]]]) -> None:
        self.prompts = prompts()
        n = self.body.n
        requests: list[tuple[Any, str | None, SamplingParams | None, Any]] = [
            (
                self.prompts[index // n],
                self.adapter,
                self._params(index),
                self.outputs.sink(self.queue, index),
            )
            for index in range(len(self.choices))
        ]
        try:
            self.handles = self.engine.submit_many(requests)
        except QueueFull as exc:
            self.count(429)
            raise APIError(
                429, str(exc), "rate_limit_error", code="queue_full", retry_after=retry_after
            ) from exc
        except ShuttingDown as exc:
            self.count(503)
            raise APIError(503, str(exc), "server_error", code="shutting_down") from exc
        except RequestError as exc:
            self.count(400)
            raise _bad_request(exc) from exc
        self.prompt_tokens = sum(len(h.seq.prompt_ids) for h in self.handles[::n])

    def cancel(self) -> None:
        for handle in self.handles:
            if not handle.seq.finished:
                handle.cancel()

    def count(self, status: int) -> None:
        """Record the request's outcome in the metrics, once."""
        if not self.counted:
            self.counted = True
            self.metrics.request(self.endpoint, status)

    def close(self) -> None:
        """End the request: nothing of it keeps running (a client that left: 499)."""
        self.cancel()
        if self.open:
            self.count(499)

    async def _next(self, request: Request | None) -> list[tuple[int, Output]] | None:
        """The outputs that have arrived (waiting for one); None once the client has gone."""
        while True:
            try:
                items = [await asyncio.wait_for(self.queue.get(), timeout=1.0)]
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    self.cancel()
                    return None
                continue
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            got = [(index, out) for index, out in items if out is not None]
            if len(got) < len(items):  # _watch: the client has gone
                self.cancel()
                return None
            for index, out in got:
                self._record(index, out)
            return got

    async def _watch(self, request: Request) -> None:
        """Wait for the client to leave (its body is read already, so the next message is the
        disconnect), then wake ``_next`` at once, between two engine steps."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self.queue.put_nowait((-1, None))
                return

    def _record(self, index: int, out: Output) -> None:
        choice = self.choices[index]
        choice.text += out.text
        choice.tokens += len(out.token_ids)
        if out.token_ids and not self.first_token:
            self.first_token = True
            self.metrics.first_token(time.perf_counter() - self.submitted)
        if out.finished:
            # "abort": the server shut down first (what vLLM says); the rest are ends of text.
            reason = out.finish_reason
            choice.reason = reason if reason in ("length", "abort") else "stop"
            choice.error = out.error if out.finish_reason == "error" else None
            self.open -= 1

    async def wait(self, request: Request) -> None:
        """Collect every choice to its end; a client that leaves cancels them at once."""
        watcher = asyncio.create_task(self._watch(request))
        try:
            while self.open:
                if await self._next(None) is None:
                    self.count(499)
                    return
        except asyncio.CancelledError:
            self.cancel()
            raise
        finally:
            watcher.cancel()
        self._fail_on_error()
        self.count(200)

    def _fail_on_error(self) -> None:
        failed = [c.error for c in self.choices if c.error]
        if failed:
            self.count(500)
            raise APIError(500, f"generation failed: {failed[0]}", "server_error")

    def completion_choices(self) -> list[CompletionChoice]:
        """The finished choices of a completions request, with the prompt first under echo and
        OpenAI's legacy ``logprobs`` when asked for."""
        tokenizer = self.engine.tokenizer
        out = []
        for i, choice in enumerate(self.choices):
            text = choice.text if self.max_tokens else ""
            head = self._echoed_prompt(i) if self.echo else ""
            logprobs = None
            if self.top is not None:
                ids, entries = self._scored(i)
                logprobs = _legacy_logprobs(tokenizer, token_pieces(tokenizer, ids), entries)
            out.append(
                CompletionChoice(
                    index=i, text=head + text, logprobs=logprobs, finish_reason=choice.reason
                )
            )
        return out

    def _echoed_prompt(self, index: int) -> str:
        """The text ``echo`` puts before choice ``index``'s completion: its prompt."""
        prompt = self.prompts[index // self.body.n]
        return prompt if isinstance(prompt, str) else self.engine.tokenizer.decode(prompt)

    def chat_choices(self) -> list[ChatChoice]:
        """The finished choices of a chat request, with their ``logprobs`` when asked for."""
        return [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=c.text),
                logprobs=self.chat_logprobs(i),
                finish_reason=c.reason,
            )
            for i, c in enumerate(self.choices)
        ]

    def chat_logprobs(self, index: int) -> ChatLogprobs | None:
        """A finished chat choice's ``logprobs`` (None when not asked for)."""
        if self.top is None:
            return None
        tokenizer = self.engine.tokenizer
        entries = self.handles[index].seq.logprobs
        pieces = token_pieces(tokenizer, [e.token for e in entries])
        return ChatLogprobs(
            content=[_chat_entry(tokenizer, p, e) for p, e in zip(pieces, entries, strict=True)]
        )

    def usage(self) -> Usage:
        if self.max_tokens == 0:  # echo alone: the one token made is not part of the answer
            return Usage(
                prompt_tokens=self.prompt_tokens,
                completion_tokens=0,
                total_tokens=self.prompt_tokens,
            )
        completion = sum(c.tokens for c in self.choices)
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
        )

    def _chunk(self, kind: str, choices: list[dict], usage: Usage | None = None) -> str:
        data: dict[str, Any] = {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.body.model,
            "choices": choices,
        }
        if self.body.stream_options and self.body.stream_options.include_usage:
            data["usage"] = usage.model_dump() if usage is not None else None
        return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"

    async def _stream(
        self, request: Request, kind: str, piece: Callable[[int, Output], dict]
    ) -> AsyncIterator[str]:
        status = 200
        try:
            while self.open:
                items = await self._next(request)
                if items is None:
                    status = 499
                    return
                # What arrived while the client was being served goes out as one chunk per
                # choice: under load, fewer and larger events for server and client alike.
                merged = _merged(items)
                if self.top is None and not self.echo:
                    events, failed = self._events(kind, merged, piece)
                else:  # logprobs and echo detokenize: off the event loop
                    events, failed = await run_in_threadpool(self._events, kind, merged, piece)
                status = 500 if failed else status
                for event in events:
                    yield event
            if self.body.stream_options and self.body.stream_options.include_usage:
                yield self._chunk(kind, [], self.usage())
            yield "data: [DONE]\n\n"
        finally:
            # The client went away (the response was cancelled) or the stream ended: nothing
            # of this request keeps running.
            if self.open:
                status = 499
            self.cancel()
            self.count(status)

    def _events(
        self, kind: str, merged: list[tuple[int, Output]], piece: Callable[[int, Output], dict]
    ) -> tuple[list[str], bool]:
        """The server-sent events for outputs that arrived, and whether one is an error."""
        events, failed = [], False
        for index, out in merged:
            if out.finish_reason == "error":
                failed = True
                message = f"generation failed: {out.error}"
                error = {"error": {"message": message, "type": "server_error"}}
                events.append(f"data: {json.dumps(error)}\n\n")
            elif out.text or out.finished:
                events.append(self._chunk(kind, [piece(index, out)]))
        return events, failed

    def _scored(self, index: int) -> tuple[list[int], list[TokenLogprobs | None]]:
        """Choice ``index``'s tokens so far (the prompt's first under echo) with their entries:
        the whole answer's once it has finished, as far as the stream has come before."""
        seq = self.handles[index].seq
        upto = self.choices[index].tokens if self.max_tokens else 0
        ids: list[int] = list(seq.output_ids[:upto])
        entries: list[TokenLogprobs | None] = list(seq.logprobs[:upto])
        if self.echo:
            ids = list(seq.prompt_ids) + ids
            entries = list(seq.prompt_logprobs or [None] * len(seq.prompt_ids)) + entries
        return ids, entries

    def _unsent(self, index: int) -> tuple[list[str], list[TokenLogprobs | None], int]:
        """The tokens of choice ``index`` not streamed yet: their text pieces (spaced as in
        the whole answer), entries, and where the first piece starts in the choice's text."""
        ids, entries = self._scored(index)
        sent, self.sent[index] = self.sent[index], len(ids)
        context = min(sent, 6)  # token_pieces' window: the same pieces as over the whole answer
        pieces = token_pieces(self.engine.tokenizer, ids[sent - context :])[context:]
        at = self.sent_chars[index]
        self.sent_chars[index] += sum(len(t) for t in pieces)
        return pieces, entries[sent:], at

    def completion_chunks(self, request: Request) -> AsyncIterator[str]:
        tokenizer = self.engine.tokenizer
        echoed = [False] * len(self.choices)

        def piece(index: int, out: Output) -> dict:
            reason = self.choices[index].reason if out.finished else None
            text = out.text if self.max_tokens else ""  # max_tokens 0: the token made is dropped
            if self.echo and not echoed[index]:
                echoed[index] = True
                text = self._echoed_prompt(index) + text
            logprobs = None
            if self.top is not None:
                pieces, entries, at = self._unsent(index)
                logprobs = _legacy_logprobs(tokenizer, pieces, entries, at).model_dump()
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

        return self._stream(request, "text_completion", piece)

    async def chat_chunks(self, request: Request) -> AsyncIterator[str]:
        first = [
            {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            for i in range(len(self.choices))
        ]
        yield self._chunk("chat.completion.chunk", first)

        def piece(index: int, out: Output) -> dict:
            if out.finished:
                delta = {"content": out.text} if out.text else {}
                reason = self.choices[index].reason
            else:
                delta, reason = {"content": out.text}, None
            logprobs = None
            if self.top is not None:
                pieces, entries, _ = self._unsent(index)
                content = [
                    _chat_entry(self.engine.tokenizer, p, e)
                    for p, e in zip(pieces, entries, strict=True)
                    if e is not None
                ]
                logprobs = ChatLogprobs(content=content).model_dump()
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}

        async for event in self._stream(request, "chat.completion.chunk", piece):
            yield event


def _merged(items: list[tuple[int, Output]]) -> list[tuple[int, Output]]:
    """Consecutive outputs of each choice joined into one, in order of first arrival."""
    joined: dict[int, Output] = {}
    for index, out in items:
        before = joined.get(index)
        if before is None:
            joined[index] = out
            continue
        joined[index] = Output(
            out.request_id,
            before.token_ids + out.token_ids,
            before.text + out.text,
            out.finished,
            out.finish_reason,
            out.error,
        )
    return list(joined.items())


def token_pieces(tokenizer: Any, ids: list[int], window: int = 6) -> list[str]:
    """The text each token adds after the ones before it (a few tokens of context decide
    spacing and merged characters), so the pieces join into the decoded text."""
    pieces = []
    for i in range(len(ids)):
        start = max(0, i - window)
        before = tokenizer.decode(ids[start:i]) if i > start else ""
        pieces.append(tokenizer.decode(ids[start : i + 1])[len(before) :])
    return pieces


def _chat_entry(tokenizer: Any, piece: str, entry: TokenLogprobs) -> TokenLogprob:
    """One token of the chat format's ``logprobs.content``: its text, and its alternatives."""
    top = [
        TopLogprob(token=t, logprob=v, bytes=list(t.encode()))
        for t, v in ((tokenizer.decode([i]), v) for i, v in entry.top)
    ]
    return TokenLogprob(
        token=piece, logprob=entry.logprob, bytes=list(piece.encode()), top_logprobs=top
    )


def _legacy_logprobs(
    tokenizer: Any, tokens: list[str], entries: list[TokenLogprobs | None], at: int = 0
) -> LegacyLogprobs:
    """OpenAI's legacy ``logprobs`` object for tokens whose text pieces are ``tokens`` (each
    with its entry, or None where there is no log-probability: the first prompt token), the
    first of them at ``at`` in the choice's text."""
    offsets = []
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return LegacyLogprobs(
        tokens=tokens,
        token_logprobs=[None if e is None else e.logprob for e in entries],
        top_logprobs=[
            None if e is None else {tokenizer.decode([i]): v for i, v in e.top} for e in entries
        ],
        text_offset=offsets,
    )


def _bad_request(exc: RequestError) -> APIError:
    param = PARAM_NAMES.get(exc.field or "", exc.field)
    return APIError(400, exc.renamed(param) if param else str(exc), param=param)
