"""Fidelity of a model to its target: does a CLLM still behave like the model it was made from?

Accuracy benchmarks cannot tell at the scale of the default model (it scores at their floor), so
this measures the behaviour itself, on the target's own greedy outputs l (decoded once and cached):

- teacher-forced on prompt + l: how often the model's top token equals the target's, and the
  per-token KL(target || model) (mean, p90, p99), at every position of l;
- free-running: the model's own greedy outputs against l (share identical, mean fraction of l
  before the first difference);
- perplexity of both on the dataset's reference texts (where it has them), as a ratio.

Greedy outputs are exact whatever the decoder (per dtype), so the default decoder is Jacobi with
the lookup guess, the fastest exact one here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cllm.data import PromptRecord
from cllm.errors import CllmError
from cllm.evaluation import DecodeSettings, generate_all, perplexity
from cllm.files import read_text, write_atomically
from cllm.losses import token_distance
from cllm.metrics import common_prefix
from cllm.models import LoadedModel


@dataclass(frozen=True)
class FidelitySettings:
    decode: DecodeSettings = DecodeSettings(decoder="jacobi", init="lookup", batch_size=4)
    free_running: bool = True  # also decode with the model (the slow part) and compare outputs


def check_same_tokenizer(model: LoadedModel, target: LoadedModel) -> None:
    """Token-level comparisons need one vocabulary: refuse models whose tokenizers differ."""
    if model.tokenizer.get_vocab() != target.tokenizer.get_vocab():
        raise CllmError(f"the model and the target have different tokenizers ({model.source} vs {target.source}): "
                        "fidelity compares token distributions and needs the same vocabulary")
    if model.model.get_output_embeddings().weight.shape[0] != target.model.get_output_embeddings().weight.shape[0]:
        raise CllmError("the model and the target have output layers of different vocabulary sizes")


@torch.inference_mode()
def teacher_forced_positions(
    model, target, sequences: Sequence[tuple[list[int], int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position (same top-1, KL(target || model)) over the tokens of each sequence from its
    `output_start` on, each predicted from the tokens before it."""
    same, kl = [], []
    for ids, start in sequences:
        predicted = len(ids) - start
        if predicted < 1 or start < 1:
            continue
        keep = predicted + 1  # columns start-1 .. len-1; the last predicts past the sequence
        x = torch.tensor([ids], device=model.device)
        model_logits = model(input_ids=x, logits_to_keep=keep).logits[0, :-1].float()
        target_logits = (
            target(input_ids=x.to(target.device), logits_to_keep=keep).logits[0, :-1].float().to(model_logits.device)
        )
        same.append((model_logits.argmax(-1) == target_logits.argmax(-1)).cpu())
        kl.append(token_distance(target_logits, model_logits, "forward_kl").clamp(min=0).cpu())
    if not same:
        return torch.zeros(0, dtype=torch.bool), torch.zeros(0)
    return torch.cat(same), torch.cat(kl)


def summarize_positions(same: torch.Tensor, kl: torch.Tensor) -> dict:
    if same.numel() == 0:
        return {"positions": 0, "same_top1": None, "kl_mean": None, "kl_p90": None, "kl_p99": None}
    quantiles = torch.quantile(kl.double(), torch.tensor([0.9, 0.99], dtype=torch.float64)).tolist()
    return {
        "positions": same.numel(),
        "same_top1": round(same.double().mean().item(), 5),
        "kl_mean": round(kl.double().mean().item(), 5),
        "kl_p90": round(quantiles[0], 5),
        "kl_p99": round(quantiles[1], 5),
    }


def compare_outputs(outputs: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> dict:
    """Share of outputs identical to the reference, and the mean fraction of the reference before
    the first difference."""
    if not outputs:
        return {"identical": None, "common_prefix_fraction": None}
    pairs = list(zip(outputs, references))
    return {
        "identical": round(sum(list(o) == list(r) for o, r in pairs) / len(pairs), 5),
        "common_prefix_fraction": round(sum(common_prefix(o, r) / max(1, len(r)) for o, r in pairs) / len(pairs), 5),
    }


class TargetOutputs:
    """The target's greedy outputs per prompt, cached in one JSON file: decoding them is the costly
    part and they do not change between the models compared against one target."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.data: dict = {}
        if path is not None and path.exists():
            # refused rather than overwritten: the path may name some other file by mistake
            try:
                self.data = json.loads(read_text(path, "--target-outputs"))
            except json.JSONDecodeError:
                raise CllmError(f"--target-outputs {path} is corrupt or not a cache of target outputs; "
                                "delete it to decode the target again") from None
            if not isinstance(self.data, dict):
                raise CllmError(f"--target-outputs {path} is not a cache of target outputs")

    @staticmethod
    def key(target: LoadedModel, settings: DecodeSettings) -> str:
        dtype = str(target.model.dtype).removeprefix("torch.")
        text = f"{target.source}|{dtype}|{settings.max_new_tokens}|{settings.template}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def get(self, target: LoadedModel, settings: DecodeSettings, records: Sequence[PromptRecord],
            on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
        cached = self.data.setdefault(self.key(target, settings), {})
        prompts = [r.formatted(settings.template) for r in records]
        keys = [hashlib.sha256(prompt.encode()).hexdigest()[:24] for prompt in prompts]  # the text, not the id
        missing = [(key, prompt) for key, prompt in dict(zip(keys, prompts)).items() if key not in cached]
        if missing:
            generations = generate_all(target, [prompt for _, prompt in missing], settings, on_batch)
            cached.update({key: g["token_ids"] for (key, _), g in zip(missing, generations)})
            self._save()
        if on_batch is not None:
            on_batch(len(records) - len(missing))
        return [cached[key] for key in keys]

    def _save(self) -> None:
        if self.path is None:
            return
        write_atomically(self.path, json.dumps(self.data))


def evaluate_fidelity(
    model: LoadedModel,
    target: LoadedModel,
    domains: dict[str, Sequence[PromptRecord]],
    settings: FidelitySettings = FidelitySettings(),
    cache: TargetOutputs | None = None,
    in_domain: str | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Fidelity of `model` to `target` per domain (dataset name -> prompts), plus the positions of
    every domain but `in_domain` pooled as `out_of_domain`."""
    check_same_tokenizer(model, target)
    cache = cache or TargetOutputs(None)
    decode = settings.decode
    report: dict = {"domains": {}, "in_domain": in_domain}
    pooled_same, pooled_kl = [], []
    for name, records in domains.items():
        references = cache.get(target, decode, records, on_batch)
        sequences = [
            (ids + output, len(ids))
            for ids, output in zip(
                (target.encode_prompt(r.formatted(decode.template), raw=decode.template == "raw") for r in records),
                references,
            )
        ]
        same, kl = teacher_forced_positions(model.model, target.model, sequences)
        result = {"prompts": len(records)} | summarize_positions(same, kl)
        if settings.free_running:
            generations = generate_all(model, [r.formatted(decode.template) for r in records], decode, on_batch)
            result |= compare_outputs([g["token_ids"] for g in generations], references)
            forwards = sum(g["stats"]["forward_passes"] for g in generations)
            result["model_tokens_per_forward"] = round(
                sum(g["stats"]["new_tokens"] for g in generations) / max(1, forwards), 4
            )
        result |= _perplexity_ratio(model, target, records)
        report["domains"][name] = result
        if name != in_domain:
            pooled_same.append(same)
            pooled_kl.append(kl)
    if in_domain is not None and pooled_same:
        report["out_of_domain"] = summarize_positions(torch.cat(pooled_same), torch.cat(pooled_kl))
    report["settings"] = asdict(settings)
    return report


def _perplexity_ratio(model: LoadedModel, target: LoadedModel, records: Sequence[PromptRecord]) -> dict:
    """Perplexity of both models on the records' reference texts (prompt + label), where they have labels."""
    texts = [f"{r.raw_text or r.text}\n{r.label}" for r in records if r.label]
    if not texts:
        return {"perplexity": None, "target_perplexity": None, "perplexity_ratio": None}
    mine, theirs = perplexity(model, texts)["perplexity"], perplexity(target, texts)["perplexity"]
    return {
        "perplexity": round(mine, 4),
        "target_perplexity": round(theirs, 4),
        "perplexity_ratio": round(mine / theirs, 4),
    }


def markdown_table(report: dict) -> str:
    lines = [
        "| domain | prompts | same top-1 | KL mean | KL p90 | KL p99 | identical outputs | common prefix "
        "| perplexity ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = list(report["domains"].items()) + (
        [("out of domain (pooled)", report["out_of_domain"])] if "out_of_domain" in report else []
    )
    for name, row in rows:
        def cell(key: str, form: str) -> str:
            value = row.get(key)
            return "-" if value is None else format(value, form)
        label = f"{name} (in domain)" if name == report.get("in_domain") else name
        lines.append(f"| {label} | {row.get('prompts', '-')} | {cell('same_top1', '.2%')} | {cell('kl_mean', '.4f')} "
                     f"| {cell('kl_p90', '.4f')} | {cell('kl_p99', '.4f')} | {cell('identical', '.0%')} "
                     f"| {cell('common_prefix_fraction', '.0%')} | {cell('perplexity_ratio', '.3f')} |")
    return "\n".join(lines)
