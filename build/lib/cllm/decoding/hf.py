"""transformers' own `generate`: the reference (`hf_generate`) and the baselines to beat,
prompt-lookup decoding (`hf_pld`) and assisted generation with a draft model (`hf_assisted`),
greedy or sampling with transformers' own random draws (the same distribution as cllm's sampling,
not the same tokens). Their forwards of the target model are counted with a forward hook."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from transformers import GenerationConfig, PreTrainedModel

from cllm.decoding.core import (
    DecodeOutput,
    DecodeStats,
    TokenCallback,
    _as_batch,
    _eos_tensor,
    _one_token_per_forward,
    _validate,
)
from cllm.decoding.sampling import GREEDY, Sampling


@torch.inference_mode()
def hf_generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 128,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    on_tokens: TokenCallback | None = None,
    sampling: Sampling = GREEDY,
    seed: int = 0,
) -> DecodeOutput:
    """transformers' own greedy `generate`. `on_tokens` is called once per row with its whole
    output, after generation ends (likewise for the other two)."""
    return _generate(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, on_tokens,
                     sampling, seed, {}, {})


@torch.inference_mode()
def hf_pld(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    lookup_tokens: int = 10,
    max_new_tokens: int = 128,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    on_tokens: TokenCallback | None = None,
    sampling: Sampling = GREEDY,
    seed: int = 0,
) -> DecodeOutput:
    """Prompt-lookup decoding (`prompt_lookup_num_tokens`): drafts copied from the context,
    verified by the model. transformers runs it for one prompt at a time."""
    _one_row(input_ids, "hf-pld")
    extra = {"prompt_lookup_num_tokens": lookup_tokens}
    return _generate(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, on_tokens,
                     sampling, seed, extra, {})


@torch.inference_mode()
def hf_assisted(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    draft_model: PreTrainedModel,
    max_new_tokens: int = 128,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    on_tokens: TokenCallback | None = None,
    sampling: Sampling = GREEDY,
    seed: int = 0,
) -> DecodeOutput:
    """Assisted generation: `draft_model` (same tokenizer) drafts, the model verifies; greedy, so
    the output is the model's own. forward_passes counts the target's forwards only."""
    _one_row(input_ids, "hf-assisted")
    return _generate(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, on_tokens,
                     sampling, seed, {}, {"assistant_model": draft_model})


def _one_row(input_ids: torch.Tensor, name: str) -> None:
    if input_ids.shape[0] != 1:
        raise ValueError(f"{name} decodes one prompt at a time (transformers' limit); use batch size 1")


def _generate(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, on_tokens,
              sampling: Sampling, seed: int, config_extra: dict, generate_extra: dict) -> DecodeOutput:
    input_ids, attention_mask = _as_batch(input_ids, attention_mask)
    _validate(input_ids, attention_mask, max_new_tokens, block_size=1)
    eos_ids = _eos_tensor(eos_token_id, input_ids.device).tolist()
    # An explicit config, so nothing falls back to the model's own generation defaults.
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, num_beams=1, eos_token_id=eos_ids or None, pad_token_id=pad_token_id,
        **_sampling_settings(sampling), **config_extra,
    )
    own_rng = [input_ids.device] if input_ids.device.type == "cuda" else []
    with _counting_forwards(model) as forwards, torch.random.fork_rng(devices=own_rng):
        torch.manual_seed(seed)  # transformers samples from the global generator; ours is left as it was
        generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                   **generate_extra)[:, input_ids.shape[1] :]
    eos = set(eos_ids)
    token_ids = []
    for row in generated.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        token_ids.append(row[:end])
        if on_tokens is not None:
            on_tokens(len(token_ids) - 1, row[:end])
    if not (config_extra or generate_extra):
        return _one_token_per_forward(token_ids)
    stats = [
        DecodeStats(forward_passes=forwards[0], new_tokens=len(t), fast_forward=len(t) - forwards[0]) for t in token_ids
    ]
    return DecodeOutput(token_ids=token_ids, stats=stats)


def _sampling_settings(sampling: Sampling) -> dict:
    if sampling.greedy:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": sampling.temperature, "top_k": sampling.top_k,
            "top_p": sampling.top_p}


@contextmanager
def _counting_forwards(model: torch.nn.Module):
    count = [0]
    handle = model.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        yield count
    finally:
        handle.remove()
