"""`cllm collect` and `cllm data inspect`: Jacobi trajectories."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from cllm.cli import common
from cllm.cli.common import stderr
from cllm.errors import CllmError


def add_collect(commands) -> None:
    collect = commands.add_parser(
        "collect",
        help="collect Jacobi trajectories of a model on a prompt dataset",
        description="Decodes every prompt block by block with the Jacobi decoder and stores one entry per "
        "block (all its states and its fixed point) as parquet shards in --out. Re-running the same command "
        "after an interruption resumes where it stopped. Under torchrun/accelerate each process takes its "
        "share of the prompts (RANK/WORLD_SIZE), or set --shard-index/--num-shards by hand.",
    )
    collect.add_argument(
        "--dataset", required=True, help="gsm8k (../shared/datasets beside the repository, else the hub's "
        "openai/gsm8k), humaneval, mtbench, sharegpt, jsonl, stdlib-code or hf:NAME[:CONFIG]"
    )
    collect.add_argument("--path", help="dataset file (default for gsm8k: ../shared/datasets/gsm8k/<split>.jsonl)")
    collect.add_argument("--split", default="train", help="dataset split for gsm8k and hf: (default: %(default)s)")
    collect.add_argument(
        "--prompt-field", default="prompt", help="prompt field for jsonl and hf: (default: %(default)s)"
    )
    collect.add_argument("--label-field", help="label field for jsonl and hf:")
    collect.add_argument(
        "--template",
        choices=["chat", "raw"],
        default="chat",
        help="chat: the model's chat template; raw: the dataset's plain-text template (default: %(default)s)",
    )
    collect.add_argument("--out", type=Path, required=True, help="output directory (created, or resumed)")
    common.add_decoding_args(collect, max_new_tokens=256)
    collect.add_argument("--limit", type=common.positive_int, help="use only the first N prompts")
    collect.add_argument("--max-prompt-chars", type=common.positive_int,
                         help="skip prompts longer than N characters (before --limit counts)")
    collect.add_argument(
        "--batch-size", type=common.positive_int, default=8, help="prompts decoded together (default: %(default)s)"
    )
    collect.add_argument("--seed", type=int, default=0, help="seed of guesses and augmentation (default: %(default)s)")
    collect.add_argument("--augment", action="store_true", help="also store states with random wrong tokens corrected")
    collect.add_argument(
        "--drop-degenerate", action="store_true", help="drop the entries of degenerate (repetitive) outputs"
    )
    collect.add_argument(
        "--engine",
        choices=["kv", "nokv"],
        default="kv",
        help="kv: batched with a KV cache; nokv: the original style, batch 1 without a cache (default: %(default)s)",
    )
    collect.add_argument(
        "--drafter", metavar="DIR",
        help="collect the states of exact drafted Jacobi with this drafter of --model (a `cllm train --lora "
        "--adapter-only` directory, or 'default'): the drafter's own iterates, to train it further on what it "
        "meets when it drafts; the fixed points stay the model's greedy output",
    )
    collect.add_argument("--shard-index", type=int, help="this process's share of the prompts (default: $RANK or 0)")
    collect.add_argument("--num-shards", type=common.positive_int, help="number of shares (default: $WORLD_SIZE or 1)")
    common.add_model_args(collect)


def add_data(commands) -> None:
    data = commands.add_parser("data", help="inspect collected trajectories")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=common.Parser)
    inspect = data_commands.add_parser(
        "inspect", help="counts, iteration statistics and a sample entry of a collection"
    )
    inspect.add_argument("directory", type=Path, help="a directory written by cllm collect")
    inspect.add_argument("--json", action="store_true", help="print the statistics as JSON")


def cmd_collect(args: argparse.Namespace) -> None:
    from cllm.data import SourceOptions, load_prompts
    from cllm.trajectories import CollectConfig, CollectionDir, check_collection, collect, process_shard, shard_prompts

    config = CollectConfig(
        model=args.model, dataset=args.dataset, dataset_path=args.path, template=args.template, dtype=args.dtype,
        block_size=args.block_size, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        limit=args.limit, init=args.init, seed=args.seed, augment=args.augment,
        drop_degenerate=args.drop_degenerate, engine=args.engine, max_prompt_chars=args.max_prompt_chars,
        drafter=args.drafter,
    )
    shard_index, num_shards = process_shard(args.shard_index, args.num_shards)
    options = SourceOptions(
        path=args.path, prompt_field=args.prompt_field, label_field=args.label_field, split=args.split,
        max_prompt_chars=args.max_prompt_chars,
    )
    records = load_prompts(args.dataset, options, limit=args.limit)
    total = len(shard_prompts(len(records), shard_index, num_shards))
    check_collection(args.out, config)
    loaded = common.load(args)
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
    for key in (
        "entries",
        "prompts",
        "shards",
        "mean_iterations_per_block",
        "degenerate_entries",
        "degenerate_prompts",
    ):
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
        histogram.add_row(
            f"{gained}" + ("+" if gained == 16 else ""), str(count), "#" * max(1, round(40 * count / peak))
        )
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
