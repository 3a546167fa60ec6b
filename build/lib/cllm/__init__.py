"""cllm: Consistency Large Language Models -- Jacobi decoding and consistency training for any HF causal LM.

Names are imported on first use, so the CLI and `cllm.decoding.spec` start without torch."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CllmError": "cllm.errors", "DecodeOutput": "cllm.decoding", "DecodeStats": "cllm.decoding",
    "LoadedModel": "cllm.models", "Sampling": "cllm.decoding", "ar": "cllm.decoding", "decode": "cllm.decoding",
    "hf_generate": "cllm.decoding", "jacobi": "cllm.decoding", "load_model": "cllm.models",
    "lookahead": "cllm.decoding",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
