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
from cllm.cli.eval import run_bench
from cllm.distill import command_line
from cllm.errors import CllmError
from cllm.paths import quick_cllm


def add_distill(commands) -> None:
    distill = commands.add_parser(
        "distill",
        help="collect -> train -> bench -> eval from a recipe, each stage resumable",
        description="Runs the stages of a recipe (see recipes/smollm2-gsm8k.yaml): trajectories of the target, "
        "consistency training, a target-vs-CLLM speed benchmark and quality evaluations. A stage whose output "
        "is complete is skipped; an interrupted one resumes. Ends with OUT/report.md and OUT/report.json.",
    )
    distill.add_argument("recipe", type=Path, help="a YAML recipe")


def add_demo(commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="a few prompts decoded with AR and Jacobi, then a small speed table (target vs CLLM when there is one)",
        description="The main job on the default model: shows that Jacobi decoding returns exactly the AR "
        "text, then times hf, ar and jacobi side by side. When the quick CLLM exists ($CLLM_HOME/quick/cllm, "
        "made by `cllm distill recipes/quick.yaml`), or --cllm names one, the target and the "
        "CLLM are compared instead: tokens/forward, speedup over the target's AR, and fidelity to the target.",
    )
    common.add_decoding_args(demo, max_new_tokens=64)
    demo.add_argument(
        "--cllm", help="a CLLM of --model to compare with it (default: $CLLM_HOME/quick/cllm if it exists)"
    )
    common.add_drafter_arg(demo, what="The speed table then also has")
    common.add_model_args(demo)


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


def cmd_demo(args: argparse.Namespace) -> None:
    import torch

    from cllm.bench import DecoderSpec, decode_once
    from cllm.prompts import DEMO_PROMPTS

    cllm = args.cllm or (
        str(quick_cllm()) if args.model == "default" and (quick_cllm() / "config.json").is_file() else None
    )
    if cllm is not None:
        return _demo_target_vs_cllm(args, cllm)
    loaded = common.load(args)
    encoded = common.encode_all(loaded, DEMO_PROMPTS, args.raw, args.max_new_tokens)
    jacobi_spec = DecoderSpec("jacobi", args.block_size, args.init)
    out = Console()
    for number, (text, ids) in enumerate(zip(DEMO_PROMPTS, encoded), start=1):
        ar_output, ar_seconds = decode_once(loaded, DecoderSpec("ar"), ids, args.max_new_tokens)
        jacobi_output, jacobi_seconds = decode_once(loaded, jacobi_spec, ids, args.max_new_tokens)
        same = ar_output.token_ids == jacobi_output.token_ids
        stats = jacobi_output.stats[0]
        out.rule(f"prompt {number}")
        out.print(f"[bold]{text}[/bold]")
        ar_text = loaded.tokenizer.decode(ar_output.token_ids[0], skip_special_tokens=True)
        out.print(f"[cyan]AR[/cyan] ({ar_seconds:.1f} s): {ar_text}")
        out.print(
            f"[magenta]Jacobi n={args.block_size}[/magenta] ({jacobi_seconds:.1f} s, {stats.forward_passes} forwards "
            f"for {stats.new_tokens} tokens): identical to AR: {'[green]yes[/green]' if same else '[red]NO[/red]'}"
        )
    out.rule("speed (batch size 1, same prompts, one process)")
    specs = [DecoderSpec("hf"), DecoderSpec("ar"), jacobi_spec]
    if args.drafter:
        specs.append(DecoderSpec("drafted", args.block_size, "lookup"))
    run_bench([("", loaded)], args, DEMO_PROMPTS, specs, out_dir=None)
    out.print(
        f"[dim]{torch.get_num_threads()} CPU threads; vanilla Jacobi gains little before consistency training.[/dim]"
    )
    if args.model == "default":
        out.print("No CLLM yet: `cllm distill recipes/quick.yaml` makes one of the default model "
                  f"(into {quick_cllm()}); `cllm demo` then compares it with the target.", highlight=False)


def _demo_target_vs_cllm(args: argparse.Namespace, cllm: str) -> None:
    """Target vs CLLM on the demo prompts: speed and fidelity side by side."""
    from cllm.bench import DecoderSpec
    from cllm.fidelity import check_same_tokenizer
    from cllm.prompts import DEMO_PROMPTS

    target = common.load(args)
    model = common.load_named(args, cllm)
    check_same_tokenizer(model, target)
    out = Console()
    out.rule(f"target ({args.model}) vs CLLM ({cllm}), {len(DEMO_PROMPTS)} prompts, batch size 1, one process")
    specs = [
        DecoderSpec("ar"),
        DecoderSpec("jacobi", args.block_size),
        DecoderSpec("jacobi", args.block_size, "lookup"),
    ] + ([DecoderSpec("drafted", args.block_size, "lookup")] if args.drafter else [])
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
