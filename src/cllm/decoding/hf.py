"""transformers' own `generate`: the reference and the baselines to beat."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import GenerationConfig, PreTrainedModel

from cllm.decoding.core import DecodeOutput, TokenCallback, _as_batch, _eos_tensor, _one_token_per_forward, _validate


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
) -> DecodeOutput:
    """transformers' own greedy `generate`, as the reference and the speed baseline to beat.

    `on_tokens` is called once per row with its whole output, after generation ends.
    """
    input_ids, attention_mask = _as_batch(input_ids, attention_mask)
    _validate(input_ids, attention_mask, max_new_tokens, block_size=1)
    eos_ids = _eos_tensor(eos_token_id, input_ids.device).tolist()
    # An explicit config, so nothing falls back to the model's own generation defaults.
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos_ids or None,
        pad_token_id=pad_token_id,
    )
    generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)[:, input_ids.shape[1] :]
    eos = set(eos_ids)
    token_ids = []
    for row in generated.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        token_ids.append(row[:end])
        if on_tokens is not None:
            on_tokens(len(token_ids) - 1, row[:end])
    return _one_token_per_forward(token_ids)
