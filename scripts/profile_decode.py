"""Where a decode's time goes on this machine (issue 20), three measurements:

  profile MODEL DECODER   forwards vs the decoding loop around them, then cProfile's top entries
                          (DECODER: ar, jacobi (jacobi:16:lookup) or lookahead (3:3:3); 4 GSM8K prompts, 256 tokens)
  compile [DTYPE]         AR over a StaticCache: eager vs torch.compile, ms per token (128 tokens)
  matmul                  one linear layer's shapes of SmolLM2-135M: float32, bfloat16, int8 weights
  int8 MODEL              ar and jacobi:16:lookup tokens/s with int8 weights (cllm.quantize) against bf16
                          (4 GSM8K prompts, 256 tokens)

Run with the repository's .venv: .venv/bin/python scripts/profile_decode.py profile default jacobi
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time

import torch

from cllm.data import SourceOptions, load_prompts
from cllm.decoding import ar, jacobi, left_pad, lookahead
from cllm.models import ModelConfig, load_model
from cllm.quantize import quantize_weights


def gsm8k_prompts(loaded, count: int) -> list[list[int]]:
    return [loaded.encode_prompt(r.text) for r in load_prompts("gsm8k", SourceOptions(split="test"), limit=count)]


def profile(model_name: str, decoder: str) -> None:
    loaded = load_model(ModelConfig(name=model_name, dtype="bfloat16", threads=2))
    prompts = gsm8k_prompts(loaded, 4)
    inside = [0.0, 0]
    forward = loaded.model.forward

    def timed_forward(*args, **kwargs):
        start = time.perf_counter()
        result = forward(*args, **kwargs)
        inside[0] += time.perf_counter() - start
        inside[1] += 1
        return result

    loaded.model.forward = timed_forward
    common = dict(max_new_tokens=256, eos_token_id=loaded.eos_token_ids, pad_token_id=loaded.pad_token_id)

    def run() -> None:
        for prompt in prompts:
            ids, mask = left_pad([prompt], loaded.pad_token_id)
            if decoder == "ar":
                ar(loaded.model, ids, mask, **common)
            elif decoder == "lookahead":
                lookahead(loaded.model, ids, mask, window=3, ngram=3, candidates=3, **common)
            else:
                jacobi(loaded.model, ids, mask, block_size=16, init="lookup", **common)

    run()  # warm-up
    inside[:] = [0.0, 0]
    start = time.perf_counter()
    run()
    total = time.perf_counter() - start
    outside = total - inside[0]
    print(f"{decoder}: {total:.2f} s, {inside[1]} forwards taking {inside[0]:.2f} s ({inside[0] / total:.0%}), "
          f"{inside[0] / inside[1] * 1000:.1f} ms each; the loop around them {outside / inside[1] * 1000:.2f} ms per forward")
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


def compile_ar(dtype: str) -> None:
    from transformers import StaticCache

    loaded = load_model(ModelConfig(name="default", dtype=dtype, threads=2))
    model = loaded.model
    ids = torch.tensor(gsm8k_prompts(loaded, 1))
    length, new = ids.shape[1], 128

    def decode(step) -> tuple[torch.Tensor, float]:
        cache = StaticCache(config=model.config, max_cache_len=length + new)
        with torch.inference_mode():
            logits = model(input_ids=ids, cache_position=torch.arange(length), past_key_values=cache).logits[:, -1]
            token = logits.argmax(-1, keepdim=True)
            tokens = [token]
            start = time.perf_counter()
            for i in range(new - 1):
                position = torch.tensor([length + i])
                logits = step(input_ids=token, cache_position=position, position_ids=position[None],
                              past_key_values=cache).logits[:, -1]
                token = logits.argmax(-1, keepdim=True)
                tokens.append(token)
            return torch.cat(tokens, 1), (time.perf_counter() - start) / (new - 1)

    decode(model.forward)
    eager_tokens, eager = decode(model.forward)
    print(f"{dtype} eager: {eager * 1000:.1f} ms/token", flush=True)
    compiled = torch.compile(model.forward, dynamic=False)
    start = time.perf_counter()
    decode(compiled)
    print(f"compile and first decode: {time.perf_counter() - start:.0f} s", flush=True)
    tokens, step = decode(compiled)
    print(f"{dtype} compiled: {step * 1000:.1f} ms/token ({eager / step:.2f}x eager); same tokens: "
          f"{bool((tokens == eager_tokens).all())}")


def matmul() -> None:
    torch.set_num_threads(2)

    def microseconds(fn, repeats: int = 300) -> float:
        for _ in range(20):
            fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats * 1e6

    for inputs, outputs in [(576, 576), (576, 1536), (1536, 576), (576, 49152)]:
        for columns in (1, 16):
            times = []
            for dtype in (torch.float32, torch.bfloat16):
                x, w = torch.randn(columns, inputs, dtype=dtype), torch.randn(outputs, inputs, dtype=dtype)
                times.append(microseconds(lambda: torch.nn.functional.linear(x, w)))
            x = torch.randn(columns, inputs, dtype=torch.bfloat16)
            w8 = torch.randint(-128, 127, (outputs, inputs), dtype=torch.int8)
            scales = torch.rand(outputs, dtype=torch.bfloat16)
            times.append(microseconds(lambda: torch._weight_int8pack_mm(x, w8, scales)))
            print(f"{inputs}x{outputs}, {columns:2d} columns: float32 {times[0]:.0f} us, bfloat16 {times[1]:.0f} us, "
                  f"int8 weights {times[2]:.0f} us")


def int8(model_name: str) -> None:
    loaded = load_model(ModelConfig(name=model_name, dtype="bfloat16", threads=2))
    prompts = gsm8k_prompts(loaded, 4)
    common = dict(max_new_tokens=256, eos_token_id=loaded.eos_token_ids, pad_token_id=loaded.pad_token_id)

    def rate(decoder, **settings) -> tuple[float, float, list[list[int]]]:
        tokens = forwards = 0
        outputs = []
        start = time.perf_counter()
        for prompt in prompts:
            ids, mask = left_pad([prompt], loaded.pad_token_id)
            output = decoder(loaded.model, ids, mask, **common, **settings)
            tokens, forwards = tokens + output.stats[0].new_tokens, forwards + output.stats[0].forward_passes
            outputs.append(output.token_ids[0])
        return tokens / (time.perf_counter() - start), tokens / forwards, outputs

    reference = None
    for label in ("bfloat16", "int8 weights"):
        if label != "bfloat16":
            quantize_weights(loaded.model, "int8")
        rate(ar)
        ar_rate, _, ar_outputs = rate(ar)
        jacobi_rate, per_forward, jacobi_outputs = rate(jacobi, block_size=16, init="lookup")
        reference = reference or ar_outputs
        print(f"{label}: ar {ar_rate:.1f} tokens/s; jacobi:16:lookup {jacobi_rate:.1f} tokens/s, {per_forward:.2f} "
              f"tokens/forward; jacobi = ar on {sum(a == b for a, b in zip(ar_outputs, jacobi_outputs))}/4; "
              f"ar = bf16 ar on {sum(a == b for a, b in zip(ar_outputs, reference))}/4", flush=True)


if __name__ == "__main__":
    command, *rest = sys.argv[1:] or ["matmul"]
    {"profile": lambda: profile(*rest), "compile": lambda: compile_ar(*(rest or ["bfloat16"])), "matmul": matmul,
     "int8": lambda: int8(*rest)}[command]()
