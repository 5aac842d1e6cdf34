"""OpenAI-compatible HTTP server: routes, limits, errors, and `serve`."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Any, TypeVar

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from nanovllm_onnx.config import EngineConfig
from nanovllm_onnx.engine.llm_engine import LLMEngine
from nanovllm_onnx.sampling_params import SamplingParams
from nanovllm_onnx.server import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_WAITING
from nanovllm_onnx.server.async_engine import (
    AsyncEngine,
    ChatPrompt,
    EngineDeadError,
    RequestStream,
)
from nanovllm_onnx.server.metrics import ServerMetrics
from nanovllm_onnx.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    Prompt,
    TokenizeRequest,
    bad_request,
    server_error,
)
from nanovllm_onnx.server.serving import ResponseMeta, ToolCalls, event_stream, response_body
from nanovllm_onnx.server.tool_parsers import parser_for

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class RequestGuard:
    """Checks that come before any parsing: the API key on /v1 routes, then the body size (the
    body is read here, never more than max_bytes of it, and handed on)."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_bytes: int) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key is not None else None
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if scope["path"].startswith("/v1") and not self._authorized(headers):
            error = APIError(401, "a valid API key is required: send 'Authorization: Bearer "
                             "<key>'", code="invalid_api_key")
            await _error_response(error)(scope, receive, send)
            return
        too_large = APIError(413, f"the request body is larger than {self.max_bytes} bytes",
                             code="request_too_large")
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _error_response(too_large)(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await _error_response(too_large)(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(),
                                                                      self.api_key)


class EventStreamResponse(StreamingResponse):
    """Server-sent events that stop as soon as the client disconnects (whatever the ASGI spec
    version), and that always close their request: finished, failed, gone, or never started."""

    def __init__(self, stream: RequestStream, events: AsyncIterator[str]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self.request_stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream_then_stop() -> None:
                    await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream_then_stop)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            self.request_stream.close()


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """The result of work, or None if the client disconnects first (work is then cancelled)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    return task.result() if task.done() and not task.cancelled() else None


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        error = errors[0]
        reason = error.get("ctx", {}).get("error", "invalid JSON")
        return bad_request(f"malformed JSON body: {reason} at character {error['loc'][-1]}")
    parts = []
    for error in errors[:5]:
        where = ".".join(str(x) for x in error.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {error.get('msg')}")
    loc = [x for x in errors[0].get("loc", ()) if x != "body"] if errors else []
    param = loc[0] if loc and isinstance(loc[0], str) else None
    return bad_request("; ".join(parts) or "invalid request", param)


def build_app(engine: AsyncEngine, served_model_name: str, api_key: str | None = None,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
              tool_call_parser: str | None = None) -> FastAPI:
    started = int(time.time())
    tool_parser = parser_for(engine.chat_template, tool_call_parser)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="nano-vllm-onnx", summary="OpenAI-compatible API", lifespan=lifespan)
    app.add_middleware(RequestGuard, api_key=api_key, max_bytes=max_request_bytes)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        logger.info("%s %s -> %d: %s", request.method, request.url.path, exc.status,
                    exc.message)
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError
                                  ) -> JSONResponse:
        return await on_api_error(request, _validation_error(exc))

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return await on_api_error(request, APIError(exc.status_code, str(exc.detail), code=code,
                                                    headers=exc.headers))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return _error_response(server_error("internal server error"))

    def check_model(name: str | None) -> None:
        if name is not None and name != served_model_name:
            raise APIError(400, f"the model '{name}' does not exist; this server serves "
                           f"'{served_model_name}'", param="model", code="model_not_found")

    async def compile_constraint(body: CompletionRequest | ChatCompletionRequest,
                                 params: SamplingParams) -> None:
        """Compile the request's grammar before it is queued: a bad one is a 400 before the
        engine sees it."""
        constraint = params.structured_outputs
        if constraint is None:
            return
        try:
            await engine.compile_constraint(constraint)
        except ValueError as e:
            param = next((name for name in ("response_format", "structured_outputs")
                          if getattr(body, name) is not None), "tools")
            raise bad_request(str(e), param) from e

    def tool_calls(body: CompletionRequest | ChatCompletionRequest) -> ToolCalls | None:
        if not isinstance(body, ChatCompletionRequest) or body.tool_mode == "none":
            return None
        name = body.named_tool()["name"] if body.tool_mode == "named" else None
        return ToolCalls(body.tool_mode, tool_parser, name, body.parallel_tool_calls is not False)

    async def generate(request: Request, body: CompletionRequest | ChatCompletionRequest,
                       prompts: Sequence[Prompt | ChatPrompt], prompt_param: str) -> Response:
        check_model(body.model)
        params = body.sampling_params()
        await compile_constraint(body, params)
        tools = tool_calls(body)
        chat = isinstance(body, ChatCompletionRequest)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        stream = await engine.submit(request_id, prompts, params, prompt_param)
        meta = ResponseMeta(request_id, int(time.time()), served_model_name, chat)
        if body.stream:
            return EventStreamResponse(
                stream, event_stream(meta, stream, params, body.include_usage, tools))
        try:
            outputs = await _unless_disconnected(request, stream.final())
        finally:
            stream.close()
        if outputs is None:
            return Response(status_code=499)  # nginx's "client closed request": unread
        return JSONResponse(response_body(meta, outputs, params, stream.prompt_tokens, tools))

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.is_alive() else 503)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": metadata.version("nano-vllm-onnx")}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        chat = body.messages is not None
        prompt = ChatPrompt(body.conversation(), body.add_generation_prompt,
                            body.tool_definitions() or None) if chat else body.prompt
        try:
            ids, strings = await engine.tokenize(prompt, body.add_special_tokens)
        except ValueError as e:
            raise bad_request(str(e), "messages" if chat else "prompt") from e
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids,
                "token_strs": strings if body.return_token_strs else None}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        check_model(body.model)
        try:
            return {"prompt": await engine.detokenize(body.tokens)}
        except ValueError as e:
            raise bad_request(str(e), "tokens") from e

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": served_model_name, "object": "model", "created": started,
                "owned_by": "nano-vllm-onnx", "max_model_len": engine.max_model_len}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await generate(request, body, body.prompts(), "prompt")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        prompt = ChatPrompt(body.conversation(), body.add_generation_prompt,
                            body.tool_definitions() or None)
        return await generate(request, body, [prompt], "messages")

    return app


def serve(config: EngineConfig, served_model_name: str, *, host: str = "127.0.0.1",
          port: int = 8000, api_key: str | None = None,
          max_waiting: int = DEFAULT_MAX_WAITING,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, log_level: str = "info",
          tool_call_parser: str | None = None, log_stats_interval: float | None = 10.0) -> None:
    """log_stats_interval: seconds between the engine stats lines (None: none)."""
    if max_waiting < 1 or max_request_bytes < 1:
        raise ValueError("max_waiting and max_request_bytes must be at least 1")
    if log_stats_interval is not None and not log_stats_interval > 0:
        raise ValueError(f"log_stats_interval must be positive, got {log_stats_interval}")
    engine = AsyncEngine(LLMEngine(config), max_waiting, ServerMetrics(served_model_name),
                         log_stats_interval=log_stats_interval)
    app = build_app(engine, served_model_name, api_key, max_request_bytes, tool_call_parser)
    logger.info("serving %s on http://%s:%d%s", served_model_name, host, port,
                " (API key required)" if api_key else "")
    # log_config=None: uvicorn logs through the handlers the CLI set up. No access log: each
    # request gets one line of our own.
    server = uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, log_level=log_level.lower(), log_config=None,
        access_log=False, timeout_graceful_shutdown=5))

    def shut_down() -> None:  # from the engine thread; uvicorn polls the flag
        server.should_exit = True

    engine.on_death = shut_down
    server.run()
    if engine.died:
        raise EngineDeadError("the engine thread died (see the log above); the server stopped "
                              "so that its supervisor can restart it")
