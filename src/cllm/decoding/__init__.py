"""Decoders over any Hugging Face causal LM, one module each: `ar` (autoregressive, the
reference), `jacobi` (and `jacobi_no_cache`), `lookahead`, and transformers' own `hf_generate`,
`hf_pld` (prompt lookup) and `hf_assisted` (a draft model); `DecoderSpec` names one with its settings.
Greedy by default; `Sampling` (temperature, top-k, top-p) samples, and ar, jacobi and lookahead give
the same sample for the same seed (`sampling`).

All are plain functions of (model, left-padded input ids) that use only the public forward and
cache API, so every architecture with a standard cache works; the cached ones run a batch of
prompts of different lengths, and rows leave the batch as soon as they finish. The shared
machinery and the KV-cache layout are in `core`.
"""

from cllm.decoding.ar import ar
from cllm.decoding.core import DecodeOutput, DecodeStats, TokenCallback, left_pad
from cllm.decoding.hf import hf_assisted, hf_generate, hf_pld
from cllm.decoding.jacobi import (
    accepted_per_iteration,
    count_stationary,
    jacobi,
    jacobi_no_cache,
    lookup_continuation,
    stationary_mask,
)
from cllm.decoding.lookahead import lookahead
from cllm.decoding.sampling import GREEDY, Sampling
from cllm.decoding.spec import INIT_STRATEGIES, DecoderSpec

DECODERS = {"ar": ar, "jacobi": jacobi, "hf": hf_generate, "lookahead": lookahead, "hf-pld": hf_pld, "hf-assisted": hf_assisted}

__all__ = [
    "DECODERS", "GREEDY", "INIT_STRATEGIES", "Sampling", "DecodeOutput", "DecoderSpec", "hf_assisted", "hf_pld", "lookahead", "DecodeStats", "TokenCallback", "accepted_per_iteration", "ar",
    "count_stationary", "hf_generate", "jacobi", "jacobi_no_cache", "left_pad", "lookup_continuation", "stationary_mask",
]
