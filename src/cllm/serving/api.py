"""The OpenAI-compatible HTTP API over an `Engine`: /v1/models, /v1/chat/completions,
/v1/completions (JSON or SSE streams), /health, /metrics and the live page at /.

Every error is an OpenAI error object `{"error": {"message", "type", "param", "code"}}` with a
4xx status for a bad request; 500 is left to real faults of the server.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import math
import random
from contextlib import asynccontextmanager
from importlib.resources import files

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from cllm.decoding.sampling import Sampling
from cllm.errors import CllmError
from cllm.models import LoadedModel
from cllm.serving.engine import Engine, QueueFull, Request, ShuttingDown
from cllm.serving.logprobs import TokenStrings
from cllm.serving.metrics import Metrics
from cllm.serving.responses import ApiError, Run, error_body
from cllm.serving.schemas import ChatCompletionRequest, CompletionRequest, RequestError, parse
from cllm.serving.settings import ServeSettings, Service


def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    metrics = Metrics(engine)
    service = Service(engine, settings, metrics, TokenStrings(engine.loaded.tokenizer))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="cllm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_: HttpRequest, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: HttpRequest, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", exc.status_code), exc.status_code)

    @app.exception_handler(Exception)
    async def fault(_: HttpRequest, exc: Exception) -> JSONResponse:  # ours, never the client's: a clean 500
        return JSONResponse(error_body("internal server error", "server_error", 500), 500)

    app.add_middleware(_CountRequests, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {"status": "ok" if engine.accepting else "shutting down", "model": settings.served_name,
                "decoder": settings.decoder_label, "column_budget": engine.column_budget, "running": engine.running,
                "waiting": engine.queue_depth}
        return JSONResponse(body, 200 if engine.accepting else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(files("cllm.serving").joinpath("page.html").read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models(http: HttpRequest) -> dict:
        _authorize(http, settings)
        return {"object": "list", "data": [_model_card(settings.served_name)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, http: HttpRequest) -> dict:
        _authorize(http, settings)
        if name != settings.served_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {settings.served_name!r}",
                           "not_found_error")
        return _model_card(name)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest) -> Response:
        _authorize(http, settings)
        body = _parse(ChatCompletionRequest, await _read_body(http, settings.max_body_bytes))
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in body.messages]
        _check_length(engine, sum(len(m["content"]) for m in messages), "messages")
        prompt_ids = _chat_ids(engine, messages)
        return await _generate(service, http, body, prompt_ids, chat=True)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest) -> Response:
        _authorize(http, settings)
        body = _parse(CompletionRequest, await _read_body(http, settings.max_body_bytes))
        for prompt in body.prompts:
            _check_length(engine, len(prompt), "prompt")
        prompts = [_completion_ids(engine, prompt) for prompt in body.prompts]
        echoes = [_echo_text(engine, prompt) if body.echo else "" for prompt in body.prompts]
        if len(prompts) == 1:
            return await _generate(service, http, body, prompts[0], chat=False, echo=echoes[0])
        answers = await asyncio.gather(*(_generate(service, http, body, ids, chat=False, echo=echo)
                                         for ids, echo in zip(prompts, echoes)))
        return _one_answer(answers)

    return app


class _CountRequests:
    """Counts responses by path and status (plain ASGI: it must not get in the way of streams)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


KNOWN_PATHS = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "cllm"}


def _authorize(http: HttpRequest, settings: ServeSettings) -> None:
    if settings.api_key is None:
        return
    scheme, _, key = http.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), settings.api_key.encode()):
        raise ApiError(401, "missing or wrong API key: send the header `Authorization: Bearer <key>`",
                       headers={"WWW-Authenticate": "Bearer"})


async def _read_body(http: HttpRequest, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (before any parsing)."""
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body has {int(declared)} bytes; this server takes at most {limit}")
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body passes {limit} bytes, the most this server takes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(model, body: bytes):
    try:
        return parse(model, body)
    except RequestError as exc:
        raise ApiError(400, str(exc), param=exc.param) from None


def _check_length(engine: Engine, size: int, param: str) -> None:
    """Refuse a prompt of `size` characters (or token ids) that cannot fit the context, before
    tokenizing it: no token is longer than the vocabulary's longest, so at least size / longest tokens."""
    context = engine.loaded.context_length
    if context is not None and size > context * _longest_token(engine.loaded.tokenizer):
        raise ApiError(400, f"the prompt has {size} characters: more than the model's context of {context} "
                            "tokens holds", param=param)


@functools.cache
def _longest_token(tokenizer) -> int:
    return max(map(len, tokenizer.get_vocab()), default=1)


def _completion_ids(engine: Engine, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "prompt: empty", param="prompt")
        return list(engine.loaded.tokenizer(prompt).input_ids)
    vocabulary = engine.loaded.model.config.vocab_size
    if not prompt or not all(0 <= token < vocabulary for token in prompt):
        raise ApiError(400, f"prompt: token ids must be a non-empty list in [0, {vocabulary})", param="prompt")
    return prompt


def _echo_text(engine: Engine, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else engine.loaded.tokenizer.decode(prompt)


def _one_answer(answers: list[Response]) -> Response:
    """The answers to a batch of prompts as one completion: choice i for prompt i, usage summed."""
    failed = [answer for answer in answers if answer.status_code != 200]
    if failed:  # the client left (499): nobody reads it
        return failed[0]
    parts = [json.loads(answer.body) for answer in answers]
    usage = {key: sum(part["usage"][key] for part in parts) for key in parts[0]["usage"]}
    choices = [part["choices"][0] | {"index": index} for index, part in enumerate(parts)]
    return JSONResponse(parts[0] | {"choices": choices, "usage": usage, "cllm": [part["cllm"] for part in parts]})


def _chat_ids(engine: Engine, messages: list[dict]) -> list[int]:
    tokenizer = engine.loaded.tokenizer
    if not tokenizer.chat_template:
        raise ApiError(400, "this model has no chat template: use /v1/completions with a plain prompt")
    try:
        return engine.loaded.encode_messages(messages)
    except Exception as exc:  # noqa: BLE001 -- templates raise what they like (e.g. roles out of order)
        raise ApiError(400, f"messages: the chat template refused them: {exc}", param="messages") from None


def _request(settings: ServeSettings, loaded: LoadedModel, body, prompt_ids: list[int], deliver) -> Request:
    """The engine request of a validated body: the context and the sampling settings checked."""
    context = loaded.context_length
    if not prompt_ids:
        raise ApiError(400, "the prompt encodes to zero tokens", param="prompt")
    limit = body.token_limit
    if context is not None:
        room = context - len(prompt_ids)
        if room < 1:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens: it does not fit the model's context "
                                f"of {context} tokens", param="messages" if hasattr(body, "messages") else "prompt")
        if limit is not None and limit > room:
            raise ApiError(400, f"max_tokens {limit} + the prompt's {len(prompt_ids)} tokens exceed the model's "
                                f"context of {context} tokens", param="max_tokens")
        limit = limit if limit is not None else min(settings.default_max_tokens, room)
    if limit is None:
        limit = settings.default_max_tokens
    default = settings.sampling
    try:
        sampling = Sampling(
            default.temperature if body.temperature is None else body.temperature,
            default.top_k if body.top_k is None else body.top_k,
            default.top_p if body.top_p is None else body.top_p,
        )
    except CllmError as exc:
        raise ApiError(400, str(exc)) from None
    if body.seed is not None:
        seed = body.seed
    else:  # greedy: the seed only picks Jacobi's first guesses; keep the statistics reproducible too
        seed = 0 if sampling.greedy else random.randrange(2**63)
    # max_tokens 0 (echo): the engine still makes one token (the prefill's), which is not answered
    prediction = body.prediction and loaded.tokenizer(body.prediction.text, add_special_tokens=False).input_ids
    return Request(prompt_ids, max(limit, 1), sampling, seed, deliver, logprobs=body.top_logprobs_wanted,
                   prompt_logprobs=body.prompt_logprobs_wanted, prediction_ids=list(prediction) if prediction else None)


def _deliver_to(events: asyncio.Queue):
    """A callback the engine thread may call: puts the event on `events` in this event loop."""
    loop = asyncio.get_running_loop()

    def deliver(event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:
            pass  # the loop closed: nobody is listening any more

    return deliver


async def _generate(service: Service, http: HttpRequest, body, prompt_ids: list[int], chat: bool,
                    echo: str = "") -> Response:
    engine, settings = service.engine, service.settings
    if body.model != settings.served_name:
        raise ApiError(404, f"the model {body.model!r} does not exist; this server serves {settings.served_name!r}",
                       "not_found_error")
    events: asyncio.Queue = asyncio.Queue()
    request = _request(settings, engine.loaded, body, prompt_ids, _deliver_to(events))
    try:
        engine.submit(request)
    except QueueFull as exc:
        retry = max(1, math.ceil(service.latency_average))
        raise ApiError(429, f"the server is busy ({exc}); retry in {retry} s", "rate_limit_error",
                       {"Retry-After": str(retry)}) from None
    except ShuttingDown as exc:
        raise ApiError(503, str(exc), "server_error") from None
    run = Run(service, request, events, body, chat, echo)
    if body.stream:
        return StreamingResponse(run.stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await run.whole(http)
