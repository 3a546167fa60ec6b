"""`decode`: the one entry point every caller uses (generate, bench, eval, fidelity, the server,
collection, the viewer), and the one place that turns a `DecoderSpec` into a call of its function."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

from transformers import PreTrainedModel

from cllm.decoding.core import BatchControl, DecodeOutput, TokenCallback, left_pad
from cllm.decoding.drafting import ADAPTER_DRAFTERS, DraftModel
from cllm.decoding.sampling import GREEDY, Sampling, row_seeds
from cllm.decoding.spec import SERVABLE, DecoderKind, DecoderSpec
from cllm.errors import CllmError
from cllm.models import LoadedModel


def decode(
    model: PreTrainedModel | LoadedModel,
    spec: DecoderSpec | str,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int] = 128,
    sampling: Sampling | Sequence[Sampling] = GREEDY,
    seed: int | Sequence[int] = 0,
    on_tokens: TokenCallback | None = None,
    control: BatchControl | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    compile: bool | str | None = None,
    draft_model: DraftModel | None = None,
    return_trajectory: bool = False,
    logprobs: int | Sequence[int | None] | None = None,
    predictions: Sequence[Sequence[int] | None] | None = None,
) -> DecodeOutput:
    """Decode `prompts` (token ids, unpadded) with the decoder `spec` names.

    `model` is a model or a `LoadedModel` (then EOS, padding and the compiled path come from it
    unless given). `seed` is one int (row r seeds with seed + r) or one per row; decoders that take
    one seed for the batch (transformers') get the first row's. `control` (continuous batching),
    `compile` and `draft_model` only reach the decoders that take them. `logprobs` (the cached
    decoders: cllm.decoding.logprobs): per row or for all, how many top tokens to report beside
    each token's log-probability (None: none); they come in `DecodeOutput.logprobs` and as the
    third argument of `on_tokens`. `predictions` (the cached decoders): per row, token ids the
    answer is expected to be close to (OpenAI's Predicted Outputs), guessed with and verified.
    """
    spec = DecoderSpec.parse(spec) if isinstance(spec, str) else spec
    kind = spec.kind_info
    network, eos_token_id, pad_token_id, compile = _resolve(model, eos_token_id, pad_token_id, compile)
    _check(kind, spec, len(prompts), control, draft_model, return_trajectory, logprobs, predictions)
    input_ids, attention_mask = left_pad(prompts, pad_token_id)
    seeds = row_seeds(seed, len(prompts))
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                  on_tokens=on_tokens, sampling=sampling, seed=seeds if kind.per_row_seeds else seeds[0])
    kwargs |= spec.decoder_kwargs()
    if control is not None:
        kwargs["control"] = control
    if compile and kind.compilable:
        kwargs["compile"] = compile
    if kind.needs_draft:
        kwargs["draft_model"] = draft_model
    if return_trajectory:
        kwargs["return_trajectory"] = True
    if logprobs is not None:
        kwargs["logprobs"] = logprobs
    if predictions is not None:
        kwargs["predictions"] = predictions
    device = network.device
    return decoder_function(kind)(network, input_ids.to(device), attention_mask.to(device), **kwargs)


def decoder_function(kind: DecoderKind) -> Callable[..., DecodeOutput]:
    if kind.function is None:
        raise CllmError(f"{kind.name} is not a decoder of a torch model (it is a reference row of cllm bench)")
    module, name = kind.function.split(":")
    return getattr(importlib.import_module(module), name)


def _resolve(model, eos_token_id, pad_token_id, compile) -> tuple[PreTrainedModel, object, int, bool | str]:
    if not isinstance(model, LoadedModel):
        return model, eos_token_id, 0 if pad_token_id is None else pad_token_id, compile or False
    eos = model.eos_token_ids if eos_token_id is None else eos_token_id
    pad = model.pad_token_id if pad_token_id is None else pad_token_id
    return model.model, eos, pad, model.compile if compile is None else compile


def _check(kind: DecoderKind, spec: DecoderSpec, batch: int, control: BatchControl | None,
           draft_model: DraftModel | None, return_trajectory: bool, logprobs: object, predictions: object) -> None:
    # the cached decoders (the servable ones) are the ones that run a `Batch`
    wanted = {"let rows join and leave a running batch": control, "report logprobs": logprobs,
              "take predictions": predictions}
    for what, value in wanted.items():
        if value is not None and not kind.servable:
            raise CllmError(f"{kind.name} cannot {what}; use one of {', '.join(SERVABLE)}")
    if kind.needs_draft and draft_model is None:
        raise CllmError(f"{kind.name} needs a drafter: --drafter (hf-assisted: --draft-model)")
    if spec.kind == "drafted" and spec.verified and not isinstance(draft_model, ADAPTER_DRAFTERS):
        raise CllmError(f"{spec.label}: n-gram candidates go with an adapter drafter (a LoRA adapter of the "
                        f"target); with a full model as the drafter use drafted:{spec.block_size}:{spec.init}")
    if return_trajectory and (spec.kind not in ("jacobi", "drafted") or spec.verified):
        raise CllmError("trajectories are Jacobi iterates: decode them with jacobi or drafted, without candidates")
    if batch < 1:
        raise CllmError("no prompts to decode")
    if batch > 1 and not kind.batched:
        raise CllmError(f"{kind.name} decodes one prompt at a time (transformers' limit); use batch size 1")
