"""Every transformers and torch internal the compiled path relies on, in one place.

The eager path uses only public API. The compiled one (cllm.decoding.kv.StaticKV and
cllm.decoding.compiled) also moves a `StaticCache` layer's write position back, undoes
transformers' static-address marking of the cache tensors, switches a model's attention
implementation for one call, and sets inductor's cache directory and dynamo's recompile limit.
None of these is public API, so `check()` says which one an upgrade of torch or transformers
changed (a test runs it), and `TESTED_WITH` names the versions they were written against.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import PretrainedConfig, StaticCache

TESTED_WITH = {"torch": "2.13", "transformers": "5.23"}


def set_write_position(cache: StaticCache, slot: int) -> None:
    """Where each layer writes the next forward's KV: its `cumulative_length` counter."""
    for layer in cache.layers:
        if layer.is_initialized:
            layer.cumulative_length.fill_(slot)


def unmark_static_addresses(cache: StaticCache) -> None:
    """transformers marks the cache's tensors as static addresses (for CUDA graphs), which makes a
    frozen graph keep the first cache's tensors as its own, unguarded, for every later cache; the
    cache's length is marked dynamic instead, so one graph serves every cache size."""
    for layer in cache.layers:
        if layer.is_initialized:
            for tensor in (layer.keys, layer.values, layer.cumulative_length):
                if hasattr(tensor, "_dynamo_static_input_type"):
                    del tensor._dynamo_static_input_type
            torch._dynamo.maybe_mark_dynamic(layer.keys, 2)
            torch._dynamo.maybe_mark_dynamic(layer.values, 2)


@contextmanager
def attention_implementation(config: PretrainedConfig, implementation: str | None) -> Iterator[None]:
    """The model's attention implementation switched for one call (transformers reads it from the
    config at every forward), so compiled graphs get theirs while eager forwards keep the model's."""
    before = config._attn_implementation
    if implementation is None or implementation == before:
        yield
        return
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = before


def configure_inductor(cache_dir: str) -> None:
    """Process-wide settings, made once before the first compile: kernels kept in `cache_dir` so a
    second process reuses them (torch writes its default, a temporary directory, into the variable
    when it first looks, so that one is replaced), and room for the few widths and batch sizes a
    decode compiles per model (more than dynamo's default recompile limit)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


def check(config: PretrainedConfig, inductor_options: dict) -> list[str]:
    """What no longer holds of the internals above with the installed torch and transformers
    (empty when all do): run on a model's config and the inductor options the compiled path sets."""
    problems = []
    if not hasattr(config, "_attn_implementation"):
        problems.append("transformers: PretrainedConfig._attn_implementation is gone")
    problems += _static_layer_problems(config)
    if not hasattr(torch._dynamo.config, "recompile_limit"):
        problems.append("torch: torch._dynamo.config.recompile_limit is gone")
    if not hasattr(torch.compiler.config, "cache_key_tag"):
        problems.append("torch: torch.compiler.config.cache_key_tag is gone")
    unknown = [key for key in inductor_options if not hasattr(torch._inductor.config, key)]
    if unknown:
        problems.append(f"torch: inductor options {unknown} are gone")
    for module, version in TESTED_WITH.items():
        installed = __import__(module).__version__
        if not installed.startswith(version):
            problems.append(f"{module} {installed} is not the {version} these internals were written against: "
                            "run tests/test_compile.py")
    return problems


def _static_layer_problems(config: PretrainedConfig) -> list[str]:
    """A StaticCache layer still counts its written slots in a `cumulative_length` tensor that the
    next write starts from."""
    layer = StaticCache(config=config, max_cache_len=4).layers[0]
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    try:
        layer.update(torch.zeros(1, heads, 1, head_dim), torch.zeros(1, heads, 1, head_dim))
        counter = layer.cumulative_length
        written = int(counter) if isinstance(counter, torch.Tensor) else None
    except Exception as error:  # noqa: BLE001 - any failure here is what the check reports
        return [f"transformers: StaticLayer.update or its fields changed ({type(error).__name__}: {error})"]
    if not layer.is_initialized or written != 1:
        return ["transformers: StaticLayer.cumulative_length no longer counts the written slots"]
    return []
