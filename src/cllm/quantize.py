"""Weight-only int8 linear layers for CPU decoding (`--quantize int8`).

A one-token step on a CPU is bound by reading the weights (docs/results-history.md, "Where a decode's
time goes"): int8 weights halve the bytes of bf16 and torch's `_weight_int8pack_mm` kernel makes
one-column products 3-4x faster. Every `nn.Linear` (the LM head included; GPT-2's `Conv1D` too) gets symmetric int8
weights with one scale per output channel; activations keep the model's dtype.

A quantized model is a different model: its outputs are not the original's. Decoders stay exact
with respect to it (Jacobi = AR of the quantized model, up to the kernel's accumulation order for
one and several columns), and its fidelity to the original is measured with
`cllm eval fidelity --model M --quantize int8 --target M`.
"""

from __future__ import annotations

import torch
from transformers.pytorch_utils import Conv1D

from cllm.errors import CllmError
from cllm.layers import replace_layers

QUANTIZATIONS = ("int8",)


class Int8Linear(torch.nn.Module):
    """y = x W^T + b with W stored as int8 rows times one scale per row (output channel)."""

    def __init__(self, weight: torch.Tensor, bias: torch.nn.Parameter | None) -> None:
        """weight: (out_features, in_features), as nn.Linear holds it."""
        super().__init__()
        scale = weight.detach().float().abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.out_features, self.in_features = weight.shape
        quantized = torch.round(weight.detach().float() / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.register_buffer("weight_int8", quantized)
        self.register_buffer("scale", scale.to(weight.dtype))
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight_int8, self.scale.to(x.dtype))
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.to(self.scale.dtype) * self.scale[:, None]

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for code that inspects a linear layer's shape or values."""
        return self.dequantized()


def quantize_weights(model: torch.nn.Module, scheme: str) -> int:
    """Replace the model's linear layers in place; returns how many were replaced."""
    if scheme not in QUANTIZATIONS:
        raise CllmError(f"unknown quantization {scheme!r}; choose one of {', '.join(QUANTIZATIONS)}")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise CllmError(f"--quantize {scheme} is a CPU kernel; the model is on {device}")
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.float32, torch.bfloat16):
        raise CllmError(f"--quantize {scheme} runs with float32 or bfloat16 activations, not {dtype}")
    return replace_layers(model, _int8)


def _int8(layer: torch.nn.Module) -> Int8Linear | None:
    if isinstance(layer, torch.nn.Linear):
        return Int8Linear(layer.weight, layer.bias)
    if isinstance(layer, Conv1D):  # GPT-2's linear layers, weight stored (in, out)
        return Int8Linear(layer.weight.t(), layer.bias)
    return None
