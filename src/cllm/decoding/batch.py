"""The batch a cached decoder runs (`Batch`): its rows, their KV cache, their outputs and the
per-row state each decoder keeps beside them. Rows join (continuous batching) in `Batch.admit`
and leave in `Batch.retire`, and nowhere else: a decoder's own per-row state is a `RowState`
that the batch starts for joining rows and trims for leaving ones. Cache layout: cllm.decoding.core.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

import torch
from transformers import PreTrainedModel

from cllm.decoding.core import (
    Admission,
    BatchControl,
    DecodeOutput,
    DecodeStats,
    KVStore,
    TokenCallback,
    _eos_tensor,
    _pad,
    _per_row,
    _Rows,
    left_pad,
)
from cllm.decoding.kv import new_store
from cllm.decoding.logprobs import Scores, TokenLogprob, score
from cllm.decoding.sampling import GREEDY, Sampling, row_seeds, uniforms


class RowState(Protocol):
    """What a decoder keeps per row by batch position (dim 0), beside `_Rows`."""

    def start(self, which: torch.Tensor) -> None:
        """The rows at batch positions `which` (the last ones) began: make their state."""

    def keep(self, keep: torch.Tensor) -> None:
        """Only the rows at batch positions `keep` go on."""


State = TypeVar("State", bound=RowState)


class Batch:
    """The running rows of one decode. Built by prefilling the prompts; the prefill's prediction
    is each row's first token (emitted at once, so EOS and streaming treat it like any other).
    Rows get `max_new_tokens + slack` output slots: `slack` is the most tokens one step accepts.
    `store(capacity)` makes the KV store (default: kv.new_store of `model`, eager or compiled)."""

    def __init__(
        self, model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
        max_new_tokens: int | list[int], slack: int, eos_token_id: int | list[int] | None, pad_token_id: int,
        sampling: Sampling | list[Sampling] = GREEDY, seed: int | list[int] = 0, on_tokens: TokenCallback | None = None,
        control: BatchControl | None = None, compile: bool | str = False, one_per_token: bool = False,
        store: Callable[[int], KVStore] | None = None, logprobs: int | Sequence[int | None] | None = None,
        predictions: Sequence[Sequence[int] | None] | None = None,
    ) -> None:
        self.model, self.slack, self.pad_token_id, self.control = model, slack, pad_token_id, control
        self.eos = _eos_tensor(eos_token_id, input_ids.device)
        self.outputs = _Outputs(input_ids.shape[0], on_tokens, control, one_per_token)
        self.scores: Scores | None = None  # of the last target forward, for the rows that want logprobs
        self.cache, self.rows, logits = _prefill(model, input_ids, attention_mask, max_new_tokens, slack, sampling,
                                                 seed, compile=compile, store=store, logprobs=logprobs,
                                                 predictions=predictions)
        self.states: list[RowState] = []
        self._emit_first_token(self.cache, self.rows, logits)

    @property
    def stats(self) -> list[DecodeStats]:
        """Per row, by the row's index in the caller's batch."""
        return self.outputs.stats

    def __len__(self) -> int:
        return len(self.rows.index)

    def attach(self, state: State) -> State:
        """Keep `state` in step with the rows from now on (started for the running ones)."""
        state.start(torch.arange(len(self), device=self.rows.pending.device))
        self.states.append(state)
        return state

    def admit(self) -> bool:
        """Let the rows the control admits join (each state started for them); True while any row runs."""
        admission = self.control.admit() if self.control is not None else None
        if admission is not None:
            joined = self._join(admission)
            if joined:
                new = torch.arange(len(self) - joined, len(self), device=self.rows.pending.device)
                for state in self.states:
                    state.start(new)
        return len(self) > 0

    def column_cap(self, full: int) -> int:
        """How many columns each row may feed this step: `full`, or, under a control with a
        `column_budget` (columns per forward the hardware affords, a server's), what the budget
        leaves each running row, at least 1 (an AR step). Any width stays exact: every fed guess
        is verified."""
        budget = getattr(self.control, "column_budget", None)
        return full if not budget else max(1, min(full, budget // max(1, len(self))))

    def forward(self, tokens: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        """One forward of `tokens` (B, m), `pending` first, after the cache (`real` (B, m): which
        columns are not padding); the prediction (argmax or fixed sample) at every column (B, m)."""
        real = torch.ones_like(tokens, dtype=torch.bool) if real is None else real
        logits, out_index = _forward_after(self.cache, self.rows.slot_mask, self.rows, tokens, real)
        return self.pick(logits, out_index)

    def pick(self, logits: torch.Tensor, out_index: torch.Tensor) -> torch.Tensor:
        """`_Rows.pick` for a forward of the target: also scores it for the rows that want logprobs."""
        prediction = self.rows.pick(logits, out_index)
        self.scores = score(logits, prediction, self.rows.logprobs)
        return prediction

    def ar_step(self) -> None:
        """One forward of every row's `pending`: its next token, as AR decodes; rows that end retire."""
        one = torch.ones_like(self.rows.n_out)  # (B,) every row accepts its one token
        prediction = self.forward(self.rows.pending[:, None])  # (B, 1)
        self.keep_columns(one)
        _, done = self.emit(prediction, one)
        self.retire(done)

    def keep_columns(self, accepted: torch.Tensor) -> None:
        """After a forward, keep the KV of each row's first `accepted` (B,) columns."""
        self.rows.slot_mask = _keep_first(self.cache, self.rows.slot_mask, accepted)
        self.rows.n_real = self.rows.n_real + accepted

    def keep_pending_and(self, first: torch.Tensor, accepted: torch.Tensor) -> None:
        """After a forward that fed `pending` at column 0, keep its KV and that of each row's
        `accepted` (B,) columns from column `first` (B,) on: fed tokens that proved right."""
        offsets = torch.arange(int(accepted.max()), device=accepted.device)
        real = offsets < accepted[:, None]
        columns = torch.where(real, first[:, None] + offsets, 0)  # a row's unused slots copy column 0, masked
        self.cache.keep_columns(torch.cat([torch.zeros_like(first)[:, None], columns], dim=1))
        self.rows.slot_mask = torch.cat([self.rows.slot_mask, torch.ones_like(first)[:, None], real.long()], dim=1)
        self.rows.n_real = self.rows.n_real + 1 + accepted

    def emit(self, tokens: torch.Tensor, count: torch.Tensor,
             source: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Append each row's first `count` (B,) of `tokens` (B, m), cut after an EOS, to its output
        and count the step's forward; the last one becomes `pending`. `source` (B, m): the column
        of the last `pick` each token was chosen at (default: token j at column j), for logprobs.
        Returns (B,) how many were emitted and (B,) which rows are done."""
        count, hit_eos = _truncate_at_eos(tokens, count, self.eos)
        _emit(self.rows, tokens, count, self.outputs, self.scores, source)
        self.rows.pending = tokens.gather(1, (count - 1)[:, None]).squeeze(1)
        for row, emitted in zip(self.rows.index.tolist(), count.tolist()):
            self.stats[row].forward_passes += 1
            self.stats[row].fast_forward += emitted - 1
        return count, hit_eos | (self.rows.n_out >= self.rows.limit)

    def retire(self, done: torch.Tensor) -> None:
        """Store the output of the rows that are `done` (B,) or cancelled and drop them everywhere."""
        keep = self.outputs.retire(self.rows, self.cache, done)
        if keep is not None:
            for state in self.states:
                state.keep(keep)

    def output(self, trajectories: list[list[torch.Tensor]] | None = None) -> DecodeOutput:
        return self.outputs.output(trajectories)

    def _emit_first_token(self, cache: KVStore, rows: _Rows, logits: torch.Tensor) -> None:
        """Emit the prefill's prediction (from its `logits` (B, 1, V)) and retire the rows it already finished."""
        first = rows.pending[:, None]  # (B, 1)
        count, hit_eos = _truncate_at_eos(first, torch.ones_like(rows.n_out), self.eos)
        _emit(rows, first, count, self.outputs, score(logits, first, rows.logprobs))
        self.outputs.retire(rows, cache, hit_eos | (rows.n_out >= rows.limit))

    def _join(self, admission: Admission) -> int:
        """Prefill the admitted prompts and append them to the running rows; returns how many
        joined (the last rows: some may have ended with their first token)."""
        device = self.rows.pending.device
        input_ids, attention_mask = left_pad(admission.prompts, self.pad_token_id)
        first = self.outputs.grow(len(admission.prompts))
        cache, rows, logits = _prefill(self.model, input_ids.to(device), attention_mask.to(device),
                                       admission.max_new_tokens, self.slack, admission.samplings, admission.seeds,
                                       first_index=first, like=self.cache, logprobs=admission.logprobs,
                                       predictions=admission.predictions)
        self._emit_first_token(cache, rows, logits)
        joined = len(rows.index)
        if not len(self):
            self.cache, self.rows = cache, rows
        elif joined:
            self.cache, self.rows = self.cache.merge(cache), _merge_rows(self.rows, rows)
        return joined


def _forward_after(store: KVStore, slot_mask: torch.Tensor, rows: _Rows, tokens: torch.Tensor,
                   real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of `tokens` (B, m) after `store` (whose real slots `slot_mask` marks): the
    logits (B, m, V) and the output index each column predicts (B, m), for `pick`."""
    columns = torch.arange(tokens.shape[1], device=tokens.device)
    attention_mask = torch.cat([slot_mask, real.long()], dim=1)  # (B, S + m)
    if bool(attention_mask.all()):
        attention_mask = None  # no padding or holes: the plain causal mask, cheapest for the backend
    logits = store.forward(tokens, rows.n_real[:, None] + columns, attention_mask)  # (B, m, V)
    return logits, rows.n_out[:, None] + columns  # column j predicts output index n_out + j


def _keep_first(store: KVStore, slot_mask: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
    """Keep the KV of each row's first `accepted` (B,) fed columns; returns the grown slot mask."""
    keep = int(accepted.max())
    store.keep(keep)
    columns = torch.arange(keep, device=accepted.device)
    return torch.cat([slot_mask, (columns < accepted[:, None]).long()], dim=1)


def _prefill(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    max_new_tokens: int | list[int], slack: int, sampling: Sampling | list[Sampling] = GREEDY,
    seed: int | list[int] = 0, first_index: int = 0, compile: bool | str = False, like: KVStore | None = None,
    store: Callable[[int], KVStore] | None = None, logprobs: int | Sequence[int | None] | None = None,
    predictions: Sequence[Sequence[int] | None] | None = None,
) -> tuple[KVStore, _Rows, torch.Tensor]:
    """Run the prompts into a fresh cache (of the kind `compile` picks, kv.new_store, or of the
    kind of `like`); the prediction after the last prompt token is `pending`, made from the
    returned logits (B, 1, V). Rows get indices from `first_index` on."""
    batch = input_ids.shape[0]
    device = input_ids.device
    limits = torch.tensor(_per_row(max_new_tokens, batch, "max_new_tokens"), dtype=torch.long, device=device)
    scratch = int(limits.max()) + slack
    width = input_ids.shape[1]
    if like is not None:
        cache = like.empty(width)
    else:
        cache = store(width) if store is not None else new_store(model, width, compile)
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
    mask = None if bool(attention_mask.all()) else attention_mask
    logits = cache.forward(input_ids, positions, mask, logits_to_keep=1)  # (B, 1, V)
    seeds = row_seeds(seed, batch)
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
        draws=uniforms(seeds, scratch).to(device),
        samplings=_per_row(sampling, batch, "sampling"),
        seeds=seeds,
        logprobs=_per_row(logprobs, batch, "logprobs"),
        predictions=[torch.tensor(list(p), dtype=torch.long, device=device) if p else None
                     for p in _per_row(predictions, batch, "predictions")],
    )
    rows.pending = rows.pick(logits, torch.zeros((batch, 1), dtype=torch.long, device=device))[:, 0]
    return cache, rows, logits


def _truncate_at_eos(
    new_tokens: torch.Tensor, count: torch.Tensor, eos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut each row's `count` new tokens (B, m) after its first EOS: (kept count, hit EOS)."""
    columns = torch.arange(new_tokens.shape[1], device=new_tokens.device)
    is_eos = torch.isin(new_tokens, eos) & (columns < count[:, None])
    hit = is_eos.any(dim=1)
    first = is_eos.long().argmax(dim=1)
    return torch.where(hit, first + 1, count), hit


def _emit(rows: _Rows, new_tokens: torch.Tensor, count: torch.Tensor, outputs: _Outputs, scores: Scores | None,
          source: torch.Tensor | None = None) -> None:
    """Append each row's first `count` tokens of `new_tokens` (B, m) to its output, with their
    logprobs (chosen at the `source` (B, m) columns of the scored forward) for the rows that asked."""
    columns = torch.arange(new_tokens.shape[1], device=new_tokens.device)
    rows.out.scatter_(1, rows.n_out[:, None] + columns, new_tokens)
    if outputs.on_tokens is not None or scores is not None:
        sources = None if scores is None else \
            (columns[None].expand_as(new_tokens) if source is None else source).tolist()
        for i, (row, tokens, k) in enumerate(zip(rows.index.tolist(), new_tokens.tolist(), count.tolist())):
            logprobs = scores.entries(i, tokens[:k], sources[i][:k]) if sources is not None else None
            outputs.add(row, tokens[:k], logprobs)
    rows.n_out = rows.n_out + count


class _Outputs:
    """Per-row results and statistics by row index, the streaming callback and the control."""

    def __init__(self, batch: int, on_tokens: TokenCallback | None, control: BatchControl | None, one_per_token: bool):
        self.results: list[list[int] | None] = [None] * batch
        self.stats = [DecodeStats(forward_passes=1) for _ in range(batch)]  # the prefill yields the first token
        self.logprobs: dict[int, list[TokenLogprob]] = {}  # by row, for the rows that asked
        self.on_tokens, self.control, self.one_per_token = on_tokens, control, one_per_token

    def grow(self, count: int) -> int:
        """Room for `count` joining rows; returns the first new index."""
        first = len(self.results)
        self.results += [None] * count
        self.stats += [DecodeStats(forward_passes=1) for _ in range(count)]
        return first

    def add(self, row: int, tokens: list[int], logprobs: list[TokenLogprob] | None) -> None:
        """A row's output grew by `tokens`: keep their logprobs and tell the callback."""
        if logprobs is not None:
            self.logprobs.setdefault(row, []).extend(logprobs)
        if self.on_tokens is not None:
            self.on_tokens(row, tokens) if logprobs is None else self.on_tokens(row, tokens, logprobs)

    def retire(self, rows: _Rows, cache: KVStore, done: torch.Tensor) -> torch.Tensor | None:
        """Store the output of finished rows and drop them from the rows and the cache; returns
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
        logprobs = [self.logprobs.get(row) for row in range(len(self.results))] if self.logprobs else None
        return DecodeOutput(token_ids=[r or [] for r in self.results], stats=self.stats, trajectories=trajectories,
                            logprobs=logprobs)


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
        samplings=first.samplings + second.samplings, seeds=first.seeds + second.seeds,
        logprobs=first.logprobs + second.logprobs, predictions=first.predictions + second.predictions,
    )
