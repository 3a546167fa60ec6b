"""Per-step cost of drafted Jacobi on this machine: one forward of n columns after a cached context,
for the target alone (1 row), the target and its LoRA drafter as two rows of one forward (PairedKV),
and one row of 2n columns (what a gated single-row design would feed). Eager, median of repeats.

    python scripts/drafter_step_cost.py --drafter runs/drafter/d1/adapter [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from cllm.decoding.drafting import PairedKV
from cllm.decoding.kv import DynamicKV
from cllm.drafters import load_drafter
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
    parser.add_argument("--drafter", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    loaded = load_model(ModelConfig(dtype=args.dtype, threads=2))
    drafter = load_drafter(args.drafter, loaded)
    rows = []
    for n in (1, 4, 8, 16):
        alone = _time(lambda: DynamicKV(loaded.model), args.context, n, 1, args.repeats)
        paired = _time(lambda: PairedKV(DynamicKV(drafter.model), drafter.name), args.context, n, 1, args.repeats)
        wide = _time(lambda: DynamicKV(loaded.model), args.context, 2 * n, 1, args.repeats)
        rows.append({"n": n, "target_ms": round(alone, 1), "two_rows_ms": round(paired, 1),
                     "one_row_2n_ms": round(wide, 1), "two_rows_over_target": round(paired / alone, 2)})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
