"""Greedy decoders over any Hugging Face causal LM: autoregressive (`ar`) and Jacobi (`jacobi`).

Both are plain functions of (model, left-padded input ids) that use only the public forward and
`DynamicCache` API, so every architecture with a standard cache works. Both run a batch of
prompts of different lengths; rows leave the batch as soon as they finish.

KV-cache layout. All rows share one cache tensor of S slots. A slot holds a real token of that
row or a hole (left padding, a padded input column, or KV of a rejected Jacobi guess that another
row's longer acceptance kept from being cropped); `_Rows.slot_mask` marks the real ones and is
the attention mask, and position ids count real tokens only, so holes change nothing but cost.
The last accepted token of every row (`pending`) is never in the cache: it is the first input of
the next forward, whose prediction at that column is the next token. The prefill of the prompts
yields the first token; Jacobi blocks cover the tokens after it.

Jacobi iteration (block of n positions, `fixed` of them already known to be right):
  1. guess    -- input = [pending, unfixed guesses except the last]          (B, m)
  2. forward  -- one parallel forward; argmax at every column                 (B, m)
  3. accept   -- the longest prefix where the prediction equals the guess it replaces, plus one:
                 the tokens fed up to there were right, so the predictions after them are too
  4. commit   -- write the new iterate, emit accepted tokens, crop the cache to the longest
                 acceptance and mask the rest; a row whose block is complete starts a new block.
A Jacobi block of size 1 is exactly the AR loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, GenerationConfig, PreTrainedModel

INIT_STRATEGIES = ("prompt", "repeat", "pad", "lookup")
LOOKUP_MAX_NGRAM = 3
LOOKUP_MIN_NGRAM_MID_BLOCK = 2  # a lone recurring token is too weak a reason to discard the iterate

TokenCallback = Callable[[int, list[int]], None]
"""Called as `callback(row, new_token_ids)` whenever a row's output grows (streaming)."""


@dataclass
class DecodeStats:
    """What one row's decoding cost and gained.

    forward_passes: forwards this row took part in, the prompt prefill included (it yields the
        first token), so AR takes exactly one forward per token.
    new_tokens: tokens emitted (EOS included when produced).
    block_iterations: Jacobi iterations per block (for AR: one per token).
    fast_forward: sum over iterations of (tokens accepted - 1), i.e. correct tokens gained in an
        iteration beyond the one Jacobi decoding always gains; tokens discarded after an EOS do
        not count, so fast_forward == new_tokens - forward_passes. 0 for AR.
    stationary: block positions whose token became correct while some earlier position of the
        block was still wrong and then never changed until the block converged (counted once per
        position; the initial guess counts). 0 for AR.
    """

    forward_passes: int = 0
    new_tokens: int = 0
    block_iterations: list[int] = field(default_factory=list)
    fast_forward: int = 0
    stationary: int = 0

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / self.forward_passes if self.forward_passes else 0.0

    def to_dict(self) -> dict:
        return {
            "forward_passes": self.forward_passes,
            "new_tokens": self.new_tokens,
            "tokens_per_forward": round(self.tokens_per_forward, 4),
            "block_iterations": self.block_iterations,
            "fast_forward": self.fast_forward,
            "stationary": self.stationary,
        }


@dataclass
class DecodeOutput:
    """Per row: generated token ids (no prompt, no padding), stats and optional Jacobi trajectory.

    trajectories[row][block] is a (k+1, L) tensor of the states y(0)..y(k) of that block, y(k)
    being its fixed point; L < n for a last block cut by `max_new_tokens` or by EOS.
    """

    token_ids: list[list[int]]
    stats: list[DecodeStats]
    trajectories: list[list[torch.Tensor]] | None = None


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack prompts of different lengths, padded on the left: (input_ids, attention_mask), both (B, P)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


@dataclass
class _Rows:
    """Per-row decoding state of the rows still running; every tensor has the batch as dim 0."""

    index: torch.Tensor  # (B,) the row's position in the caller's batch
    slot_mask: torch.Tensor  # (B, S) 1 where the cache slot holds a real token of this row
    n_real: torch.Tensor  # (B,) real tokens in the cache = position id of `pending`
    pending: torch.Tensor  # (B,) last accepted token; its KV is not in the cache yet
    out: torch.Tensor  # (B, max_new_tokens + n) generated tokens (tail beyond n_out is scratch)
    n_out: torch.Tensor  # (B,)
    prompt: torch.Tensor  # (B, P) left-padded prompt, for guesses drawn from it
    prompt_len: torch.Tensor  # (B,)

    def select(self, keep: torch.Tensor) -> None:
        for name, value in vars(self).items():
            setattr(self, name, value[keep])


def _validate(input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, block_size: int) -> None:
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError("input_ids must be a non-empty (batch, length) tensor")
    if attention_mask.shape != input_ids.shape:
        raise ValueError("attention_mask must have the shape of input_ids")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded: every row's last column must be a real token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")


def _eos_tensor(eos_token_id: int | Sequence[int] | None, device: torch.device) -> torch.Tensor:
    if eos_token_id is None:
        return torch.empty(0, dtype=torch.long, device=device)
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device)


def _prefill(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, scratch: int
) -> tuple[DynamicCache, _Rows]:
    """Run the prompts into a fresh cache; the prediction after the last prompt token is `pending`.

    That first token is not emitted here: callers do it with `_emit`, so EOS and streaming
    treat it like any other token.
    """
    batch = input_ids.shape[0]
    device = input_ids.device
    cache = DynamicCache(config=model.config)
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids,
        attention_mask=None if bool(attention_mask.all()) else attention_mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits  # (B, 1, V)
    rows = _Rows(
        index=torch.arange(batch, device=device),
        slot_mask=attention_mask.clone(),
        n_real=attention_mask.sum(1),
        pending=logits[:, -1].argmax(dim=-1),
        out=torch.zeros((batch, scratch), dtype=torch.long, device=device),
        n_out=torch.zeros(batch, dtype=torch.long, device=device),
        prompt=input_ids,
        prompt_len=attention_mask.sum(1),
    )
    return cache, rows


def _emit_first_token(
    rows: _Rows, cache: DynamicCache, eos: torch.Tensor, max_new_tokens: int,
    results: list[list[int] | None], on_tokens: TokenCallback | None,
) -> None:
    """Emit the prefill's prediction and retire rows that it already finished."""
    first = rows.pending[:, None]  # (B, 1)
    count, hit_eos = _truncate_at_eos(first, torch.ones_like(rows.n_out), eos)
    _emit(rows, first, count, on_tokens)
    done = hit_eos | (rows.n_out >= max_new_tokens)
    if done.any():
        _retire(rows, cache, done, results)


def _forward(
    model: PreTrainedModel, cache: DynamicCache, rows: _Rows, tokens: torch.Tensor, real: torch.Tensor
) -> torch.Tensor:
    """One forward of `tokens` (B, m) after the cache; returns the greedy prediction at every column."""
    columns = torch.arange(tokens.shape[1], device=tokens.device)
    positions = rows.n_real[:, None] + columns  # (B, m)
    attention_mask = torch.cat([rows.slot_mask, real.long()], dim=1)  # (B, S + m)
    if bool(attention_mask.all()):
        attention_mask = None  # no padding or holes: the plain causal mask, cheapest for the backend
    logits = model(
        input_ids=tokens,
        attention_mask=attention_mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    ).logits  # (B, m, V)
    return logits.argmax(dim=-1)


def _keep_real_slots(cache: DynamicCache, rows: _Rows, fed: int, accepted: torch.Tensor) -> None:
    """After a forward of `fed` columns, keep the KV of each row's first `accepted` columns."""
    keep = int(accepted.max())
    if keep < fed:
        cache.crop(keep - fed)
    columns = torch.arange(keep, device=accepted.device)
    rows.slot_mask = torch.cat([rows.slot_mask, (columns < accepted[:, None]).long()], dim=1)
    rows.n_real = rows.n_real + accepted


def _truncate_at_eos(new_tokens: torch.Tensor, count: torch.Tensor, eos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut each row's `count` new tokens (B, m) after its first EOS: (kept count, hit EOS)."""
    columns = torch.arange(new_tokens.shape[1], device=new_tokens.device)
    is_eos = torch.isin(new_tokens, eos) & (columns < count[:, None])
    hit = is_eos.any(dim=1)
    first = is_eos.long().argmax(dim=1)
    return torch.where(hit, first + 1, count), hit


def _emit(rows: _Rows, new_tokens: torch.Tensor, count: torch.Tensor, on_tokens: TokenCallback | None) -> None:
    """Append each row's first `count` tokens of `new_tokens` (B, m) to its output."""
    columns = torch.arange(new_tokens.shape[1], device=new_tokens.device)
    rows.out.scatter_(1, rows.n_out[:, None] + columns, new_tokens)
    if on_tokens is not None:
        for row, tokens, k in zip(rows.index.tolist(), new_tokens.tolist(), count.tolist()):
            on_tokens(row, tokens[:k])
    rows.n_out = rows.n_out + count


def _retire(rows: _Rows, cache: DynamicCache, done: torch.Tensor, results: list[list[int] | None]) -> None:
    """Store the output of finished rows and drop them from the batch and the cache."""
    for i in done.nonzero().flatten().tolist():
        results[int(rows.index[i])] = rows.out[i, : int(rows.n_out[i])].tolist()
    keep = (~done).nonzero().flatten()
    rows.select(keep)
    cache.batch_select_indices(keep)


def _as_batch(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return input_ids, attention_mask.to(input_ids.device)


@torch.inference_mode()
def ar(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 128,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    on_tokens: TokenCallback | None = None,
) -> DecodeOutput:
    """Greedy autoregressive decoding with a KV cache: one forward per new token.

    input_ids, attention_mask: (B, P) left-padded prompts. Returns B outputs, each stopping after
    its first EOS (included) or at `max_new_tokens`.
    """
    input_ids, attention_mask = _as_batch(input_ids, attention_mask)
    _validate(input_ids, attention_mask, max_new_tokens, block_size=1)
    batch = input_ids.shape[0]
    eos = _eos_tensor(eos_token_id, input_ids.device)
    cache, rows = _prefill(model, input_ids, attention_mask, scratch=max_new_tokens + 1)
    results: list[list[int] | None] = [None] * batch
    _emit_first_token(rows, cache, eos, max_new_tokens, results, on_tokens)
    one = torch.ones((batch, 1), dtype=torch.bool, device=input_ids.device)
    while len(rows.index):
        prediction = _forward(model, cache, rows, rows.pending[:, None], one[: len(rows.index)])  # (B, 1)
        _keep_real_slots(cache, rows, fed=1, accepted=torch.ones_like(rows.n_out))
        count, hit_eos = _truncate_at_eos(prediction, torch.ones_like(rows.n_out), eos)
        _emit(rows, prediction, count, on_tokens)
        rows.pending = prediction[:, 0]
        done = hit_eos | (rows.n_out >= max_new_tokens)
        if done.any():
            _retire(rows, cache, done, results)
    token_ids = [r or [] for r in results]
    return _one_token_per_forward(token_ids)


def _one_token_per_forward(token_ids: list[list[int]]) -> DecodeOutput:
    stats = [DecodeStats(len(t), len(t), [1] * len(t)) for t in token_ids]
    return DecodeOutput(token_ids=token_ids, stats=stats)


class _GuessMaker:
    """Initial guesses y(0) for a new block, per the chosen strategy.

    `prompt` (the paper's choice) draws n tokens uniformly from the row's own prompt; every row has
    its own generator, seeded `seed + row` or by its entry of a per-row `seed` list, so a row's
    guesses do not depend on its batch mates. `lookup` starts from what followed the latest earlier
    occurrence of the context's last tokens (see `lookup_continuation`) and fills the rest like
    `prompt`: answers repeat numbers and phrases of their question, and the acceptance rule verifies
    every guess, so the output stays the greedy one whatever the guess.
    """

    def __init__(self, strategy: str, seed: int | Sequence[int], batch: int, pad_token_id: int) -> None:
        if strategy not in INIT_STRATEGIES:
            raise ValueError(f"unknown init strategy {strategy!r}; choose one of {', '.join(INIT_STRATEGIES)}")
        seeds = [seed + row for row in range(batch)] if isinstance(seed, int) else list(seed)
        if len(seeds) != batch:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {batch}")
        self.strategy = strategy
        self.pad_token_id = pad_token_id
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

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


def _context(rows: _Rows, i: int) -> torch.Tensor:
    """Row i's prompt and output so far (its last token is `pending`)."""
    prompt = rows.prompt[i, rows.prompt.shape[1] - int(rows.prompt_len[i]) :]
    return torch.cat([prompt, rows.out[i, : int(rows.n_out[i])]])


def lookup_continuation(
    context: torch.Tensor | Sequence[int], n: int, max_ngram: int = LOOKUP_MAX_NGRAM, min_ngram: int = 1
) -> list[int]:
    """Up to n tokens that followed the latest earlier occurrence of the context's last `size`
    tokens, trying size = max_ngram down to min_ngram (prompt lookup); [] when no suffix recurs."""
    context = torch.as_tensor(context, dtype=torch.long)
    length = context.shape[0]
    for size in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        # every window that some token follows, the suffix itself excluded
        earlier = context[: length - 1].unfold(0, size, 1)
        hits = (earlier == context[length - size :]).all(dim=1).nonzero()
        if len(hits):
            start = int(hits[-1]) + size
            return context[start : start + n].tolist()
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
        matched = int((after[fixed:] == before[fixed:]).long().cumprod(0).sum())
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
    max_new_tokens: int = 128,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    init: str = "prompt",
    seed: int | Sequence[int] = 0,
    return_trajectory: bool = False,
    on_tokens: TokenCallback | None = None,
) -> DecodeOutput:
    """Greedy Jacobi decoding with a KV cache over blocks of `block_size` tokens.

    Produces exactly the greedy AR output (up to floating-point near-ties), with each forward
    fixing at least one token. See the module docstring for the iteration; blocks are cut at
    `max_new_tokens`, and tokens after an EOS inside a block are discarded.
    """
    input_ids, attention_mask = _as_batch(input_ids, attention_mask)
    _validate(input_ids, attention_mask, max_new_tokens, block_size)
    n = block_size
    batch, device = input_ids.shape[0], input_ids.device
    eos = _eos_tensor(eos_token_id, device)
    cache, rows = _prefill(model, input_ids, attention_mask, scratch=max_new_tokens + n)
    make_guess = _GuessMaker(init, seed, batch, pad_token_id)
    results: list[list[int] | None] = [None] * batch
    stats = [DecodeStats(forward_passes=1) for _ in range(batch)]  # the prefill yields the first token
    trajectories: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    _emit_first_token(rows, cache, eos, max_new_tokens, results, on_tokens)

    active = len(rows.index)
    block = make_guess(rows, torch.arange(active, device=device), n)  # (B, n) current iterate y(j)
    fixed = torch.zeros(active, dtype=torch.long, device=device)  # leading positions known right
    block_start = rows.n_out.clone()  # n_out when the block began
    block_iters = torch.zeros(active, dtype=torch.long, device=device)
    # The current block's states y(0), y(1), ... per row. Entries are rows of `block` tensors that
    # are never written in place after being appended, except rows of just-converged blocks.
    states: dict[int, list[torch.Tensor]] = {row: [state] for row, state in zip(rows.index.tolist(), block)}

    def finish_block(i: int, length: int) -> None:
        row = int(rows.index[i])
        trajectory = torch.stack(states[row])[:, :length]
        stats[row].block_iterations.append(int(block_iters[i]))
        stats[row].stationary += count_stationary(trajectory)
        if return_trajectory:
            trajectories[row].append(trajectory.cpu())

    while len(rows.index):
        block_len = (max_new_tokens - block_start).clamp(max=n)
        width = block_len - fixed  # (B,) >= 1 unfixed positions
        fed = int(width.max())
        columns = torch.arange(fed, device=device)
        real = columns < width[:, None]  # (B, m)

        # 1. guess: the unfixed part of the iterate, shifted one right behind `pending`
        positions = (fixed[:, None] + columns).clamp(max=n - 1)  # (B, m) block positions predicted
        guesses = block.gather(1, positions)
        tokens = torch.cat([rows.pending[:, None], guesses[:, :-1]], dim=1).masked_fill(~real, pad_token_id)

        # 2. one parallel forward
        prediction = _forward(model, cache, rows, tokens, real)  # (B, m)

        # 3. accept the longest prefix whose inputs were right, plus the token after it
        same = (prediction == guesses) & real
        accepted = torch.minimum(same.long().cumprod(1).sum(1) + 1, width)  # (B,) >= 1

        # 4. commit: new iterate, output, cache
        relative = torch.arange(n, device=device) - fixed[:, None]  # (B, n)
        updated = (relative >= 0) & (relative < width[:, None])
        block = torch.where(updated, prediction.gather(1, relative.clamp(0, fed - 1)), block)
        _keep_real_slots(cache, rows, fed, accepted)
        rows.pending = prediction.gather(1, (accepted - 1)[:, None]).squeeze(1)
        count, hit_eos = _truncate_at_eos(prediction, accepted, eos)
        _emit(rows, prediction, count, on_tokens)
        fixed = fixed + accepted
        block_iters += 1
        done = hit_eos | (rows.n_out >= max_new_tokens)
        make_guess.refresh(rows, block, fixed, block_len, done)
        for row, emitted, state in zip(rows.index.tolist(), count.tolist(), block):
            stats[row].forward_passes += 1
            stats[row].fast_forward += emitted - 1
            states[row].append(state)

        converged = (fixed >= block_len) | done
        if bool((block_iters > block_len).any()):
            raise RuntimeError("Jacobi block exceeded n iterations; acceptance must fix >= 1 token per forward")
        if converged.any():
            which = converged.nonzero().flatten()
            for i in which.tolist():
                finish_block(i, int(rows.n_out[i] - block_start[i]))
            block[which] = make_guess(rows, which, n)
            fixed[which] = 0
            block_iters[which] = 0
            block_start[which] = rows.n_out[which]
            for i in which.tolist():
                states[int(rows.index[i])] = [block[i]]
        if done.any():
            keep = (~done).nonzero().flatten()
            _retire(rows, cache, done, results)
            block, fixed, block_start, block_iters = block[keep], fixed[keep], block_start[keep], block_iters[keep]

    token_ids = [r or [] for r in results]
    for row, tokens in enumerate(token_ids):
        stats[row].new_tokens = len(tokens)
    return DecodeOutput(token_ids=token_ids, stats=stats, trajectories=trajectories if return_trajectory else None)


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
        prompt_len=torch.tensor([input_ids.shape[1]]),
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
            matched = int((prediction[fixed:] == block[fixed:]).long().cumprod(0).sum())
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


@torch.inference_mode()
def hf_generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 128,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    on_tokens: TokenCallback | None = None,
) -> DecodeOutput:
    """transformers' own greedy `generate`, as the reference and the speed baseline to beat.

    `on_tokens` is called once per row with its whole output, after generation ends.
    """
    input_ids, attention_mask = _as_batch(input_ids, attention_mask)
    _validate(input_ids, attention_mask, max_new_tokens, block_size=1)
    eos_ids = _eos_tensor(eos_token_id, input_ids.device).tolist()
    # An explicit config, so nothing falls back to the model's own generation defaults.
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos_ids or None,
        pad_token_id=pad_token_id,
    )
    generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)[:, input_ids.shape[1] :]
    eos = set(eos_ids)
    token_ids = []
    for row in generated.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        token_ids.append(row[:end])
        if on_tokens is not None:
            on_tokens(len(token_ids) - 1, row[:end])
    return _one_token_per_forward(token_ids)


DECODERS = {"ar": ar, "jacobi": jacobi, "hf": hf_generate}
