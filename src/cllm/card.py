"""What a directory `cllm train` wrote is, for the rest of the ecosystem: a model card (README.md
in the Hugging Face format) and, for a full model, a `cllm` entry in its config.json. A CLLM is
a lossy fine-tune of its target, a drafter an adapter that only proposes tokens; both say which
target, which block sizes and which objective made them, and how to measure their fidelity."""

from __future__ import annotations

import json
from pathlib import Path

from cllm.files import write_atomically
from cllm.train_config import TrainConfig

DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the GGUF cllm embeds is a quantization of it


def describe(config: TrainConfig, collections: list[dict], steps: int) -> dict:
    """The card's facts: `collections` are the manifests of the trajectory collections trained on."""
    kind = "drafter-gated" if config.gated else "drafter" if config.adapter_only else "cllm"
    return {
        "kind": kind,
        "target": DEFAULT_MODEL_HUB_ID if config.model == "default" else config.model,
        "block_sizes": sorted({c["config"]["block_size"] for c in collections}),
        "datasets": sorted({c["config"]["dataset"] for c in collections}),
        "objective": {"loss": config.loss_type, "distance": config.distance, "ar_weight": config.ar_weight,
                      "teacher": config.teacher, "distill_weight": config.distill_weight},
        "lora_rank": config.lora_rank if config.lora else None,
        "steps": steps,
    }


def recorded_facts(directory: Path) -> dict | None:
    """The facts a CLLM's config.json carries (`cllm train` wrote them), or None for any other model."""
    try:
        facts = json.loads((directory / "config.json").read_text()).get("cllm")
    except (OSError, ValueError, AttributeError):
        return None
    return facts if isinstance(facts, dict) and facts.get("kind") == "cllm" else None


def record(directory: Path, **more) -> bool:
    """Add facts measured later (the recipe that made it, its fidelity) to a CLLM's config.json and
    model card; False, writing nothing, where `directory` is not a CLLM that `cllm train` wrote."""
    facts = recorded_facts(directory)
    if facts is None:
        return False
    if facts | more != facts:  # a rerun that measures nothing new leaves the files as they are
        write_card(directory, facts | more)
    return True


def fidelity_facts(report: dict) -> dict:
    """The headline of a `cllm eval fidelity` report, as the card keeps it."""
    keep = ("prompts", "same_top1", "kl_mean", "identical")
    return {"target": report["target"], "dtype": report["dtype"], "command": report["command"],
            "domains": {name: {key: row.get(key) for key in keep} for name, row in report["domains"].items()}}


def write_card(out: Path, facts: dict) -> None:
    """README.md in `out`; a full model's config.json also gets the facts under `cllm`."""
    config_path = out / "config.json"
    if facts["kind"] == "cllm" and config_path.is_file():
        config = json.loads(config_path.read_text())
        write_atomically(config_path, json.dumps(config | {"cllm": facts}, indent=2) + "\n")
    write_atomically(out / "README.md", _card(facts))
    # A drafter's file must name its own directory: transformers runs a copy from its module cache.
    drafter = None if facts["kind"] == "cllm" else str(out.resolve())
    (out / "custom_generate").mkdir(exist_ok=True)
    write_atomically(out / "custom_generate" / "generate.py",
                     GENERATE_PY.replace("BLOCK_SIZE_HERE", str(max(facts["block_sizes"])))
                     .replace("DRAFTER_HERE", repr(drafter)))
    write_atomically(out / "custom_generate" / "requirements.txt", "cllm\n")


# `model.generate(custom_generate=DIR, trust_remote_code=True)` runs this file from the saved
# directory: a CLLM's own Jacobi decoding, or for a drafter its target's exact drafted Jacobi
# decoding, at the block size trained for, through cllm's own decoders.
GENERATE_PY = '''"""Jacobi decoding for transformers' `generate(custom_generate=DIR, trust_remote_code=True)`,
written by `cllm train` (pip install cllm): on a CLLM, its own Jacobi decoding; with a drafter
(DRAFTER, or `drafter=` where the directory has moved), the target's exact drafted Jacobi decoding,
the target verifying every token. Either way the output is the model's own greedy one."""

from pathlib import Path

import torch

BLOCK_SIZE = BLOCK_SIZE_HERE
DRAFTER = DRAFTER_HERE  # the drafter adapter's directory as `cllm train` wrote it; None for a CLLM


def generate(model, inputs=None, input_ids=None, attention_mask=None, generation_config=None, max_new_tokens=None,
             block_size=BLOCK_SIZE, init="lookup", drafter=DRAFTER, **kwargs):
    """Like greedy `generate`: (batch, prompt + new) token ids, padded after EOS; `block_size` and
    `init` (prompt, repeat, pad, lookup) choose the Jacobi decoder, `drafter` an adapter directory."""
    from cllm.decoding import decode

    draft = None
    if drafter is not None:
        from cllm.drafters import adapter_drafter

        draft = adapter_drafter(Path(drafter), model)
    ids = inputs if inputs is not None else input_ids
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    config = generation_config or model.generation_config
    new = max_new_tokens or config.max_new_tokens or 128
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    prompts = [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]
    kind = "jacobi" if draft is None else "drafted"
    output = decode(model, f"{kind}:{block_size}:{init}", prompts, max_new_tokens=new,
                    eos_token_id=config.eos_token_id, pad_token_id=pad, draft_model=draft)
    width = max(len(tokens) for tokens in output.token_ids)
    rows = [tokens + [pad] * (width - len(tokens)) for tokens in output.token_ids]
    return torch.cat([ids, torch.tensor(rows, dtype=ids.dtype, device=ids.device)], dim=1)
'''


def _card(facts: dict) -> str:
    drafter = facts["kind"] != "cllm"
    blocks = "/".join(map(str, facts["block_sizes"]))
    target = "default" if facts["target"] == DEFAULT_MODEL_HUB_ID else facts["target"]  # cllm's name for it
    use = (f"cllm generate PROMPT --model {target} --drafter THIS_DIR --decoder jacobi --block-size {blocks}"
           if drafter else f"cllm generate PROMPT --model THIS_DIR --decoder jacobi --block-size {blocks}")
    what = ("A drafter for exact drafted Jacobi decoding: the target verifies every token, so outputs are the "
            "target's own; this adapter only proposes the next guesses." if drafter else
            "A consistency LLM (CLLM): the target fine-tuned to jump to the Jacobi fixed point, decoding several "
            "tokens per forward. It is a different model from its target (lossy): measure how closely it follows "
            f"it with `cllm eval fidelity --model THIS_DIR --target {target}`.")
    front = [
        "---",
        f"base_model: {facts['target']}",
        f"library_name: {'peft' if drafter else 'transformers'}",
        "tags: [cllm, consistency-llm, jacobi-decoding]",
        "---",
    ]
    rows = [f"| {key} | {json.dumps(value)} |" for key, value in facts.items() if key != "fidelity"]
    return "\n".join([*front, "", f"# {facts['kind']} of {facts['target']}", "", what, "", "```bash", use, "```", "",
                      *_fidelity_lines(facts.get("fidelity")),
                      "Made by `cllm train` (https://arxiv.org/abs/2403.00835):", "", "| | |", "|---|---|",
                      *rows, ""])


def _fidelity_lines(fidelity: dict | None) -> list[str]:
    if fidelity is None:
        return []
    lines = [f"Fidelity to {fidelity['target']} ({fidelity['dtype']}), measured by `{fidelity['command']}`:", "",
             "| prompts | n | same top-1 token | KL mean | identical outputs |", "|---|---|---|---|---|"]
    for name, row in fidelity["domains"].items():
        cells = [format(row[key], form) if row.get(key) is not None else "-"
                 for key, form in (("same_top1", ".1%"), ("kl_mean", ".4f"), ("identical", ".0%"))]
        lines.append(f"| {name} | {row.get('prompts', '-')} | " + " | ".join(cells) + " |")
    return [*lines, ""]
