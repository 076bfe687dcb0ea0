"""Starting the server: ``serve`` for the command line, ``ServerThread`` for tests and
benchmarks."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError

if TYPE_CHECKING:
    from ..upstream.engine import UpstreamSettings

UPSTREAM_QUEUE = 256
"""``--max-queue``'s default per upstream: sequences in flight (vLLM's own default batch)."""


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free one), or a clear error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise UserError(f"cannot resolve host {host!r}: {exc}") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


class ServerThread:
    """Run ``app`` with uvicorn on a thread, on a free loopback port (tests, benchmarks).

    ``with ServerThread(app) as url: ...`` serves until the block ends.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.app = app
        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
        close = getattr(self.app.state, "close", None)
        if close is not None:
            close()


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address or name) is this machine's loopback interface."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(bound: str, api_key: str | None) -> str | None:
    """The one-line warning for a server bound beyond loopback with no API key, or None."""
    if api_key or is_loopback(bound):
        return None
    return (
        f"softprompt: warning: listening on {bound} with no API key: anyone who can reach this "
        "address can use the model (set SOFTPROMPT_API_KEY)"
    )


def api_name(model: str | None, recorded: str) -> str:
    """The base model's name in the API: its Hub id, or a local folder's own name (never its
    path on this machine, which unauthenticated clients would see in /v1/models)."""
    if model is not None and os.path.exists(model):
        return Path(model).resolve().name or recorded
    return recorded


def fixed_adapters(named: list[str]) -> dict[str, Path]:
    """``--adapter NAME=REF`` flags as folders: REF a local adapter folder or a Hub repository
    ``owner/name[@revision]`` (downloaded into the Hugging Face cache now).

    Raises:
        UserError: a flag without ``NAME=``, a name given twice, or a REF that cannot be had.
    """
    from ..hub import download_adapter, hub_adapter

    out: dict[str, Path] = {}
    for flag in named:
        name, sep, ref = flag.partition("=")
        if not sep or not name or not ref or name.startswith(".") or "/" in name:
            raise UserError(f"--adapter {flag!r}: give NAME=FOLDER or NAME=owner/repo[@revision]")
        if name in out:
            raise UserError(f"--adapter: the name {name!r} is given twice")
        hub = hub_adapter(ref)
        out[name] = Path(download_adapter(*hub)) if hub is not None else Path(ref)
        if not (out[name] / "adapter_config.json").is_file():
            raise UserError(f"--adapter {flag}: {ref} is not an adapter folder")
    return out


def serve(
    model: str | None,
    device: str,
    dtype: str,
    adapters: str | None,
    host: str,
    port: int,
    api_key: str | None,
    max_batch_size: int,
    max_tokens_cap: int,
    poll_seconds: float,
    max_body_bytes: int,
    max_queue: int | None = None,
    drain_seconds: float = 30.0,
    named: list[str] | None = None,
    retune: bool = False,
    max_messages: int = 128,
    public_metrics: bool = False,
    upstreams: list[str] | None = None,
    upstream: UpstreamSettings | None = None,
    max_prefill_tokens: int | None = None,
    prefix_cache_mb: float | None = None,
) -> int:
    """``softprompt serve``: load the model, serve until SIGTERM or Ctrl-C.

    The first SIGTERM or Ctrl-C drains: new requests get 503, accepted ones run for up to
    ``drain_seconds`` and the rest end with ``finish_reason`` "abort"; then the process exits
    with 0. If the engine's step loop dies, the process exits with 1 (``/health`` says 503 until
    then).
    """
    folder = Path(adapters) if adapters is not None else None
    if folder is None and not named:
        raise UserError(
            "give --adapters DIR (a folder of adapter folders), --adapter NAME=REF, or both"
        )
    if folder is not None and not folder.is_dir():
        raise UserError(f"adapters folder {adapters} does not exist (make it, even empty)")
    fixed = fixed_adapters(named or [])
    if poll_seconds < 0:
        raise UserError("--poll-seconds must be 0 (no watching) or more")
    if max_body_bytes < 1024:
        raise UserError("--max-body-bytes must be at least 1024")
    if drain_seconds < 0:
        raise UserError("--drain-seconds must be 0 or more")
    if max_messages < 1:
        raise UserError("--max-messages must be at least 1")
    from ..upstream.pool import normalise

    urls = [normalise(u) for u in upstreams or []]
    if max_queue is None:
        # Upstream: sequences in flight (vLLM batches them); here: waiting for the batch.
        max_queue = UPSTREAM_QUEUE * len(urls) if urls else 4 * max_batch_size
    sock = bind(host, port)  # before loading the model: a busy port fails at once
    import uvicorn

    from ..engine import EngineConfig
    from .app import ServerConfig, create_app

    limits: dict[str, Any] = {}
    if max_prefill_tokens is not None:
        limits["max_prefill_tokens"] = max_prefill_tokens
    if prefix_cache_mb is not None:
        limits["prefix_cache_mb"] = prefix_cache_mb
    try:
        config = EngineConfig(
            max_batch_size=max_batch_size,
            max_new_tokens_cap=max_tokens_cap,
            max_queue=max_queue,
            retune=retune,
            **limits,
        )
    except ValueError as exc:
        raise UserError("--" + str(exc).replace("_", "-", 2)) from exc
    if urls:
        engine, recorded, summary = _upstream_engine(model, urls, config, upstream)
    else:
        engine, recorded, summary = _local_engine(model, device, dtype, config)
    bound = sock.getsockname()[0]
    app = create_app(
        engine,
        ServerConfig(
            model_name=api_name(model, recorded),
            adapters_dir=folder,
            fixed_adapters=fixed,
            api_key=api_key,
            poll_seconds=poll_seconds,
            max_body_bytes=max_body_bytes,
            max_messages=max_messages,
            public_metrics=public_metrics,
            # No key on a loopback address: answer only to loopback names (DNS rebinding).
            allowed_hosts=LOOPBACK_NAMES | {bound} if not api_key and is_loopback(bound) else None,
        ),
        start_engine=False,
    )
    url = url_of(sock)
    names = [api_name(model, recorded), *app.state.adapters.names()]
    print(f"softprompt: serving {len(names)} models at {url}/v1", file=sys.stderr)
    for name in names:
        print(f"  {name}", file=sys.stderr)
    if summary:
        print(f"softprompt: {summary}", file=sys.stderr)
    warning = exposure_warning(bound, api_key)
    if warning:
        print(warning, file=sys.stderr)
    print(f"softprompt: playground at {url}/", file=sys.stderr)
    if folder is not None:
        print(
            f"softprompt: adapters added to {folder} are served without a restart",
            file=sys.stderr,
        )
    if api_key:
        print(
            "softprompt: /v1, /metrics and the API docs need Authorization: Bearer <key>"
            + (" (/metrics is open: --public-metrics)" if public_metrics else ""),
            file=sys.stderr,
        )
    logging.basicConfig(level=logging.INFO, format="softprompt: %(message)s")
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="info", lifespan="off", timeout_graceful_shutdown=5)
    )
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="softprompt-http")

    def shut_down(*_: object) -> None:
        # The first Ctrl-C or SIGTERM drains; a second Ctrl-C interrupts at once.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(
            f"softprompt: shutting down: new requests get 503; running ones have "
            f"{drain_seconds:g} s to finish",
            file=sys.stderr,
        )
        engine.drain(drain_seconds)

    signal.signal(signal.SIGINT, shut_down)
    signal.signal(signal.SIGTERM, shut_down)
    http.start()
    status = 0
    try:
        # The engine steps in the main thread: torch's CPU kernels run faster there (Engine.run).
        # It returns once a drain has ended every request.
        engine.run()
    except Exception:  # noqa: BLE001 - logged by the engine; the process must not look healthy
        print(f"softprompt: {engine.failure}; exiting", file=sys.stderr)
        status = 1
    finally:
        server.should_exit = True
        http.join(timeout=30)
        app.state.close()
        sock.close()
    return status


def _local_engine(
    model: str | None, device: str, dtype: str, config: Any
) -> tuple[Any, str, str | None]:
    """The model loaded here and its engine; the name it records; its decode path's summary."""
    from ..device import resolve
    from ..engine import Engine
    from ..models import load_base_model

    where, precision = resolve(device, dtype)
    base = load_base_model(model, dtype=precision, device=where)
    if dtype == "auto" and where.type == "cpu" and config.cpu_linear_dtype is None:
        # Serving on the CPU, auto means the faster of float32 and bfloat16 linear layers,
        # measured here (bfloat16 only where the CPU has native bfloat16 dot products).
        config = dataclasses.replace(config, cpu_linear_dtype="auto")
    engine = Engine(base.model, base.tokenizer, config)
    path = engine.runner.decode_path
    return engine, base.name, path.summary() if path is not None else None


def _upstream_engine(
    model: str | None, urls: list[str], config: Any, settings: UpstreamSettings | None
) -> tuple[Any, str, str | None]:
    """The model's front end, the upstreams checked against it, and the engine over them."""
    from ..frontend import load_front_end
    from ..upstream.engine import UpstreamEngine, UpstreamSettings
    from ..upstream.pool import check_upstreams

    settings = settings or UpstreamSettings()
    front = load_front_end(model)
    found = check_upstreams(front, urls, api_key=settings.api_key)
    engine = UpstreamEngine(front, found, config, settings)
    names = ", ".join(u.name for u in found)
    summary = (
        f"generation on {len(found)} vLLM upstream(s) serving {found[0].model!r} "
        f"({found[0].max_model_len} tokens): {names}"
    )
    return engine, front.name, summary
