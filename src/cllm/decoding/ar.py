"""Autoregressive decoding with a KV cache: one forward per token, the reference."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from cllm.decoding.batch import Batch
from cllm.decoding.core import BatchControl, DecodeOutput, TokenCallback, _as_batch, _validate
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
    logprobs: int | Sequence[int | None] | None = None,
    predictions: Sequence[Sequence[int] | None] | None = None,
) -> DecodeOutput:
    """Autoregressive decoding with a KV cache: one forward per new token, greedy or sampled
    (`sampling`, with the per-row randomness fixed by `seed`: cllm.decoding.sampling).

    input_ids, attention_mask: (B, P) left-padded prompts. Returns B outputs, each stopping after
    its first EOS (included) or at `max_new_tokens` (one for all rows or one per row). `control`
    lets rows join and leave while decoding (continuous batching; cllm.decoding.core.BatchControl).
    `compile`: True (or a torch.compile backend's name) runs the compiled path (cllm.decoding.kv).
    `logprobs`: per row (or for all), report each token's log-probability with that many top
    tokens (None: not; cllm.decoding.logprobs); every cached decoder takes it. `predictions`
    (per row, Predicted Outputs: cllm.decoding.prediction) are what the parallel decoders guess
    with; AR has nothing to guess and ignores them.
    """
    input_ids, attention_mask = _as_batch(input_ids, attention_mask)
    _validate(input_ids, attention_mask, max_new_tokens, block_size=1)
    batch = Batch(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, slack=1, eos_token_id=eos_token_id,
                  pad_token_id=pad_token_id, sampling=sampling, seed=seed, on_tokens=on_tokens, control=control,
                  compile=compile, one_per_token=True, logprobs=logprobs, predictions=predictions)
    while batch.admit():
        batch.ar_step()
    return batch.output()
