"""`cllm chat`: a terminal chat with a model decoded in this process by the serving engine.

Replies stream as they decode; text that arrived several tokens in one forward is highlighted
(on a terminal). Ctrl-C stops the reply, not the program; Ctrl-D or /quit leaves.
"""

from __future__ import annotations

import queue
import signal
import time
from dataclasses import dataclass, field

from rich.console import Console

from cllm.decoding.core import DecodeStats
from cllm.decoding.sampling import Sampling
from cllm.serving.engine import Engine, Failed, Finished, Request, Tokens
from cllm.serving.text import TextAssembler

HELP = "commands: /reset forgets the conversation, /stats shows decoding statistics, /quit leaves (or Ctrl-D)"
FAST_FORWARD_STYLE = "black on yellow"


@dataclass
class ChatStats:
    replies: int = 0
    tokens: int = 0
    forwards: int = 0
    seconds: float = 0.0
    last: list[str] = field(default_factory=list)

    def add(self, stats: DecodeStats, seconds: float) -> None:
        self.replies += 1
        self.tokens += stats.new_tokens
        self.forwards += stats.forward_passes
        self.seconds += seconds
        self.last = [(f"last reply: {stats.new_tokens} tokens in {stats.forward_passes} forwards "
                      f"({stats.tokens_per_forward:.2f} tokens/forward), {seconds:.2f} s")]

    def lines(self) -> list[str]:
        if not self.replies:
            return ["no replies yet"]
        per_forward = self.tokens / self.forwards if self.forwards else 0.0
        rate = self.tokens / self.seconds if self.seconds else 0.0
        return self.last + [(f"session: {self.replies} replies, {self.tokens} tokens, {per_forward:.2f} "
                             f"tokens/forward, {rate:.1f} tokens/s")]


class Chat:
    def __init__(self, engine: Engine, max_new_tokens: int, sampling: Sampling, seed: int, system: str | None,
                 console: Console) -> None:
        self.engine, self.max_new_tokens, self.sampling, self.seed = engine, max_new_tokens, sampling, seed
        self.system, self.console = system, console
        self.history: list[dict] = []
        self.stats = ChatStats()
        self.replying: Request | None = None
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def run(self) -> None:
        self.console.print(f"[dim]{HELP}[/dim]")
        previous = signal.signal(signal.SIGINT, self._ctrl_c)
        try:
            while self.turn():
                pass
        finally:
            signal.signal(signal.SIGINT, previous)

    def _ctrl_c(self, *_) -> None:
        """Ctrl-C cancels the reply being decoded; anywhere else it abandons the line being typed."""
        if self.replying is not None:
            self.replying.cancel("interrupted")
        else:
            raise KeyboardInterrupt

    def turn(self) -> bool:
        """One line from the user; False when the chat is over."""
        try:
            text = self.console.input("[bold]you>[/bold] ").strip()
            if text == "/quit":
                return False
            if text == "/reset":
                self.reset()
                self.console.print("[dim]conversation forgotten[/dim]")
            elif text == "/stats":
                for stat in self.stats.lines():
                    self.console.print(f"[dim]{stat}[/dim]")
            elif text.startswith("/"):
                self.console.print(f"[dim]unknown command {text.split()[0]}; {HELP}[/dim]")
            elif text:
                self.reply(text)
        except KeyboardInterrupt:
            self.console.print()
        except EOFError:
            self.console.print()
            return False
        return True

    def prompt_ids(self, messages: list[dict]) -> list[int] | None:
        tokenizer = self.engine.loaded.tokenizer
        if tokenizer.chat_template:
            ids = self.engine.loaded.encode_messages(messages)
        else:  # no template: the turns as plain text
            ids = tokenizer("\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:").input_ids
        context = self.engine.loaded.context_length
        if context is not None and len(ids) >= context:
            return None
        return list(ids)

    def reply(self, text: str) -> None:
        messages = self.history + [{"role": "user", "content": text}]
        ids = self.prompt_ids(messages)
        if ids is None:
            self.console.print("[red]the conversation no longer fits the model's context: /reset to start over[/red]")
            return
        context = self.engine.loaded.context_length
        limit = self.max_new_tokens if context is None else min(self.max_new_tokens, context - len(ids))
        events: queue.Queue = queue.Queue()
        request = Request(ids, limit, self.sampling, self.seed + self.stats.replies, events.put)
        self.replying = request  # from here Ctrl-C stops the reply
        self.engine.submit(request)
        assembler = TextAssembler(self.engine.loaded.tokenizer)
        reply: list[str] = []
        started = time.monotonic()
        self.console.print("[bold]model>[/bold] ", end="")
        try:
            while True:
                try:
                    event = events.get(timeout=0.1)
                except queue.Empty:
                    continue
                if isinstance(event, Tokens):
                    piece = assembler.add(event.token_ids)
                    style = FAST_FORWARD_STYLE if len(event.token_ids) > 1 else None
                    self.console.print(piece, end="", style=style, highlight=False, markup=False)
                    reply.append(piece)
                elif isinstance(event, Failed):
                    self.console.print(f"\n[red]error: {event.message}[/red]")
                    return
                else:
                    self.finish(event, assembler, reply, messages, time.monotonic() - started, request.cancel_reason)
                    return
        finally:
            self.replying = None

    def finish(self, event: Finished, assembler: TextAssembler, reply: list[str], messages: list[dict],
               seconds: float, interrupted: str | None) -> None:
        rest = assembler.flush()
        self.console.print(rest, highlight=False, markup=False)
        reply.append(rest)
        if interrupted:
            self.console.print("[dim](stopped)[/dim]")
        self.history = messages + [{"role": "assistant", "content": "".join(reply)}]
        self.stats.add(event.stats, seconds)

