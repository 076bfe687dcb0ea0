"""The HTTP side of ``softprompt serve``: OpenAI's completions and chat APIs over the engine.

The app: its settings, its middleware (``middleware``), the routes, and what they share. A
route reads its body, refuses what a limit refuses, and hands the request to a job
(``jobs``), which makes its prompts and queues them with the engine off the event loop and
answers in OpenAI's format (``protocol``, ``wire``). Every adapter is a model named after its
folder; the base model is served under its own name.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine, RequestError
from .adapters import AdapterFolder
from .jobs import EventStream, Job, Outputs, chat_prompt, engine_prompts, outputs_for
from .metrics import Metrics
from .middleware import BodyLimit, HostCheck, KeyGuard, WatchLoop, key_matches, wrong_key
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from .wire import ERRORS, STREAMED, APIError, request_body

log = logging.getLogger(__name__)

_Body = TypeVar("_Body", bound=BaseModel)

CHAT_MAX_TOKENS = 256
"""Chat's default ``max_tokens`` (lowered to the server's cap when that is lower)."""

# Engine parameter names as a client knows them.


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
            raise wrong_key()

    def outputs(self) -> Outputs:
        return outputs_for(self.app.state)

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
        messages or content parts, too many prompts x n."""
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
    async def health(request: Request) -> dict[str, Any]:
        if ctx.engine.failure is not None:
            raise APIError(503, ctx.engine.failure, "server_error", code="engine_dead")
        if ctx.engine.draining:
            raise APIError(503, "the server is shutting down", "server_error", code="shutting_down")
        report = getattr(ctx.engine, "health", None)  # an UpstreamEngine: its vLLM servers
        if report is None:
            return {"status": "ok"}
        upstreams = report()
        # The upstreams' addresses and errors are for whoever holds the key (as /metrics).
        told = ctx.config.api_key is None or key_matches(
            request.headers.get("authorization", ""), ctx.config.api_key
        )
        if not any(u["healthy"] for u in upstreams):
            down = "; ".join(f"{u['url']}: {u.get('error')}" for u in upstreams)
            raise APIError(
                503,
                f"no upstream answers ({down})" if told else "no upstream answers",
                "server_error",
                code="upstreams_down",
                retry_after=ctx.config.retry_after_seconds,
            )
        return {"status": "ok", "upstreams": upstreams} if told else {"status": "ok"}

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
        response_model=CompletionResponse,
        responses=STREAMED,
        dependencies=[Depends(ctx.authorize)],
        summary="complete prompts (stream: true for server-sent events)",
        openapi_extra=request_body(CompletionRequest),
    )
    async def completions(request: Request) -> Any:
        body = await ctx.parse(request, CompletionRequest, "completions")
        prompts = engine_prompts(body.prompt)
        adapter = await ctx.resolve(body.model)
        job = Job(
            ctx.engine, ctx.metrics, "completions", body, adapter, len(prompts), 16, ctx.outputs()
        )
        await job.submit(ctx.config.retry_after_seconds, lambda: prompts)
        if body.stream:
            return EventStream(job, job.completion_chunks(request))
        await job.wait(request)
        return CompletionResponse(
            id=job.id,
            created=job.created,
            model=body.model,
            choices=await run_in_threadpool(job.completion_choices),  # detokenizing: off the loop
            usage=job.usage(),
        )

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses=STREAMED,
        dependencies=[Depends(ctx.authorize)],
        summary="chat with the base model's chat template (the adapter's virtual tokens first)",
        openapi_extra=request_body(ChatCompletionRequest),
    )
    async def chat(request: Request) -> Any:
        body = await ctx.parse(request, ChatCompletionRequest, "chat")
        adapter = await ctx.resolve(body.model)
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        # Chat's default length, under the server's cap (a chat without max_tokens still runs).
        default = min(CHAT_MAX_TOKENS, ctx.engine.config.max_new_tokens_cap)
        job = Job(ctx.engine, ctx.metrics, "chat", body, adapter, 1, default, ctx.outputs())
        await job.submit(ctx.config.retry_after_seconds, lambda: [chat_prompt(ctx.engine, body)])
        if body.stream:
            return EventStream(job, job.chat_chunks(request))
        await job.wait(request)
        return ChatCompletionResponse(
            id=job.id,
            created=job.created,
            model=body.model,
            choices=await run_in_threadpool(job.chat_choices),  # detokenizing: off the loop
            usage=job.usage(),
        )
