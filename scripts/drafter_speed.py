"""Drafters side by side on the default model, in one bench (cllm.bench: decoders and drafters
interleaved prompt by prompt, after a warm-up): AR, exact drafted Jacobi with each drafter and the
target's own jacobi:N:lookup, float32 with oneDNN linear layers, batch 1, 2 threads, on the demo's
3 prompts and on 5 GSM8K test questions. Each drafter is one bench model over the same loaded
target, so each has its own AR row; speedups are against it, run by run.

    python scripts/drafter_speed.py --drafter default --drafter runs/drafter/g1/cllm [--block-sizes 3,4] [--sets demo]
"""

from __future__ import annotations

import argparse

import torch

from cllm.bench import BenchModel, run_benchmark, summarize
from cllm.cli.common import encode_all
from cllm.data import SourceOptions, load_prompts
from cllm.decoding.spec import DecoderSpec
from cllm.drafters import load_drafter
from cllm.models import ModelConfig, load_model
from cllm.prompts import DEMO_PROMPTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafter", action="append", default=[])
    parser.add_argument("--block-sizes", default="4", help="comma-separated n of the drafted and jacobi rows")
    parser.add_argument("--sets", default="demo,gsm8k", help="demo (its 3 prompts), gsm8k (5 test questions)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    loaded = load_model(ModelConfig(dtype="float32", device="cpu", onednn=True))
    drafters = {path: load_drafter(path, loaded) for path in args.drafter}
    sizes = [int(n) for n in args.block_sizes.split(",")]
    specs = [DecoderSpec.parse("ar")] + [DecoderSpec.parse(f"{kind}:{n}:lookup") for n in sizes
                                         for kind in ("drafted", "jacobi")]
    sets = {"demo": lambda: DEMO_PROMPTS,
            "gsm8k": lambda: [record.text for record in load_prompts("gsm8k", SourceOptions(split="test"), limit=5)]}
    print("| prompts | drafter | decoder | median tok/s | speedup vs ar | tokens/forward | identical to ar |")
    print("|---|---|---|---|---|---|---|")
    for name in args.sets.split(","):
        prompts = encode_all(loaded, sets[name](), False, args.max_new_tokens)
        models = [BenchModel(path, loaded, prompts) for path in drafters]
        for model in models:
            model.drafter = drafters[model.name]
        records = run_benchmark(models, specs, args.max_new_tokens, repeats=args.repeats)
        for s in summarize(records):
            print(f"| {name} | {s.model} | {s.decoder} | {s.median_tokens_per_second:.1f} | {s.speedup_vs_ar:.2f}x | "
                  f"{s.tokens_per_forward:.3f} | {s.agreement_with_ar:.0%} |", flush=True)


if __name__ == "__main__":
    main()
