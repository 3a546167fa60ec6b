"""llama.cpp (through llama-cpp-python, an optional extra) as a reference row in `cllm bench`:
the same prompts' token ids decoded greedily by llama.cpp's own quantized CPU kernels, timed in
the same process as cllm's decoders. It runs the GGUF file itself, so only a GGUF model (the
default one, or a .gguf path) has this row."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cllm.decoding import DecodeOutput, DecodeStats
from cllm.errors import CllmError
from cllm.models import DEFAULT_MODEL, default_gguf_path

INSTALL_HINT = "pip install 'cllm[llamacpp]' (llama-cpp-python; it compiles llama.cpp, a few minutes)"


def gguf_file(model_name: str) -> Path | None:
    """The GGUF file behind a --model name, None for a Hugging Face model."""
    if model_name == DEFAULT_MODEL:
        return default_gguf_path()
    if model_name.endswith(".gguf"):
        return Path(model_name).expanduser()
    return None


class LlamaCpp:
    """One GGUF model loaded by llama.cpp, decoding greedily from token ids."""

    def __init__(self, gguf: Path, threads: int | None = None, context: int = 4096) -> None:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise CllmError(f"the llamacpp row needs llama-cpp-python: {INSTALL_HINT}") from None
        threads = threads or os.cpu_count() or 1
        self.llm = Llama(model_path=str(gguf), n_ctx=context, n_threads=threads, n_threads_batch=threads,
                         verbose=False)

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, eos_token_ids: Sequence[int]) -> DecodeOutput:
        """Greedy (llama.cpp's temperature 0 is argmax), stopping after EOS (kept) or the limit; one
        forward per token, the prompt's evaluation counted as the first like cllm's prefill."""
        tokens: list[int] = []
        stream = self.llm.generate(list(prompt_ids), temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                   reset=True)
        for token in stream:
            tokens.append(int(token))
            if token in eos_token_ids or len(tokens) >= max_new_tokens:
                break
        stats = DecodeStats(forward_passes=len(tokens), new_tokens=len(tokens), block_iterations=[1] * len(tokens))
        return DecodeOutput(token_ids=[tokens], stats=[stats])
