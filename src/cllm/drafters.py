"""Loading a drafter for exact drafted decoding (`--drafter PATH`): a PEFT LoRA adapter directory
of the target (adapter_config.json + weights, what `cllm train --lora --adapter-only` writes) or a
full model directory (a CLLM of the target). Either must share the target's tokenizer.

An adapter is attached to a copy of the target's module tree that shares every base weight
with it (`shared_copy`), so the target itself is never changed (its other decoders stay plain
and as fast) and the drafter costs only the adapter's weights.
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

from transformers import PreTrainedModel

from cllm.decoding.drafting import SharedAdapter
from cllm.errors import CllmError
from cllm.models import LoadedModel

ADAPTER_NAME = "drafter"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "c_attn", "c_proj")


def lora_targets(model: PreTrainedModel) -> list[str]:
    """The projections of `model` that LoRA adapts (attention and MLP; Llama-, Qwen- and GPT-2-style names)."""
    return [name for name in LORA_TARGETS if any(module.endswith(name) for module, _ in model.named_modules())]


def shared_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A new module tree over the same parameter and buffer tensors: adapters injected into it
    leave `model` as it was, and no weight is duplicated."""
    memo = {id(tensor): tensor for tensor in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def load_drafter(path: str, target: LoadedModel) -> SharedAdapter | LoadedModel:
    """The drafter at `path` for `target`; CllmError (one line) when it is missing, broken or for
    another vocabulary."""
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
                         device=str(target.model.device))
    drafter = load_model(config)
    try:
        check_same_tokenizer(drafter, target)
    except CllmError:
        raise CllmError(f"the drafter {path} has another tokenizer than the target {target.source}: "
                        "its drafts would be other tokens") from None
    return drafter


def adapter_drafter(directory: Path, target: PreTrainedModel) -> SharedAdapter:
    """The adapter in `directory` on a weight-sharing copy of `target`."""
    from peft import PeftModel

    try:
        json.loads((directory / "adapter_config.json").read_text())
        model = PeftModel.from_pretrained(shared_copy(target), str(directory), adapter_name=ADAPTER_NAME,
                                          is_trainable=False)
    except Exception as exc:  # peft and safetensors raise many kinds; each means the adapter cannot be used
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CllmError(f"cannot load the adapter in {directory}: {detail[:300]}") from None
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
