"""The decoding engine of the server: one thread owns the model and runs every in-flight request
through one batched decoder call (continuous batching).

The decoder asks the engine, at the start of every iteration, for requests to admit
(`BatchControl.admit`), for rows to drop (`cancelled`: a client that went away, a stop string, a
timeout, shutdown) and reports rows that end (`finished`). A decoder call returns once its batch
drains; the thread then waits for the next request. Requests hear from the thread only through
their `deliver` callback, so the HTTP side never blocks on it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cllm.decoding import DecoderSpec, DecodeStats, decode
from cllm.decoding.core import Admission
from cllm.decoding.logprobs import TokenLogprob, prompt_logprobs
from cllm.decoding.sampling import Sampling
from cllm.decoding.spec import SERVABLE
from cllm.errors import CllmError
from cllm.models import LoadedModel


class QueueFull(Exception):
    """More requests wait than the queue holds."""


class ShuttingDown(Exception):
    """The server stopped taking requests."""


@dataclass
class Tokens:
    """Token ids a row gained in one forward (with their logprobs if the request asked)."""

    token_ids: list[int]
    at: float
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Finished:
    token_ids: list[int]
    stats: DecodeStats
    reason: str  # "eos", "length", "cancelled"


@dataclass
class Failed:
    message: str


Event = Tokens | Finished | Failed


@dataclass(eq=False)
class Request:
    """One prompt in the engine. `deliver` receives, in the engine thread, Tokens events and then
    exactly one Finished or Failed; it must not block (hand the event to another thread's queue)."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    seed: int
    deliver: Callable[[Event], None]
    logprobs: int | None = None  # top tokens to report with each generated token's logprob (None: no logprobs)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (echo)
    prompt_scores: list[TokenLogprob | None] | None = None  # set by the engine before the row starts
    prediction_ids: list[int] | None = None  # Predicted Outputs: what the decoder guesses with
    arrived: float = field(default_factory=time.monotonic)
    started: float | None = None  # admitted into the batch
    cancel_reason: str | None = None  # set from any thread: the row leaves at the next iteration
    done: bool = False

    def cancel(self, reason: str = "cancelled") -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason


@dataclass
class EngineCounters:
    """Totals since start, read by /metrics."""

    new_tokens: int = 0
    forward_passes: int = 0  # summed over rows: tokens / forward_passes is the mean tokens per forward
    decoder_calls: int = 0


class Engine:
    """Owns the model; `submit` queues a request, a background thread decodes.

    max_batch: rows decoding at once. max_queue: requests waiting beyond those (more: QueueFull).
    drafter: what a drafted spec drafts with (cllm.drafters); the output stays the model's.
    column_budget: fed columns per forward across the batch: each row feeds at most
    budget // rows (Batch.column_cap), so a parallel decoder narrows as the batch grows and takes
    AR steps at saturation; outputs do not change. None: the spec's columns for one row (one
    stream at full width: on a CPU extra columns are not free); 0: never narrow.
    """

    def __init__(
        self, loaded: LoadedModel, spec: DecoderSpec, *, max_batch: int = 8, max_queue: int = 64,
        drafter: object | None = None, column_budget: int | None = None,
    ) -> None:
        if spec.kind_info.needs_draft and drafter is None:
            raise CllmError(f"{spec.kind} needs a drafter (--drafter)")
        if spec.kind not in SERVABLE:
            raise CllmError(f"cannot serve with decoder {spec.kind}: choose one of {', '.join(SERVABLE)} "
                            "(they let requests join and leave a running batch)")
        if max_batch < 1 or max_queue < 0:
            raise CllmError("max_batch must be >= 1 and max_queue >= 0")
        self.loaded, self.spec, self.drafter = loaded, spec, drafter
        self.max_batch, self.max_queue = max_batch, max_queue
        self.column_budget = spec.row_columns if column_budget is None else column_budget  # read by the batch
        self.counters = EngineCounters()
        self._waiting: deque[Request] = deque()
        self._rows: dict[int, Request] = {}  # row index of the current decoder call -> request
        self._next_row = 0
        self._wake = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._thread = threading.Thread(target=self._serve_forever, name="cllm-engine", daemon=True)

    # -- the HTTP side ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request) -> None:
        with self._wake:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.max_queue + max(0, self.max_batch - len(self._rows)):
                raise QueueFull(f"{len(self._waiting)} requests are waiting already")
            self._waiting.append(request)
            self._wake.notify()

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    def idle(self) -> bool:
        with self._wake:
            return not self._waiting and not self._rows

    def stop_accepting(self) -> None:
        with self._wake:
            self._accepting = False

    def cancel_all(self, reason: str) -> None:
        with self._wake:
            for request in [*self._waiting, *self._rows.values()]:
                request.cancel(reason)
            self._wake.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread after cancelling whatever runs."""
        self.stop_accepting()
        self.cancel_all("shutdown")
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- BatchControl, called by the decoder in the engine thread ----------------------------

    def admit(self) -> Admission | None:
        requests = self._take(self.max_batch - len(self._rows))
        return self._admission(requests) if requests else None

    def cancelled(self) -> list[int]:
        return [row for row, request in list(self._rows.items()) if request.cancel_reason is not None]

    def finished(self, row: int, token_ids: list[int], stats: DecodeStats) -> None:
        with self._wake:
            request = self._rows.pop(row)
        if request.cancel_reason is not None:
            reason = "cancelled"
        elif token_ids and token_ids[-1] in self.loaded.eos_token_ids:
            reason = "eos"
        else:
            reason = "length"
        self.counters.new_tokens += stats.new_tokens
        self.counters.forward_passes += stats.forward_passes
        self._end(request, Finished(token_ids, stats, reason))

    # -- the engine thread -----------------------------------------------------------------

    def _on_tokens(self, row: int, token_ids: list[int], logprobs: list[TokenLogprob] | None = None) -> None:
        request = self._rows.get(row)
        if request is not None and token_ids:
            request.deliver(Tokens(token_ids, time.monotonic(), logprobs))

    def _take(self, room: int) -> list[Request]:
        """Up to `room` waiting requests, dropping those cancelled while they waited; the prompts
        of those that asked are scored (outside the lock: submitting must not wait for a forward)."""
        taken: list[Request] = []
        with self._wake:
            while self._waiting and len(taken) < room:
                request = self._waiting.popleft()
                if request.cancel_reason is not None:
                    self._end(request, Finished([], DecodeStats(), "cancelled"))
                    continue
                request.started = time.monotonic()
                self._rows[self._next_row] = request
                self._next_row += 1
                taken.append(request)
        for request in taken:
            if request.prompt_logprobs is not None:
                self._score_prompt(request)
        return taken

    def _score_prompt(self, request: Request) -> None:
        try:
            request.prompt_scores = prompt_logprobs(self.loaded.model, request.prompt_ids, request.prompt_logprobs)
        except Exception as exc:  # noqa: BLE001 -- this request fails, not the batch
            request.cancel("failed")  # its row leaves at the decoder's next iteration
            self._end(request, Failed(f"scoring the prompt failed: {type(exc).__name__}: {exc}"))

    @staticmethod
    def _admission(requests: list[Request]) -> Admission:
        return Admission(
            prompts=[r.prompt_ids for r in requests], max_new_tokens=[r.max_new_tokens for r in requests],
            samplings=[r.sampling for r in requests], seeds=[r.seed for r in requests],
            logprobs=[r.logprobs for r in requests], predictions=[r.prediction_ids for r in requests],
        )

    def _serve_forever(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self._waiting and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    break
                self._next_row = 0
            requests = self._take(self.max_batch)
            if requests:
                self._decode(requests)
        for request in list(self._waiting):
            self._end(request, Failed("the server shut down"))

    def _decode(self, requests: list[Request]) -> None:
        """One decoder call: these requests start it, later ones join through `admit`."""
        first = self._admission(requests)
        self.counters.decoder_calls += 1
        try:
            decode(self.loaded, self.spec, first.prompts, max_new_tokens=first.max_new_tokens,
                   sampling=first.samplings, seed=first.seeds, on_tokens=self._on_tokens, control=self,
                   draft_model=self.drafter, logprobs=first.logprobs, predictions=first.predictions)
        except Exception as exc:  # noqa: BLE001 -- one failed batch must not take the server down
            message = f"decoding failed: {type(exc).__name__}: {exc}"
            with self._wake:
                failed, self._rows = list(self._rows.values()), {}
            for request in failed:
                self._end(request, Failed(message))
        with self._wake:
            leftover, self._rows = list(self._rows.values()), {}
        for request in leftover:  # cannot happen with a correct decoder; never leave a client hanging
            self._end(request, Failed("the decoder returned without finishing this request"))

    def _end(self, request: Request, event: Finished | Failed) -> None:
        if request.done:
            return
        request.done = True
        request.deliver(event)

