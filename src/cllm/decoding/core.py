"""The machinery the cached decoders share: statistics, outputs, the batched KV-cache layout,
prefill, one forward, emitting and retiring rows.

KV-cache layout. All rows share one cache tensor of S slots. A slot holds a real token of that
row or a hole (left padding, a padded input column, or KV of a rejected guess that another
row's longer acceptance kept from being cropped); `_Rows.slot_mask` marks the real ones and is
the attention mask, and position ids count real tokens only, so holes change nothing but cost.
The last accepted token of every row (`pending`) is never in the cache: it is the first input of
the next forward, whose prediction at that column is the next token.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import PreTrainedModel

from cllm.decoding.kv import DynamicKV, StaticKV, new_store
from cllm.decoding.sampling import GREEDY, Sampling, row_seeds, sample, uniforms

KVStore = DynamicKV | StaticKV

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
    input_ids, present = ragged(prompts, pad_token_id, left=True)
    return input_ids, present.long()


def ragged(sequences: Sequence[Sequence[int]], fill: int, *, left: bool = False,
           device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists of different lengths as one (B, L) tensor padded with `fill` (on the right, or
    the left), and (B, L) True where a token is real. L is the longest length, 0 when all are empty."""
    width = max(map(len, sequences), default=0)
    tokens = torch.full((len(sequences), width), fill, dtype=torch.long)
    present = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, sequence in enumerate(sequences):
        if len(sequence):
            span = slice(width - len(sequence), width) if left else slice(0, len(sequence))
            tokens[row, span] = torch.as_tensor(list(sequence), dtype=torch.long)
            present[row, span] = True
    return tokens.to(device), present.to(device)


def accepted_prefix(proposed: torch.Tensor, predicted: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
    """The acceptance rule: how many leading entries (last dim) of `proposed` equal `predicted`,
    stopping at the first difference or the first entry that is not `real`. (..., L) -> (...)."""
    same = proposed == predicted
    if real is not None:
        same = same & real
    return same.long().cumprod(-1).sum(-1)


def verify_candidates(proposals: torch.Tensor, present: torch.Tensor, next_token: torch.Tensor,
                      predictions: torch.Tensor) -> torch.Tensor:
    """Right tokens of each candidate n-gram fed after `pending` (B,) -> (B, G).

    proposals (B, G, L): the candidates' tokens; present (B, G): which exist; next_token (B, 1):
    the prediction at `pending`; predictions (B, G, L): the prediction at each candidate token.
    Token k of a candidate is right when it equals the prediction at the column before it.
    """
    groups = proposals.shape[1]
    before = torch.cat([next_token[:, None, :].expand(-1, groups, -1), predictions[:, :, :-1]], dim=2)
    return accepted_prefix(proposals, before, present[:, :, None])


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
    limit: torch.Tensor  # (B,) max new tokens
    draws: torch.Tensor  # (B, T) the uniform that samples output index t
    samplings: list[Sampling]  # per row

    def select(self, keep: torch.Tensor) -> None:
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value[keep])
        self.samplings = [self.samplings[i] for i in keep.tolist()]

    def pick(self, logits: torch.Tensor, out_index: torch.Tensor) -> torch.Tensor:
        """The token chosen from each column's logits (B, m, V), the column predicting the row's
        output index `out_index` (B, m): argmax, or the sample fixed for that index. Indices past
        the table only occur for guesses beyond the last token, which are never emitted."""
        tokens = logits.argmax(dim=-1)
        index = out_index.clamp(0, self.draws.shape[1] - 1)
        for setting in set(self.samplings) - {GREEDY}:
            which = torch.tensor([i for i, s in enumerate(self.samplings) if s == setting], device=tokens.device)
            tokens[which] = sample(logits[which], setting, self.draws[which].gather(1, index[which]))
        return tokens


def _per_row(value, batch: int, name: str) -> list:
    """A setting given once for the batch or once per row, as a list per row."""
    if isinstance(value, (int, Sampling)):
        return [value] * batch
    values = list(value)
    if len(values) != batch:
        raise ValueError(f"got {len(values)} values of {name} for a batch of {batch}")
    return values


def _validate(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int | Sequence[int], block_size: int
) -> None:
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError("input_ids must be a non-empty (batch, length) tensor")
    if attention_mask.shape != input_ids.shape:
        raise ValueError("attention_mask must have the shape of input_ids")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded: every row's last column must be a real token")
    limits = _per_row(max_new_tokens, input_ids.shape[0], "max_new_tokens")
    if min(limits) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {min(limits)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")


def _eos_tensor(eos_token_id: int | Sequence[int] | None, device: torch.device) -> torch.Tensor:
    if eos_token_id is None:
        return torch.empty(0, dtype=torch.long, device=device)
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device)


def _prefill(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    max_new_tokens: int | Sequence[int], slack: int, sampling: Sampling | Sequence[Sampling] = GREEDY,
    seed: int | Sequence[int] = 0, first_index: int = 0, compile: bool | str = False, like: KVStore | None = None,
) -> tuple[KVStore, _Rows]:
    """Run the prompts into a fresh cache; the prediction after the last prompt token is `pending`.

    That first token is not emitted here: callers do it with `_emit`, so EOS and streaming
    treat it like any other token. Rows get `max_new_tokens + slack` output slots (the sampling
    table's width too) and indices from `first_index` on. `compile` picks the store (kv.new_store),
    unless it is to be of the kind of `like`.
    """
    batch = input_ids.shape[0]
    device = input_ids.device
    limits = torch.tensor(_per_row(max_new_tokens, batch, "max_new_tokens"), dtype=torch.long, device=device)
    scratch = int(limits.max()) + slack
    width = input_ids.shape[1]
    cache = like.empty(width) if like is not None else new_store(model, width, compile)
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
    mask = None if bool(attention_mask.all()) else attention_mask
    logits = cache.forward(input_ids, positions, mask, logits_to_keep=1)  # (B, 1, V)
    rows = _Rows(
        index=torch.arange(first_index, first_index + batch, device=device),
        slot_mask=attention_mask.clone(),
        n_real=attention_mask.sum(1),
        pending=torch.zeros(batch, dtype=torch.long, device=device),
        out=torch.zeros((batch, scratch), dtype=torch.long, device=device),
        n_out=torch.zeros(batch, dtype=torch.long, device=device),
        prompt=input_ids,
        prompt_len=attention_mask.sum(1),
        limit=limits,
        draws=uniforms(row_seeds(seed, batch), scratch).to(device),
        samplings=_per_row(sampling, batch, "sampling"),
    )
    rows.pending = rows.pick(logits, torch.zeros((batch, 1), dtype=torch.long, device=device))[:, 0]
    return cache, rows


def _emit_first_token(rows: _Rows, cache: KVStore, eos: torch.Tensor, outputs: _Outputs) -> torch.Tensor | None:
    """Emit the prefill's prediction and retire rows that it already finished (returns what
    `_Outputs.retire` does)."""
    first = rows.pending[:, None]  # (B, 1)
    count, hit_eos = _truncate_at_eos(first, torch.ones_like(rows.n_out), eos)
    _emit(rows, first, count, outputs.on_tokens)
    return outputs.retire(rows, cache, hit_eos | (rows.n_out >= rows.limit))


def _forward(cache: KVStore, rows: _Rows, tokens: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """One forward of `tokens` (B, m), `pending` first, after the cache; returns the prediction
    (argmax or fixed sample) at every column."""
    columns = torch.arange(tokens.shape[1], device=tokens.device)
    positions = rows.n_real[:, None] + columns  # (B, m)
    attention_mask = torch.cat([rows.slot_mask, real.long()], dim=1)  # (B, S + m)
    if bool(attention_mask.all()):
        attention_mask = None  # no padding or holes: the plain causal mask, cheapest for the backend
    logits = cache.forward(tokens, positions, attention_mask)  # (B, m, V)
    return rows.pick(logits, rows.n_out[:, None] + columns)  # column j predicts output index n_out + j


def _keep_real_slots(cache: KVStore, rows: _Rows, accepted: torch.Tensor) -> None:
    """After a forward, keep the KV of each row's first `accepted` columns."""
    keep = int(accepted.max())
    cache.keep(keep)
    columns = torch.arange(keep, device=accepted.device)
    rows.slot_mask = torch.cat([rows.slot_mask, (columns < accepted[:, None]).long()], dim=1)
    rows.n_real = rows.n_real + accepted


def _keep_pending_and_accepted(cache: KVStore, rows: _Rows, first: torch.Tensor, accepted: torch.Tensor) -> None:
    """After a forward that fed `pending` at column 0, keep its KV and that of each row's `accepted`
    (B,) columns from column `first` (B,) on: the fed tokens that proved right, now part of the output."""
    offsets = torch.arange(int(accepted.max()), device=accepted.device)
    real = offsets < accepted[:, None]
    columns = torch.where(real, first[:, None] + offsets, 0)  # a row's unused slots copy column 0, masked
    cache.keep_columns(torch.cat([torch.zeros_like(first)[:, None], columns], dim=1))
    rows.slot_mask = torch.cat([rows.slot_mask, torch.ones_like(first)[:, None], real.long()], dim=1)
    rows.n_real = rows.n_real + 1 + accepted


def _context(rows: _Rows, i: int) -> torch.Tensor:
    """Row i's prompt and output so far (its last token is `pending`)."""
    prompt = rows.prompt[i, rows.prompt.shape[1] - int(rows.prompt_len[i]) :]
    return torch.cat([prompt, rows.out[i, : int(rows.n_out[i])]])


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


@dataclass
class Admission:
    """Prompts that join a running decode: token ids (unpadded) and their per-row settings."""

    prompts: list[list[int]]
    max_new_tokens: list[int]
    samplings: list[Sampling]
    seeds: list[int]


class BatchControl(Protocol):
    """How a caller (a server) lets rows join and leave a running decode. The decoder asks at the
    start of every iteration; joining rows get the next row indices, in order."""

    def admit(self) -> Admission | None: ...

    def cancelled(self) -> Collection[int]: ...

    def finished(self, row: int, token_ids: list[int], stats: DecodeStats) -> None: ...


class _Outputs:
    """Per-row results and statistics by row index, the streaming callback and the control."""

    def __init__(self, batch: int, on_tokens: TokenCallback | None, control: BatchControl | None, one_per_token: bool = False):
        self.results: list[list[int] | None] = [None] * batch
        self.stats = [DecodeStats(forward_passes=1) for _ in range(batch)]  # the prefill yields the first token
        self.on_tokens, self.control, self.one_per_token = on_tokens, control, one_per_token

    def grow(self, count: int) -> int:
        """Room for `count` joining rows; returns the first new index."""
        first = len(self.results)
        self.results += [None] * count
        self.stats += [DecodeStats(forward_passes=1) for _ in range(count)]
        return first

    def retire(self, rows: _Rows, cache: KVStore, done: torch.Tensor) -> torch.Tensor | None:
        """Store the output of finished rows and drop them from the batch and the cache; returns
        the batch positions kept (None when every row goes on)."""
        if self.control is not None:
            cancelled = set(self.control.cancelled())
            if cancelled:
                done = done | torch.tensor([int(r) in cancelled for r in rows.index.tolist()], device=done.device)
        if not done.any():
            return None
        for i in done.nonzero().flatten().tolist():
            row = int(rows.index[i])
            tokens = rows.out[i, : int(rows.n_out[i])].tolist()
            self.results[row] = tokens
            stats = self.stats[row]
            if self.one_per_token:
                self.stats[row] = stats = DecodeStats(len(tokens), len(tokens), [1] * len(tokens))
            stats.new_tokens = len(tokens)
            if self.control is not None:
                self.control.finished(row, tokens, stats)
        keep = (~done).nonzero().flatten()
        rows.select(keep)
        cache.select(keep)
        return keep

    def output(self, trajectories: list[list[torch.Tensor]] | None = None) -> DecodeOutput:
        return DecodeOutput(token_ids=[r or [] for r in self.results], stats=self.stats, trajectories=trajectories)


def _as_batch(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return input_ids, attention_mask.to(input_ids.device)


def _join(
    model: PreTrainedModel, cache: KVStore, rows: _Rows, admission: Admission, outputs: _Outputs,
    eos: torch.Tensor, slack: int, pad_token_id: int,
) -> tuple[KVStore, _Rows, int]:
    """Prefill the admitted prompts and append them to the running batch; returns the new cache,
    rows and how many rows joined (the last ones: some may have ended with their first token)."""
    input_ids, attention_mask = left_pad(admission.prompts, pad_token_id)
    device = rows.pending.device
    first = outputs.grow(len(admission.prompts))
    new_cache, new_rows = _prefill(model, input_ids.to(device), attention_mask.to(device), admission.max_new_tokens,
                                   slack, admission.samplings, admission.seeds, first_index=first,
                                   like=cache)
    _emit_first_token(new_rows, new_cache, eos, outputs)
    joined = len(new_rows.index)
    if not len(rows.index):
        return new_cache, new_rows, joined
    if not joined:
        return cache, rows, 0
    return cache.merge(new_cache), _merge_rows(rows, new_rows), joined


def _pad(tensor: torch.Tensor, size: int, dim: int, left: bool) -> torch.Tensor:
    missing = size - tensor.shape[dim]
    if not missing:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    filler = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([filler, tensor] if left else [tensor, filler], dim=dim)


def _merge_rows(first: _Rows, second: _Rows) -> _Rows:
    def both(name: str, dim_pad: bool | None = None) -> torch.Tensor:
        a, b = getattr(first, name), getattr(second, name)
        if dim_pad is not None:
            size = max(a.shape[1], b.shape[1])
            a, b = _pad(a, size, 1, left=dim_pad), _pad(b, size, 1, left=dim_pad)
        return torch.cat([a, b])

    return _Rows(
        index=both("index"), slot_mask=both("slot_mask", dim_pad=True), n_real=both("n_real"), pending=both("pending"),
        out=both("out", dim_pad=False), n_out=both("n_out"), prompt=both("prompt", dim_pad=True),
        prompt_len=both("prompt_len"), limit=both("limit"), draws=both("draws", dim_pad=False),
        samplings=first.samplings + second.samplings,
    )


def _one_token_per_forward(token_ids: list[list[int]]) -> DecodeOutput:
    stats = [DecodeStats(len(t), len(t), [1] * len(t)) for t in token_ids]
    return DecodeOutput(token_ids=token_ids, stats=stats)
