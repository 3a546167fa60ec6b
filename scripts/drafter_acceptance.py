"""Tokens per forward of exact drafted Jacobi with several drafters, beside the target's own AR and
Jacobi, on the first prompts of GSM8K test, HumanEval and MT-bench (batch 1). Acceptance only: no
timing (the bench does that), so it may run beside other work.

    python scripts/drafter_acceptance.py --drafter runs/drafter/d1/adapter --drafter runs/fidelity/f4/cllm
"""

from __future__ import annotations

import argparse
import json

import torch

from cllm.data import SourceOptions, load_prompts
from cllm.decoding import decode
from cllm.drafters import load_drafter
from cllm.models import LoadedModel, ModelConfig, load_model


def _tokens_per_forward(loaded: LoadedModel, spec: str, prompts: list[list[int]], max_new_tokens: int,
                        drafter=None) -> tuple[float, list[list[int]]]:
    outputs, tokens, forwards = [], 0, 0
    for prompt in prompts:
        out = decode(loaded, spec, [prompt], max_new_tokens=max_new_tokens, draft_model=drafter)
        outputs.append(out.token_ids[0])
        tokens += out.stats[0].new_tokens
        forwards += out.stats[0].forward_passes
    return tokens / forwards, outputs


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--drafter", action="append", default=[])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--datasets", default="gsm8k,humaneval,mtbench")
    args = parser.parse_args()
    loaded = load_model(ModelConfig(dtype=args.dtype))
    drafters = {path: load_drafter(path, loaded) for path in args.drafter}
    drafters = {path: getattr(d, "model", d) if isinstance(d, LoadedModel) else d for path, d in drafters.items()}
    for dataset in args.datasets.split(","):
        options = SourceOptions(split="test") if dataset == "gsm8k" else SourceOptions()
        records = load_prompts(dataset, options, limit=args.limit)
        prompts = [loaded.encode_prompt(r.formatted("chat")) for r in records]  # as cllm bench encodes them
        _, reference = _tokens_per_forward(loaded, "ar", prompts, args.max_new_tokens)
        row = {"dataset": dataset, "prompts": len(prompts), "dtype": args.dtype}
        rate, outputs = _tokens_per_forward(loaded, "jacobi:16:lookup", prompts, args.max_new_tokens)
        row["target jacobi:16:lookup"] = (round(rate, 3), sum(a == b for a, b in zip(outputs, reference)))
        for path, drafter in drafters.items():
            rate, outputs = _tokens_per_forward(loaded, "drafted:16:lookup", prompts, args.max_new_tokens, drafter)
            row[f"drafted:16:lookup {path}"] = (round(rate, 3), sum(a == b for a, b in zip(outputs, reference)))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
