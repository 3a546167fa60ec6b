"""The compiled forward behind the static-cache store (cllm.decoding.kv.StaticKV).

On a CPU, `compile=True` runs AOTInductor packages: the model's forward over a static cache is
exported once per column width and batch kind (one row, or a dynamic number of rows; the cache's
size is always dynamic), compiled ahead of time with frozen weights and autotuned GEMMs, and kept
under $CLLM_HOME/compile/packages, keyed by a hash of the weights. The first process spends
minutes per package on a CPU; every later one loads it (times in docs/results-history.md). Freezing is
what makes the CPU step fast: the weights become constants, prepacked for the matrix kernels,
and each linear layer's kernel is picked by timing inductor's own C++ GEMM against oneDNN's for
its shape (one column: a weight-streaming kernel several times faster than oneDNN's; 16 columns:
oneDNN). inductor's in-process graph cache
never keeps such graphs (oneDNN-packed weights), so torch.compile alone would compile them again
in every process. The attention runs as plain matmuls and softmax, which inductor fuses; the
CPU's fused SDPA kernel has a high fixed cost per call for a handful of queries.

Elsewhere (a GPU, another torch.compile backend, a model a width cannot be exported for) the
forward is torch.compile'd in the process. Where compiling is unavailable (no C++ compiler, a
cache with sliding-window layers, an op inductor cannot lower), the decode says so once and runs
eagerly. A change to the weights (training, loading) makes the next decode compile again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import sys
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from transformers import PreTrainedModel, StaticCache
from transformers.cache_utils import StaticLayer

from cllm.decoding.internals import attention_implementation, configure_inductor
from cllm.paths import compile_dir

_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# freezing folds the weights into the graph, so the GEMM autotuning sees constant weights and can prepack them
CPU_INDUCTOR_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                        # inductor prints every GEMM's timings otherwise
                        "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}

PACKAGE_FORMAT = 1  # raise it when _Step or the exported inputs change: older packages are then ignored


def compiled_forward(model: PreTrainedModel, backend: str = "inductor") -> Callable | None:
    """The model's compiled forward, made once per process and backend and kept as long as the
    process (it holds the model), made again when the weights changed; None (after saying why,
    once) where compiling is unavailable."""
    per_model = _COMPILED.setdefault(model, {})
    weights = _weights_state(model)
    if backend in per_model and per_model[backend] is not None and per_model[backend].weights != weights:
        print("cllm: the model's weights changed since it was compiled; compiling again", file=sys.stderr)
        torch._dynamo.reset()  # frozen graphs hold the old weights and dynamo's guards cannot tell
        del per_model[backend]
    if backend not in per_model:
        reason = _cannot_compile(model, backend)
        if reason is None:
            per_model[backend] = _new_forward(model, backend, weights)
        else:
            print(f"cllm: cannot compile ({reason}); decoding eagerly", file=sys.stderr)
            per_model[backend] = None
    return per_model[backend]


def _new_forward(model: PreTrainedModel, backend: str, weights: int) -> Callable:
    frozen = backend == "inductor" and next(model.parameters()).device.type == "cpu"
    if backend == "inductor":
        _configure_inductor()
    # frozen graphs hold packed copies of the weights, and inductor's graph cache keys them by shape
    # only: another model of the same shapes would be served these weights
    fingerprint = _weights_fingerprint(model) if frozen else ""
    in_process = _CompiledForward(model, backend, weights, fingerprint, CPU_INDUCTOR_OPTIONS if frozen else {})
    return _PackagedForward(model, weights, fingerprint, in_process) if frozen else in_process


class _CompiledForward:
    """torch.compile of the model's forward, which turns into the eager forward, with a message,
    if compiling fails."""

    def __init__(self, model: PreTrainedModel, backend: str, weights: int, cache_tag: str, settings: dict) -> None:
        self.compiled = torch.compile(model.forward, backend=backend)
        self.model, self.weights, self.cache_tag, self.failed = model, weights, cache_tag, False
        # set while tracing as well as compiling (dynamo decides there whether weights are constants),
        # and only around these calls, not for the process's other compiled code
        self.settings = settings
        self.attention = _compiled_attention(model)

    def __call__(self, **inputs):
        if not self.failed:
            try:
                with (
                    attention_implementation(self.model.config, self.attention),
                    torch._inductor.config.patch(self.settings),
                    torch.compiler.config.patch(cache_key_tag=self.cache_tag),
                ):
                    return self.compiled(**inputs)
            except Exception as error:  # noqa: BLE001 - any backend failure means: run eagerly
                self.failed = True
                print(f"cllm: compiling failed ({_first_line(error)}); decoding eagerly", file=sys.stderr)
        return self.model(**inputs)


class _PackagedForward:
    """The model's forward over a static cache from AOTInductor packages, loaded from
    $CLLM_HOME/compile/packages or exported and compiled there first. One package per column width
    and batch kind: a single row (the batch size fixed at 1: its small products get faster kernels,
    docs/results-history.md) or several (the batch size dynamic). A
    package that cannot be exported runs `in_process` (torch.compile) instead."""

    def __init__(self, model: PreTrainedModel, weights: int, fingerprint: str, in_process: _CompiledForward) -> None:
        self.model, self.weights, self.in_process = model, weights, in_process
        self.attention = _compiled_attention(model)
        self.key = _package_key(model, fingerprint, self.attention)
        self.runners: dict[tuple[int, bool], Callable | None] = {}

    def __call__(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 past_key_values: StaticCache, use_cache: bool = True) -> SimpleNamespace:
        shape = (input_ids.shape[1], input_ids.shape[0] == 1)
        if shape not in self.runners:
            self.runners[shape] = self._load(*shape)
        runner = self.runners[shape]
        if runner is None:
            return self.in_process(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, use_cache=use_cache)
        layers = past_key_values.layers
        logits = runner(input_ids, position_ids, attention_mask, [layer.cumulative_length for layer in layers],
                        [states for layer in layers for states in (layer.keys, layer.values)])
        return SimpleNamespace(logits=logits[0] if isinstance(logits, (list, tuple)) else logits)

    def _load(self, width: int, single: bool) -> Callable | None:
        path = package_directory() / f"step-{self.key}-w{width}-{'b1' if single else 'bN'}.pt2"
        steps = f"{width}-column steps of {'one row' if single else 'several rows'}"
        try:
            if not path.exists():
                print(f"cllm: compiling the model's forward for {steps}, once per model and shape (minutes on a CPU; "
                      f"kept in {path.parent})", file=sys.stderr)
                self._build(width, single, path)
            return torch._inductor.aoti_load_package(str(path))
        except Exception as error:  # noqa: BLE001 - any export or AOT failure: torch.compile in this process
            print(f"cllm: cannot package the forward for {steps} ({_first_line(error)}); compiling it in this "
                  "process instead", file=sys.stderr)
            return None

    def _build(self, width: int, single: bool, path: Path) -> None:
        rows, capacity = {} if single else {0: torch.export.Dim("batch")}, torch.export.Dim("capacity")
        with (torch.inference_mode(False), torch.no_grad(), attention_implementation(self.model.config, self.attention),
              warnings.catch_warnings()):
            warnings.filterwarnings("ignore", "TypedStorage is deprecated")  # inductor's GEMM autotuning, every time
            examples = _example_inputs(self.model, width, single)
            layers = len(examples[3])
            shapes = (rows, rows, {**rows, 3: capacity}, [None] * layers, [{**rows, 2: capacity}] * (2 * layers))
            exported = torch.export.export(_Step(self.model), examples, dynamic_shapes=shapes, strict=False)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")  # the packager wants .pt2
            try:
                # a copy: the packager adds its own settings to the dict it gets, which would change the key
                torch._inductor.aoti_compile_and_package(exported, package_path=str(partial),
                                                         inductor_configs=dict(CPU_INDUCTOR_OPTIONS))
                os.replace(partial, path)  # another process never loads a half-written package
            finally:
                partial.unlink(missing_ok=True)


class _Step(torch.nn.Module):
    """The model's forward over a StaticCache made of the inputs' tensors, which it writes in place:
    what an exported program can take (tensors, not a cache object)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                lengths: list[torch.Tensor], states: list[torch.Tensor]) -> torch.Tensor:
        cache = StaticCache(config=self.model.config, max_cache_len=states[0].shape[2])
        for layer, length, keys, values in zip(cache.layers, lengths, states[0::2], states[1::2]):
            layer.keys, layer.values, layer.cumulative_length = keys, values, length
            layer.batch_size, layer.num_heads, layer.k_head_dim, layer.v_head_dim = (
                keys.shape[0], keys.shape[1], keys.shape[3], values.shape[3])
            layer.dtype, layer.device, layer.is_initialized = keys.dtype, keys.device, True
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=cache, use_cache=True).logits


def _example_inputs(model: PreTrainedModel, width: int, single: bool) -> tuple:
    """_Step's inputs for `width` columns after one cached slot; several rows and the cache's size
    differ from each other and from the width, so that the export keeps them apart."""
    batch, capacity = 1 if single else (2 if width != 2 else 3), width + 67
    device = next(model.parameters()).device
    cache = StaticCache(config=model.config, max_cache_len=capacity)
    model(input_ids=torch.zeros((batch, 1), dtype=torch.long, device=device), past_key_values=cache, use_cache=True)
    positions = torch.arange(1, width + 1, device=device).expand(batch, -1).contiguous()
    mask = torch.zeros((batch, 1, width, capacity), dtype=model.dtype, device=device)
    return (torch.zeros((batch, width), dtype=torch.long, device=device), positions, mask,
            [layer.cumulative_length.clone() for layer in cache.layers],
            [states.clone() for layer in cache.layers for states in (layer.keys, layer.values)])


def package_directory() -> Path:
    return compile_dir() / "packages"


def _package_key(model: PreTrainedModel, fingerprint: str, attention: str | None) -> str:
    """What a package depends on besides its width: the weights, how they were compiled and by what
    (the GEMM kernels are written, and timed, for the process's thread count)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    parts = [fingerprint, str(model.dtype), str(attention), torch.__version__, transformers.__version__,
             str(pick_vec_isa()), str(torch.get_num_threads()), json.dumps(CPU_INDUCTOR_OPTIONS, sort_keys=True),
             str(PACKAGE_FORMAT)]
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=12).hexdigest()


def _compiled_attention(model: PreTrainedModel) -> str | None:
    # transformers' eager attention takes its softmax in float32: below a float64 model's precision
    on_cpu = next(model.parameters()).device.type == "cpu"
    return "eager" if on_cpu and model.dtype != torch.float64 else None


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
def _weights_state(model: PreTrainedModel) -> int:
    """Changes when a parameter or buffer (int8 weights are buffers) is replaced or modified in
    place: its storage or its version counter."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return hash(tuple((tensor.data_ptr(), tensor._version) for tensor in tensors))


def _weights_fingerprint(model: PreTrainedModel) -> str:
    """A hash of every parameter's and buffer's bytes."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _cannot_compile(model: PreTrainedModel, backend: str) -> str | None:
    layers = StaticCache(config=model.config, max_cache_len=1).layers
    if any(type(layer) is not StaticLayer for layer in layers):
        return "the model's cache has sliding-window or other special layers; only full-attention caches are supported"
    device = next(model.parameters()).device
    if backend == "inductor" and device.type == "cpu" and not (os.environ.get("CXX") or shutil.which("g++")
                                                                or shutil.which("clang++")):
        return "inductor needs a C++ compiler on the CPU (g++ or clang++), none found"
    return None


def _configure_inductor() -> None:
    configure_inductor(str(compile_dir()))
