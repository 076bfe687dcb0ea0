"""A stand-in for a vLLM OpenAI server, in this process: the few routes ``serve --upstream``
uses (``/health``, ``/v1/models``, ``/tokenize``, ``/v1/completions`` with token ids or
``prompt_embeds``), answered as vLLM answers them, with knobs for the ways an upstream fails.

Its "model" reads the front end's embedding table: the next token is the one whose embedding
is closest (dot product) to the last input row, so the same text sent as token ids and as
embeddings scores the same, as on a real server, and another table scores differently. Cheap on
the tiny test model, so cancels, retries, failover and drains are tested in ``make test`` without
vLLM; ``test_upstream.py`` runs the same paths against the real one.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import threading
from typing import Any, ClassVar

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from softprompt.frontend import FrontEnd
from softprompt.server.run import ServerThread


class FakeVLLM:
    """``with FakeVLLM(front) as url:`` serves until the block ends; ``stop()`` ends it early
    (connections then refused, as from a server that died)."""

    def __init__(self, front: FrontEnd, name: str = "smol", max_model_len: int = 256) -> None:
        self.front, self.name, self.max_model_len = front, name, max_model_len
        self.token_seconds = 0.0
        """Pause before each streamed token (a slow server, so a test can act mid-answer)."""
        self.completion_status = 200
        """Anything else: ``/v1/completions`` answers it with an error body."""
        self.health_status = 200
        self.cut_after: int | None = None
        """Drop the connection after this many streamed tokens (a server that dies mid-answer)."""
        self.raw: dict[str, tuple[int, bytes]] = {}
        """Per path, a raw answer given instead of the real one (a web UI on the port)."""
        self.in_flight = 0
        """Completions being answered now."""
        self.requests = 0
        self.left = 0
        """Streamed answers whose client closed the connection before their end."""
        self._lock = threading.Lock()
        self._thread: ServerThread | None = None
        self.app = self._app()

    # Lifecycle -------------------------------------------------------------------------------

    _live: ClassVar[dict[str, FakeVLLM]] = {}

    @classmethod
    def at(cls, url: str) -> FakeVLLM:
        """The running fake at ``url``."""
        return cls._live[url]

    def __enter__(self) -> str:
        self._thread = ServerThread(self.app)
        logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)  # the cut connections
        self.url = self._thread.__enter__()
        FakeVLLM._live[self.url] = self
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.server.force_exit = True  # open streams end now, not gracefully
            self._thread.__exit__()
            self._thread = None
            FakeVLLM._live.pop(self.url, None)

    # The model -------------------------------------------------------------------------------

    def _rows(self, body: dict[str, Any]) -> torch.Tensor:
        if "prompt_embeds" in body:
            raw = base64.b64decode(body["prompt_embeds"])
            return torch.load(io.BytesIO(raw), weights_only=True).float()
        return self.front.embedding(torch.tensor(body["prompt"])).float()

    def _scores(self, row: torch.Tensor) -> torch.Tensor:
        logits = self.front.embedding.weight.float() @ row
        return torch.log_softmax(logits, dim=-1)

    def _tokens(self, body: dict[str, Any]) -> list[tuple[int, torch.Tensor]]:
        """The answer's tokens, each with the log-probabilities it was chosen from."""
        with torch.no_grad():
            row = self._rows(body)[-1]
            out = []
            for _ in range(int(body.get("max_tokens") or 16)):
                scores = self._scores(row)
                token = int(scores.argmax())
                out.append((token, scores))
                row = self.front.embedding.weight[token].float()
        return out

    def _logprobs(self, token: int, scores: torch.Tensor, top: int) -> dict[str, Any]:
        best = torch.topk(scores, max(top, 1))
        pairs = zip(best.values, best.indices, strict=True)
        tops = {f"token_id:{int(i)}": float(v) for v, i in pairs}
        tops[f"token_id:{token}"] = float(scores[token])
        return {
            "tokens": [f"token_id:{token}"],
            "token_logprobs": [float(scores[token])],
            "top_logprobs": [tops],
        }

    def _choice(self, tokens: list[tuple[int, torch.Tensor]], top: int | None, done: bool):
        ids = [t for t, _ in tokens]
        choice: dict[str, Any] = {
            "index": 0,
            "text": self.front.tokenizer.decode(ids),
            "token_ids": ids,
            "finish_reason": "length" if done else None,
        }
        if top is not None:
            parts = [self._logprobs(t, s, top) for t, s in tokens]
            choice["logprobs"] = {
                key: [v for p in parts for v in p[key]]
                for key in ("tokens", "token_logprobs", "top_logprobs")
            }
        return choice

    # Routes ----------------------------------------------------------------------------------

    def _app(self) -> FastAPI:
        app = FastAPI()

        def raw(path: str) -> Response | None:
            if path in self.raw:
                status, content = self.raw[path]
                return Response(content, status_code=status, media_type="text/html")
            return None

        @app.get("/health")
        async def health() -> Response:
            return raw("/health") or Response(status_code=self.health_status)

        @app.get("/v1/models")
        async def models() -> Response:
            card = {"id": self.name, "object": "model", "max_model_len": self.max_model_len}
            return raw("/v1/models") or JSONResponse({"object": "list", "data": [card]})

        @app.post("/tokenize")
        async def tokenize(request: Request) -> Response:
            body = await request.json()
            ids = self.front.tokenizer(body["prompt"])["input_ids"]
            return raw("/tokenize") or JSONResponse({"tokens": ids, "count": len(ids)})

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            body = await request.json()
            with self._lock:
                self.requests += 1
            given = raw("/v1/completions")
            if given is not None:
                return given
            if self.completion_status != 200:
                error = {"message": "the fake upstream failed", "code": self.completion_status}
                return JSONResponse({"error": error}, status_code=self.completion_status)
            tokens = self._tokens(body)
            top = body.get("logprobs")
            if not body.get("stream"):
                return JSONResponse({"choices": [self._choice(tokens, top, True)]})
            return StreamingResponse(self._events(tokens, top), media_type="text/event-stream")

        return app

    async def _events(self, tokens: list[tuple[int, torch.Tensor]], top: int | None):
        with self._lock:
            self.in_flight += 1
        finished = False
        try:
            for i, token in enumerate(tokens):
                if self.cut_after is not None and i >= self.cut_after:
                    raise ConnectionAbortedError("the fake upstream died mid-answer")
                await asyncio.sleep(self.token_seconds)
                chunk = {"choices": [self._choice([token], top, i == len(tokens) - 1)]}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            with self._lock:
                self.in_flight -= 1
                if not finished:
                    self.left += 1
