"""The server's ASGI middleware: the body size limit, the ``Host`` check, the API key on the
paths the routes' own check does not cover, and the event loop's lag readings."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from .metrics import Metrics
from .wire import APIError


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
            host = hostname(headers.get(b"host", b"").decode("latin-1"))
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


def wrong_key() -> APIError:
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
                await wrong_key().response()(scope, receive, send)
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


def hostname(header: str) -> str:
    """The host of a ``Host`` header value, without its port, lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header
