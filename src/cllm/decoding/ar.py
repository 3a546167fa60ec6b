"""Autoregressive decoding with a KV cache: one forward per token, the reference."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from cllm.decoding.core import (
    DecodeOutput,
    TokenCallback,
    _as_batch,
    _emit,
    _emit_first_token,
    _eos_tensor,
    _forward,
    _keep_real_slots,
    _one_token_per_forward,
    _prefill,
    _retire,
    _truncate_at_eos,
    _validate,
)
from cllm.decoding.sampling import GREEDY, Sampling


@torch.inference_mode()
def ar(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 128,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    on_tokens: TokenCallback | None = None,
    sampling: Sampling = GREEDY,
    seed: int | Sequence[int] = 0,
) -> DecodeOutput:
    """Autoregressive decoding with a KV cache: one forward per new token, greedy or sampled
    (`sampling`, with the per-row randomness fixed by `seed`: cllm.decoding.sampling).

    input_ids, attention_mask: (B, P) left-padded prompts. Returns B outputs, each stopping after
    its first EOS (included) or at `max_new_tokens`.
    """
    input_ids, attention_mask = _as_batch(input_ids, attention_mask)
    _validate(input_ids, attention_mask, max_new_tokens, block_size=1)
    batch = input_ids.shape[0]
    eos = _eos_tensor(eos_token_id, input_ids.device)
    cache, rows = _prefill(model, input_ids, attention_mask, max_new_tokens + 1, sampling, seed)
    results: list[list[int] | None] = [None] * batch
    _emit_first_token(rows, cache, eos, max_new_tokens, results, on_tokens)
    one = torch.ones((batch, 1), dtype=torch.bool, device=input_ids.device)
    while len(rows.index):
        prediction = _forward(model, cache, rows, rows.pending[:, None], one[: len(rows.index)])  # (B, 1)
        _keep_real_slots(cache, rows, fed=1, accepted=torch.ones_like(rows.n_out))
        count, hit_eos = _truncate_at_eos(prediction, torch.ones_like(rows.n_out), eos)
        _emit(rows, prediction, count, on_tokens)
        rows.pending = prediction[:, 0]
        done = hit_eos | (rows.n_out >= max_new_tokens)
        if done.any():
            _retire(rows, cache, done, results)
    token_ids = [r or [] for r in results]
    return _one_token_per_forward(token_ids)
