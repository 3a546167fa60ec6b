"""Drafters side by side on the default model: AR, exact drafted Jacobi with each drafter, and the
target's own jacobi:N:lookup, interleaved prompt by prompt in one process (float32, oneDNN, batch 1,
2 threads), twice over the demo's 3 prompts and 5 GSM8K test questions. Prints tok/s, the speedup
over AR measured in the same run, tokens per forward and how many outputs equal AR's.

    python scripts/drafter_speed.py --drafter default --drafter runs/drafter/g1/cllm [--block-size 4]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from cllm.cli.common import encode_all
from cllm.data import SourceOptions, load_prompts
from cllm.decoding import decode
from cllm.drafters import load_drafter
from cllm.models import ModelConfig, load_model
from cllm.prompts import DEMO_PROMPTS


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafter", action="append", default=[])
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    loaded = load_model(ModelConfig(dtype="float32", device="cpu", onednn=True))
    n = args.block_size
    rows = [("ar", "ar", None)] + [(path, f"drafted:{n}:lookup", load_drafter(path, loaded)) for path in args.drafter]
    rows.append((f"jacobi:{n}:lookup", f"jacobi:{n}:lookup", None))
    gsm8k = [record.text for record in load_prompts("gsm8k", SourceOptions(split="test"), limit=5)]
    for name, texts in {"demo": DEMO_PROMPTS, "gsm8k": gsm8k}.items():
        seconds, tokens, forwards, same = defaultdict(float), defaultdict(int), defaultdict(int), defaultdict(int)
        prompts = encode_all(loaded, texts, False, args.max_new_tokens)
        for _ in range(args.repeats):
            for prompt in prompts:
                reference = None
                for label, spec, drafter in rows:
                    start = time.perf_counter()
                    out = decode(loaded, spec, [prompt], max_new_tokens=args.max_new_tokens, draft_model=drafter)
                    seconds[label] += time.perf_counter() - start
                    tokens[label] += out.stats[0].new_tokens
                    forwards[label] += out.stats[0].forward_passes
                    reference = out.token_ids[0] if label == "ar" else reference
                    same[label] += out.token_ids[0] == reference
        ar_speed = tokens["ar"] / seconds["ar"]
        for label, spec, _ in rows:
            speed = tokens[label] / seconds[label]
            print(f"{name} | {label} ({spec}) | {speed:.1f} tok/s | {speed / ar_speed:.2f}x | "
                  f"{tokens[label] / forwards[label]:.3f} tokens/forward | "
                  f"identical {same[label]}/{args.repeats * len(prompts)}")


if __name__ == "__main__":
    main()
