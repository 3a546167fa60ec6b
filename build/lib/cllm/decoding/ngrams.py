"""The n-gram pool that lookahead decoding and multi-candidate Jacobi draw their candidates from."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cllm.decoding.core import _context, _Rows, ragged


class NgramPool:
    """One row's n-grams: first token -> continuations (N-1 tokens), newest first, at most `size`."""

    def __init__(self, ngram: int, size: int) -> None:
        self.ngram, self.size = ngram, size
        self.table: dict[int, list[tuple[int, ...]]] = {}
        self.context_seen = 0  # context tokens whose n-grams are in the pool

    def add(self, gram: Sequence[int]) -> None:
        key, continuation = gram[0], tuple(gram[1:])
        entries = self.table.setdefault(key, [])
        if continuation in entries:
            entries.remove(continuation)
        entries.insert(0, continuation)
        del entries[self.size :]

    def add_context(self, context: torch.Tensor) -> None:
        """Every n-gram of the context (1-D) that ends after what was added before; only the new
        tail leaves the tensor, so a step costs what it adds, not the context's length."""
        first = max(0, self.context_seen - self.ngram + 1)
        tail = context[first:].tolist()
        for start in range(len(tail) - self.ngram + 1):
            self.add(tail[start : start + self.ngram])
        self.context_seen = len(context)

    def candidates(self, token: int) -> list[tuple[int, ...]]:
        return self.table.get(token, [])


class NgramPools:
    """Every row's pool, by the row's index in the caller's batch, made when the row first asks."""

    def __init__(self, ngram: int, size: int) -> None:
        self.ngram, self.size = ngram, size
        self.pools: dict[int, NgramPool] = {}

    def __getitem__(self, row: int) -> NgramPool:
        if row not in self.pools:
            self.pools[row] = NgramPool(self.ngram, self.size)
        return self.pools[row]

    def offer(self, rows: _Rows, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, G, N-1) the candidates for each row's `pending` and (B, G) which exist, after the
        n-grams its context gained since the last step joined its pool."""
        for i, row in enumerate(rows.index.tolist()):
            self[row].add_context(_context(rows, i))
        offered = [self[int(r)].candidates(int(t)) for r, t in zip(rows.index, rows.pending)]
        flat, present = ragged([[token for gram in grams for token in gram] for grams in offered], pad_token_id,
                               device=rows.pending.device)  # (B, G * (N-1))
        return flat.view(len(offered), flat.shape[1] // (self.ngram - 1), self.ngram - 1), present[:, :: self.ngram - 1]

    def remember_iterate(self, row: int, pending: int, unfixed: list[int]) -> None:
        """The n-grams of the last accepted token followed by the iterate's unfixed guesses."""
        sequence = [pending, *unfixed]
        for start in range(len(sequence) - self.ngram + 1):
            self[row].add(sequence[start : start + self.ngram])
