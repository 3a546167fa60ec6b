"""Loading a drafter for exact drafted decoding (`--drafter PATH`): a PEFT LoRA adapter directory
of the target (adapter_config.json + weights, what `cllm train --lora --adapter-only` writes) or a
full model directory (a CLLM of the target). Either must share the target's tokenizer.

An adapter drafts the way it was trained, which `cllm train` records in drafter.json: "rows" (its
own context, a second row of the forward: SharedAdapter) or "gated" (`--gated`: the block's columns
over the target's context, in the same row: GatedAdapter); an adapter without the file is "rows".
It is attached to a copy of the target's module tree that shares every base weight
with it (`shared_copy`), so the target itself is never changed (its other decoders stay plain
and as fast) and the drafter costs only the adapter's weights.
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

from transformers import PreTrainedModel

from cllm.decoding.drafting import GatedAdapter, SharedAdapter, gated_drafter
from cllm.errors import CllmError
from cllm.models import LoadedModel

ADAPTER_NAME = "drafter"
DEFAULT_DRAFTER = "default"
SHIPPED = Path(__file__).parent / "assets" / "default-drafter"  # the default model's, made by `cllm distill drafter-g2`
KIND_FILE = "drafter.json"
KINDS = ("rows", "gated")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "c_attn", "c_proj")


def lora_targets(model: PreTrainedModel, chosen: str = "") -> list[str]:
    """The projections of `model` that LoRA adapts: those named in `chosen` (comma-separated), or
    every attention and MLP projection it has (Llama-, Qwen- and GPT-2-style names)."""
    names = [name.strip() for name in chosen.split(",") if name.strip()] or LORA_TARGETS
    present = [name for name in names if any(module.endswith(name) for module, _ in model.named_modules())]
    missing = sorted(set(names) - set(present)) if chosen else []
    if missing or not present:
        raise CllmError(f"--lora-targets: the model has no projection named {', '.join(missing or names)}")
    return present


def shared_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A new module tree over the same parameter and buffer tensors: adapters injected into it
    leave `model` as it was, and no weight is duplicated."""
    memo = {id(tensor): tensor for tensor in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def write_drafter_kind(directory: Path, kind: str) -> None:
    (Path(directory) / KIND_FILE).write_text(json.dumps({"kind": kind}) + "\n")


def drafter_kind(directory: Path) -> str:
    path = Path(directory) / KIND_FILE
    try:
        kind = json.loads(path.read_text())["kind"] if path.is_file() else "rows"
    except (OSError, ValueError, KeyError, TypeError):
        raise CllmError(f"{path} is not a drafter description (a JSON object with \"kind\")") from None
    if kind not in KINDS:
        raise CllmError(f"{path}: unknown drafter kind {kind!r} (one of {', '.join(KINDS)})")
    return kind


def load_drafter(path: str, target: LoadedModel) -> SharedAdapter | GatedAdapter | LoadedModel:
    """The drafter at `path` for `target`; CllmError (one line) when it is missing, broken or for
    another vocabulary. "default": the drafter shipped for the default model."""
    if path == DEFAULT_DRAFTER:
        return _shipped_drafter(target)
    directory = Path(path)
    if not directory.is_dir():
        raise CllmError(f"drafter not found: {path} (a PEFT adapter directory or a model directory)")
    if (directory / "adapter_config.json").is_file():
        _check_adapter_tokenizer(directory, target)
        return adapter_drafter(directory, target.model)
    if not (directory / "config.json").is_file():
        raise CllmError(f"{path} is neither a PEFT adapter (adapter_config.json) nor a model directory (config.json)")
    from cllm.fidelity import check_same_tokenizer
    from cllm.models import ModelConfig, load_model

    config = ModelConfig(name=str(directory), dtype=str(target.model.dtype).removeprefix("torch."),
                         device=str(target.model.device), onednn=target.onednn)
    drafter = load_model(config)
    try:
        check_same_tokenizer(drafter, target)
    except CllmError:
        raise CllmError(f"the drafter {path} has another tokenizer than the target {target.source}: "
                        "its drafts would be other tokens") from None
    return drafter


def load_draft_model(path: str, target: LoadedModel):
    """`load_drafter` as the decoders take it (`draft_model`): an adapter drafter, or the module of a model."""
    drafter = load_drafter(path, target)
    return drafter.model if isinstance(drafter, LoadedModel) else drafter


def _shipped_drafter(target: LoadedModel) -> GatedAdapter | SharedAdapter:
    from cllm.models import DEFAULT_GGUF_FILE, converted_gguf_dir, default_gguf_path

    if not (SHIPPED / "adapter_config.json").is_file():
        raise CllmError(f"this installation has no shipped drafter ({SHIPPED} is missing): reinstall cllm")
    if target.source != str(converted_gguf_dir(default_gguf_path())):
        raise CllmError(f"--drafter default drafts for the default model ({DEFAULT_GGUF_FILE}), not {target.source}: "
                        "make one for it with a copy of the drafter-g2 recipe whose `model:` is yours "
                        "(`cllm distill --list`)")
    return adapter_drafter(SHIPPED, target.model)


def adapter_drafter(directory: Path, target: PreTrainedModel) -> SharedAdapter | GatedAdapter:
    """The adapter in `directory` on a weight-sharing copy of `target`, drafting as it was trained."""
    from peft import PeftModel

    kind = drafter_kind(directory)
    try:
        json.loads((directory / "adapter_config.json").read_text())
        model = PeftModel.from_pretrained(shared_copy(target), str(directory), adapter_name=ADAPTER_NAME,
                                          is_trainable=False)
    except Exception as exc:  # peft and safetensors raise many kinds; each means the adapter cannot be used
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CllmError(f"cannot load the adapter in {directory}: {detail[:300]}") from None
    if kind == "gated":
        return gated_drafter(model, ADAPTER_NAME)
    return SharedAdapter(model.eval(), ADAPTER_NAME)


def _check_adapter_tokenizer(directory: Path, target: LoadedModel) -> None:
    """An adapter saved with a tokenizer (cllm train does) must have the target's vocabulary."""
    if not (directory / "tokenizer_config.json").is_file():
        return
    from transformers import AutoTokenizer

    try:
        vocab = AutoTokenizer.from_pretrained(str(directory)).get_vocab()
    except Exception as exc:
        raise CllmError(f"cannot read the tokenizer saved with the adapter in {directory}: {exc}") from None
    if vocab != target.tokenizer.get_vocab():
        raise CllmError(f"the drafter {directory} was trained with another tokenizer than the target "
                        f"{target.source}: its drafts would be other tokens")
