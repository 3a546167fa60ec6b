"""Predicted Outputs on an edit-a-file request: the default model asked to rename a variable in a
small Python file, decoded with and without the file as the prediction (what an editor sends),
side by side in one run: identical text, tokens per forward, wall clock.

    python scripts/predicted_outputs.py [--dtype float32] [--threads 2] [--max-new-tokens 256]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cllm.decoding import decode
from cllm.models import ModelConfig, load_model

FILE = '''def summarize(items):
    total = 0
    count = 0
    for item in items:
        total += item.price * item.quantity
        count += item.quantity
    average = total / count if count else 0
    return {"total": total, "count": count, "average": average}


def report(items):
    summary = summarize(items)
    lines = [f"{name}: {value}" for name, value in summary.items()]
    return "\\n".join(lines)
'''
REQUEST = ("Rename the variable `total` to `grand_total` in this Python file. Reply with the whole file "
           "and nothing else.\n\n```python\n" + FILE + "```")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--decoders", default="jacobi:16,jacobi:16:lookup,lookahead:3:3:3",
                        help="beside ar, the baseline of the speedups (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(ModelConfig(name="default", dtype=args.dtype))
    prompt = loaded.encode_prompt(REQUEST)
    prediction = loaded.tokenizer("```python\n" + FILE + "```", add_special_tokens=False).input_ids
    decode(loaded, "ar", [prompt], max_new_tokens=8)  # warm-up
    rows, reference = [], None
    for spec in ["ar", *args.decoders.split(",")]:
        for predicted in (False,) if spec == "ar" else (False, True):
            start = time.perf_counter()
            out = decode(loaded, spec, [prompt], max_new_tokens=args.max_new_tokens,
                         predictions=[prediction] if predicted else None)
            seconds = time.perf_counter() - start
            tokens, stats = out.token_ids[0], out.stats[0]
            reference = reference if reference is not None else tokens
            rows.append({"decoder": spec, "prediction": predicted, "tokens": len(tokens),
                         "tokens_per_forward": round(stats.tokens_per_forward, 3),
                         "tokens_per_second": round(len(tokens) / seconds, 1), "identical_to_ar": tokens == reference})
    ar_speed = rows[0]["tokens_per_second"]
    print("| decoder | prediction | identical to AR | tokens | tokens/forward | tokens/s | speedup |")
    print("|---|---|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['decoder']} | {'file' if row['prediction'] else 'none'} | {row['identical_to_ar']} | "
              f"{row['tokens']} | {row['tokens_per_forward']} | {row['tokens_per_second']} | "
              f"{row['tokens_per_second'] / ar_speed:.2f}x |")
    print(json.dumps({"dtype": args.dtype, "threads": args.threads, "answer": loaded.tokenizer.decode(reference)}))


if __name__ == "__main__":
    main()
