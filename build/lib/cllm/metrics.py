"""Measures of token sequences shared by collection, benchmarks and fidelity (no model, no torch)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Tokens before the first difference."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def longest_repetition(tokens: Sequence[int], max_period: int = 8) -> int:
    """Length of the longest stretch that repeats one n-gram (n <= max_period) back to back."""
    array = np.asarray(tokens)
    best = 0
    for period in range(1, min(max_period, len(array) - 1) + 1):
        same = np.concatenate([[False], array[period:] == array[:-period], [False]])
        edges = np.flatnonzero(np.diff(same.astype(np.int8)))
        if len(edges):
            best = max(best, int((edges[1::2] - edges[::2]).max()) + period)
    return best


def is_degenerate(tokens: Sequence[int], span: int) -> bool:
    return longest_repetition(tokens) >= span
