"""oneDNN linear layers for float32 decoding on a CPU (`--onednn`; `cllm demo` uses it).

In float32, torch's `F.linear` on a CPU takes a BLAS GEMM that is slow for the shapes decoding
meets: 1 to 16 columns against a wide weight. oneDNN's kernel (`torch.ops.mkldnn._linear_pointwise`,
the one torch itself picks in bfloat16) computes the same product 1.4-2.6x faster for the LM head
(576 x 49152); on the default model eager AR decodes 1.2-1.3x faster, and with the weights packed
once in oneDNN's layout a forward of 4 columns costs about what one of 1 does (docs/benchmarks.md,
"oneDNN"). Every `nn.Linear` becomes a `OneDnnLinear` over the same parameters (tied weights stay
tied; PEFT adapters wrap it as a linear layer).

The product is the same up to float32 rounding (another accumulation order), so a model with
oneDNN layers is the same model, not bit for bit: decoders stay exact against AR run with the same
layers, which is how bench and demo compare them.
"""

from __future__ import annotations

import torch

from cllm.errors import CllmError
from cllm.layers import replace_layers

PACKING_COLUMNS = 8  # the column count oneDNN blocks the packed weight for; 1 to 16 all gain from it


class OneDnnLinear(torch.nn.Linear):
    """An `nn.Linear` whose inference forward runs oneDNN's kernel on a copy of the weight packed
    in oneDNN's blocked layout. Unpacked, the kernel re-blocks the weight on every call: packed, a
    product of 8 columns costs about what one does (the LM head: 4.2 ms against 8.2 for 8
    columns, 2 threads), which is what makes a parallel decoder's wide step cheap. The copy costs
    the weights' memory once more; it is made again when the weight changes (a new tensor, or an
    in-place write). Where gradients are wanted it falls back to torch's own linear (the oneDNN op
    has no backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return super().forward(x)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), self.bias, "none", [], "")

    def __getstate__(self) -> dict:
        # a copy (shared_copy's deepcopy, pickling) packs its own weight when it first runs
        state = super().__getstate__()
        state.pop("_packed", None)
        state.pop("_packed_from", None)
        return state

    def _packed_weight(self) -> torch.Tensor:
        source = getattr(self, "_packed_from", None)
        if source is None or source[0] is not self.weight or source[1] != self.weight._version:
            with torch.no_grad():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PACKING_COLUMNS)
            self._packed_from = (self.weight, self.weight._version)
        return self._packed


def check_onednn(model: torch.nn.Module) -> None:
    """CllmError unless `model`'s linear layers can run through oneDNN here."""
    parameter = next(model.parameters())
    if parameter.device.type != "cpu":
        raise CllmError(f"--onednn is a CPU kernel; the model is on {parameter.device}")
    if parameter.dtype != torch.float32:
        raise CllmError(f"--onednn is for float32 (in {str(parameter.dtype).removeprefix('torch.')} torch's "
                        "linear already runs oneDNN where it helps)")
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        raise CllmError("--onednn: this torch build has no oneDNN (mkldnn) linear kernel")


def use_onednn(model: torch.nn.Module) -> int:
    """Turn every `nn.Linear` of `model` into a `OneDnnLinear` in place; returns how many."""
    check_onednn(model)
    return replace_layers(model, _onednn)


def _onednn(layer: torch.nn.Module) -> OneDnnLinear | None:
    if type(layer) is not torch.nn.Linear:
        return None
    replacement = OneDnnLinear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    replacement.weight, replacement.bias = layer.weight, layer.bias  # the same tensors: ties hold
    return replacement.train(layer.training)
