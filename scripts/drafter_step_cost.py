"""Per-step cost of drafted Jacobi on this machine: one forward of n columns after a cached context,
for the target alone (1 row), the target and a LoRA drafter as two rows of one forward (PairedKV),
the gated drafter's one row of 2n columns under a 4-D mask (GatedKV), and the target alone on 2n
columns (the floor a single-row design can reach). Eager, median of repeats. The adapter is fresh
(rank --rank): the cost does not depend on its weights.

    python scripts/drafter_step_cost.py [--dtype bfloat16] [--rank 16] [--targets down_proj,o_proj] [--sizes 4,8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

from cllm.decoding.drafting import GatedKV, PairedKV, TokenGate
from cllm.decoding.kv import DynamicKV
from cllm.drafters import ADAPTER_NAME, lora_targets, shared_copy
from cllm.models import ModelConfig, load_model


def _time(store_factory, context: int, columns: int, rows: int, repeats: int) -> float:
    """Median ms of a forward of `columns` after `context` cached tokens (the cache cropped back each time)."""
    store = store_factory()
    ids = torch.randint(100, 1000, (rows, context))
    store.forward(ids, torch.arange(context).expand(rows, -1), None, logits_to_keep=1)
    fed = torch.randint(100, 1000, (rows, columns))
    positions = (context + torch.arange(columns)).expand(rows, -1)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        store.forward(fed, positions, None)
        times.append((time.perf_counter() - start) * 1000)
        store.keep(0)
    return statistics.median(times)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--targets", default="", help="projections the adapter adapts (default: all)")
    parser.add_argument("--sizes", default="1,2,4,8,16", help="block sizes n")
    args = parser.parse_args()
    loaded = load_model(ModelConfig(dtype=args.dtype, threads=2))
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=lora_targets(loaded.model, args.targets))
    adapted = get_peft_model(shared_copy(loaded.model), config, adapter_name=ADAPTER_NAME).eval()
    gate = TokenGate(adapted, ADAPTER_NAME)
    rows = []
    for n in map(int, args.sizes.split(",")):
        alone = _time(lambda: DynamicKV(loaded.model), args.context, n, 1, args.repeats)
        paired = _time(lambda: PairedKV(DynamicKV(adapted), ADAPTER_NAME), args.context, n, 1, args.repeats)
        gated = _time(lambda: GatedKV(DynamicKV(adapted), gate), args.context, n, 1, args.repeats)
        wide = _time(lambda: DynamicKV(loaded.model), args.context, 2 * n, 1, args.repeats)
        rows.append({"n": n, "target_ms": round(alone, 1), "two_rows_ms": round(paired, 1),
                     "gated_one_row_ms": round(gated, 1), "target_2n_ms": round(wide, 1),
                     "gated_over_target": round(gated / alone, 2)})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
