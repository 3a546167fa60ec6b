"""cllm: Consistency Large Language Models -- Jacobi decoding and consistency training for any HF causal LM."""

from cllm.decoding import DecodeOutput, DecodeStats, Sampling, ar, hf_generate, jacobi, lookahead
from cllm.errors import CllmError
from cllm.models import LoadedModel, load_model

__all__ = [
    "CllmError",
    "DecodeOutput",
    "DecodeStats",
    "LoadedModel",
    "Sampling",
    "ar",
    "hf_generate",
    "jacobi",
    "load_model",
    "lookahead",
]
__version__ = "0.1.0"
