"""What the cached decoders share: statistics and outputs, the per-row tensors (`_Rows`), the
acceptance rule, candidate verification, the fed columns' attention mask and the ragged padder.
The batch that runs them (prefill, forward, emit, join and leave) is cllm.decoding.batch.

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

from cllm.decoding.kv import DynamicKV, StaticKV
from cllm.decoding.logprobs import TokenLogprob
from cllm.decoding.sampling import GREEDY, Sampling, sample

KVStore = DynamicKV | StaticKV

TokenCallback = Callable[..., None]
"""Called as `callback(row, new_token_ids)` whenever a row's output grows (streaming); for a row
that asked for log-probabilities, `callback(row, new_token_ids, logprobs)` (cllm.decoding.logprobs)."""


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
    logprobs: list[list[TokenLogprob] | None] | None = None  # per row that asked: one per token


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


def fed_mask(segments: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """(B, Q, Q) True where a fed column may attend to another, for a forward that feeds
    `pending` and then segments (the cache's part is added by the caller). Segment s is
    (pattern (L, L): who sees whom inside it, present (B, L): which of its columns exist). A
    present column sees `pending` and, by the pattern, the present columns of its own segment; an
    absent one sees only itself, so no row of the mask is empty and nothing reads it."""
    batch = segments[0][1].shape[0] if segments else 1
    device = segments[0][1].device if segments else None
    present = torch.cat([torch.ones((batch, 1), dtype=torch.bool, device=device)] + [p for _, p in segments], dim=1)
    total = present.shape[1]
    mask = torch.zeros((batch, total, total), dtype=torch.bool, device=device)
    mask[:, :, 0] = present
    start = 1
    for pattern, real in segments:
        cols = slice(start, start + pattern.shape[0])
        mask[:, cols, cols] = pattern[None] & real[:, :, None] & real[:, None, :]
        start += pattern.shape[0]
    return mask | torch.eye(total, dtype=torch.bool, device=device)[None]


def causal(length: int, device: torch.device | None = None) -> torch.Tensor:
    """(L, L) the pattern of a segment whose tokens follow each other."""
    return torch.ones((length, length), dtype=torch.bool, device=device).tril()


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
    seeds: list[int]  # per row: what its draws and its guesses are seeded with
    logprobs: list[int | None]  # per row: how many top tokens to report with each token's logprob (None: none)
    predictions: list[torch.Tensor | None]  # per row: its Predicted Output (cllm.decoding.prediction), or None

    def select(self, keep: torch.Tensor) -> None:
        kept = keep.tolist()
        for name, value in vars(self).items():
            setattr(self, name, value[keep] if isinstance(value, torch.Tensor) else [value[i] for i in kept])

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
    if value is None or isinstance(value, (int, Sampling)):
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


def _context(rows: _Rows, i: int) -> torch.Tensor:
    """Row i's prompt and output so far (its last token is `pending`)."""
    prompt = rows.prompt[i, rows.prompt.shape[1] - int(rows.prompt_len[i]) :]
    return torch.cat([prompt, rows.out[i, : int(rows.n_out[i])]])


@dataclass
class Admission:
    """Prompts that join a running decode: token ids (unpadded) and their per-row settings."""

    prompts: list[list[int]]
    max_new_tokens: list[int]
    samplings: list[Sampling]
    seeds: list[int]
    logprobs: list[int | None] | None = None  # per prompt (None: no row asks)
    predictions: list[list[int] | None] | None = None  # per prompt: its Predicted Output's tokens (None: none)


class BatchControl(Protocol):
    """How a caller (a server) lets rows join and leave a running decode. The decoder asks at the
    start of every iteration; joining rows get the next row indices, in order."""

    def admit(self) -> Admission | None: ...

    def cancelled(self) -> Collection[int]: ...

    def finished(self, row: int, token_ids: list[int], stats: DecodeStats) -> None: ...


def _as_batch(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return input_ids, attention_mask.to(input_ids.device)


def _pad(tensor: torch.Tensor, size: int, dim: int, left: bool) -> torch.Tensor:
    missing = size - tensor.shape[dim]
    if not missing:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    filler = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([filler, tensor] if left else [tensor, filler], dim=dim)


def _one_token_per_forward(token_ids: list[list[int]]) -> DecodeOutput:
    stats = [DecodeStats(len(t), len(t), [1] * len(t)) for t in token_ids]
    return DecodeOutput(token_ids=token_ids, stats=stats)
