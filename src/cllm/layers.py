"""Swapping a model's layers in place at load time (`--quantize int8`, `--onednn`): the model's
own code stays as it is, only its modules are replaced."""

from __future__ import annotations

from collections.abc import Callable

import torch


def replace_layers(module: torch.nn.Module, swap: Callable[[torch.nn.Module], torch.nn.Module | None]) -> int:
    """Replace every submodule for which `swap` returns a module (None: look inside it instead);
    returns how many were replaced."""
    count = 0
    for name, child in module.named_children():
        replacement = swap(child)
        if replacement is None:
            count += replace_layers(child, swap)
        else:
            setattr(module, name, replacement)
            count += 1
    return count
