"""Greedy decoders over any Hugging Face causal LM, one module each: `ar` (autoregressive, the
reference), `jacobi` (and `jacobi_no_cache`), `hf_generate` (transformers' own).

All are plain functions of (model, left-padded input ids) that use only the public forward and
cache API, so every architecture with a standard cache works; the cached ones run a batch of
prompts of different lengths, and rows leave the batch as soon as they finish. The shared
machinery and the KV-cache layout are in `core`.
"""

from cllm.decoding.ar import ar
from cllm.decoding.core import DecodeOutput, DecodeStats, TokenCallback, left_pad
from cllm.decoding.hf import hf_generate
from cllm.decoding.jacobi import (
    INIT_STRATEGIES,
    accepted_per_iteration,
    count_stationary,
    jacobi,
    jacobi_no_cache,
    lookup_continuation,
    stationary_mask,
)

DECODERS = {"ar": ar, "jacobi": jacobi, "hf": hf_generate}

__all__ = [
    "DECODERS", "INIT_STRATEGIES", "DecodeOutput", "DecodeStats", "TokenCallback", "accepted_per_iteration", "ar",
    "count_stationary", "hf_generate", "jacobi", "jacobi_no_cache", "left_pad", "lookup_continuation", "stationary_mask",
]
