"""Lookahead decoding (Fu et al., 2024), exact (greedy, or sampled with the fixed per-position draws of
cllm.decoding.sampling), batched, in one forward per step.

Each step feeds one sequence per row through the public forward with a custom 4D attention mask
(docs/decoding.md draws it):

    [ pending | lookahead window: N-1 levels x W columns | G candidate n-grams of N-1 tokens | draft ]

- pending: the last accepted token, at position p, not yet in the KV cache; every column sees it.
  Its prediction is the next token, exactly as in AR.
- lookahead window: a W-wide trajectory of Jacobi guesses, N-1 levels deep. The token at level l,
  column i sits at position p+1+i+l and sees `pending`, level 0 up to column i, and column i of
  levels 1..l: a diagonal. The last level's predictions become the next step's last level (the
  oldest level drops out), and each column, read down its levels plus that prediction, is an
  N-gram for the pool. The window only proposes; nothing it holds is trusted.
- candidates: up to G n-grams from the pool that start with `pending`, each at positions p+1..
  and seeing `pending` and its own earlier tokens only. Candidate g is right for as long as each
  of its tokens equals the prediction at the column before it; the longest such prefix, plus the
  prediction after it, is accepted (at least one token: the plain AR step).
- draft (optional, `draft` D > 0): D tokens that followed the latest earlier occurrence of the
  context's last tokens (prompt lookup; a loop shorter than D repeated), verified like a
  candidate. The pool's candidates are N-1 tokens long; a draft copies a longer span where the
  answer repeats its question, which is what makes transformers' prompt lookup hard to beat on a
  CPU (docs/results-history.md).
The pool (per row, keyed by first token, newest first, G per key) is fed by the window and by
every N-gram of the row's own context (prompt + output so far). The KV of `pending` and of the
winner's right prefix is kept (gathered per row: each row's winner sits in other columns), the
window's and the other candidates' are cropped away; the prediction after the prefix is the next
`pending`. The cache only ever holds tokens fed after a correct prefix: outputs equal AR's token
for token.

Custom 4D masks are handed to the attention as they are: this works with the eager and SDPA
attentions (an additive float mask), not with flash-attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from cllm.decoding.batch import Batch
from cllm.decoding.core import (
    BatchControl,
    DecodeOutput,
    TokenCallback,
    _as_batch,
    _context,
    _pad,
    _Rows,
    _validate,
    accepted_prefix,
    causal,
    fed_mask,
    ragged,
    verify_candidates,
)
from cllm.decoding.jacobi import _GuessMaker, matched_lookup
from cllm.decoding.ngrams import NgramPools
from cllm.decoding.prediction import aligned_continuation
from cllm.decoding.sampling import GREEDY, Sampling


def _step_mask(levels: int, window: int, counts: torch.Tensor, ngram: int, drafted: torch.Tensor | None = None
               ) -> torch.Tensor:
    """(B, Q, Q) True where a fed column may attend to another fed column (the cache part is
    added by the caller). Columns: `pending`, then levels*window window tokens, then the
    candidates ((B, G) `counts`: which exist), then the draft ((B, D) `drafted`: which draft tokens exist)."""
    device = counts.device
    batch, span, groups = counts.shape[0], levels * window, counts.shape[1]
    level = torch.arange(span, device=device) // window
    column = torch.arange(span, device=device) % window
    sees_level0 = (level[None, :] == 0) & (column[None, :] <= column[:, None])
    sees_diagonal = (level[None, :] >= 1) & (level[None, :] <= level[:, None]) & (column[None, :] == column[:, None])
    segments = [(sees_level0 | sees_diagonal, torch.ones((batch, span), dtype=torch.bool, device=device))]
    segments += [(causal(ngram - 1, device), counts[:, g, None].expand(-1, ngram - 1)) for g in range(groups)]
    if drafted is not None and drafted.shape[1]:
        segments.append((causal(drafted.shape[1], device), drafted))
    return fed_mask(segments)


@torch.inference_mode()
def lookahead(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    window: int = 5,
    ngram: int = 4,
    candidates: int = 5,
    draft: int = 0,
    max_new_tokens: int | Sequence[int] = 128,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    seed: int | Sequence[int] = 0,
    on_tokens: TokenCallback | None = None,
    sampling: Sampling | Sequence[Sampling] = GREEDY,
    control: BatchControl | None = None,
    compile: bool | str = False,
    logprobs: int | Sequence[int | None] | None = None,
    predictions: Sequence[Sequence[int] | None] | None = None,
) -> DecodeOutput:
    """Lookahead decoding: `window` W, n-gram size `ngram` N, up to `candidates` G verified
    n-grams per step, and a prompt-lookup draft of up to `draft` tokens (0: none). Returns exactly
    the AR output, greedy or sampled with the same `sampling` and `seed`; stats count one forward
    per step. `max_new_tokens`, `sampling` and `seed` are one for the batch or one per row;
    `control` lets rows join and leave (cllm.decoding.core.BatchControl); `compile` runs the
    compiled path (cllm.decoding.kv)."""
    input_ids, attention_mask = _as_batch(input_ids, attention_mask)
    _check_lookahead(model, input_ids, attention_mask, max_new_tokens, window, ngram, candidates, draft)
    batch = Batch(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, slack=max(ngram, draft + 1),
                  eos_token_id=eos_token_id, pad_token_id=pad_token_id, sampling=sampling, seed=seed,
                  on_tokens=on_tokens, control=control, compile=compile, logprobs=logprobs, predictions=predictions)
    trail = batch.attach(_Window(batch, ngram - 1, window))
    pools = NgramPools(ngram, candidates)
    full = 1 + (window + candidates) * (ngram - 1) + draft  # columns of a row's step
    while batch.admit():
        if batch.column_cap(full) < full:  # a server's column budget cannot afford a step for every row
            batch.ar_step()
            continue
        # a prediction drafts as many tokens as the batch's slack holds
        drafts = _context_drafts(batch.rows, draft, pad_token_id, predicted=max(draft, ngram - 1))
        candidates_and_draft = *pools.offer(batch.rows, pad_token_id), *drafts
        step = _Step(batch, trail, *candidates_and_draft)
        prediction = step.forward()  # (B, 1 + W + G(N-1) + D) at `pending`, the last level, candidates, draft
        emitted, count, winner = step.verify(prediction)  # (B, E) right tokens first, (B,) how many, (B,) where fed
        count, done = batch.emit(emitted, torch.minimum(count, batch.rows.limit - batch.rows.n_out),
                                 step.read_columns(winner, emitted.shape[1]))
        # the winner's accepted tokens were fed after a right prefix: their KV is kept, the rest cropped
        batch.keep_pending_and(winner, count - 1)
        trail.advance(pools, prediction[:, 1 : 1 + window])
        batch.retire(done)
    return batch.output()


def _check_lookahead(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     max_new_tokens: int | Sequence[int], window: int, ngram: int, candidates: int, draft: int) -> None:
    _validate(input_ids, attention_mask, max_new_tokens, block_size=1)
    if window < 1 or ngram < 2 or candidates < 1 or draft < 0:
        raise ValueError("lookahead needs window >= 1, ngram >= 2, candidates >= 1 and draft >= 0; "
                         f"got {window}, {ngram}, {candidates}, {draft}")
    if str(getattr(model.config, "_attn_implementation", "")).startswith("flash"):
        raise ValueError("lookahead needs a custom attention mask, which flash-attention does not take: load the model "
                         "with attn_implementation='sdpa' or 'eager'")


class _Window:
    """Per-row lookahead window (a `RowState` of the batch): (B, N-1, W) the last N-1 levels of
    Jacobi guesses, started as Jacobi's `prompt` guess."""

    def __init__(self, batch: Batch, levels: int, window: int) -> None:
        self.batch, self.levels, self.window = batch, levels, window
        self.make_guess = _GuessMaker("prompt", batch.pad_token_id)
        self.trail = torch.zeros((0, levels, window), dtype=torch.long, device=batch.rows.pending.device)

    def start(self, which: torch.Tensor) -> None:
        started = self.make_guess(self.batch.rows, which, self.levels * self.window).view(-1, self.levels, self.window)
        self.trail = torch.cat([self.trail, started])

    def keep(self, keep: torch.Tensor) -> None:
        self.trail = self.trail[keep]

    def advance(self, pools: NgramPools, newest: torch.Tensor) -> None:
        """The last level's predictions (B, W) become the newest level; every column read down
        the levels and that prediction is an n-gram for the row's pool."""
        for i, row in enumerate(self.batch.rows.index.tolist()):
            for gram in torch.cat([self.trail[i], newest[i][None]], dim=0).T.tolist():
                pools[row].add(gram)
        self.trail = torch.cat([self.trail[:, 1:], newest[:, None]], dim=1)


@dataclass
class _Step:
    """One step's fed columns: `pending` | the window | G candidates of N-1 tokens | the draft."""

    batch: Batch
    window: _Window
    proposals: torch.Tensor  # (B, G, N-1)
    present: torch.Tensor  # (B, G) which candidates exist
    drafts: torch.Tensor  # (B, D)
    drafted: torch.Tensor  # (B, D) which draft tokens exist

    def forward(self) -> torch.Tensor:
        """The prediction after `pending`, the window's last level, the candidates and the draft."""
        rows, levels, width = self.batch.rows, self.window.levels, self.window.window
        device, groups = rows.pending.device, self.proposals.shape[1]
        last = rows.n_real  # position of `pending`
        span = torch.arange(levels * width, device=device)
        positions = torch.cat([last[:, None], last[:, None] + 1 + span % width + span // width,
                               last[:, None] + 1 + torch.arange(levels, device=device).repeat(groups),
                               last[:, None] + 1 + torch.arange(self.drafts.shape[1], device=device)], dim=1)
        tokens = torch.cat([rows.pending[:, None], self.window.trail.flatten(1), self.proposals.flatten(1),
                            self.drafts], dim=1)
        fed = _step_mask(levels, width, self.present, levels + 1, self.drafted)
        allowed = torch.cat([rows.slot_mask.bool()[:, None, :].expand(-1, fed.shape[1], -1), fed], dim=2)
        # only `pending`, the window's last level, the candidates and the draft are read: the LM head skips the rest
        last_level = 1 + (levels - 1) * width
        read = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(last_level, tokens.shape[1])]).to(device)
        logits = self.batch.cache.forward(tokens, positions, allowed, logits_to_keep=read)
        # the column at position q predicts output index n_out + q - last (`pending`, at `last`, is n_out - 1)
        return self.batch.pick(logits, positions[:, read] - last[:, None] + rows.n_out[:, None])

    def read_columns(self, winner: torch.Tensor, emitted: int) -> torch.Tensor:
        """(B, E) the column of the prediction each emitted token was read at: the one after
        `pending`, then the winner's (fed from column `winner` (B,) on; the window's first levels
        are not read)."""
        skipped = (self.window.levels - 1) * self.window.window
        offsets = torch.arange(emitted, device=winner.device)
        columns = torch.where(offsets == 0, 0, winner[:, None] - skipped + offsets - 1)
        width = 1 + self.window.window + self.proposals.shape[1] * self.window.levels + self.drafts.shape[1]
        return columns.clamp(max=width - 1)

    def verify(self, prediction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, E) the tokens to emit, right ones first, (B,) how many are right (>= 1: the
        prediction after `pending`), (B,) the fed column where the winner's tokens start.
        A candidate holds while each token equals the prediction before it; the draft wins where
        it matched more than the best candidate."""
        levels, width, groups = self.window.levels, self.window.window, self.proposals.shape[1]
        size, device = prediction.shape[0], prediction.device
        first_candidate = 1 + levels * width  # fed column of the first candidate's first token
        after_pending = prediction[:, :1]  # (B, 1) the next token, as AR
        proposed_end = 1 + width + groups * levels
        proposed_predictions = prediction[:, 1 + width : proposed_end].view(size, groups, levels)
        matched = verify_candidates(self.proposals, self.present, after_pending, proposed_predictions)  # (B, G)
        best = matched.argmax(dim=1) if groups else torch.zeros(size, dtype=torch.long, device=device)
        length = matched.gather(1, best[:, None]).squeeze(1) if groups else torch.zeros_like(best)
        chosen = proposed_predictions[torch.arange(size, device=device), best] if groups else \
            torch.zeros((size, levels), dtype=torch.long, device=device)
        winner = first_candidate + best * levels
        if self.drafts.shape[1]:
            draft_predictions = prediction[:, proposed_end:]
            draft_length = accepted_prefix(self.drafts, torch.cat([after_pending, draft_predictions[:, :-1]], dim=1),
                                           self.drafted)
            longest = max(levels, self.drafts.shape[1])
            by_draft = draft_length > length
            chosen = torch.where(by_draft[:, None], _pad(draft_predictions, longest, 1, left=False),
                                 _pad(chosen, longest, 1, left=False))
            winner = torch.where(by_draft, first_candidate + groups * levels, winner)
            length = torch.maximum(length, draft_length)
        return torch.cat([after_pending, chosen], dim=1), length + 1, winner


def _context_drafts(rows: _Rows, length: int, pad_token_id: int,
                    predicted: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, D) each row's draft and (B, D) which tokens exist: its prompt-lookup draft of `length`
    tokens, or what its prediction (Predicted Outputs) says follows, up to `predicted` tokens,
    where the output aligns with the prediction at least as long a suffix. D is 0 where no row
    has one, so no column is fed for nothing."""
    if not length and all(p is None for p in rows.predictions):  # no draft columns: no per-row work
        return ragged([[]] * len(rows.index), pad_token_id, device=rows.pending.device)
    found = []
    for i in range(len(rows.index)):
        context, prediction = _context(rows, i), rows.predictions[i]
        draft, size = matched_lookup(context, length) if length else ([], 0)
        if prediction is not None:
            predicted_draft, aligned = aligned_continuation(prediction, context[int(rows.prompt_len[i]) :], predicted)
            if predicted_draft and aligned >= size:
                draft = predicted_draft
        found.append(draft)
    return ragged(found, pad_token_id, device=rows.pending.device)
