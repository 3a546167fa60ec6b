"""Exactness of every parallel decoder against AR on one device, per dtype: the real model, the
prompts of a JSONL file, greedy (batch 1 and batched) and sampled with seeds. Prints one JSON line
per (dtype, decoder): rows identical to AR's output / rows. Exits 1 when a float32 row differs
(exactness holds per dtype; bf16 and float16 may differ at near-ties: their rate is reported).

    python scripts/gpu_exactness.py PROMPTS.jsonl --device cuda [--dtypes float32,bfloat16] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from cllm.decoding import decode
from cllm.decoding.sampling import Sampling
from cllm.drafters import load_drafter
from cllm.models import ModelConfig, load_model

GREEDY_SPECS = ("jacobi:16", "jacobi:16:lookup", "jacobi:8:lookup:3", "drafted:4:lookup", "drafted:16",
                "lookahead:3:3:3", "lookahead:5:4:5")
SAMPLED_SPECS = ("jacobi:8", "drafted:4:lookup", "lookahead:3:3:3")
SAMPLED = Sampling(temperature=0.8, top_p=0.9)


def _decode(loaded, spec: str, prompts: list[list[int]], batch: int, tokens: int, sampling, drafter) -> list:
    outputs = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        out = decode(loaded, spec, chunk, max_new_tokens=tokens, sampling=sampling, seed=start,
                     draft_model=drafter if spec.startswith("drafted") else None)
        outputs += out.token_ids
    return outputs


def _report(dtype: str, spec: str, batch: int, sampled: bool, got: list, want: list) -> dict:
    same = sum(a == b for a, b in zip(got, want))
    record = {"dtype": dtype, "decoder": spec, "batch": batch, "sampled": sampled, "identical": same,
              "rows": len(want)}
    print(json.dumps(record), flush=True)
    return record


@torch.inference_mode()
def check(dtype: str, device: str, prompts: list[str], tokens: int, batch: int) -> list[dict]:
    loaded = load_model(ModelConfig(dtype=dtype, device=device))
    drafter = load_drafter("default", loaded)
    ids = [loaded.encode_prompt(text) for text in prompts]
    records = []
    for sampling, specs in ((Sampling(), GREEDY_SPECS), (SAMPLED, SAMPLED_SPECS)):
        reference = _decode(loaded, "ar", ids, 1, tokens, sampling, None)
        for spec in specs:
            for size in (1, batch):
                got = _decode(loaded, spec, ids, size, tokens, sampling, drafter)
                records.append(_report(dtype, spec, size, sampling.temperature > 0, got, reference))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompts")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--limit", type=int, default=20)
    args = parser.parse_args()
    with open(args.prompts) as handle:
        prompts = [json.loads(line)["prompt"] for line in handle if line.strip()][:args.limit]
    records = [r for dtype in args.dtypes.split(",") for r in check(dtype, args.device, prompts, args.tokens,
                                                                    args.batch)]
    exact = [r for r in records if r["dtype"] == "float32"]
    if any(r["identical"] != r["rows"] for r in exact):
        print("FAIL: a float32 decoder differs from AR", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
