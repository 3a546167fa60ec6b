"""`cllm distill` (a recipe's stages) and `cllm demo` (the main job)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from cllm.cli import common
from cllm.cli.common import stderr
from cllm.cli.eval import _summary_table, run_bench
from cllm.distill import command_line
from cllm.errors import CllmError
from cllm.paths import quick_cllm

# The demo's path: eager (no multi-minute compile on a fresh machine), in the dtype and block sizes
# measured fastest here (docs/results.md, summary): drafted Jacobi with the shipped drafter at n = 3
# (its step feeds 2n - 1 columns, and n = 4 accepted too little more to pay for two), the target's
# own Jacobi at n = 4.
DEMO_DTYPE = "float32"
DEMO_DRAFTED_BLOCK_SIZE = 3
DEMO_JACOBI_BLOCK_SIZE = 4


def add_distill(commands) -> None:
    distill = commands.add_parser(
        "distill",
        help="collect -> train -> bench -> eval from a recipe, each stage resumable",
        description="Runs the stages of a recipe: trajectories of the target, consistency training, a "
        "target-vs-CLLM speed benchmark and quality evaluations. A stage whose output is complete is skipped; an "
        "interrupted one resumes. Ends with OUT/report.md and OUT/report.json. Recipes ship with cllm (`--list`); "
        "copy one to change it.",
    )
    distill.add_argument("recipe", nargs="?", help="a YAML recipe file, or a shipped recipe's name (e.g. quick)")
    distill.add_argument("--list", action="store_true", help="list the shipped recipes and where they are")


def add_demo(commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="exact drafted decoding beside AR on a few prompts: identical text, tokens/forward, speedup",
        description="The main job on the default model: the target's AR beside exact drafted Jacobi (the target "
        "verifies every token, the drafter shipped with cllm proposes them), with lookahead and prompt lookup as "
        "the exact peers and plain Jacobi: the text each returns, whether it equals AR's, tokens per forward "
        "and speedup, measured side by side in this process. A lossy CLLM in $CLLM_HOME/quick/cllm (made by "
        "`cllm distill quick`), or --cllm, is then shown beside the target with its fidelity.",
    )
    common.add_decoding_args(demo, max_new_tokens=64, block_size=None,
                             block_size_help=f"block size n of the Jacobi rows (default: {DEMO_DRAFTED_BLOCK_SIZE} "
                             f"drafted, {DEMO_JACOBI_BLOCK_SIZE} the target's own)")
    demo.add_argument(
        "--cllm", help="a CLLM of --model to compare with it (default: $CLLM_HOME/quick/cllm if it exists)"
    )
    common.add_drafter_arg(demo, what="(default for the default model: 'default'.) The demo then shows")
    common.add_model_args(demo)
    common.add_onednn_arg(demo, default=None)
    demo.set_defaults(dtype=DEMO_DTYPE)


def cmd_distill(args: argparse.Namespace) -> None:
    from cllm.distill import SHIPPED, load_recipe, resolve_recipe, run_distill, shipped_recipes

    if args.list:
        for name, summary in shipped_recipes().items():
            print(f"{name:<20} {summary}")
        print(f"(in {SHIPPED}; accelerate configs for `cllm train` in {SHIPPED.parent / 'configs'})")
        return
    if args.recipe is None:
        raise CllmError("give a recipe (a YAML file or a shipped recipe's name), or --list")
    path = resolve_recipe(args.recipe)
    recipe = load_recipe(path)

    def run(argv: list[str]) -> None:
        # A fresh process per stage: decoding right after training in the same process measured
        # 19.5 AR tok/s against 25.8 in a new one (bf16), and slowed Jacobi more than AR.
        stderr.rule(f"cllm {' '.join(argv[:1])}")
        code = subprocess.run([sys.executable, "-m", "cllm.cli", *argv]).returncode
        if code != 0:
            raise CllmError(f"stage failed (exit status {code}): {command_line(argv)}")

    report = run_distill(recipe, run, lambda message: stderr.print(message, highlight=False), source=str(path))
    stderr.print(f"report: {Path(report['out']) / 'report.md'}")
    print(json.dumps(report))


def cmd_demo(args: argparse.Namespace) -> None:
    import torch

    from cllm.bench import BenchModel, run_benchmark, summarize
    from cllm.decoding.spec import DecoderSpec
    from cllm.prompts import DEMO_PROMPTS

    if args.drafter is None and args.model == "default":
        args.drafter = "default"
    loaded = common.load(args)
    drafter = common.load_drafter(args, loaded)
    drafted_n, jacobi_n = (args.block_size or DEMO_DRAFTED_BLOCK_SIZE), (args.block_size or DEMO_JACOBI_BLOCK_SIZE)
    exact = [DecoderSpec("drafted", drafted_n, "lookup")] if drafter is not None else []
    specs = [DecoderSpec("ar"), *exact, DecoderSpec.parse("lookahead:3:3:3"), DecoderSpec.parse("hf-pld:10"),
             DecoderSpec("jacobi", jacobi_n, "lookup")]
    bench_model = BenchModel("", loaded, common.encode_all(loaded, DEMO_PROMPTS, args.raw, args.max_new_tokens))
    bench_model.drafter = drafter
    out = Console()
    with common.progress() as progress:
        task = progress.add_task("demo", total=len(DEMO_PROMPTS) * len(specs))
        records = run_benchmark([bench_model], specs, args.max_new_tokens,
                                on_step=lambda what, done: progress.update(task, description=what, completed=done))
    for number, text in enumerate(DEMO_PROMPTS):
        runs = {r.decoder: r for r in records if r.prompt_index == number}
        reference = runs["ar"]
        out.rule(f"prompt {number + 1}")
        out.print(f"[bold]{text}[/bold]")
        out.print(f"[cyan]AR[/cyan]: {loaded.tokenizer.decode(reference.token_ids, skip_special_tokens=True)}")
        for spec in specs[1:]:
            run = runs[spec.label]
            same = "[green]identical to AR[/green]" if run.token_ids == reference.token_ids else "[red]differs[/red]"
            out.print(f"  {spec.label:<18} {same}, {run.new_tokens / run.forward_passes:.2f} tokens/forward, "
                      f"{reference.seconds / run.seconds:.2f}x AR's speed")
    kernels = ", oneDNN linear layers" if loaded.onednn else ""
    out.rule(f"speed: {len(DEMO_PROMPTS)} prompts, batch size 1, {args.dtype}{kernels}, eager, "
             f"{torch.get_num_threads()} CPU threads, one process")
    summaries = summarize(records)
    out.print(_summary_table(summaries))
    if all(s.agreement_with_ar in (None, 1) for s in summaries):
        out.print("[dim]Every row is exact: the target's own greedy output.[/dim]")
    else:
        out.print(f"[yellow]Some outputs differ from AR's: in {args.dtype} a forward of several columns rounds "
                  "differently from a one-token one, so near-ties can flip (each decoder is exact in float32, the "
                  "demo's default).[/yellow]")
    out.print("[dim]A drafter of your own model: copy the drafter-g2 recipe (`cllm distill --list` says where it "
              "is), set its `model:` to yours, and run `cllm distill COPY.yaml`.[/dim]")
    cllm = args.cllm or (
        str(quick_cllm()) if args.model == "default" and (quick_cllm() / "config.json").is_file() else None
    )
    if cllm is not None:
        _demo_target_vs_cllm(args, cllm, loaded)


def _demo_target_vs_cllm(args: argparse.Namespace, cllm: str, target) -> None:
    """Target vs a lossy CLLM on the demo prompts: speed and fidelity side by side."""
    from cllm.bench import DecoderSpec
    from cllm.fidelity import check_same_tokenizer
    from cllm.prompts import DEMO_PROMPTS

    model = common.load_named(args, cllm)
    check_same_tokenizer(model, target)
    out = Console()
    out.rule(f"target ({args.model}) vs CLLM ({cllm}), {len(DEMO_PROMPTS)} prompts, batch size 1, one process")
    specs = [
        DecoderSpec("ar"),
        DecoderSpec("jacobi", 16),
        DecoderSpec("jacobi", 16, "lookup"),  # the block size lossy CLLMs are trained for
    ]
    args.drafter = None  # drafted rows were shown above
    summaries = run_bench([("target", target), ("cllm", model)], args, DEMO_PROMPTS, specs, out_dir=None)
    fidelity = next(s for s in summaries if s.model == "cllm")
    out.print(
        "Fidelity of the CLLM, teacher-forced on the target's answers: "
        f"same top token {fidelity.same_top1_vs_target:.1%}, "
        f"KL {fidelity.kl_vs_target:.3f} nats/token; its greedy answer equals the target's on "
        f"{fidelity.identical_to_target:.0%} of the prompts. Jacobi's output is always the CLLM's own greedy "
        "output; `cllm eval fidelity` measures this on more prompts.",
        highlight=False,
    )
    for s in summaries:
        if s.degenerate_runs:
            out.print(f"[red]{s.model} {s.name}: {s.degenerate_runs} of {s.runs} outputs are repetition loops; "
                      "speed from repeating itself is not a speedup.[/red]")
