"""Decoders over any Hugging Face causal LM, one module each: `ar` (autoregressive, the
reference), `jacobi` (and `jacobi_no_cache`), `lookahead`, and transformers' own `hf_generate`,
`hf_pld` (prompt lookup) and `hf_assisted` (a draft model). `DecoderSpec` names one with its
settings (`spec`, which registers every kind once and imports no torch) and `decode` runs it.
Greedy by default; `Sampling` (temperature, top-k, top-p) samples, and ar, jacobi and lookahead give
the same sample for the same seed (`sampling`).

The cached decoders run a batch of prompts of different lengths through the public forward and
cache API, and rows leave the batch as soon as they finish; the compiled path (`kv`, `compiled`)
adds a static cache and the few non-public internals gathered in `internals`. `batch` runs the
rows (prefill, forward, emit, join and leave); `core` holds what the decoders share and the
KV-cache layout.

Names are imported on first use, so `cllm.decoding.spec` stays importable without torch.
"""

from __future__ import annotations

import importlib
import sys
import types

_EXPORTS = {
    "decode": "api", "ar": "ar", "DecodeOutput": "core", "DecodeStats": "core", "TokenCallback": "core",
    "left_pad": "core", "hf_assisted": "hf", "hf_generate": "hf", "hf_pld": "hf", "accepted_per_iteration": "jacobi",
    "count_stationary": "jacobi", "jacobi": "jacobi", "jacobi_no_cache": "jacobi", "lookup_continuation": "jacobi",
    "stationary_mask": "jacobi", "lookahead": "lookahead", "GREEDY": "sampling", "Sampling": "sampling",
    "INIT_STRATEGIES": "spec", "DecoderSpec": "spec",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: object) -> None:
        # Importing the submodule `jacobi` sets the package's attribute `jacobi`; the package
        # exports the decoder function of that name, so keep the function there.
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
