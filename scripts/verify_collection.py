"""Check a collection against AR greedy decoding (batch 1, same dtype): teacher outputs and fixed points.

Usage: .venv/bin/python scripts/verify_collection.py DIR
"""

import json
import sys
from pathlib import Path

import torch

from cllm.decoding import ar
from cllm.models import ModelConfig, load_model
from cllm.trajectories import MANIFEST, read_entries

root = Path(sys.argv[1])
config = json.loads((root / MANIFEST).read_text())["config"]
loaded = load_model(ModelConfig(name=config["model"], dtype=config["dtype"]))
by_prompt: dict[str, list[dict]] = {}
for entry in read_entries(root).to_pylist():
    by_prompt.setdefault(entry["prompt_id"], []).append(entry)
teachers_equal = blocks_equal = blocks = 0
for entries in by_prompt.values():
    prompt = entries[0]["prompt_ids"]
    reference = ar(loaded.model, torch.tensor([prompt]), max_new_tokens=config["max_new_tokens"],
                   eos_token_id=loaded.eos_token_ids).token_ids[0]
    teachers_equal += reference == entries[0]["teacher_output_ids"]
    for entry in entries:
        offset = len(entry["prefix_ids"]) - len(prompt)
        blocks += 1
        blocks_equal += reference[offset : offset + len(entry["fixed_point"])] == entry["fixed_point"]
print(json.dumps({"prompts": len(by_prompt), "teacher_equal_to_ar": teachers_equal,
                  "blocks": blocks, "fixed_points_equal_to_ar": blocks_equal}))
