"""Where a decode's time goes on this machine (issue 20), four measurements:

  profile MODEL DECODER   forwards vs the decoding loop around them, then cProfile's top entries
                          (DECODER: ar, jacobi (jacobi:16:lookup) or lookahead (3:3:3); 4 GSM8K prompts, 256 tokens)
  compiled MODEL [DTYPE [int8]]
                          the compiled path (compile=True) against eager and transformers' generate: tokens/s
                          of ar and jacobi:16:lookup (4 GSM8K prompts, 256 tokens), then the cost of a 1- and
                          a 16-column step
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
from cllm.decoding import ar, hf_generate, jacobi, left_pad, lookahead
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
    print(
        f"{decoder}: {total:.2f} s, {inside[1]} forwards taking {inside[0]:.2f} s ({inside[0] / total:.0%}), "
        f"{inside[0] / inside[1] * 1000:.1f} ms each; "
        f"the loop around them {outside / inside[1] * 1000:.2f} ms per forward"
    )
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


def compiled(model_name: str = "default", dtype: str = "bfloat16", quantize: str | None = None) -> None:
    """The compiled path (`compile=True`) against the eager one and transformers' generate."""
    loaded = load_model(ModelConfig(name=model_name, dtype=dtype, threads=2, quantize=quantize))
    model, prompts = loaded.model, gsm8k_prompts(loaded, 4)
    common = dict(max_new_tokens=256, eos_token_id=loaded.eos_token_ids, pad_token_id=loaded.pad_token_id)
    decoders = {
        "hf generate": lambda ids, mask: hf_generate(model, ids, mask, **common),
        "ar": lambda ids, mask: ar(model, ids, mask, **common),
        "ar compiled": lambda ids, mask: ar(model, ids, mask, compile=True, **common),
        "jacobi:16:lookup": lambda ids, mask: jacobi(model, ids, mask, block_size=16, init="lookup", **common),
        "jacobi:16:lookup compiled": lambda ids, mask: jacobi(model, ids, mask, block_size=16, init="lookup",
                                                              compile=True, **common),
    }
    outputs = {}
    for name, decode in decoders.items():
        start = time.perf_counter()
        decode(*left_pad(prompts[:1], loaded.pad_token_id))  # warm-up, and the compile
        warm_up = time.perf_counter() - start
        start, tokens, forwards, outputs[name] = time.perf_counter(), 0, 0, []
        for prompt in prompts:
            out = decode(*left_pad([prompt], loaded.pad_token_id))
            tokens += out.stats[0].new_tokens
            forwards += out.stats[0].forward_passes
            outputs[name].append(out.token_ids[0])
        seconds = time.perf_counter() - start
        same = sum(a == b for a, b in zip(outputs[name], outputs["ar"])) if "ar" in outputs else "-"
        print(
            f"{name}: {tokens / seconds:.1f} tokens/s, {seconds / forwards * 1000:.1f} ms per forward, "
            f"{tokens / forwards:.2f} tokens/forward, warm-up {warm_up:.0f} s, outputs equal to ar: {same}/4",
            flush=True,
        )
    step_costs(model, prompts[0])


def step_costs(model, prompt: list[int], repeats: int = 50) -> None:
    """ms per forward of 1, 4 and 16 columns after the prompt, eager (DynamicCache) and compiled."""
    from cllm.decoding.kv import DynamicKV, new_store

    ids = torch.tensor([prompt])
    positions = torch.arange(len(prompt))[None]
    for label, store in (("eager", DynamicKV(model)), ("compiled", new_store(model, len(prompt) + 64, compile=True))):
        costs = {}
        with torch.inference_mode():
            store.forward(ids, positions, None, logits_to_keep=1)
            for width in (1, 4, 16):
                tokens, after = ids[:, :width], len(prompt) + torch.arange(width)[None]
                for _ in range(3):
                    store.forward(tokens, after, None)
                    store.keep(0)
                start = time.perf_counter()
                for _ in range(repeats):
                    store.forward(tokens, after, None)
                    store.keep(0)
                costs[width] = (time.perf_counter() - start) / repeats * 1000
        print(f"{label} step: 1 column {costs[1]:.1f} ms, 4 columns {costs[4]:.1f} ms, 16 columns {costs[16]:.1f} ms "
              f"({costs[16] / costs[1]:.2f}x)")


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
    {"profile": lambda: profile(*rest), "compiled": lambda: compiled(*rest), "matmul": matmul,
     "int8": lambda: int8(*rest)}[command]()
