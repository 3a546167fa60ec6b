"""Sampling that every decoder reproduces exactly: temperature, top-k, top-p.

The randomness of every output position is fixed before decoding starts. Row r's t-th output
token (t = 0 for the prefill's prediction) is drawn by inverse-CDF sampling from the filtered
distribution at that position with one uniform number u(seed_r, t), a counter-based hash of the
row's seed and t (splitmix64). Sampling is thereby a deterministic function of the prefix, like
argmax: Jacobi's fixed point, lookahead's and multi-candidate Jacobi's verification give the AR
sample token for token, whatever the block size, guesses or batch mates. (Gumbel-max with noise
keyed the same way would do too, but needs one number per vocabulary entry instead of one per
position.) Temperature 0 is greedy: argmax, no randomness.

Filtering follows transformers' order and semantics: logits / T, then top-k (ties with the k-th
kept), then top-p (the smallest set of most likely tokens whose mass reaches p; the token that
crosses p is kept, and so is any token exactly as likely as it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cllm.errors import CllmError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SAMPLING_STREAM = 0x5A3D1E  # keeps these draws apart from the Jacobi guesses' generator of the same seed


@dataclass(frozen=True)
class Sampling:
    """temperature 0 (the default) is greedy; top_k 0 and top_p 1 filter nothing."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        problem = sampling_problem(self.temperature, self.top_k, self.top_p)
        if problem:
            raise CllmError(problem)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def describe(self) -> str:
        if self.greedy:
            return "greedy"
        return f"T={self.temperature:g}" + (f" top-k {self.top_k}" if self.top_k else "") + \
            (f" top-p {self.top_p:g}" if self.top_p < 1 else "")


def sampling_problem(temperature: float, top_k: int, top_p: float) -> str | None:
    """What is wrong with these settings, in one line; None when they are fine."""
    if not np.isfinite(temperature) or temperature < 0:
        return f"temperature must be >= 0 (0: greedy), got {temperature}"
    if top_k < 0:
        return f"top-k must be >= 0 (0: off), got {top_k}"
    if not 0 < top_p <= 1:
        return f"top-p must be in (0, 1] (1: off), got {top_p}"
    return None


GREEDY = Sampling()


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def row_seeds(seed: int | Sequence[int], batch: int) -> list[int]:
    """Row r of a batch decoded with an int seed s samples like a lone prompt with seed s + r."""
    seeds = [seed + row for row in range(batch)] if isinstance(seed, int) else list(seed)
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {batch}")
    return seeds


def uniforms(seeds: Sequence[int], length: int) -> torch.Tensor:
    """(B, length) float64 in [0, 1): u(seed_r, t) for t < length; the value at t does not depend
    on `length`, the batch or the device."""
    keys = _splitmix64(np.array([(s ^ _SAMPLING_STREAM) % 2**64 for s in seeds], dtype=np.uint64))
    with np.errstate(over="ignore"):
        counters = keys[:, None] + np.arange(length, dtype=np.uint64)[None, :] * _GOLDEN
    bits = _splitmix64(_splitmix64(counters)) >> np.uint64(11)  # 53 random bits
    return torch.from_numpy(bits.astype(np.float64) / float(2**53))


def filtered_probabilities(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """softmax(logits / T) over the last dim after top-k and top-p, in float64 (so the cumulative
    sums that pick a token agree across decoders and batch layouts)."""
    scores = logits.double() / sampling.temperature
    vocab = scores.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth = scores.topk(sampling.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = scores.softmax(dim=-1)
    if sampling.top_p < 1:
        probs = probs.masked_fill(probs < _nucleus_floor(probs, sampling.top_p), 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def _nucleus_floor(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """(..., 1) the probability of the last token the nucleus needs; keeping every token at least
    that likely makes the set independent of how ties are ordered. The nucleus is usually within a
    few dozen tokens, but a Jacobi guess after a wrong token gets a flat distribution: partial top-k
    of growing size, per row, spare sorting the whole vocabulary (a sort of 160 rows costs ~0.3 s)."""
    vocab = probs.shape[-1]
    rows = probs.reshape(-1, vocab)
    floor = torch.empty((rows.shape[0], 1), dtype=probs.dtype, device=probs.device)
    pending = torch.arange(rows.shape[0], device=probs.device)
    for size in (64, 1024, vocab):
        ordered = rows[pending].topk(min(size, vocab), dim=-1).values
        mass = ordered.cumsum(dim=-1)
        # the same cumulative sums as a full sort's first `size`: the nucleus ends inside them
        covered = (mass[:, -1] >= top_p) | (size >= vocab)
        needed = ((mass - ordered)[covered] < top_p).sum(dim=-1, keepdim=True)  # >= 1
        floor[pending[covered]] = ordered[covered].gather(-1, needed - 1)
        pending = pending[~covered]
        if not len(pending):
            break
    return floor.view(*probs.shape[:-1], 1)


def sample(logits: torch.Tensor, sampling: Sampling, draws: torch.Tensor) -> torch.Tensor:
    """logits (..., V) and one uniform per position (...) -> tokens (...): the first token whose
    cumulative probability exceeds the draw. Greedy when the temperature is 0."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    cdf = filtered_probabilities(logits, sampling).cumsum(dim=-1)
    target = (draws.to(cdf.device, torch.float64) * cdf[..., -1])[..., None]  # cdf[-1] is 1 up to rounding
    # right=True: a token of probability 0 repeats its predecessor's cdf and is never the first above
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
