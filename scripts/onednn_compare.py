"""torch's linear against oneDNN's (--onednn) on the default model in float32, side by side in one
bench: the model loaded twice, once with each, every decoder of `cllm demo` on the same prompts,
decoders and models interleaved prompt by prompt. Prints each model's summary and whether every
output equals the other model's for the same decoder and its own AR.

    python scripts/onednn_compare.py [--prompts demo|builtin|gsm8k] [--max-new-tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch

from cllm.bench import BenchModel, run_benchmark, summarize
from cllm.cli.common import encode_all
from cllm.decoding.spec import DecoderSpec
from cllm.drafters import load_drafter
from cllm.models import ModelConfig, load_model
from cllm.prompts import BUILTIN_PROMPTS, DEMO_PROMPTS

DECODERS = ["ar", "drafted:4:lookup", "lookahead:3:3:3", "hf-pld:10", "jacobi:4:lookup"]


def prompt_texts(which: str) -> list[str]:
    if which == "gsm8k":
        from cllm.data import SourceOptions, load_prompts

        return [q.text for q in load_prompts("gsm8k", SourceOptions(split="test"), limit=5)]
    return DEMO_PROMPTS if which == "demo" else BUILTIN_PROMPTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", choices=["demo", "builtin", "gsm8k"], default="demo")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts = prompt_texts(args.prompts)
    models = []
    for onednn in (False, True):
        loaded = load_model(ModelConfig(dtype="float32", device="cpu", onednn=onednn))
        prompts = encode_all(loaded, texts, False, args.max_new_tokens)
        bench = BenchModel("onednn" if onednn else "torch", loaded, prompts)
        bench.drafter = load_drafter("default", loaded)
        models.append(bench)
    records = run_benchmark(models, [DecoderSpec.parse(d) for d in DECODERS], args.max_new_tokens)
    tokens = {(r.model, r.decoder, r.prompt_index): r.token_ids for r in records}
    print(f"{len(texts)} prompts ({args.prompts}), {args.max_new_tokens} new tokens, float32, {args.threads} threads")
    print("| linear | decoder | median tok/s | speedup vs its own ar | vs torch's ar | tokens/forward |")
    print("|---|---|---|---|---|---|")
    for s in summarize(records):
        print(f"| {s.model} | {s.decoder} | {s.median_tokens_per_second:.1f} | {s.speedup_vs_ar:.2f}x | "
              f"{s.speedup_vs_reference_ar:.2f}x | {s.tokens_per_forward:.3f} |")
    same_kernel = all(ids == tokens[(model, "ar", index)] for (model, _, index), ids in tokens.items())
    across = all(ids == tokens[("torch", decoder, index)] for (_, decoder, index), ids in tokens.items())
    print(f"every output == its own model's AR: {same_kernel}; == torch's linear, same decoder: {across}")


if __name__ == "__main__":
    main()
