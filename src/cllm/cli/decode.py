"""`cllm generate` and `cllm viz`: decode prompts, draw trajectories."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rich.table import Table

from cllm.cli import common
from cllm.cli.common import SINGLE_MODEL_DECODERS, stderr
from cllm.errors import CllmError


def add_generate(commands) -> None:
    generate = commands.add_parser(
        "generate",
        help="decode prompts with ar, jacobi, lookahead or hf and print the text",
        description="Decoding (greedy, or sampled with --temperature) of one prompt (an argument, or - for stdin) "
        'or of a JSONL file of {"prompt": ...} lines. Text streams to stdout; --json prints one object per prompt '
        "instead.",
    )
    generate.add_argument("prompt", nargs="?", help="the prompt text, or - to read it from stdin")
    generate.add_argument("--file", type=Path, help='JSONL file with one {"prompt": ...} per line')
    generate.add_argument(
        "--decoder",
        choices=SINGLE_MODEL_DECODERS,
        default="jacobi",
        help="ar: our KV-cache loop; jacobi: Jacobi decoding; lookahead: lookahead decoding (--window, "
        "--ngram, --candidates); hf: transformers generate; hf-pld: transformers' prompt lookup (batch size 1). "
        "The same text from each, greedy or sampled with the same --seed (hf: the same distribution) "
        "(default: %(default)s)",
    )
    common.add_decoding_args(generate, max_new_tokens=128)
    common.add_drafter_arg(generate)
    common.add_sampling_args(generate)
    generate.add_argument(
        "--batch-size", type=common.positive_int, default=1, help="prompts decoded together (default: %(default)s)"
    )
    generate.add_argument("--stats", action="store_true", help="print a table of decoding statistics to stderr")
    generate.add_argument(
        "--json", action="store_true", help="print one JSON object per prompt (text, token_ids, stats)"
    )
    common.add_model_args(generate, engine_options=True)


def add_viz(commands) -> None:
    viz = commands.add_parser(
        "viz",
        help="draw the Jacobi trajectory of a prompt for one or two models (HTML + PNG)",
        description="Decodes PROMPT with Jacobi and draws every state of the first blocks: tokens green where "
        "they equal the fixed point, red where not, fast-forwarded and stationary tokens marked. Give --model "
        "twice (target, then CLLM) for the paper's side-by-side figure. Writes trajectory.html and trajectory.png.",
    )
    viz.add_argument("prompt", help="the prompt text")
    viz.add_argument(
        "--block-size", type=common.positive_int, default=16, help="Jacobi block size n (default: %(default)s)"
    )
    viz.add_argument("--blocks", type=common.positive_int, default=2, help="blocks to draw (default: %(default)s)")
    viz.add_argument("--out", type=Path, default=Path("runs/viz"), help="output directory (default: %(default)s)")
    common.add_model_args(viz, several=True)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    from cllm.prompts import read_prompts_jsonl

    if args.file is not None and args.prompt is not None:
        raise CllmError("give either a prompt or --file, not both")
    if args.file is not None:
        return read_prompts_jsonl(args.file)
    if args.prompt is None:
        raise CllmError("no prompt: give one as an argument, - for stdin, or --file")
    text = common.read_stdin() if args.prompt == "-" else common.check_utf8(args.prompt, "the prompt")
    if not text.strip():
        raise CllmError("empty prompt")
    return [text]


class _TextStream:
    """Prints a row's text as tokens arrive, holding back bytes of an unfinished UTF-8 character."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.printed = 0

    def __call__(self, row: int, new_tokens: list[int]) -> None:
        self.tokens.extend(new_tokens)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        sys.stdout.write(text[self.printed :])
        sys.stdout.flush()
        self.printed = len(text)


def _decode_batch(loaded, decoder: str, batch: list[list[int]], first: int, args, on_tokens: Callable | None,
                  drafter=None):
    """Decode prompts number first, first + 1, ... of the input."""
    import torch

    from cllm.decoding import decode

    device = loaded.model.device
    start = time.perf_counter()
    output = decode(loaded, common.spec(args, decoder), batch, max_new_tokens=args.max_new_tokens, on_tokens=on_tokens,
                    sampling=common.sampling(args), seed=args.seed + first, draft_model=drafter)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return output, time.perf_counter() - start


def _stats_table(rows: list[tuple[int, object, float]]) -> Table:
    table = Table(title="decoding statistics")
    for column in ("prompt", "tokens", "forwards", "tok/fwd", "fast-fwd", "stationary", "s", "tok/s"):
        table.add_column(column, justify="right")
    for number, stats, seconds in rows:
        table.add_row(
            str(number), str(stats.new_tokens), str(stats.forward_passes), f"{stats.tokens_per_forward:.3f}",
            str(stats.fast_forward), str(stats.stationary), f"{seconds:.2f}",
            f"{stats.new_tokens / seconds:.1f}" if seconds > 0 else "-",
        )
    return table


def cmd_generate(args: argparse.Namespace) -> None:
    prompts = _read_prompts(args)
    common.spec(args, args.decoder)  # a bad flag combination fails before the model loads
    loaded = common.load(args)
    drafter = common.load_drafter(args, loaded)
    encoded = common.encode_all(loaded, prompts, args.raw, args.max_new_tokens)
    stream = not args.json and args.batch_size == 1
    stats_rows = []
    progress = common.progress() if len(prompts) > 1 and not stream else None
    task = progress.add_task("generating", total=len(prompts)) if progress else None
    if progress:
        progress.start()
    try:
        for first in range(0, len(encoded), args.batch_size):
            batch = encoded[first : first + args.batch_size]
            if stream and len(prompts) > 1:
                sys.stdout.write(f"\n### prompt {first + 1}\n")
            on_tokens = _TextStream(loaded.tokenizer) if stream else None
            output, seconds = _decode_batch(loaded, args.decoder, batch, first, args, on_tokens, drafter)
            for offset, (tokens, stats) in enumerate(zip(output.token_ids, output.stats)):
                number = first + offset + 1
                stats_rows.append((number, stats, seconds))
                if args.json:
                    record = {
                        "prompt": prompts[number - 1],
                        "text": loaded.tokenizer.decode(tokens, skip_special_tokens=True),
                        "token_ids": tokens,
                        "decoder": common.spec(args, args.decoder).label,
                        "drafter": args.drafter,
                        "block_size": args.block_size if args.decoder == "jacobi" else None,
                        "sampling": common.sampling(args).describe(),
                        "seed": args.seed + number - 1,
                        "model": args.model,
                        "dtype": args.dtype,
                        "quantize": args.quantize,
                        "compile": args.compile,
                        "onednn": args.onednn,
                        "seconds": round(seconds, 4),
                        "stats": stats.to_dict(),
                    }
                    print(json.dumps(record, ensure_ascii=False), flush=True)
            if stream:
                sys.stdout.write("\n")
            if progress:
                progress.advance(task, len(batch))
    finally:
        if progress:
            progress.stop()
    if args.stats:
        stderr.print(_stats_table(stats_rows))


def cmd_viz(args: argparse.Namespace) -> None:
    from cllm.viz import render_html, render_png, trajectory_views

    if not common.check_utf8(args.prompt, "the prompt").strip():
        raise CllmError("empty prompt")
    views = {}
    names = args.model or ["default"]
    with common.progress() as progress:
        for name, label in zip(names, common.short_names(names)):
            args.model = name
            loaded = common.load(args)
            task = progress.add_task(f"viz {label}", total=1 + args.block_size * args.blocks)
            views[label] = trajectory_views(loaded, args.prompt, args.block_size, args.blocks, args.raw,
                                            on_tokens=lambda count, task=task: progress.advance(task, count))
    args.out.mkdir(parents=True, exist_ok=True)
    render_html(views, args.prompt, args.out / "trajectory.html")
    render_png(views, args.out / "trajectory.png")
    stderr.print(f"wrote {args.out / 'trajectory.html'} and {args.out / 'trajectory.png'}")
