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
  CPU (docs/results.md).
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

import torch
from transformers import PreTrainedModel

from cllm.decoding.core import (
    BatchControl,
    DecodeOutput,
    TokenCallback,
    _as_batch,
    _context,
    _emit,
    _emit_first_token,
    _eos_tensor,
    _join,
    _keep_pending_and_accepted,
    _Outputs,
    _pad,
    _prefill,
    _Rows,
    _truncate_at_eos,
    _validate,
    accepted_prefix,
    ragged,
    verify_candidates,
)
from cllm.decoding.jacobi import _GuessMaker, lookup_continuation
from cllm.decoding.ngrams import NgramPool, offered_candidates
from cllm.decoding.sampling import GREEDY, Sampling


def _step_mask(levels: int, window: int, counts: torch.Tensor, ngram: int, drafted: torch.Tensor | None = None
               ) -> torch.Tensor:
    """(B, Q, Q) True where a fed column may attend to another fed column (the cache part is
    added by the caller). Columns: `pending`, then levels*window window tokens, then the
    candidates ((B, G) `counts`: which exist), then the draft ((B, D) `drafted`: which draft tokens exist)."""
    device = counts.device
    batch, span, groups = counts.shape[0], levels * window, counts.shape[1]
    drafted = torch.zeros((batch, 0), dtype=torch.bool, device=device) if drafted is None else drafted
    total = 1 + span + groups * (ngram - 1) + drafted.shape[1]
    mask = torch.zeros((batch, total, total), dtype=torch.bool, device=device)
    mask[:, :, 0] = True  # every column sees `pending`

    level = torch.arange(span, device=device) // window
    column = torch.arange(span, device=device) % window
    sees_level0 = (level[None, :] == 0) & (column[None, :] <= column[:, None])
    sees_diagonal = (level[None, :] >= 1) & (level[None, :] <= level[:, None]) & (column[None, :] == column[:, None])
    mask[:, 1 : 1 + span, 1 : 1 + span] = (sees_level0 | sees_diagonal)[None]

    own = torch.ones((ngram - 1, ngram - 1), dtype=torch.bool, device=device).tril()
    eye = torch.eye(ngram - 1, dtype=torch.bool, device=device)
    for g in range(groups):
        cols = slice(1 + span + g * (ngram - 1), 1 + span + (g + 1) * (ngram - 1))
        real = counts[:, g]  # (B,) whether this row has a g-th candidate
        mask[:, cols, cols] = own[None] & real[:, None, None] | eye[None]
        mask[:, cols, 0] &= real[:, None]  # an absent candidate sees only itself
    if drafted.shape[1]:
        cols = slice(total - drafted.shape[1], total)
        own = torch.ones((drafted.shape[1],) * 2, dtype=torch.bool, device=device).tril()
        eye = torch.eye(drafted.shape[1], dtype=torch.bool, device=device)
        mask[:, cols, cols] = own[None] & drafted[:, None, :] & drafted[:, :, None] | eye[None]
        mask[:, cols, 0] &= drafted  # a missing draft token sees only itself
    return mask


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
) -> DecodeOutput:
    """Lookahead decoding: `window` W, n-gram size `ngram` N, up to `candidates` G verified
    n-grams per step, and a prompt-lookup draft of up to `draft` tokens (0: none). Returns exactly
    the AR output, greedy or sampled with the same `sampling` and `seed`; stats count one forward
    per step. `max_new_tokens`, `sampling` and `seed` are one for the batch or one per row;
    `control` lets rows join and leave (cllm.decoding.core.BatchControl); `compile` runs the
    compiled path (cllm.decoding.kv)."""
    input_ids, attention_mask = _as_batch(input_ids, attention_mask)
    _validate(input_ids, attention_mask, max_new_tokens, block_size=1)
    if window < 1 or ngram < 2 or candidates < 1 or draft < 0:
        raise ValueError("lookahead needs window >= 1, ngram >= 2, candidates >= 1 and draft >= 0; "
                         f"got {window}, {ngram}, {candidates}, {draft}")
    if str(getattr(model.config, "_attn_implementation", "")).startswith("flash"):
        raise ValueError("lookahead needs a custom attention mask, which flash-attention does not take: load the model "
                         "with attn_implementation='sdpa' or 'eager'")
    batch, device = input_ids.shape[0], input_ids.device
    levels = ngram - 1
    eos = _eos_tensor(eos_token_id, device)
    outputs = _Outputs(batch, on_tokens, control)
    stats = outputs.stats
    slack = max(ngram, draft + 1)  # the most tokens a step can accept
    cache, rows = _prefill(model, input_ids, attention_mask, max_new_tokens, slack, sampling, seed, compile=compile)
    pools = [NgramPool(ngram, candidates) for _ in range(batch)]
    make_guess = _GuessMaker("prompt", seed, batch, pad_token_id)  # the window starts as Jacobi's `prompt` guess
    _emit_first_token(rows, cache, eos, outputs)

    def start_trail(which: torch.Tensor) -> torch.Tensor:
        """(b, N-1, W) the window of rows starting their first step."""
        return make_guess(rows, which, levels * window).view(-1, levels, window)

    trail = start_trail(torch.arange(len(rows.index), device=device))
    span = torch.arange(levels * window, device=device)
    first_candidate = 1 + levels * window  # fed column of the first candidate's first token

    while True:
        admission = control.admit() if control is not None else None
        if admission is not None:
            cache, rows, joined = _join(model, cache, rows, admission, outputs, eos, slack, pad_token_id)
            make_guess.add_rows(admission.seeds, first_index=len(pools))
            pools += [NgramPool(ngram, candidates) for _ in admission.prompts]
            joining = torch.arange(len(rows.index) - joined, len(rows.index), device=device)
            trail = torch.cat([trail, start_trail(joining)])
        if not len(rows.index):
            break
        for i in range(len(rows.index)):
            pools[int(rows.index[i])].add_context(_context(rows, i))
        proposals, present = offered_candidates(pools, rows, ngram, pad_token_id)
        groups = proposals.shape[1]
        drafts, drafted = _context_drafts(rows, draft, pad_token_id)

        last = rows.n_real  # position of `pending`
        window_positions = last[:, None] + 1 + span % window + span // window
        proposal_positions = last[:, None] + 1 + torch.arange(levels, device=device).repeat(groups)
        draft_positions = last[:, None] + 1 + torch.arange(drafts.shape[1], device=device)
        tokens = torch.cat([rows.pending[:, None], trail.flatten(1), proposals.flatten(1), drafts], dim=1)
        positions = torch.cat([last[:, None], window_positions, proposal_positions, draft_positions], dim=1)
        fed = _step_mask(levels, window, present, ngram, drafted)
        allowed = torch.cat([rows.slot_mask.bool()[:, None, :].expand(-1, fed.shape[1], -1), fed], dim=2)
        # only `pending`, the window's last level, the candidates and the draft are read: the LM head skips the rest
        last_level = 1 + (levels - 1) * window
        read = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(last_level, tokens.shape[1])]).to(device)
        logits = cache.forward(tokens, positions, allowed, logits_to_keep=read)
        # the column at position q predicts output index n_out + q - last (`pending`, at `last`, is n_out - 1)
        prediction = rows.pick(logits, positions[:, read] - last[:, None] + rows.n_out[:, None])  # (B, 1+W+G(N-1)+D)

        # verification: candidate g holds while each token equals the prediction before it
        after_pending = prediction[:, :1]  # (B, 1) the next token, as AR
        proposed_end = 1 + window + groups * levels
        proposed_predictions = prediction[:, 1 + window : proposed_end].view(len(rows.index), groups, levels)
        matched = verify_candidates(proposals, present, after_pending, proposed_predictions)  # (B, G)
        best = matched.argmax(dim=1) if groups else torch.zeros(len(rows.index), dtype=torch.long, device=device)
        length = matched.gather(1, best[:, None]).squeeze(1) if groups else torch.zeros_like(best)
        chosen = proposed_predictions[torch.arange(len(rows.index), device=device), best] if groups else \
            torch.zeros((len(rows.index), levels), dtype=torch.long, device=device)
        winner = first_candidate + best * levels  # the fed column where the winning tokens start
        if drafts.shape[1]:  # the draft wins where it matched more than the best candidate
            draft_predictions = prediction[:, proposed_end:]
            draft_length = accepted_prefix(drafts, torch.cat([after_pending, draft_predictions[:, :-1]], dim=1), drafted)
            longest = max(levels, drafts.shape[1])
            by_draft = draft_length > length
            chosen = torch.where(by_draft[:, None], _pad(draft_predictions, longest, 1, left=False),
                                 _pad(chosen, longest, 1, left=False))
            winner = torch.where(by_draft, first_candidate + groups * levels, winner)
            length = torch.maximum(length, draft_length)
        emitted = torch.cat([after_pending, chosen], dim=1)  # the first 1 + length are right
        count = torch.minimum(length + 1, rows.limit - rows.n_out)
        count, hit_eos = _truncate_at_eos(emitted, count, eos)

        # the winner's accepted tokens were fed after a right prefix: their KV is kept, the rest cropped
        _keep_pending_and_accepted(cache, rows, winner, count - 1)
        _emit(rows, emitted, count, on_tokens)
        for row, emitted_count in zip(rows.index.tolist(), count.tolist()):
            stats[int(row)].forward_passes += 1
            stats[int(row)].fast_forward += emitted_count - 1
        newest = prediction[:, 1 : 1 + window]  # (B, W) last level's predictions
        for i, row in enumerate(rows.index.tolist()):
            columns = torch.cat([trail[i], newest[i][None]], dim=0).T.tolist()  # W n-grams, one per column
            for gram in columns:
                pools[row].add(gram)
        trail = torch.cat([trail[:, 1:], newest[:, None]], dim=1)
        rows.pending = emitted.gather(1, (count - 1)[:, None]).squeeze(1)
        keep = outputs.retire(rows, cache, hit_eos | (rows.n_out >= rows.limit))
        if keep is not None:
            trail = trail[keep]
    return outputs.output()


def _context_drafts(rows: _Rows, length: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, D) each row's prompt-lookup draft of `length` tokens and (B, D) which exist: D is 0 where
    no row's context has a recurring suffix, so no column is fed for nothing."""
    found = [lookup_continuation(_context(rows, i), length) for i in range(len(rows.index))] if length else \
        [[]] * len(rows.index)
    return ragged(found, pad_token_id, device=rows.pending.device)
