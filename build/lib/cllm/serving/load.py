"""The load generator behind `cllm serve-bench`: streamed chat requests through the official
`openai` client at several concurrency levels, against a running server or against `cllm serve`
processes it starts, one per decoder."""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from cllm.errors import CllmError


@dataclass
class Outcome:
    """One request as the client saw it (seconds from sending it)."""

    ttft: float | None
    latency: float
    completion_tokens: int
    tokens_per_forward: float | None
    error: str | None = None


@dataclass
class LevelReport:
    label: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    tokens_per_second: float  # completion tokens of all requests / wall time of the level
    requests_per_second: float
    ttft_p50: float
    ttft_p99: float
    latency_p50: float
    latency_p99: float
    tokens_per_forward: float

    def row(self) -> str:
        return (
            f"| {self.label} | {self.concurrency} | {self.requests} | {self.errors} | {self.tokens_per_second:.1f} | "
            f"{self.requests_per_second:.2f} | {self.ttft_p50:.2f} | {self.ttft_p99:.2f} | {self.latency_p50:.2f} | "
            f"{self.latency_p99:.2f} | {self.tokens_per_forward:.2f} |"
        )


TABLE_HEADER = ("| decoder | concurrency | requests | errors | tokens/s | requests/s | TTFT p50 s | TTFT p99 s | "
                "latency p50 s | latency p99 s | tokens/forward |\n|---|---|---|---|---|---|---|---|---|---|---|")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def one_request(client, model: str, prompt: str, max_tokens: int) -> Outcome:
    start = time.perf_counter()
    ttft = None
    tokens, per_forward = 0, None
    try:
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and ttft is None:
                ttft = time.perf_counter() - start
            stats = (chunk.model_extra or {}).get("cllm")
            if chunk.choices and chunk.choices[0].finish_reason and stats:
                per_forward = stats.get("tokens_per_forward")
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as exc:  # noqa: BLE001 -- a failed request is a result to report, not a crash
        return Outcome(ttft, time.perf_counter() - start, tokens, per_forward, f"{type(exc).__name__}: {exc}")
    return Outcome(ttft, time.perf_counter() - start, tokens, per_forward)


def run_level(base_url: str, model: str, prompts: Sequence[str], concurrency: int, requests: int, max_tokens: int,
              label: str) -> LevelReport:
    """`requests` requests (prompts in turn), `concurrency` of them in flight at any time."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=3600)
    work = [prompts[i % len(prompts)] for i in range(requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(lambda prompt: one_request(client, model, prompt, max_tokens), work))
    seconds = time.perf_counter() - start
    good = [o for o in outcomes if o.error is None]
    forwards = [o.tokens_per_forward for o in good if o.tokens_per_forward]
    tokens = sum(o.completion_tokens for o in good)
    return LevelReport(
        label=label, concurrency=concurrency, requests=requests, errors=len(outcomes) - len(good), seconds=seconds,
        tokens_per_second=tokens / seconds, requests_per_second=len(good) / seconds,
        ttft_p50=percentile([o.ttft for o in good if o.ttft is not None], 0.5),
        ttft_p99=percentile([o.ttft for o in good if o.ttft is not None], 0.99),
        latency_p50=percentile([o.latency for o in good], 0.5), latency_p99=percentile([o.latency for o in good], 0.99),
        tokens_per_forward=statistics.fmean(forwards) if forwards else float("nan"),
    )


def served_model(base_url: str) -> str:
    url = base_url.rstrip("/") + "/models"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)["data"][0]["id"]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise CllmError(f"cannot reach an OpenAI-compatible server at {url}: {exc}") from None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`cllm serve ARGS` on a free local port, from `start` (which waits for /health) to `stop` (SIGTERM)."""

    def __init__(self, serve_args: Sequence[str], startup_timeout: float = 600.0) -> None:
        self.port = free_port()
        self.args = [sys.executable, "-m", "cllm.cli", "serve", *serve_args, "--host", "127.0.0.1",
                     "--port", str(self.port), "--log-level", "warning"]
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        self.stderr = ""
        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        env=os.environ | {"PYTHONUNBUFFERED": "1"})
        threading.Thread(target=self._keep_stderr, daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                time.sleep(0.2)
                raise CllmError(f"cllm serve exited with status {self.process.returncode}: {self.stderr.strip()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise CllmError(f"cllm serve did not answer within {self.startup_timeout:g} s")

    def _keep_stderr(self) -> None:
        for line in self.process.stderr:
            self.stderr = (self.stderr + line)[-4000:]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def bench_levels(base_url: str, prompts: Sequence[str], levels: Sequence[int], requests: int, max_tokens: int,
                 label: str, on_level: Callable[[LevelReport], None]) -> list[LevelReport]:
    import openai

    model = served_model(base_url)
    one_request(openai.OpenAI(base_url=base_url, api_key="unused"), model, prompts[0], 8)  # warm-up
    reports = []
    for concurrency in levels:
        report = run_level(base_url, model, prompts, concurrency, max(requests, concurrency), max_tokens, label)
        on_level(report)
        reports.append(report)
    return reports


def write_report(out: Path, reports: Sequence[LevelReport], meta: dict) -> str:
    out.mkdir(parents=True, exist_ok=True)
    table = TABLE_HEADER + "\n" + "\n".join(r.row() for r in reports)
    (out / "serve-bench.json").write_text(json.dumps({"meta": meta, "levels": [asdict(r) for r in reports]}, indent=2))
    (out / "serve-bench.md").write_text(table + "\n")
    return table
