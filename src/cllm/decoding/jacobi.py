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
from dataclasses import dataclass, fields

import torch
from transformers import PreTrainedModel

from cllm.decoding.candidates import candidate_step
from cllm.decoding.core import (
    BatchControl,
    DecodeOutput,
    DecodeStats,
    TokenCallback,
    _as_batch,
    _context,
    _emit,
    _emit_first_token,
    _eos_tensor,
    _forward,
    _join,
    _keep_real_slots,
    _Outputs,
    _prefill,
    _Rows,
    _truncate_at_eos,
    _validate,
    accepted_prefix,
)
from cllm.decoding.ngrams import NgramPool, offered_candidates, remember_iterate
from cllm.decoding.sampling import GREEDY, Sampling, row_seeds
from cllm.decoding.spec import INIT_STRATEGIES

LOOKUP_MAX_NGRAM = 3
LOOKUP_MIN_NGRAM_MID_BLOCK = 2  # a lone recurring token is too weak a reason to discard the iterate


class _GuessMaker:
    """Initial guesses y(0) for a new block, per the chosen strategy.

    `prompt` (the paper's choice) draws n tokens uniformly from the row's own prompt; every row has
    its own generator, seeded `seed + row` or by its entry of a per-row `seed` list, so a row's
    guesses do not depend on its batch mates. `lookup` takes what followed the latest earlier
    occurrence of the context's last tokens (see `lookup_continuation`), and draws like `prompt`
    where no suffix recurs: answers repeat numbers and phrases of their question, and the
    acceptance rule verifies every guess, so the output stays the greedy one whatever the guess.
    """

    def __init__(self, strategy: str, seed: int | Sequence[int], batch: int, pad_token_id: int) -> None:
        if strategy not in INIT_STRATEGIES:
            raise ValueError(f"unknown init strategy {strategy!r}; choose one of {', '.join(INIT_STRATEGIES)}")
        self.strategy = strategy
        self.pad_token_id = pad_token_id
        self.generators = [torch.Generator().manual_seed(s) for s in row_seeds(seed, batch)]

    def add_rows(self, seeds: Sequence[int], first_index: int) -> None:
        """Generators for rows joining at indices first_index, first_index + 1, ..."""
        assert first_index == len(self.generators), "rows join in index order"
        self.generators += [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, rows: _Rows, which: torch.Tensor, n: int) -> torch.Tensor:
        """Guesses (len(which), n) for the rows at batch positions `which`."""
        device = rows.pending.device
        if len(which) == 0:
            return torch.empty((0, n), dtype=torch.long, device=device)
        if self.strategy == "repeat":
            return rows.pending[which, None].expand(-1, n).clone()
        if self.strategy == "pad":
            return torch.full((len(which), n), self.pad_token_id, dtype=torch.long, device=device)
        draws = torch.stack(
            [torch.rand(n, generator=self.generators[int(rows.index[i])]) for i in which.tolist()]
        ).to(device)  # (len(which), n) in [0, 1)
        prompt_len = rows.prompt_len[which, None]
        width = rows.prompt.shape[1]
        offsets = width - prompt_len + (draws * prompt_len).long()
        guesses = rows.prompt[which].gather(1, offsets)
        if self.strategy == "lookup":
            for slot, i in enumerate(which.tolist()):
                found = lookup_continuation(_context(rows, i), n)
                guesses[slot, : len(found)] = torch.tensor(found, dtype=torch.long, device=device)
        return guesses

    def refresh(self, rows: _Rows, block: torch.Tensor, fixed: torch.Tensor, block_len: torch.Tensor, done: torch.Tensor) -> None:
        """`lookup` only, after an iteration: where the verified context's last 2-3 tokens recur
        and what followed them disagrees with the iterate's first unfixed token, overwrite the
        unfixed positions with it. The iterate there was computed from a rejected token, the
        lookup from verified ones; the acceptance rule checks both alike."""
        if self.strategy != "lookup":
            return
        for i in ((fixed < block_len) & ~done).nonzero().flatten().tolist():
            start = int(fixed[i])
            found = lookup_continuation(_context(rows, i), int(block_len[i]) - start, min_ngram=LOOKUP_MIN_NGRAM_MID_BLOCK)
            if found and found[0] != int(block[i, start]):
                block[i, start : start + len(found)] = torch.tensor(found, dtype=torch.long, device=block.device)


def lookup_continuation(
    context: torch.Tensor | Sequence[int], n: int, max_ngram: int = LOOKUP_MAX_NGRAM, min_ngram: int = 1
) -> list[int]:
    """n tokens that followed the latest earlier occurrence of the context's last `size` tokens,
    trying size = max_ngram down to min_ngram (prompt lookup); [] when no suffix recurs. Where the
    context ends first, the copy goes on repeating what followed the occurrence (an overlapping
    copy, as in LZ77): a loop shorter than n is guessed to go on, which is what a looping model does."""
    context = torch.as_tensor(context, dtype=torch.long)
    length = context.shape[0]
    for size in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        # every window that some token follows, the suffix itself excluded
        earlier = context[: length - 1].unfold(0, size, 1)
        hits = (earlier == context[length - size :]).all(dim=1).nonzero()
        if len(hits):
            followed = context[int(hits[-1]) + size :].tolist()
            return [followed[k % len(followed)] for k in range(n)]
    return []


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
    compiled path (cllm.decoding.kv).
    """
    if candidates < 0 or ngram < 2:
        raise ValueError(f"candidates must be >= 0 and ngram >= 2, got {candidates} and {ngram}")
    if candidates and return_trajectory:
        raise ValueError("trajectories are pure Jacobi iterates: collect them without candidates")
    input_ids, attention_mask = _as_batch(input_ids, attention_mask)
    _validate(input_ids, attention_mask, max_new_tokens, block_size)
    if return_trajectory and control is not None:
        raise ValueError("trajectories are collected for a fixed batch, without a control")
    n, slack = block_size, max(block_size, ngram)
    batch, device = input_ids.shape[0], input_ids.device
    eos = _eos_tensor(eos_token_id, device)
    outputs = _Outputs(batch, on_tokens, control)
    stats = outputs.stats
    cache, rows = _prefill(model, input_ids, attention_mask, max_new_tokens, slack, sampling, seed, compile=compile)
    make_guess = _GuessMaker(init, seed, batch, pad_token_id)
    trajectories: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    pools = [NgramPool(ngram, candidates) for _ in range(batch)] if candidates else None
    _emit_first_token(rows, cache, eos, outputs)
    iterates = _Iterates.start(rows, torch.arange(len(rows.index), device=device), make_guess, n)
    # The current block's states y(0), y(1), ... per row. Entries are rows of `block` tensors that
    # are never written in place after being appended, except rows of just-converged blocks.
    states: dict[int, list[torch.Tensor]] = {row: [state] for row, state in zip(rows.index.tolist(), iterates.block)}

    def finish_block(i: int, length: int) -> None:
        row = int(rows.index[i])
        trajectory = torch.stack(states[row])[:, :length]
        stats[row].block_iterations.append(int(iterates.block_iters[i]))
        stats[row].stationary += count_stationary(trajectory)
        if return_trajectory:
            trajectories[row].append(trajectory.cpu())

    while True:
        admission = control.admit() if control is not None else None
        if admission is not None:
            cache, rows, joined = _join(model, cache, rows, admission, outputs, eos, slack, pad_token_id)
            new = torch.arange(len(rows.index) - joined, len(rows.index), device=device)
            make_guess.add_rows(admission.seeds, first_index=len(trajectories))
            trajectories += [[] for _ in admission.prompts]
            if pools is not None:
                pools += [NgramPool(ngram, candidates) for _ in admission.prompts]
            joining = _Iterates.start(rows, new, make_guess, n)
            iterates = iterates.extended(joining) if len(new) < len(rows.index) else joining
            states |= {int(rows.index[i]): [state] for i, state in zip(new.tolist(), joining.block)}
        if not len(rows.index):
            break
        block, fixed = iterates.block, iterates.fixed
        block_len = (rows.limit - iterates.block_start).clamp(max=n)
        width = block_len - fixed  # (B,) >= 1 unfixed positions
        fed = int(width.max())
        columns = torch.arange(fed, device=device)
        real = columns < width[:, None]  # (B, m)

        # 1. guess: the unfixed part of the iterate, shifted one right behind `pending`
        positions = (fixed[:, None] + columns).clamp(max=n - 1)  # (B, m) block positions predicted
        guesses = block.gather(1, positions)
        if pools is None:
            tokens = torch.cat([rows.pending[:, None], guesses[:, :-1]], dim=1).masked_fill(~real, pad_token_id)

            # 2. one parallel forward
            prediction = _forward(cache, rows, tokens, real)  # (B, m)

            # 3. accept the longest prefix whose inputs were right, plus the token after it
            accepted = torch.minimum(accepted_prefix(prediction, guesses, real) + 1, width)  # (B,) >= 1
            _keep_real_slots(cache, rows, accepted)
            emitted = prediction
        else:  # 2-3 with candidates verified alongside; the cache is committed inside
            for i, row in enumerate(rows.index.tolist()):
                pools[row].add_context(_context(rows, i))
            proposals, present = offered_candidates(pools, rows, ngram, pad_token_id)
            step = candidate_step(cache, rows, guesses, width, proposals, present, pad_token_id)
            prediction, emitted, accepted = step.predictions, step.emitted, step.count

        # 4. commit: new iterate (the accepted tokens where a candidate won), output
        relative = torch.arange(n, device=device) - fixed[:, None]  # (B, n)
        updated = (relative >= 0) & (relative < width[:, None])
        block = torch.where(updated, prediction.gather(1, relative.clamp(0, fed - 1)), block)
        settled = (relative >= 0) & (relative < accepted[:, None])
        block = torch.where(settled, emitted.gather(1, relative.clamp(0, emitted.shape[1] - 1)), block)
        rows.pending = emitted.gather(1, (accepted - 1)[:, None]).squeeze(1)
        count, hit_eos = _truncate_at_eos(emitted, accepted, eos)
        _emit(rows, emitted, count, on_tokens)
        fixed = fixed + accepted
        iterates.block, iterates.fixed = block, fixed
        iterates.block_iters += 1
        done = hit_eos | (rows.n_out >= rows.limit)
        make_guess.refresh(rows, block, fixed, block_len, done)
        if pools is not None:  # the iterate's unfixed part: the model's own guesses of what follows
            for i, row in enumerate(rows.index.tolist()):
                remember_iterate(pools[row], int(rows.pending[i]), block[i, int(fixed[i]) : int(block_len[i])].tolist())
        for row, emitted_count, state in zip(rows.index.tolist(), count.tolist(), block):
            stats[row].forward_passes += 1
            stats[row].fast_forward += emitted_count - 1
            states[row].append(state)

        converged = (fixed >= block_len) | done
        if bool((iterates.block_iters > block_len).any()):
            raise RuntimeError("Jacobi block exceeded n iterations; acceptance must fix >= 1 token per forward")
        if converged.any():
            which = converged.nonzero().flatten()
            for i in which.tolist():
                finish_block(i, int(rows.n_out[i] - iterates.block_start[i]))
            iterates.restart(rows, which, make_guess, n)
            for i in which.tolist():
                states[int(rows.index[i])] = [iterates.block[i]]
        keep = outputs.retire(rows, cache, done)
        if keep is not None:
            iterates = iterates.selected(keep)

    return outputs.output(trajectories if return_trajectory else None)


@dataclass
class _Iterates:
    """Per-row Jacobi state beside `_Rows` (batch dim 0)."""

    block: torch.Tensor  # (B, n) the current iterate y(j)
    fixed: torch.Tensor  # (B,) leading positions known right
    block_start: torch.Tensor  # (B,) n_out when the block began
    block_iters: torch.Tensor  # (B,)

    @classmethod
    def start(cls, rows: _Rows, which: torch.Tensor, make_guess: _GuessMaker, n: int) -> _Iterates:
        zeros = torch.zeros(len(which), dtype=torch.long, device=rows.pending.device)
        return cls(make_guess(rows, which, n), zeros, rows.n_out[which].clone(), zeros.clone())

    def restart(self, rows: _Rows, which: torch.Tensor, make_guess: _GuessMaker, n: int) -> None:
        """New blocks for the rows at `which` (their previous block converged)."""
        self.block[which] = make_guess(rows, which, n)
        self.fixed[which] = 0
        self.block_iters[which] = 0
        self.block_start[which] = rows.n_out[which]

    def selected(self, keep: torch.Tensor) -> _Iterates:
        return _Iterates(*(getattr(self, f.name)[keep] for f in fields(self)))

    def extended(self, other: _Iterates) -> _Iterates:
        return _Iterates(*(torch.cat([getattr(self, f.name), getattr(other, f.name)]) for f in fields(self)))


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
    def greedy(tokens: torch.Tensor) -> torch.Tensor:  # (T,) -> argmax after every position
        return model(input_ids=tokens[None], attention_mask=torch.ones_like(tokens)[None]).logits[0].argmax(-1)

    first = greedy(input_ids[0])[-1]
    sequence = torch.cat([input_ids[0], first[None]])  # prompt + output so far
    stats = DecodeStats(forward_passes=1)
    blocks: list[torch.Tensor] = []
    rows = _Rows(  # only what the guess maker reads
        index=torch.zeros(1, dtype=torch.long), slot_mask=input_ids, n_real=torch.zeros(1, dtype=torch.long),
        pending=first[None], out=input_ids, n_out=torch.zeros(1, dtype=torch.long), prompt=input_ids,
        prompt_len=torch.tensor([input_ids.shape[1]]), limit=torch.tensor([max_new_tokens]),
        draws=torch.empty((1, 0), dtype=torch.float64), samplings=[GREEDY],
    )
    make_guess = _GuessMaker(init, seed, 1, pad_token_id)
    produced, finished = 1, bool(torch.isin(first, eos))
    while produced < max_new_tokens and not finished:
        length = min(block_size, max_new_tokens - produced)
        rows.pending = sequence[-1:]
        rows.out, rows.n_out = sequence[None, input_ids.shape[1] :], torch.tensor([produced])
        block = make_guess(rows, torch.zeros(1, dtype=torch.long), block_size)[0, :length]
        states, fixed = [block], 0
        while fixed < length:
            prediction = greedy(torch.cat([sequence, block[:-1]]))[len(sequence) - 1 :]  # (length,) f(block)
            matched = int(accepted_prefix(prediction[fixed:], block[fixed:]))
            accepted = min(matched + 1, length - fixed)
            block = torch.cat([block[:fixed], prediction[fixed:]])
            new = block[fixed : fixed + accepted]
            is_eos = torch.isin(new, eos)
            if bool(is_eos.any()):
                finished = True
                accepted = int(is_eos.long().argmax()) + 1
            fixed += accepted
            stats.forward_passes += 1
            stats.fast_forward += accepted - 1
            rows.out, rows.n_out = torch.cat([sequence, block[:fixed]])[None, input_ids.shape[1] :], torch.tensor([produced + fixed])
            make_guess.refresh(rows, block[None], torch.tensor([fixed]), torch.tensor([length]), torch.tensor([finished]))
            states.append(block)
            if finished:
                break
        trajectory = torch.stack(states)[:, :fixed]
        stats.block_iterations.append(len(states) - 1)
        stats.stationary += count_stationary(trajectory)
        blocks.append(trajectory)
        sequence = torch.cat([sequence, block[:fixed]])
        produced += fixed
    tokens = sequence[input_ids.shape[1] :].tolist()
    stats.new_tokens = len(tokens)
    return DecodeOutput(token_ids=[tokens], stats=[stats], trajectories=[blocks] if return_trajectory else None)
