"""Predicted Outputs (OpenAI's `prediction`): a client's guess of the answer, such as the file it
asks to edit. The decoders only guess with it (Jacobi's block guesses, lookahead's draft) and
verify every guessed token as any other, so the output is unchanged; a right prediction is
accepted many tokens per forward."""

from __future__ import annotations

import torch

ALIGN_MAX_NGRAM = 8  # the longest output suffix looked up in the prediction


def predicted_continuation(prediction: torch.Tensor, output: torch.Tensor, n: int,
                           max_ngram: int = ALIGN_MAX_NGRAM) -> list[int]:
    """Up to n tokens of `prediction` (P,) that follow where the `output` so far (T,) aligns with
    it: after the longest suffix of `output` found in the prediction, at the occurrence nearest
    to position T (an edit shifts the rest of a file only a little); [] where none is found."""
    return aligned_continuation(prediction, output, n, max_ngram)[0]


def aligned_continuation(prediction: torch.Tensor, output: torch.Tensor, n: int,
                         max_ngram: int = ALIGN_MAX_NGRAM) -> tuple[list[int], int]:
    """`predicted_continuation` and the length of the output suffix it aligned on (0: none, or
    an empty output), so a caller can prefer a longer match found elsewhere."""
    length, size_limit = output.shape[0], min(max_ngram, output.shape[0], prediction.shape[0] - 1)
    if length == 0:
        return prediction[:n].tolist(), 0
    for size in range(size_limit, 0, -1):
        ends = (prediction.unfold(0, size, 1) == output[length - size :]).all(dim=1).nonzero().flatten() + size
        ends = ends[ends < prediction.shape[0]]  # some token follows the occurrence
        if len(ends):
            end = int(ends[(ends - length).abs().argmin()])
            return prediction[end : end + n].tolist(), size
    return [], 0
