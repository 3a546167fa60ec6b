"""`cllm serve`, `cllm chat` and `cllm serve-bench`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.console import Console

from cllm.cli import common
from cllm.cli.common import stderr
from cllm.decoding.spec import KINDS, SERVABLE
from cllm.errors import CllmError, require_extra

SERVE_MODULES = ("fastapi", "uvicorn", "pydantic", "starlette", "prometheus_client")

SERVED = [name for name in SERVABLE if not KINDS[name].needs_draft]  # drafted: jacobi with --drafter


def add_serve(commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server: continuous batching, streaming, /metrics, a live page at /",
        description="Serves /v1/chat/completions, /v1/completions and /v1/models (OpenAI's schemas; streams are "
        "SSE ending in [DONE]; every response carries its decoding statistics in a `cllm` field), /health, "
        "/metrics (Prometheus) and a chat page at /. One decoding loop serves every request: new ones join the "
        "running batch, finished and disconnected ones leave it. A request that names no temperature, top_p or "
        "top_k gets this server's --temperature, --top-p, --top-k; one without max_tokens gets --max-new-tokens. "
        "The first Ctrl-C / SIGTERM lets running requests finish (up to --shutdown-grace), a second stops at once.",
    )
    serve.add_argument("--decoder", choices=SERVED, default="jacobi",
                       help="the decoder every request goes through (default: %(default)s)")
    common.add_decoding_args(serve, max_new_tokens=256, max_new_tokens_help="max_tokens of a request that sets none")
    common.add_drafter_arg(serve)
    common.add_sampling_args(serve, seed=False, about="Defaults for requests that set none (a request's `seed` fixes "
                       "its sample; without one it is random).")
    group = serve.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface "
                       "(default: %(default)s)")
    group.add_argument("--port", type=common.non_negative_int, default=8000, help="(default: %(default)s)")
    group.add_argument("--served-name", help="the model name clients use (default: the --model argument)")
    group.add_argument("--max-batch", type=common.positive_int, default=8, help="requests decoded together at most "
                       "(default: %(default)s)")
    group.add_argument(
        "--max-queue",
        type=common.non_negative_int,
        default=64,
        help="requests waiting for a place in the batch at most; more get 429 with Retry-After (default: %(default)s)",
    )
    group.add_argument(
        "--request-timeout",
        type=common.positive_float,
        default=300.0,
        help="seconds a request may take from arrival, waiting included; then it ends with 504 (default: %(default)s)",
    )
    group.add_argument(
        "--shutdown-grace",
        type=common.non_negative_float,
        default=30.0,
        help="seconds running requests get to finish at shutdown (default: %(default)s)",
    )
    group.add_argument("--column-budget", type=common.non_negative_int,
                       help="fed columns per forward across the batch: each row feeds at most budget / rows, so a "
                       "parallel decoder narrows as requests join and takes AR steps at saturation (outputs do not "
                       "change). Default: the decoder's columns for one row (on a CPU extra columns are not free; "
                       "raise it on a GPU); 0: never narrow")
    group.add_argument("--max-body-bytes", type=common.positive_int, default=1 << 20,
                       help="larger request bodies get 413 before they are parsed (default: %(default)s)")
    group.add_argument("--api-key", default=os.environ.get("CLLM_API_KEY"),
                       help="require `Authorization: Bearer KEY` on /v1 (401 otherwise; default: $CLLM_API_KEY, "
                       "else none)")
    group.add_argument("--cors-origin", action="append", default=[], help="a browser origin allowed to call the API "
                       "(e.g. http://localhost:3000, or * for any); repeat for several (default: none)")
    group.add_argument("--keepalive", type=common.positive_float, default=15.0,
                       help="seconds without a chunk after which a stream gets an SSE comment (default: %(default)s)")
    group.add_argument("--chat-template", type=Path, help="a Jinja chat template file to use instead of the model's")
    group.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                       help="uvicorn's log level; debug also logs every request (default: %(default)s)")
    common.add_model_args(serve, raw=False, engine_options=True)


def add_chat(commands) -> None:
    chat = commands.add_parser(
        "chat",
        help="chat with a model in the terminal (streaming; fast-forwarded text highlighted)",
        description="An interactive chat with the model decoded in this process. Text that arrived several tokens "
        "in one forward is highlighted. /reset forgets the conversation, /stats shows tokens per forward, "
        "Ctrl-C stops a reply (not the program), Ctrl-D or /quit leaves.",
    )
    chat.add_argument("--decoder", choices=SERVED, default="jacobi", help="(default: %(default)s)")
    chat.add_argument("--system", help="a system message that starts every conversation")
    common.add_decoding_args(chat, max_new_tokens=512)
    common.add_drafter_arg(chat)
    common.add_sampling_args(chat)
    common.add_model_args(chat, raw=False, engine_options=True)


def add_serve_bench(commands) -> None:
    load = commands.add_parser(
        "serve-bench",
        help="load-test cllm serve: throughput and latency percentiles at several concurrency levels",
        description="For each decoder, starts `cllm serve` with it (or uses --url), sends streamed chat requests "
        "through the openai client with --concurrency requests in flight, and reports total tokens/s, "
        "requests/s, p50/p99 time to first token and end-to-end latency, and tokens per forward. Writes "
        "serve-bench.json and serve-bench.md to --out.",
    )
    load.add_argument("--decoders", default="ar,jacobi:16,lookahead:3:3:3",
                      help="comma-separated ar, jacobi:N[:INIT[:G]], lookahead:W:N:G (default: %(default)s)")
    load.add_argument("--url", help="an already running server's base URL (e.g. http://127.0.0.1:8000/v1) "
                      "instead of starting one per decoder; --decoders is then ignored")
    load.add_argument("--concurrency", default="1,4,16", help="comma-separated levels (default: %(default)s)")
    load.add_argument("--requests", type=common.positive_int, default=16,
                      help="requests per level (at least the level's concurrency) (default: %(default)s)")
    load.add_argument("--max-new-tokens", type=common.positive_int, default=128, help="max_tokens of every request "
                      "(default: %(default)s)")
    load.add_argument("--max-batch", type=common.positive_int, default=16, help="the servers' --max-batch "
                      "(default: %(default)s)")
    load.add_argument("--column-budget", type=common.non_negative_int,
                      help="the servers' --column-budget (default: theirs)")
    load.add_argument("--repeats", type=common.positive_int, default=1,
                      help="measure each level this many times per decoder, the decoders' order reversed every "
                      "other time, and report the run of median throughput (default: %(default)s)")
    common.add_prompt_source_args(load)
    load.add_argument("--limit", type=common.positive_int, help="use only the first N prompts")
    load.add_argument(
        "--out", type=Path, default=Path("runs/serve-bench"), help="report directory (default: %(default)s)"
    )
    common.add_model_args(load, raw=False, engine_options=True)


def _engine(args: argparse.Namespace, max_batch: int):
    from cllm.serving.engine import Engine

    spec = common.spec(args, args.decoder)
    loaded = common.load(args)
    if getattr(args, "chat_template", None) is not None:
        _use_chat_template(loaded, args.chat_template)
    drafter = common.load_drafter(args, loaded)
    if loaded.compile:  # compile before the first request, not during it
        from cllm.bench import decode_once

        with stderr.status("compiling the decoder (minutes on a CPU the first time) ..."):
            decode_once(loaded, spec, loaded.encode_prompt("Hello"), args.max_new_tokens, drafter)
    return Engine(loaded, spec, max_batch=max_batch, max_queue=getattr(args, "max_queue", 64), drafter=drafter,
                  column_budget=getattr(args, "column_budget", None))


def _use_chat_template(loaded, path: Path) -> None:
    """The template in `path` instead of the model's, tried once on a conversation so a broken one
    fails at start-up rather than on every request."""
    from cllm.files import read_text

    loaded.tokenizer.chat_template = read_text(path, "chat template")
    try:
        loaded.encode_messages([{"role": "user", "content": "hi"}])
    except Exception as exc:  # noqa: BLE001 -- Jinja and the template itself raise many kinds
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CllmError(f"--chat-template {path}: {detail}") from None


def cmd_serve(args: argparse.Namespace) -> None:
    require_extra("serve", *SERVE_MODULES)
    from cllm.serving.server import serve
    from cllm.serving.settings import ServeSettings

    engine = _engine(args, args.max_batch)
    settings = ServeSettings(served_name=args.served_name or args.model, decoder_label=engine.spec.label,
                             default_max_tokens=args.max_new_tokens, sampling=common.sampling(args),
                             request_timeout=args.request_timeout, max_body_bytes=args.max_body_bytes,
                             api_key=args.api_key, cors_origins=tuple(args.cors_origin),
                             keepalive_seconds=args.keepalive)
    stderr.print(f"serving {settings.served_name!r} with {settings.decoder_label} on http://{args.host}:{args.port} "
                 f"(OpenAI API under /v1, chat page at /, metrics at /metrics)", highlight=False, soft_wrap=True)
    serve(engine, settings, args.host, args.port, grace=args.shutdown_grace, log_level=args.log_level)


def cmd_chat(args: argparse.Namespace) -> None:
    from cllm.serving.chat import Chat

    engine = _engine(args, max_batch=1)
    engine.start()
    try:
        Chat(engine, args.max_new_tokens, common.sampling(args), args.seed, args.system, Console()).run()
    finally:
        engine.stop()


def _serve_args(args: argparse.Namespace, spec) -> list[str]:
    """`cllm serve` flags for one decoder spec and this command's model settings."""
    flags = ["--model", args.model, "--dtype", args.dtype, "--device", args.device, "--decoder", spec.kind,
             "--max-batch", str(args.max_batch), "--max-queue", str(max(64, args.requests))]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    if args.quantize:
        flags += ["--quantize", args.quantize]
    if args.compile:
        flags += ["--compile"]
    if args.onednn:
        flags += ["--onednn"]
    if args.column_budget is not None:
        flags += ["--column-budget", str(args.column_budget)]
    if spec.kind == "jacobi":
        flags += ["--block-size", str(spec.block_size), "--init", spec.init]
    if spec.kind == "lookahead" or spec.verified:
        flags += ["--window", str(spec.window), "--ngram", str(spec.ngram), "--candidates", str(spec.verified),
                  "--draft", str(spec.draft)]
    return flags


def cmd_serve_bench(args: argparse.Namespace) -> None:
    require_extra("serve", *SERVE_MODULES, "openai")
    from cllm.decoding.spec import DecoderSpec
    from cllm.serving.load import ServerProcess, bench_levels, write_report

    levels = [_level(part) for part in args.concurrency.split(",") if part.strip()]
    args.raw = False
    prompts = common.bench_prompts(args)
    reports = []

    def show(report) -> None:
        stderr.print(f"{report.label} concurrency {report.concurrency}: {report.tokens_per_second:.1f} tokens/s, "
                     f"TTFT p50 {report.ttft_p50:.2f} s, latency p50 {report.latency_p50:.2f} s, "
                     f"{report.errors} errors", highlight=False, soft_wrap=True)

    if args.url:
        reports = bench_levels(args.url, prompts, levels, args.requests, args.max_new_tokens, args.url, show)
    else:
        specs = [DecoderSpec.parse(part.strip()) for part in args.decoders.split(",") if part.strip()]
        for spec in specs:
            if spec.kind not in SERVED:
                raise CllmError(f"cannot serve-bench {spec.label}: use {', '.join(SERVED)}")
        # every server up first, then each level through every decoder back to back: the decoders of
        # a level are measured minutes apart at most, not a whole run apart (this machine drifts)
        servers = [ServerProcess(_serve_args(args, spec)) for spec in specs]
        try:
            for spec, server in zip(specs, servers):
                with stderr.status(f"starting cllm serve with {spec.label} ..."):
                    server.start()
            by_decoder: dict[str, list] = {spec.label: [] for spec in specs}
            for level in levels:
                runs: dict[str, list] = {spec.label: [] for spec in specs}
                for repeat in range(args.repeats):  # the order reversed every other time: drift cancels
                    pairs = list(zip(specs, servers))
                    for spec, server in pairs if repeat % 2 == 0 else reversed(pairs):
                        runs[spec.label] += bench_levels(server.base_url, prompts, [level], args.requests,
                                                         args.max_new_tokens, spec.label, show)
                for label, measured in runs.items():  # the run of median throughput
                    by_decoder[label].append(sorted(measured, key=lambda r: r.tokens_per_second)[len(measured) // 2])
            reports = [report for label in by_decoder for report in by_decoder[label]]
        finally:
            for server in servers:
                server.stop()
    meta = {
        "command": args.command_line,
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores",
        "model": args.model,
        "dtype": args.dtype,
        "threads": args.threads,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "max_batch": args.max_batch,
        "column_budget": "each decoder's own" if args.column_budget is None else args.column_budget,
        "repeats": args.repeats,
    }
    print(write_report(args.out, reports, meta))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _level(text: str) -> int:
    try:
        return common.positive_int(text.strip())
    except argparse.ArgumentTypeError as exc:
        raise CllmError(f"--concurrency: {exc}") from None
