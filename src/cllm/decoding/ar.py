"""Autoregressive decoding with a KV cache: one forward per token, the reference."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from cllm.decoding.core import (
    BatchControl,
    DecodeOutput,
    TokenCallback,
    _as_batch,
    _emit,
    _emit_first_token,
    _eos_tensor,
    _forward,
    _join,
    _keep_real_slots,
    _Outputs,
    _prefill,
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
    max_new_tokens: int | Sequence[int] = 128,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    on_tokens: TokenCallback | None = None,
    sampling: Sampling | Sequence[Sampling] = GREEDY,
    seed: int | Sequence[int] = 0,
    control: BatchControl | None = None,
    compile: bool | str = False,
) -> DecodeOutput:
    """Autoregressive decoding with a KV cache: one forward per new token, greedy or sampled
    (`sampling`, with the per-row randomness fixed by `seed`: cllm.decoding.sampling).

    input_ids, attention_mask: (B, P) left-padded prompts. Returns B outputs, each stopping after
    its first EOS (included) or at `max_new_tokens` (one for all rows or one per row). `control`
    lets rows join and leave while decoding (continuous batching; cllm.decoding.core.BatchControl).
    `compile`: True (or a torch.compile backend's name) runs the compiled path (cllm.decoding.kv).
    """
    input_ids, attention_mask = _as_batch(input_ids, attention_mask)
    _validate(input_ids, attention_mask, max_new_tokens, block_size=1)
    eos = _eos_tensor(eos_token_id, input_ids.device)
    outputs = _Outputs(input_ids.shape[0], on_tokens, control, one_per_token=True)
    cache, rows = _prefill(model, input_ids, attention_mask, max_new_tokens, 1, sampling, seed, compile=compile)
    _emit_first_token(rows, cache, eos, outputs)
    while True:
        admission = control.admit() if control is not None else None
        if admission is not None:
            cache, rows, _ = _join(model, cache, rows, admission, outputs, eos, 1, pad_token_id)
        if not len(rows.index):
            break
        one = torch.ones((len(rows.index), 1), dtype=torch.bool, device=input_ids.device)
        prediction = _forward(cache, rows, rows.pending[:, None], one)  # (B, 1)
        _keep_real_slots(cache, rows, accepted=torch.ones_like(rows.n_out))
        count, hit_eos = _truncate_at_eos(prediction, torch.ones_like(rows.n_out), eos)
        _emit(rows, prediction, count, on_tokens)
        rows.pending = prediction[:, 0]
        outputs.retire(rows, cache, hit_eos | (rows.n_out >= rows.limit))
    return outputs.output()
