"""`cllm eval` and `cllm bench`: quality and speed."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cllm.cli import common
from cllm.cli.common import SINGLE_MODEL_DECODERS, stderr
from cllm.errors import CllmError
from cllm.files import write_atomically


def add_bench(commands) -> None:
    bench = commands.add_parser(
        "bench",
        help="time hf, ar and jacobi side by side on the same prompts, for one or several models",
        description="Runs every decoder of every --model on every prompt (batch size 1) in one process after "
        "a warm-up, then reports median tokens/s, speedup vs the model's own ar and vs the first model's ar "
        "(the target), tokens per forward, fast-forward and stationary counts, agreement with ar and "
        "degenerate outputs. Writes bench.json, bench.md and bench.png (speedup and tokens/forward vs "
        "block size) to --out.",
    )
    common.add_prompt_source_args(bench)
    bench.add_argument(
        "--decoders", default="hf,ar,jacobi:8,jacobi:16,jacobi:32",
        help="comma-separated: hf, ar, jacobi:N, jacobi:N:INIT with INIT one of --init's, jacobi:N:INIT:G "
        "(G n-gram candidates verified alongside the block), drafted:N[:INIT[:G]] (Jacobi whose guesses --drafter "
        "drafts and the first --model verifies: its exact output; that model's rows only), lookahead:W:N:G "
        "(window, n-gram size, candidates; plain lookahead = 5:4:5), hf-pld[:K] (transformers' prompt lookup, "
        "K tokens, default 10), hf-assisted (transformers' assisted generation, with --draft-model), llamacpp "
        "(llama.cpp on the GGUF file of a GGUF model, greedy: a reference; needs pip install 'cllm[llamacpp]') "
        "(default: %(default)s)",
    )
    bench.add_argument("--draft-model", help="hf-assisted: the draft model (same tokenizer as every --model)")
    common.add_drafter_arg(bench, what="Drafted rows (drafted:N[:INIT[:G]]) of the first --model are")
    bench.add_argument(
        "--max-new-tokens",
        type=common.positive_int,
        default=128,
        help="tokens per prompt at most (default: %(default)s)",
    )
    bench.add_argument("--limit", type=common.positive_int, help="use only the first N prompts")
    bench.add_argument(
        "--repeats",
        type=common.positive_int,
        default=1,
        help="timed runs per prompt and decoder (default: %(default)s)",
    )
    bench.add_argument("--out", type=Path, default=Path("runs/bench"), help="report directory (default: %(default)s)")
    common.add_sampling_args(bench)
    common.add_model_args(bench, several=True, engine_options=True)


def add_eval(commands) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="quality: gsm8k accuracy, humaneval pass@1, perplexity, mtbench answers, fidelity to a target",
        description="gsm8k: accuracy on a GSM8K split (final number extracted, see docs/results-history.md). "
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
    evaluate.add_argument("--limit", type=common.positive_int, help="evaluate the first N items only")
    evaluate.add_argument("--split", default="test", help="GSM8K split (default: %(default)s)")
    evaluate.add_argument("--path", help="GSM8K JSONL file instead of ../shared/datasets/gsm8k/<split>.jsonl")
    evaluate.add_argument("--decoder", choices=SINGLE_MODEL_DECODERS, default="jacobi",
                          help="decoder; greedy, the score does not depend on it, nor does it when sampling with "
                          "the same --seed (hf aside) (default: %(default)s)")
    common.add_decoding_args(evaluate, max_new_tokens=256)
    common.add_sampling_args(evaluate)
    evaluate.add_argument(
        "--batch-size", type=common.positive_int, default=1, help="prompts decoded together (default: %(default)s)"
    )
    evaluate.add_argument(
        "--timeout",
        type=common.positive_float,
        default=10.0,
        help="humaneval: seconds per program (default: %(default)s)",
    )
    evaluate.add_argument(
        "--unsafe-exec",
        action="store_true",
        help="humaneval: where the kernel refuses the sandbox's namespaces, run generated code anyway "
        "with only resource limits and Python-level guards (not a security boundary)",
    )
    evaluate.add_argument("--text", type=Path, help="perplexity: a UTF-8 text file (scored as one text)")
    evaluate.add_argument(
        "--ppl-window",
        type=common.positive_int,
        default=512,
        help="perplexity: tokens per window (default: %(default)s)",
    )
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
    common.add_drafter_arg(evaluate)
    common.add_model_args(evaluate, engine_options=True)


def run_bench(models: Sequence[tuple[str, object]], args, prompt_texts: Sequence[str], specs, out_dir: Path | None,
           repeats: int = 1, sampling=None, seed: int = 0, drafter=None) -> list:
    """`sampling` None: greedy (the demo); prompt i samples with seed + i. `drafter`: the first
    model's, already loaded (else from --drafter)."""
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

    bench_models = [BenchModel(name, loaded, common.encode_all(loaded, prompt_texts, args.raw, args.max_new_tokens))
                    for name, loaded in models]
    bench_models[0].drafter = drafter or common.load_drafter(args, models[0][1])
    if any(spec.kind == "llamacpp" for spec in specs):
        _attach_llamacpp(bench_models, args, sampling)
    draft = None
    if getattr(args, "draft_model", None):
        from cllm.fidelity import check_same_tokenizer

        draft = common.load_named(args, args.draft_model)
        check_same_tokenizer(draft, models[0][1])
    with common.progress() as progress:
        task = progress.add_task("benchmarking", total=len(prompt_texts) * len(specs) * len(models) * repeats)
        records = run_benchmark(bench_models, specs, args.max_new_tokens, repeats=repeats,
                                on_step=lambda what, done: progress.update(task, description=what, completed=done),
                                draft=draft,
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
        "onednn": getattr(args, "onednn", False),
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
               "identical to ar", "degenerate"] + (["same top-1 as target", "KL to target"] if several else [])
    # The decoder's name is the row's key: it is never cut, the headers wrap instead.
    table.add_column(columns[0], no_wrap=True, min_width=max(len(s.name) for s in summaries))
    for column in columns[1:]:
        table.add_column(column, justify="right", overflow="fold")
    for s in summaries:
        speedup = s.speedup_vs_reference_ar if several else s.speedup_vs_ar
        row = [
            s.name,
            f"{s.median_tokens_per_second:.1f}",
            f"{speedup:.2f}x",
            f"{s.tokens_per_forward:.3f}",
            f"{s.agreement_with_ar:.0%}",
            f"{s.degenerate_runs}/{s.runs}" if s.degenerate_runs == 0 else f"[red]{s.degenerate_runs}/{s.runs}[/red]",
        ]
        if several:
            row += ["-" if s.same_top1_vs_target is None else f"{s.same_top1_vs_target:.1%}",
                    "-" if s.kl_vs_target is None else f"{s.kl_vs_target:.3f}"]
        table.add_row(*row)
    return table


def cmd_bench(args: argparse.Namespace) -> None:
    from cllm.decoding.spec import DecoderSpec

    specs = [DecoderSpec.parse(part.strip()) for part in args.decoders.split(",") if part.strip()]
    if not specs:
        raise CllmError("--decoders lists no decoder")
    if any(s.kind == "hf-assisted" for s in specs) != bool(args.draft_model):
        raise CllmError("--draft-model goes with hf-assisted and only then")
    if any(s.kind == "drafted" for s in specs) != bool(args.drafter):
        raise CllmError("--drafter goes with drafted:N[:INIT[:G]] rows and only then")
    prompts = common.bench_prompts(args)
    names = args.model or ["default"]
    if len(set(names)) != len(names):
        raise CllmError("the same --model is given twice")
    models = []
    for name, label in zip(names, common.short_names(names)):
        args.model = name
        models.append((label, common.load(args)))
    args.model = names
    run_bench(
        models, args, prompts, specs, args.out, repeats=args.repeats, sampling=common.sampling(args), seed=args.seed
    )


def run_eval(args: argparse.Namespace) -> dict:
    """Runs one `cllm eval` task and writes its report; returns the report without the items."""
    from cllm import evaluation

    settings = evaluation.DecodeSettings(
        decoder=args.decoder, block_size=args.block_size, init=args.init, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, template="raw" if args.raw else "chat", window=args.window, ngram=args.ngram,
        candidates=args.candidates, draft=args.draft, sampling=common.sampling(args), seed=args.seed,
    )
    if args.drafter and args.task in ("fidelity", "perplexity"):
        raise CllmError(f"--drafter decodes exactly as the model does: it has no {args.task} of its own")
    common.spec(args, args.decoder)  # a bad flag combination fails before the model loads
    if args.task == "fidelity":
        return _run_fidelity(args, args.out, settings)
    task = evaluation.EvalTask(
        args.task, limit=args.limit, split=args.split, path=args.path, timeout=args.timeout,
        unsafe_exec=args.unsafe_exec, text=args.text, ppl_window=args.ppl_window,
        answers=args.answers or args.out.with_suffix(".answers.jsonl"), second_turn=args.second_turn,
        model_id=args.model_id or (Path(args.model).name if args.model != "default" else "SmolLM2-135M-Instruct"),
    )
    items = evaluation.task_items(task)
    loaded = common.load(args)
    settings = replace(settings, drafter=common.load_drafter(args, loaded))
    with common.progress() as progress:
        bar = progress.add_task(f"eval {args.task}", total=len(items))
        report = evaluation.run_task(loaded, task, items, settings, lambda count=1: progress.advance(bar, count))
    report["settings"] = {"model": args.model, "dtype": args.dtype, "template": settings.template} | (
        {} if args.task == "perplexity" else {"decoder": settings.spec.label, "drafter": args.drafter,
                                                "block_size": args.block_size, "init": args.init,
                                                "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                                                "sampling": settings.sampling.describe(), "seed": args.seed})
    report["command"] = args.command_line
    common.write_json(args.out, report)
    return {k: v for k, v in report.items() if k != "items"}


def _run_fidelity(args: argparse.Namespace, out: Path, settings) -> dict:
    from cllm.data import SourceOptions, load_prompts
    from cllm.fidelity import FidelitySettings, TargetOutputs, evaluate_fidelity, markdown_table

    if not args.target:
        raise CllmError("eval fidelity needs --target: the model the CLLM was made from")
    names = [name.strip() for name in args.dataset.split(",") if name.strip()]
    if not names or len(set(names)) != len(names):
        raise CllmError(f"--dataset must name distinct prompt sources, got {args.dataset!r}")
    limit = args.limit or 20
    domains = {
        name: load_prompts(
            name, SourceOptions(path=args.path if name == "gsm8k" else None, split=args.split), limit=limit
        )
        for name in names
    }
    model = common.load(args)
    target = common.load_named(args, args.target, quantize=None)  # the reference stays the original model
    cache = TargetOutputs(args.target_outputs or out.parent / "fidelity-target-outputs.json")
    total = sum(map(len, domains.values())) * (2 if args.free_running else 1)
    with common.progress() as progress:
        task = progress.add_task("eval fidelity", total=total)
        start = time.perf_counter()
        report = evaluate_fidelity(model, target, domains, FidelitySettings(settings, args.free_running), cache,
                                   in_domain=names[0], on_batch=lambda count: progress.advance(task, count))
    report |= {"task": "fidelity", "model": args.model, "target": args.target, "dtype": args.dtype,
               "seconds": round(time.perf_counter() - start, 2), "command": args.command_line}
    common.write_json(out, report)
    write_atomically(out.with_suffix(".md"), f"`{args.command_line}`\n\n" + markdown_table(report) + "\n")
    print(markdown_table(report), file=sys.stderr)
    _record_fidelity(Path(args.model), report)
    return report


def _record_fidelity(model: Path, report: dict) -> None:
    """A CLLM that `cllm train` wrote keeps its measured fidelity in its config.json and model card."""
    from cllm.card import fidelity_facts, record

    try:
        if record(model, fidelity=fidelity_facts(report)):
            stderr.print(f"recorded in {model / 'config.json'} and {model / 'README.md'}", highlight=False)
    except CllmError as exc:  # a read-only model directory: the report itself is written
        stderr.print(f"[yellow]could not record the fidelity in {model}: {exc}[/yellow]")


def cmd_eval(args: argparse.Namespace) -> None:
    summary = run_eval(args)
    if args.task == "fidelity":
        print(json.dumps(summary))
        return
    headline = {
        "gsm8k": ("accuracy", "correct"),
        "humaneval": ("pass@1", "passed"),
        "perplexity": ("perplexity", "tokens"),
        "mtbench": ("answers_file", "questions"),
    }[args.task]
    stderr.print(f"{args.task}: " + ", ".join(f"{key} = {summary[key]}" for key in headline) +
                 (f" (n = {summary['n']})" if "n" in summary else "") +
                 (f", tokens/forward {summary['decoding']['tokens_per_forward']}" if "decoding" in summary else ""),
                 highlight=False)
    print(json.dumps(summary))
