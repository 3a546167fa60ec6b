"""Tiny random-weight causal LMs (2 layers, hidden 64, vocab 96) of several architectures, in float64."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedModel, Qwen2Config

ARCHS = ["llama", "qwen2", "gpt2"]  # the architectures every decoder is tested on

VOCAB = 96


def tiny_config(arch: str):
    # A large init range makes greedy outputs varied instead of one repeated token.
    common = dict(vocab_size=VOCAB, initializer_range=0.4, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    if arch == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=512, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=512, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float64) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=dtype)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def tiny_tokenizer():
    """A character-level fast tokenizer over VOCAB ids: id 0 = <pad>, 1 = <eos>, then printable ASCII."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 32 + VOCAB - 2)]
    vocab = {"<pad>": 0, "<eos>": 1} | {c: i + 2 for i, c in enumerate(chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


# The tokenizer has no newline: turns are separated by "|".
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}|{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def save_tiny_model(
    path,
    arch: str = "llama",
    seed: int = 0,
    eos_token_id: int | None = None,
    context: int | None = None,
    chat_template: bool = False,
    endless: bool = False,
):
    """A tiny model + tokenizer directory that every cllm command can load with --model PATH.

    `context` raises the declared context length of llama/qwen2 (RoPE: the weights stay the same);
    `chat_template` gives the tokenizer TINY_CHAT_TEMPLATE; `endless` drops the tokenizer's <eos>
    too, so that with `eos_token_id` None nothing ends an output before its limit."""
    model = tiny_model(arch, seed=seed, dtype=torch.float32)
    if context is not None:
        model.config.max_position_embeddings = context
    model.generation_config.eos_token_id = eos_token_id
    model.save_pretrained(path)
    tokenizer = tiny_tokenizer()
    if chat_template:
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
    if endless:
        tokenizer.eos_token = None
    tokenizer.save_pretrained(path)
    return path


def tiny_adapter(model: PreTrainedModel, seed: int = 0, rank: int = 4, random: bool = True, gated: bool = False,
                 folded: bool = True):
    """A LoRA drafter of `model` (cllm.decoding.drafting.SharedAdapter, or GatedAdapter when
    `gated`): random weights (a bad drafter), or PEFT's initialisation (B = 0: the adapter changes
    nothing, the drafter is the target). A gated one is folded as decoding loads it, or, with
    `folded=False`, PEFT's layers under the gate's hooks, as training runs it."""
    from peft import LoraConfig, get_peft_model

    from cllm.decoding.drafting import GatedAdapter, SharedAdapter, TokenGate, gated_drafter
    from cllm.drafters import ADAPTER_NAME, lora_targets, shared_copy

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=lora_targets(model), init_lora_weights=not random)
    adapted = get_peft_model(shared_copy(model), config, adapter_name=ADAPTER_NAME)
    if random:  # PEFT's random init leaves B at 0 for some layer kinds: make every delta count
        for name, weight in adapted.named_parameters():
            if "lora_" in name:
                weight.data.normal_(0, 0.5)
    if gated:
        return gated_drafter(adapted, ADAPTER_NAME) if folded else GatedAdapter(adapted.eval(),
                                                                                TokenGate(adapted, ADAPTER_NAME))
    return SharedAdapter(adapted.eval(), ADAPTER_NAME)


def save_tiny_adapter(model_dir, path, seed: int = 0, rank: int = 4):
    """A random LoRA adapter of the model saved in `model_dir`, written to `path` as
    `cllm train --lora --adapter-only` writes one (PEFT's default adapter name, at the top level)."""
    from peft import LoraConfig, get_peft_model

    from cllm.drafters import lora_targets

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=lora_targets(model), init_lora_weights=False)
    adapted = get_peft_model(model, config)
    for name, weight in adapted.named_parameters():
        if "lora_" in name:
            weight.data.normal_(0, 0.5)
    adapted.save_pretrained(path)
    return path


def generate_ids(model: Path, decoder: str, capsys) -> list[int]:
    """`cllm generate hello --json` with `decoder` on the model in `model`: its token ids."""
    from cllm.cli import main

    capsys.readouterr()  # drop what came before
    assert main(["generate", "hello", "--model", str(model), "--decoder", decoder, "--json",
                 "--max-new-tokens", "20"]) == 0
    return json.loads(capsys.readouterr().out)["token_ids"]
