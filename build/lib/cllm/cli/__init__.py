"""The `cllm` command: one module per command group (`decode`: generate, viz; `data`: collect,
data inspect; `train`; `eval`: eval, bench; `recipe`: distill, demo; `serve`: serve, chat,
serve-bench), each parsing its flags and printing; the work is done by the library modules they call.
`common` holds the argument types and groups and the model loading they share."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cllm.cli import common, data, decode, eval, recipe, serve, train
from cllm.cli.common import stderr
from cllm.decoding.spec import KINDS
from cllm.distill import command_line
from cllm.errors import CllmError
from cllm.files import check_output_dir, check_output_file


def build_parser() -> argparse.ArgumentParser:
    parser = common.Parser(
        prog="cllm",
        description="Consistency LLMs: Jacobi decoding (several tokens per forward), benchmarks, and more.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=common.Parser)
    for add in (decode.add_generate, eval.add_bench, data.add_collect, train.add_train, data.add_data, eval.add_eval,
                decode.add_viz, recipe.add_distill, recipe.add_demo, serve.add_serve, serve.add_chat,
                serve.add_serve_bench):
        add(commands)
    return parser


COMMANDS = {
    "generate": decode.cmd_generate, "bench": eval.cmd_bench, "demo": recipe.cmd_demo, "collect": data.cmd_collect,
    "data": data.cmd_data, "train": train.cmd_train, "eval": eval.cmd_eval, "distill": recipe.cmd_distill,
    "viz": decode.cmd_viz, "serve": serve.cmd_serve, "chat": serve.cmd_chat, "serve-bench": serve.cmd_serve_bench,
}


def _check_arguments(args: argparse.Namespace) -> None:
    """What parsing alone cannot see, and every path the command will write: checked before any
    work (and before a model loads)."""
    decoder = KINDS.get(getattr(args, "decoder", None) or "")
    if decoder is not None and not decoder.batched and getattr(args, "batch_size", 1) > 1:
        raise CllmError(
            f"--decoder {decoder.name} decodes one prompt at a time (transformers' limit): use --batch-size 1"
        )
    if args.command == "eval" and args.task in ("fidelity", "perplexity") and args.temperature > 0:
        raise CllmError(f"eval {args.task} measures the greedy model: drop --temperature")
    if args.command in ("bench", "collect", "train", "viz", "serve-bench"):
        check_output_dir(args.out, "--out")
    elif args.command == "eval":
        args.out = args.out or Path("runs/eval") / f"{args.task}.json"
        for flag in ("out", "answers", "target_outputs"):
            if getattr(args, flag) is not None:
                check_output_file(getattr(args, flag), "--" + flag.replace("_", "-"))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(argv)
        args.command_line = command_line(argv)  # recorded in reports
        _check_arguments(args)
        COMMANDS[args.command](args)
        sys.stdout.flush()  # a full disk or a closed pipe shows here, inside the handlers below
    except CllmError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        stderr.print("interrupted")
        return 130
    except BrokenPipeError:
        _detach_stdout()
        return 0
    except OSError as exc:  # the disk, the terminal, a path that changed under us
        where = exc.filename or ("stdout" if _detach_stdout() else None)
        return _fail(f"{exc.strerror or exc}" + (f": {where}" if where else ""))
    except UnicodeDecodeError as exc:
        return _fail(f"input is not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})")
    return 0


def _fail(message: str) -> int:
    stderr.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return 2


def _detach_stdout() -> bool:
    """Points a stdout that cannot be written (full disk, closed pipe) at /dev/null, so that the
    interpreter's last flush at exit does not print a traceback; True if stdout was broken."""
    try:
        sys.stdout.flush()
        return False
    except OSError:
        pass
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # not a real file (captured in tests)
    return True
