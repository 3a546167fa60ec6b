"""Multi-candidate Jacobi: G n-grams verified in the same forward as the Jacobi block.

The block keeps its iteration; the candidates only add chances. Each row feeds

    [ pending | the block's unfixed guesses | G candidates of N-1 tokens ]

with a custom 4D mask (the guesses see `pending` and each other causally, as in plain Jacobi; a
candidate sees `pending` and its own earlier tokens). Candidates come from the row's n-gram pool
(cllm.decoding.ngrams.NgramPool), fed by its prompt and output and by its own iterates, the
CLLM's fast-forwarded guesses included, and keyed by `pending`. A candidate's k-th token is right
if it equals the prediction at the column before it; when the best candidate accepts more tokens
than the block does, its tokens are emitted and written into the iterate. The KV of `pending` and
of the winner's right prefix (the block's accepted guesses, or the candidate's) is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cllm.decoding.batch import Batch
from cllm.decoding.core import accepted_prefix, causal, fed_mask, verify_candidates


@dataclass
class CandidateStep:
    predictions: torch.Tensor  # (B, m) the block's new values at its unfixed positions
    emitted: torch.Tensor  # (B, E) accepted tokens first
    count: torch.Tensor  # (B,) accepted tokens, >= 1
    source: torch.Tensor  # (B, E) the fed column each emitted token was predicted at


def _mask(guess_real: torch.Tensor, present: torch.Tensor, length: int) -> torch.Tensor:
    """(B, Q, Q): pending | guesses | candidates, who may see whom among the fed columns."""
    device = present.device
    guesses = (causal(guess_real.shape[1], device), guess_real)
    candidates = [(causal(length, device), present[:, g, None].expand(-1, length)) for g in range(present.shape[1])]
    return fed_mask([guesses, *candidates])


def candidate_step(batch: Batch, guesses: torch.Tensor, width: torch.Tensor, proposals: torch.Tensor,
                   present: torch.Tensor) -> CandidateStep:
    """One forward of pending + block + candidates; verifies both and commits the kept KV to the cache."""
    cache, rows, device = batch.cache, batch.rows, guesses.device
    size, fed = guesses.shape  # block positions predicted: the first from `pending`
    groups, length = proposals.shape[1], proposals.shape[2]
    columns = torch.arange(fed, device=device)
    guess_real = columns[1:] < width[:, None]  # the guess of position fixed + k is fed at column k + 1
    tokens = torch.cat([rows.pending[:, None], guesses[:, :-1].masked_fill(~guess_real, batch.pad_token_id),
                        proposals.flatten(1)], dim=1)
    positions = torch.cat([
        rows.n_real[:, None] + columns,
        rows.n_real[:, None] + 1 + torch.arange(length, device=device).repeat(groups),
    ], dim=1)
    fed_mask = _mask(guess_real, present, length)
    allowed = torch.cat([rows.slot_mask.bool()[:, None, :].expand(-1, fed_mask.shape[1], -1), fed_mask], dim=2)
    logits = cache.forward(tokens, positions, allowed)
    prediction = batch.pick(logits, positions - rows.n_real[:, None] + rows.n_out[:, None])  # `pending`: n_out - 1

    # the block: position fixed + c is predicted at column c (`pending`, then the guesses)
    predictions = prediction[:, :fed]
    by_block = torch.minimum(accepted_prefix(predictions, guesses, columns[None, :] < width[:, None]) + 1, width)
    # the candidates: token k must equal the prediction before it
    candidate_predictions = prediction[:, fed:].view(size, groups, length)
    matched = verify_candidates(proposals, present, predictions[:, :1], candidate_predictions)
    by_candidate = (
        torch.minimum(matched + 1, width[:, None]) if groups else torch.ones((size, 0), dtype=torch.long, device=device)
    )
    best = by_candidate.argmax(1) if groups else torch.zeros(size, dtype=torch.long, device=device)
    best_count = by_candidate.gather(1, best[:, None]).squeeze(1) if groups else torch.zeros_like(by_block)
    use_candidate = best_count > by_block
    count = torch.where(use_candidate, best_count, by_block)
    span = max(fed, length + 1)
    from_block = torch.nn.functional.pad(predictions, (0, span - fed))
    chosen = candidate_predictions[torch.arange(size, device=device), best] if groups else \
        torch.zeros((size, length), dtype=torch.long, device=device)
    from_candidate = torch.nn.functional.pad(torch.cat([predictions[:, :1], chosen], dim=1), (0, span - length - 1))
    emitted = torch.where(use_candidate[:, None], from_candidate, from_block)
    offsets = torch.arange(span, device=device)
    by_candidate_column = torch.where(offsets == 0, 0, fed + best[:, None] * length + offsets - 1)
    source = torch.where(use_candidate[:, None], by_candidate_column, offsets.clamp(max=fed - 1)[None])

    # the winner's first count - 1 tokens were fed after a right prefix: the block's guesses from
    # column 1, or the candidate's
    first = torch.where(use_candidate, fed + best * length, 1)
    batch.keep_pending_and(first, count - 1)
    return CandidateStep(predictions, emitted, count, source.clamp(max=prediction.shape[1] - 1))
