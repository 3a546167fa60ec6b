"""Multi-candidate Jacobi: G n-grams verified in the same forward as the Jacobi block.

The block keeps its iteration; the candidates only add chances. Each row feeds

    [ run | the block's unfixed guesses | G candidates of N-1 tokens ]

with a custom 4D mask (the guesses see the run and each other causally, as in plain Jacobi; a
candidate sees the run and its own earlier tokens). Candidates come from the row's n-gram pool
(cllm.decoding.ngrams.NgramPool), fed by its prompt and output and by its own iterates, the
CLLM's fast-forwarded guesses included, and keyed by the last accepted token. A candidate's
k-th token is right if it equals the prediction at the column before it; when the best
candidate accepts more tokens than the block does, its tokens are emitted and written into the
iterate. The KV of the run and of the block's accepted guesses is kept; a candidate's accepted
tokens have no kept KV, so they become the next run (fed again, first, next iteration).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cllm.decoding.core import KVStore, _Rows


@dataclass
class CandidateStep:
    predictions: torch.Tensor  # (B, m) the block's new values at its unfixed positions
    emitted: torch.Tensor  # (B, E) accepted tokens first
    count: torch.Tensor  # (B,) accepted tokens, >= 1
    run: torch.Tensor  # (B, R') the next run: accepted tokens whose KV is not cached
    run_len: torch.Tensor  # (B,)


def _mask(run_len: torch.Tensor, width: int, guess_real: torch.Tensor, present: torch.Tensor, length: int) -> torch.Tensor:
    """(B, Q, Q): run | guesses | candidates, who may see whom among the fed columns."""
    device = run_len.device
    batch, guesses, groups = run_len.shape[0], guess_real.shape[1], present.shape[1]
    total = width + guesses + groups * length
    run_real = torch.arange(width, device=device)[None, :] < run_len[:, None]
    mask = torch.zeros((batch, total, total), dtype=torch.bool, device=device)
    mask[:, :, :width] = run_real[:, None, :]
    mask[:, :width, :width] &= torch.ones((width, width), dtype=torch.bool, device=device).tril()
    guess_causal = torch.ones((guesses, guesses), dtype=torch.bool, device=device).tril()
    mask[:, width : width + guesses, width : width + guesses] = guess_causal[None] & guess_real[:, None, :]
    own = torch.ones((length, length), dtype=torch.bool, device=device).tril()
    for g in range(groups):
        cols = slice(width + guesses + g * length, width + guesses + (g + 1) * length)
        mask[:, cols, cols] = own[None] & present[:, g, None, None]
        mask[:, cols, :width] &= present[:, g, None, None]
    return mask | torch.eye(total, dtype=torch.bool, device=device)[None]  # no column is all-masked


def candidate_step(
    cache: KVStore, rows: _Rows, run: torch.Tensor, run_len: torch.Tensor,
    guesses: torch.Tensor, width: torch.Tensor, proposals: torch.Tensor, present: torch.Tensor, pad_token_id: int,
) -> CandidateStep:
    """One forward of run + block + candidates; verifies both and commits the kept KV to the cache."""
    device = run.device
    batch, run_width = run.shape
    fed = guesses.shape[1]  # block positions predicted: the first from the run's last token
    groups, length = proposals.shape[1], proposals.shape[2]
    columns = torch.arange(fed, device=device)
    guess_real = columns[1:] < width[:, None]  # the guess of position fixed + k is fed at guess column k
    tokens = torch.cat([run, guesses[:, :-1].masked_fill(~guess_real, pad_token_id), proposals.flatten(1)], dim=1)
    after_run = rows.n_real + run_len
    positions = torch.cat([
        rows.n_real[:, None] + torch.arange(run_width, device=device),
        after_run[:, None] + torch.arange(fed - 1, device=device),
        after_run[:, None] + torch.arange(length, device=device).repeat(groups),
    ], dim=1)
    fed_mask = _mask(run_len, run_width, guess_real, present, length)
    allowed = torch.cat([rows.slot_mask.bool()[:, None, :].expand(-1, fed_mask.shape[1], -1), fed_mask], dim=2)
    logits = cache.forward(tokens, positions, allowed)
    prediction = rows.pick(logits, positions - (after_run - 1)[:, None] + rows.n_out[:, None])  # `pending`: n_out - 1

    # the block: position fixed + c is predicted at the run's last column (c = 0) or at guess c - 1
    at = torch.where(columns[None, :] == 0, (run_len - 1)[:, None], run_width + columns[None, :] - 1)
    predictions = prediction.gather(1, at)  # (B, fed)
    same = (predictions == guesses) & (columns[None, :] < width[:, None])
    by_block = torch.minimum(same.long().cumprod(1).sum(1) + 1, width)
    # the candidates: token k must equal the prediction before it
    candidate_predictions = prediction[:, run_width + fed - 1 :].view(batch, groups, length)
    before = torch.cat([predictions[:, None, :1].expand(-1, groups, -1), candidate_predictions[:, :, :-1]], dim=2)
    matched = ((proposals == before) & present[:, :, None]).long().cumprod(2).sum(2)
    by_candidate = torch.minimum(matched + 1, width[:, None]) if groups else torch.ones((batch, 0), dtype=torch.long, device=device)
    best = by_candidate.argmax(1) if groups else torch.zeros(batch, dtype=torch.long, device=device)
    best_count = by_candidate.gather(1, best[:, None]).squeeze(1) if groups else torch.zeros_like(by_block)
    use_candidate = best_count > by_block
    count = torch.where(use_candidate, best_count, by_block)
    span = max(fed, length + 1)
    from_block = torch.nn.functional.pad(predictions, (0, span - fed))
    chosen = candidate_predictions[torch.arange(batch, device=device), best] if groups else \
        torch.zeros((batch, length), dtype=torch.long, device=device)
    from_candidate = torch.nn.functional.pad(torch.cat([predictions[:, :1], chosen], dim=1), (0, span - length - 1))
    emitted = torch.where(use_candidate[:, None], from_candidate, from_block)

    # keep the run's KV and the block's accepted guesses' (the first by_block - 1 guess columns)
    kept_guesses = by_block - 1
    keep = run_width + int(kept_guesses.max())
    cache.keep(keep)
    kept = torch.arange(keep, device=device)[None, :]
    real = (kept < run_len[:, None]) | ((kept >= run_width) & (kept < run_width + kept_guesses[:, None]))
    rows.slot_mask = torch.cat([rows.slot_mask, real.long()], dim=1)
    rows.n_real = rows.n_real + run_len + kept_guesses
    next_len = count - kept_guesses  # tokens from the first without kept KV to the last accepted
    next_run = emitted.gather(1, (kept_guesses[:, None] + torch.arange(int(next_len.max()), device=device)).clamp(max=span - 1))
    return CandidateStep(predictions, emitted, count, next_run, next_len)

