"""Jacobi decoding (`jacobi`, and `jacobi_no_cache`, the original code's way), its initial guesses
and the statistics of its trajectories. The prefill of the prompts yields the first token; Jacobi
blocks cover the tokens after it (cache layout: cllm.decoding.core).

Jacobi iteration (block of n positions, `fixed` of them already known to be right):
  1. guess    -- input = [pending, unfixed guesses except the last]          (B, m)
  2. forward  -- one parallel forward; argmax (or the fixed sample) per column (B, m)
  3. accept   -- the longest prefix where the prediction equals the guess it replaces, plus one:
                 the tokens fed up to there were right, so the predictions after them are too
  4. commit   -- write the new iterate, emit accepted tokens, crop the cache to the longest
                 acceptance and mask the rest; a row whose block is complete starts a new block.
A Jacobi block of size 1 is exactly the AR loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from cllm.decoding.batch import Batch
from cllm.decoding.candidates import candidate_step
from cllm.decoding.core import (
    BatchControl,
    DecodeOutput,
    DecodeStats,
    TokenCallback,
    _as_batch,
    _context,
    _eos_tensor,
    _Rows,
    _validate,
    accepted_prefix,
)
from cllm.decoding.drafting import ADAPTER_DRAFTERS, AdapterDrafts, Drafter, DraftModel
from cllm.decoding.ngrams import NgramPools
from cllm.decoding.prediction import aligned_continuation
from cllm.decoding.sampling import GREEDY, Sampling, row_seeds
from cllm.decoding.spec import INIT_STRATEGIES

LOOKUP_MAX_NGRAM = 3
LOOKUP_MIN_NGRAM_MID_BLOCK = 2  # a lone recurring token is too weak a reason to discard the iterate


class _GuessMaker:
    """Initial guesses y(0) for a new block, per the chosen strategy.

    `prompt` (the paper's choice) draws n tokens uniformly from the row's own prompt; every row has
    its own generator, seeded with the row's seed (`seed + row`, or its entry of a per-row `seed`
    list), so a row's guesses do not depend on its batch mates. `lookup` takes what followed the
    latest earlier occurrence of the context's last tokens (see `lookup_continuation`), and draws
    like `prompt` where no suffix recurs: answers repeat numbers and phrases of their question, and
    the acceptance rule verifies every guess, so the output stays the greedy one whatever the guess.
    """

    def __init__(self, strategy: str, pad_token_id: int) -> None:
        if strategy not in INIT_STRATEGIES:
            raise ValueError(f"unknown init strategy {strategy!r}; choose one of {', '.join(INIT_STRATEGIES)}")
        self.strategy = strategy
        self.pad_token_id = pad_token_id
        self.generators: dict[int, torch.Generator] = {}  # by the row's index in the caller's batch

    def __call__(self, rows: _Rows, which: torch.Tensor, n: int) -> torch.Tensor:
        """Guesses (len(which), n) for the rows at batch positions `which`."""
        if len(which) == 0:
            return torch.empty((0, n), dtype=torch.long, device=rows.pending.device)
        return torch.stack([self.guess(int(rows.index[i]), rows.seeds[i], _context(rows, i), int(rows.prompt_len[i]), n,
                                       rows.predictions[i]) for i in which.tolist()])

    def guess(self, row: int, seed: int, context: torch.Tensor, prompt_len: int, n: int,
              prediction: torch.Tensor | None = None) -> torch.Tensor:
        """(n,) row `row`'s guess for the block after `context` (its prompt, `prompt_len` tokens, then
        its output so far, ending with `pending`); where the row's `prediction` (Predicted Outputs)
        aligns with its output, what the prediction says comes next."""
        guess, matched = self._guess(row, seed, context, prompt_len, n)
        if prediction is not None:
            found, size = aligned_continuation(prediction, context[prompt_len:], n)
            if found and size >= matched:  # the lookup's guess where the context matched longer
                guess[: len(found)] = torch.tensor(found, dtype=torch.long, device=context.device)
        return guess

    def _guess(self, row: int, seed: int, context: torch.Tensor, prompt_len: int, n: int) -> tuple[torch.Tensor, int]:
        """The strategy's guess and, for `lookup`, the length of the context suffix it matched."""
        if self.strategy == "repeat":
            return context[-1:].expand(n).clone(), 0
        if self.strategy == "pad":
            return torch.full((n,), self.pad_token_id, dtype=torch.long, device=context.device), 0
        if row not in self.generators:
            self.generators[row] = torch.Generator().manual_seed(seed)
        draws = torch.rand(n, generator=self.generators[row]).to(context.device)  # (n,) in [0, 1)
        guess, size = context[(draws * prompt_len).long()], 0
        if self.strategy == "lookup":
            found, size = matched_lookup(context, n)
            guess[: len(found)] = torch.tensor(found, dtype=torch.long, device=context.device)
        return guess, size

    def refresh(
        self, rows: _Rows, block: torch.Tensor, fixed: torch.Tensor, block_len: torch.Tensor, done: torch.Tensor
    ) -> None:
        """`refresh_row` for every row whose block goes on."""
        if self.strategy != "lookup" and all(p is None for p in rows.predictions):
            return  # nothing to look up: no per-step work, no device sync
        for i in ((fixed < block_len) & ~done).nonzero().flatten().tolist():
            if self.strategy == "lookup" or rows.predictions[i] is not None:
                self.refresh_row(_context(rows, i), block[i], int(fixed[i]), int(block_len[i]),
                                 rows.predictions[i], int(rows.prompt_len[i]))

    def refresh_row(self, context: torch.Tensor, block: torch.Tensor, start: int, length: int,
                    prediction: torch.Tensor | None = None, prompt_len: int = 0) -> None:
        """After an iteration (`lookup`, or a row with a `prediction`): where the verified
        `context`'s last tokens recur (in the context, or in the prediction: the longer match
        wins) and what followed them disagrees with the iterate's first unfixed token
        `block[start]`, overwrite the unfixed positions with it. The iterate there was computed
        from a rejected token, the lookup from verified ones; the acceptance rule checks both alike."""
        found, size = [], 0
        if self.strategy == "lookup":
            found, size = matched_lookup(context, length - start, min_ngram=LOOKUP_MIN_NGRAM_MID_BLOCK)
        if prediction is not None:
            predicted, aligned = aligned_continuation(prediction, context[prompt_len:], length - start)
            if predicted and aligned >= size:
                found = predicted
        if found and found[0] != int(block[start]):
            block[start : start + len(found)] = torch.tensor(found, dtype=torch.long, device=block.device)


def lookup_continuation(
    context: torch.Tensor | Sequence[int], n: int, max_ngram: int = LOOKUP_MAX_NGRAM, min_ngram: int = 1
) -> list[int]:
    """n tokens that followed the latest earlier occurrence of the context's last `size` tokens,
    trying size = max_ngram down to min_ngram (prompt lookup); [] when no suffix recurs. Where the
    context ends first, the copy goes on repeating what followed the occurrence (an overlapping
    copy, as in LZ77): a loop shorter than n is guessed to go on, which is what a looping model does."""
    return matched_lookup(context, n, max_ngram, min_ngram)[0]


def matched_lookup(context: torch.Tensor | Sequence[int], n: int, max_ngram: int = LOOKUP_MAX_NGRAM,
                   min_ngram: int = 1) -> tuple[list[int], int]:
    """`lookup_continuation` and the size of the suffix it matched (0: none)."""
    context = torch.as_tensor(context, dtype=torch.long)
    length = context.shape[0]
    for size in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        # every window that some token follows, the suffix itself excluded
        earlier = context[: length - 1].unfold(0, size, 1)
        hits = (earlier == context[length - size :]).all(dim=1).nonzero()
        if len(hits):
            followed = context[int(hits[-1]) + size :].tolist()
            return [followed[k % len(followed)] for k in range(n)], size
    return [], 0


def stationary_mask(states: torch.Tensor) -> torch.Tensor:
    """(k+1, L) mask over a block trajectory `states` whose last row is the fixed point: True where
    the token already holds its fixed-point value, keeps it in every later state, and some earlier
    position of that state is still wrong."""
    correct = states == states[-1]
    stays_correct = correct.flip(0).long().cumprod(0).flip(0).bool()
    wrong = (~correct).long()
    wrong_before = (wrong.cumsum(1) - wrong) > 0
    return stays_correct & wrong_before


def count_stationary(states: torch.Tensor) -> int:
    """Stationary tokens of one block trajectory: positions stationary at some state (counted once)."""
    return int(stationary_mask(states).any(0).sum())


def accepted_per_iteration(states: torch.Tensor) -> list[int]:
    """Tokens the decoder accepted at each iteration of a block trajectory `states` (k+1, L).

    Recomputes the acceptance rule from consecutive states: the longest prefix of the unfixed part
    where the new state equals the old one, plus one.
    """
    length = states.shape[1]
    fixed, accepted = 0, []
    for before, after in zip(states[:-1], states[1:]):
        matched = int(accepted_prefix(after[fixed:], before[fixed:]))
        accepted.append(min(matched + 1, length - fixed))
        fixed += accepted[-1]
    return accepted


@torch.inference_mode()
def jacobi(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    block_size: int = 16,
    max_new_tokens: int | Sequence[int] = 128,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    init: str = "prompt",
    seed: int | Sequence[int] = 0,
    return_trajectory: bool = False,
    on_tokens: TokenCallback | None = None,
    candidates: int = 0,
    ngram: int = 4,
    sampling: Sampling | Sequence[Sampling] = GREEDY,
    control: BatchControl | None = None,
    compile: bool | str = False,
    drafter: DraftModel | None = None,
    logprobs: int | Sequence[int | None] | None = None,
    predictions: Sequence[Sequence[int] | None] | None = None,
) -> DecodeOutput:
    """Jacobi decoding with a KV cache over blocks of `block_size` tokens.

    Produces exactly the AR output (up to floating-point near-ties), greedy or sampled with the
    same `sampling` and `seed` (cllm.decoding.sampling), with each forward fixing at least one
    token. See the module docstring for the iteration; blocks are cut at `max_new_tokens`, and
    tokens after an EOS inside a block are discarded. `candidates` > 0 also verifies that many
    `ngram`-grams from the context and the row's own iterates in the same forward
    (cllm.decoding.candidates). `seed` also seeds the initial guesses. `max_new_tokens`,
    `sampling` and `seed` are one for the batch or one per row; `control` lets rows join and
    leave while decoding (continuous batching; cllm.decoding.core.BatchControl); `compile` runs the
    compiled path (cllm.decoding.kv). `drafter`: a second model (same tokenizer) fed the same
    columns, whose predictions become the next guesses (`drafted`), or a LoRA adapter of `model`
    run in the same forward (`SharedAdapter`, `GatedAdapter`: cllm.decoding.drafting).
    """
    input_ids, attention_mask = _as_batch(input_ids, attention_mask)
    _check_jacobi(input_ids, attention_mask, max_new_tokens, block_size, candidates, ngram, return_trajectory, control)
    shared = isinstance(drafter, ADAPTER_DRAFTERS)
    if drafter is not None and candidates and not shared:
        # a second model's store would have to keep a winning candidate's columns too
        raise ValueError("candidates go with an adapter drafter (in the target's forward), not a second model")
    store = (lambda capacity: drafter.store(capacity, draft_width=block_size)) if shared else None
    batch = Batch(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, slack=max(block_size, ngram),
                  eos_token_id=eos_token_id, pad_token_id=pad_token_id, sampling=sampling, seed=seed,
                  on_tokens=on_tokens, control=control, compile=compile, store=store,
                  logprobs=logprobs, predictions=predictions)
    blocks = batch.attach(_Blocks(batch, block_size, _GuessMaker(init, pad_token_id), return_trajectory))
    pools = NgramPools(ngram, candidates) if candidates else None
    drafts = None
    if drafter is not None:
        drafts = batch.attach(AdapterDrafts(batch) if shared else Drafter(batch, drafter, compile))
    stale = False  # AR steps ran since the blocks were last guessed
    while batch.admit():
        cap = batch.column_cap(block_size)  # under a server's column budget: fewer columns as rows grow
        if cap == 1 < block_size and not isinstance(drafts, Drafter):  # no room for guesses: an AR step
            batch.ar_step()
            stale = True
            continue
        if stale:
            blocks.restart()
            stale = False
        guesses, width, real = blocks.unfixed(cap)  # 1. guess: (B, m) the iterate's unfixed part
        if pools is None or cap < block_size:  # under load the candidates go first, then the block narrows
            tokens = torch.cat([batch.rows.pending[:, None], guesses[:, :-1]], dim=1).masked_fill(~real, pad_token_id)
            prediction = batch.forward(tokens, real)  # 2. forward: (B, m) the prediction after each fed token
            # 3. accept the longest prefix whose inputs were right, plus the token after it
            accepted = torch.minimum(accepted_prefix(prediction, guesses, real) + 1, width)  # (B,) >= 1
            emitted, source = prediction, None
            if drafts is not None:  # the drafter's predictions at the same columns: the next guesses
                prediction = drafts.forward(tokens, real)
                drafts.keep_columns(accepted)
            batch.keep_columns(accepted)
        else:  # 2-3 with candidates verified alongside; the cache is committed inside
            step = candidate_step(batch, guesses, width, *pools.offer(batch.rows, pad_token_id))
            prediction, emitted, accepted, source = step.predictions, step.emitted, step.count, step.source
            if drafts is not None:  # the drafter's predictions at the block's columns: the next guesses
                prediction = drafts.forward(guesses, real)
        _, done = batch.emit(emitted, accepted, source)  # 4. commit: the output, the new iterate, new blocks
        blocks.commit(prediction, emitted, accepted, done, width)
        if pools is not None:  # the iterate's unfixed part: the model's own guesses of what follows
            blocks.remember_unfixed(pools)
        blocks.start_converged(done)
        batch.retire(done)
    return batch.output(blocks.trajectories() if return_trajectory else None)


def _check_jacobi(input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int | Sequence[int],
                  block_size: int, candidates: int, ngram: int, return_trajectory: bool,
                  control: BatchControl | None) -> None:
    if candidates < 0 or ngram < 2:
        raise ValueError(f"candidates must be >= 0 and ngram >= 2, got {candidates} and {ngram}")
    if candidates and return_trajectory:
        raise ValueError("trajectories are pure Jacobi iterates: collect them without candidates")
    _validate(input_ids, attention_mask, max_new_tokens, block_size)
    if return_trajectory and control is not None:
        raise ValueError("trajectories are collected for a fixed batch, without a control")


class _Blocks:
    """Per-row Jacobi state (a `RowState` of the batch): each row's current block, its iterate
    and its states so far, and the trajectories of its finished blocks."""

    def __init__(self, batch: Batch, n: int, make_guess: _GuessMaker, keep_trajectories: bool) -> None:
        self.batch, self.n, self.make_guess, self.keep_trajectories = batch, n, make_guess, keep_trajectories
        device = batch.rows.pending.device
        self.block = torch.zeros((0, n), dtype=torch.long, device=device)  # (B, n) the current iterate y(j)
        self.fixed = torch.zeros(0, dtype=torch.long, device=device)  # (B,) leading positions known right
        self.block_start = self.fixed.clone()  # (B,) n_out when the block began
        self.iterations = self.fixed.clone()  # (B,) forwards spent on the block
        # by row index: the block's states y(0), y(1), ... (rows of `block` tensors, never written
        # in place once appended, except rows of just-converged blocks) and, when kept, the
        # trajectories of finished blocks
        self.states: dict[int, list[torch.Tensor]] = {}
        self.finished: dict[int, list[torch.Tensor]] = {}

    def start(self, which: torch.Tensor) -> None:
        rows = self.batch.rows
        zeros = torch.zeros(len(which), dtype=torch.long, device=which.device)
        guesses = self.make_guess(rows, which, self.n)
        self.block = torch.cat([self.block, guesses])
        self.fixed, self.iterations = torch.cat([self.fixed, zeros]), torch.cat([self.iterations, zeros])
        self.block_start = torch.cat([self.block_start, rows.n_out[which]])
        for i, state in zip(which.tolist(), guesses):
            self.states[int(rows.index[i])] = [state]

    def restart(self) -> None:
        """Every row's block begins afresh where its output is (after AR steps, which the blocks did
        not follow; only under a control, so no trajectory is kept)."""
        rows = self.batch.rows
        every = torch.arange(len(rows.index), device=rows.pending.device)
        self.block = self.make_guess(rows, every, self.n)
        self.fixed, self.iterations = torch.zeros_like(self.fixed), torch.zeros_like(self.iterations)
        self.block_start = rows.n_out.clone()
        for i, state in zip(every.tolist(), self.block):
            self.states[int(rows.index[i])] = [state]

    def keep(self, keep: torch.Tensor) -> None:
        self.block, self.fixed = self.block[keep], self.fixed[keep]
        self.block_start, self.iterations = self.block_start[keep], self.iterations[keep]
        self.states = {row: self.states[row] for row in self.batch.rows.index.tolist()}

    @property
    def block_len(self) -> torch.Tensor:
        """(B,) the block's length: n, or what is left before the row's limit."""
        return (self.batch.rows.limit - self.block_start).clamp(max=self.n)

    def unfixed(self, cap: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, m) the guesses at the unfixed positions (the first `cap` of them), (B,) how many
        there are (>= 1), (B, m) which are real."""
        width = self.block_len - self.fixed
        if cap is not None:
            width = width.clamp(max=cap)
        columns = torch.arange(int(width.max()), device=width.device)
        positions = (self.fixed[:, None] + columns).clamp(max=self.n - 1)  # (B, m) block positions predicted
        return self.block.gather(1, positions), width, columns < width[:, None]

    def commit(
        self, prediction: torch.Tensor, emitted: torch.Tensor, accepted: torch.Tensor, done: torch.Tensor,
        width: torch.Tensor,
    ) -> None:
        """The new iterate: the predictions (B, m) at the `width` (B,) unfixed positions that were
        fed, the emitted tokens (B, E) at the `accepted` ones (where a candidate won, they differ)."""
        block_len, n = self.block_len, self.n
        relative = torch.arange(n, device=accepted.device) - self.fixed[:, None]  # (B, n)
        updated = (relative >= 0) & (relative < width[:, None])
        block = torch.where(updated, prediction.gather(1, relative.clamp(0, prediction.shape[1] - 1)), self.block)
        settled = (relative >= 0) & (relative < accepted[:, None])
        self.block = torch.where(settled, emitted.gather(1, relative.clamp(0, emitted.shape[1] - 1)), block)
        self.fixed = self.fixed + accepted
        self.iterations += 1
        self.make_guess.refresh(self.batch.rows, self.block, self.fixed, block_len, done)
        for row, state in zip(self.batch.rows.index.tolist(), self.block):
            self.states[row].append(state)
        if bool((self.iterations > block_len).any()):
            raise RuntimeError("Jacobi block exceeded n iterations; acceptance must fix >= 1 token per forward")

    def remember_unfixed(self, pools: NgramPools) -> None:
        rows, block_len = self.batch.rows, self.block_len
        for i, row in enumerate(rows.index.tolist()):
            unfixed = self.block[i, int(self.fixed[i]) : int(block_len[i])].tolist()
            pools.remember_iterate(row, int(rows.pending[i]), unfixed)

    def start_converged(self, done: torch.Tensor) -> None:
        """Rows whose block converged (or that are done) record its trajectory and begin the next."""
        rows = self.batch.rows
        which = ((self.fixed >= self.block_len) | done).nonzero().flatten()
        if not len(which):
            return
        for i in which.tolist():
            row = int(rows.index[i])
            trajectory = torch.stack(self.states[row])[:, : int(rows.n_out[i] - self.block_start[i])]
            self.batch.stats[row].block_iterations.append(int(self.iterations[i]))
            self.batch.stats[row].stationary += count_stationary(trajectory)
            if self.keep_trajectories:
                self.finished.setdefault(row, []).append(trajectory.cpu())
        self.block[which] = self.make_guess(rows, which, self.n)
        self.fixed[which] = 0
        self.iterations[which] = 0
        self.block_start[which] = rows.n_out[which]
        for i in which.tolist():
            self.states[int(rows.index[i])] = [self.block[i]]

    def trajectories(self) -> list[list[torch.Tensor]]:
        return [self.finished.get(row, []) for row in range(len(self.batch.stats))]


def drafted(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
            draft_model: DraftModel, **kwargs) -> DecodeOutput:
    """Exact drafted Jacobi decoding: the target `model` verifies every guess (its greedy output,
    or its seeded sample, token for token) while `draft_model` (a CLLM of it, or any model with
    its tokenizer), fed the same columns in the same step, drafts the next guesses. `kwargs`:
    `jacobi`'s."""
    return jacobi(model, input_ids, attention_mask, drafter=draft_model, **kwargs)


@torch.inference_mode()
def jacobi_no_cache(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    block_size: int = 16,
    max_new_tokens: int = 128,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    init: str = "prompt",
    seed: int | Sequence[int] = 0,
    return_trajectory: bool = False,
) -> DecodeOutput:
    """Jacobi decoding the way the original CLLM code collects trajectories: one prompt (B = 1),
    no KV cache, every iteration a forward over the whole prompt + output so far + block.

    Same guesses, acceptance rule and outputs as `jacobi`; kept as the reference it is tested
    against and as the baseline that `cllm collect --engine nokv` times.
    """
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError("jacobi_no_cache decodes one prompt: input_ids must be (1, P)")
    _validate(input_ids, torch.ones_like(input_ids), max_new_tokens, block_size)
    eos = _eos_tensor(eos_token_id, input_ids.device)
    make_guess, row_seed, prompt_len = _GuessMaker(init, pad_token_id), row_seeds(seed, 1)[0], input_ids.shape[1]

    def greedy(tokens: torch.Tensor) -> torch.Tensor:  # (T,) -> argmax after every position
        return model(input_ids=tokens[None], attention_mask=torch.ones_like(tokens)[None]).logits[0].argmax(-1)

    sequence = torch.cat([input_ids[0], greedy(input_ids[0])[-1:]])  # prompt + output so far
    stats, blocks = DecodeStats(forward_passes=1), []
    finished = bool(torch.isin(sequence[-1], eos))
    while len(sequence) - prompt_len < max_new_tokens and not finished:
        length = min(block_size, max_new_tokens - (len(sequence) - prompt_len))
        block = make_guess.guess(0, row_seed, sequence, prompt_len, block_size)[:length]
        states, fixed = [block], 0
        while fixed < length and not finished:
            prediction = greedy(torch.cat([sequence, block[:-1]]))[len(sequence) - 1 :]  # (length,) f(block)
            accepted = min(int(accepted_prefix(prediction[fixed:], block[fixed:])) + 1, length - fixed)
            block = torch.cat([block[:fixed], prediction[fixed:]])
            is_eos = torch.isin(block[fixed : fixed + accepted], eos)
            if finished := bool(is_eos.any()):
                accepted = int(is_eos.long().argmax()) + 1
            fixed += accepted
            stats.forward_passes += 1
            stats.fast_forward += accepted - 1
            if fixed < length and not finished:
                make_guess.refresh_row(torch.cat([sequence, block[:fixed]]), block, fixed, length)
            states.append(block)
        trajectory = torch.stack(states)[:, :fixed]
        stats.block_iterations.append(len(states) - 1)
        stats.stationary += count_stationary(trajectory)
        blocks.append(trajectory)
        sequence = torch.cat([sequence, block[:fixed]])
    tokens = sequence[prompt_len:].tolist()
    stats.new_tokens = len(tokens)
    return DecodeOutput(token_ids=[tokens], stats=[stats], trajectories=[blocks] if return_trajectory else None)
