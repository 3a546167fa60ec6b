"""One request from submission to its response (`Run`): the engine's events turned into text,
logprobs and statistics, answered whole or as an SSE stream; and the OpenAI error object."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response

from cllm.decoding.logprobs import TokenLogprob
from cllm.serving.engine import Failed, Finished, Request, Tokens
from cllm.serving.logprobs import chat_content, completion_logprobs
from cllm.serving.settings import Service
from cllm.serving.text import TextAssembler

DISCONNECT_POLL_SECONDS = 0.5
IDLE = object()  # what `Run.events` yields when nothing came for `keepalive_seconds`


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers, self.param = status, message, kind, headers or {}, param

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.kind, self.status, self.param), self.status,
                            headers=self.headers)


def error_body(message: str, kind: str, status: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


class Run:
    """One request from submission to its response: events turned into text, stats, metrics."""

    def __init__(self, service: Service, request: Request, queue: asyncio.Queue, body, chat: bool,
                 echo: str = "") -> None:
        self.service, self.settings = service, service.settings
        self.request, self.queue, self.body, self.chat, self.echo = request, queue, body, chat, echo
        self.generates = body.token_limit != 0  # max_tokens 0 (echo): the prompt only
        self.assembler = TextAssembler(service.engine.loaded.tokenizer, body.stop_strings)
        self.logprobs: list[TokenLogprob] = []  # of the tokens the text so far was made from
        self.unsent: list[TokenLogprob] = []  # of those not yet in a stream chunk
        self.sent_chars = 0
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.first_token_at: float | None = None

    async def events(self, http: HttpRequest | None) -> AsyncIterator[Tokens | Finished | Failed | object]:
        """The engine's events until the end, a timeout or (with `http`) the client leaving; IDLE
        after each `keepalive_seconds` without one."""
        request = self.request
        deadline = request.arrived + self.settings.request_timeout
        last = time.monotonic()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                request.cancel("timeout")
                yield Failed(f"the request timed out after {self.settings.request_timeout:g} s")
                return
            poll = min(remaining, DISCONNECT_POLL_SECONDS, self.settings.keepalive_seconds)
            try:
                event = await asyncio.wait_for(self.queue.get(), poll)
            except TimeoutError:
                if http is not None and await http.is_disconnected():
                    request.cancel("disconnected")
                    return
                if time.monotonic() - last >= self.settings.keepalive_seconds:
                    last = time.monotonic()
                    yield IDLE
                continue
            last = time.monotonic()
            if isinstance(event, Tokens):
                self.first_token_at = self.first_token_at or event.at
                if self.assembler.stopped:
                    continue
            elif isinstance(event, Finished) and request.cancel_reason in ("shutdown", "timeout"):
                event = Failed("the server is shutting down" if request.cancel_reason == "shutdown"
                               else f"the request timed out after {self.settings.request_timeout:g} s")
            yield event
            if not isinstance(event, Tokens):
                return

    def add(self, tokens: Tokens) -> str:
        if not self.generates:
            return ""
        if tokens.logprobs is not None:  # the EOS that ends the answer is not part of its text: nor of these
            eos = self.service.engine.loaded.eos_token_ids
            entries = [entry for entry in tokens.logprobs if entry.token not in eos]
            self.logprobs += entries
            self.unsent += entries
        piece = self.assembler.add(tokens.token_ids)
        if self.assembler.stopped:
            self.request.cancel("stop")
        return piece

    def failure_status(self) -> int:
        return {"timeout": 504, "shutdown": 503}.get(self.request.cancel_reason or "", 500)

    def finish_reason(self, finished: Finished) -> str:
        if not self.generates:
            return "length"
        return "length" if finished.reason == "length" and not self.assembler.stopped else "stop"

    def stats(self, finished: Finished) -> dict:
        request = self.request
        return {
            "decoder": self.settings.decoder_label,
            "forward_passes": finished.stats.forward_passes,
            "tokens_per_forward": round(finished.stats.tokens_per_forward, 4),
            "fast_forward": finished.stats.fast_forward,
            "queue_seconds": round((request.started or request.arrived) - request.arrived, 4),
            "seconds": round(time.monotonic() - request.arrived, 4),
        }

    def usage(self, finished: Finished) -> dict:
        prompt, completion = len(self.request.prompt_ids), len(finished.token_ids) if self.generates else 0
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def record(self, finished: Finished | None) -> None:
        now = time.monotonic()
        request = self.request
        stats = finished.stats if finished is not None else None
        self.service.metrics.finished(request.arrived, request.started, self.first_token_at, now,
                                      stats.new_tokens if stats else 0, stats.forward_passes if stats else 0)
        self.service.latency_average = 0.8 * self.service.latency_average + 0.2 * (now - request.arrived)

    async def whole(self, http: HttpRequest) -> Response:
        text: list[str] = []
        async for event in self.events(http):
            if event is IDLE:
                continue
            if isinstance(event, Tokens):
                text.append(self.add(event))
            elif isinstance(event, Failed):
                self.record(None)
                raise ApiError(self.failure_status(), event.message, "server_error")
            else:
                text.append(self.assembler.flush())
                self.record(event)
                return JSONResponse(self.response("".join(text), event))
        self.record(None)
        return Response(status_code=499)  # the client left; nobody reads this

    def response(self, text: str, finished: Finished) -> dict:
        reason = self.finish_reason(finished)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": self.logprobs_json(self.logprobs), "finish_reason": reason}
        else:
            choice = {"index": 0, "text": self.echo + text, "logprobs": self.logprobs_json(self.logprobs, echo=True),
                      "finish_reason": reason}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.settings.served_name,
                "system_fingerprint": self.settings.fingerprint, "choices": [choice],
                "usage": self.usage(finished), "cllm": self.stats(finished)}

    def logprobs_json(self, entries: list[TokenLogprob], echo: bool = False, offset: int = 0) -> dict | None:
        """The choice's `logprobs` (None unless asked); with `echo`, the prompt's tokens first."""
        if self.request.logprobs is None:
            return None
        strings = self.service.strings
        if self.chat:
            return {"content": chat_content(strings, entries), "refusal": None}
        scores = self.request.prompt_scores if echo else None
        ids = (self.request.prompt_ids if scores is not None else []) + [e.token for e in entries]
        return completion_logprobs(strings, ids, (scores or []) + entries, offset)

    def chunk(self, piece: str | None, reason: str | None = None, extra: dict | None = None) -> str:
        logprobs, self.unsent = (self.logprobs_json(self.unsent, offset=self.sent_chars) if self.unsent else None), []
        self.sent_chars += len(piece or "")
        if self.chat:
            delta = {"role": "assistant", "content": ""} if piece is None else ({"content": piece} if piece else {})
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": piece or "", "logprobs": logprobs, "finish_reason": reason}
        data = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.settings.served_name,
                "system_fingerprint": self.settings.fingerprint, "choices": [choice]}
        return sse(data | (extra or {}))

    async def stream(self) -> AsyncIterator[str]:
        """SSE chunks: the role (chat), text pieces with how many tokens and forwards made them
        (`cllm`), the finish reason with the request's stats, the usage if asked, then [DONE]."""
        finished = None
        try:
            if self.chat:
                yield self.chunk(None)
            tokens = forwards = 0
            async for event in self.events(None):
                if event is IDLE:
                    yield ": keep-alive\n\n"  # an SSE comment: clients skip it, proxies see a live stream
                elif isinstance(event, Tokens):
                    piece = self.add(event)
                    tokens, forwards = tokens + len(event.token_ids), forwards + 1
                    if piece:
                        yield self.chunk(piece, extra={"cllm": {"tokens": tokens, "forwards": forwards}})
                        tokens = forwards = 0
                elif isinstance(event, Failed):
                    yield sse(error_body(event.message, "server_error", self.failure_status()))
                    break
                else:
                    finished = event
                    piece = self.assembler.flush()
                    if piece:
                        yield self.chunk(piece, extra={"cllm": {"tokens": tokens, "forwards": forwards}})
                    yield self.chunk("", self.finish_reason(event), {"cllm": self.stats(event)})
                    options = self.body.stream_options
                    if options is not None and options.include_usage:
                        yield sse(
                            {
                                "id": self.id,
                                "object": "chat.completion.chunk" if self.chat else "text_completion",
                                "created": self.created,
                                "model": self.settings.served_name,
                                "system_fingerprint": self.settings.fingerprint,
                                "choices": [],
                                "usage": self.usage(event),
                            }
                        )
            yield "data: [DONE]\n\n"
        finally:
            if not self.request.done:
                self.request.cancel("disconnected")
            self.record(finished)


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
