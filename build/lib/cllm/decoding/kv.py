"""Where the cached decoders keep keys and values.

Every cached decoder talks to a store: `forward` runs some columns after the cached slots,
`keep` keeps the KV of the first columns of the last forward, `keep_columns` the KV of chosen
columns per row, `select` drops rows, `merge` joins two batches (the slot layout is described in
cllm.decoding.core).

`DynamicKV` is transformers' `DynamicCache`, grown and cropped, with the model run eagerly.
`StaticKV` is the compiled path (`compile=True`): a preallocated `StaticCache` whose write position
moves back instead of cropping, and columns padded to a few fixed widths (1, 4, 16, 64, ...), so
that one compiled forward per width (cllm.decoding.compiled) covers a whole decode. Padded columns
see only themselves and are never kept, so they change nothing but cost. The mask is always
built here as a 4D additive tensor over the whole cache (transformers uses a 4D mask as it is).
The StaticCache internals this needs (moving the write position back, unmarking static addresses)
are in cllm.decoding.internals.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache, PreTrainedModel, StaticCache

from cllm.decoding.compiled import compiled_forward
from cllm.decoding.internals import set_write_position, unmark_static_addresses

WIDTH_BUCKETS = (1, 4, 16, 64, 256, 1024)
CAPACITY_STEP = 64  # static caches grow in steps of this many slots: attention reads every slot

Mask = torch.Tensor | None
"""What the decoders pass as the mask of one forward of m columns after S cached slots: None (every
slot real, causal), a (B, S + m) 0/1 padding mask (causal over the m columns), or a boolean
(B, m, S + m) tensor saying which slot and column each column may see."""


class DynamicKV:
    """transformers' DynamicCache and the model's eager forward: the reference path."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.cache = DynamicCache(config=model.config)
        self._fed = 0

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: Mask,
                logits_to_keep: int | torch.Tensor = 0, **model_kwargs) -> torch.Tensor:
        """`model_kwargs` go to the model's forward as they are (PEFT's `adapter_names`, say)."""
        self._fed = tokens.shape[1]
        if mask is not None and mask.ndim == 3:
            mask = additive(mask, self.model.dtype)
        return self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                          use_cache=True, logits_to_keep=logits_to_keep, **model_kwargs).logits

    def empty(self, capacity: int) -> DynamicKV:
        """A new store of this kind (a DynamicCache needs no capacity)."""
        return DynamicKV(self.model)

    def keep(self, count: int) -> None:
        """Keep the KV of the first `count` columns of the last forward, drop the rest."""
        if count < self._fed:
            self.cache.crop(count - self._fed)

    def keep_columns(self, columns: torch.Tensor) -> None:
        """Keep, per row, the KV of the last forward's columns `columns` (B, K), in that order."""
        start = self.cache.get_seq_length() - self._fed
        for layer in self.cache.layers:
            _move_kept(layer.keys, layer.values, start, columns)
        self.keep(columns.shape[1])

    def select(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)

    def merge(self, other: DynamicKV) -> DynamicKV:
        """One store of both batches; the shorter is padded on the left with holes (masked slots)."""
        merged = DynamicKV(self.model)
        for layer, (keys, values) in enumerate(_merged_layers(self.contents(), other.contents())):
            merged.cache.update(keys, values, layer)
        return merged

    def contents(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in self.cache.layers]


class StaticKV:
    """A preallocated StaticCache and a compiled forward over fixed column widths."""

    def __init__(self, model: PreTrainedModel, capacity: int, compiled: Callable) -> None:
        self.model = model
        self.capacity = _round_up(capacity)
        self.cache = StaticCache(config=model.config, max_cache_len=self.capacity)
        self.compiled = compiled
        self.length = 0  # slots written and kept
        self._start = 0  # where the last forward's columns begin

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: Mask,
                logits_to_keep: int | torch.Tensor = 0) -> torch.Tensor:
        batch, fed = tokens.shape
        prefill = self.length == 0  # prompt widths vary: the prefill runs eagerly, unpadded
        width = fed if prefill else next(w for w in WIDTH_BUCKETS + (fed,) if w >= fed)
        self._reserve(self.length + width)
        allowed = torch.zeros((batch, width, self.capacity), dtype=torch.bool, device=tokens.device)
        allowed[:, :fed, : self.length + fed] = _as_3d(mask, batch, fed, self.length, tokens.device)
        padding = torch.arange(fed, width, device=tokens.device)
        allowed[:, padding, self.length + padding] = True  # a padded column sees only itself
        tokens = torch.nn.functional.pad(tokens, (0, width - fed))
        positions = torch.cat([positions, positions[:, -1:].expand(-1, width - fed)], dim=1)
        mask4d = additive(allowed, self.model.dtype)
        torch._dynamo.maybe_mark_dynamic(mask4d, 3)  # the cache's size, like its keys' (unmark_static_addresses)
        # a graph per width: the best matrix kernel for one column is not the best for sixteen, and
        # dynamo would otherwise make the second width it meets dynamic (the batch size may become so)
        for tensor, dim in ((tokens, 1), (positions, 1), (mask4d, 2)):
            torch._dynamo.mark_static(tensor, dim)
        inputs = dict(input_ids=tokens, attention_mask=mask4d, position_ids=positions, past_key_values=self.cache,
                      use_cache=True)
        if prefill:
            logits = self.model(**inputs, logits_to_keep=logits_to_keep).logits
            unmark_static_addresses(self.cache)  # one graph for every cache and its size
        else:
            logits = _kept(self.compiled(**inputs).logits[:, :fed], logits_to_keep)
        self._start, self.length = self.length, self.length + width
        return logits

    def empty(self, capacity: int) -> StaticKV:
        """A new store of this kind, for up to `capacity` slots (it grows when needed)."""
        return StaticKV(self.model, capacity, self.compiled)

    def keep(self, count: int) -> None:
        """Keep the KV of the first `count` columns of the last forward; the next forward
        overwrites the rest (the mask hides slots past the length). The cache's layers advance their
        write position by every forward themselves; only a shorter keep moves it back."""
        if self._start + count != self.length:
            self.length = self._start + count
            set_write_position(self.cache, self.length)

    def keep_columns(self, columns: torch.Tensor) -> None:
        """Keep, per row, the KV of the last forward's columns `columns` (B, K), in that order: written
        over the forward's first K slots."""
        for layer in self.cache.layers:
            _move_kept(layer.keys, layer.values, self._start, columns)
        self.keep(columns.shape[1])

    def select(self, rows: torch.Tensor) -> None:
        self._refill([(k[rows], v[rows]) for k, v in self.contents()], self.capacity)

    def merge(self, other: StaticKV) -> StaticKV:
        merged = StaticKV(self.model, max(self.capacity, other.capacity), self.compiled)
        merged._refill(_merged_layers(self.contents(), other.contents()), merged.capacity)
        return merged

    def contents(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if not self.cache.layers[0].is_initialized:  # nothing written yet
            return []
        return [(layer.keys[:, :, : self.length], layer.values[:, :, : self.length]) for layer in self.cache.layers]

    def _reserve(self, slots: int) -> None:
        if slots > self.capacity:
            self._refill(self.contents(), _round_up(slots))

    def _refill(self, contents: list[tuple[torch.Tensor, torch.Tensor]], capacity: int) -> None:
        """A fresh cache of `capacity` slots holding `contents` (a new batch size or length)."""
        self.capacity = capacity
        self.cache = StaticCache(config=self.model.config, max_cache_len=capacity)
        for layer, (keys, values) in zip(self.cache.layers, contents):
            layer.update(keys.contiguous(), values.contiguous())
        self.length = self._start = contents[0][0].shape[-2] if contents else 0
        unmark_static_addresses(self.cache)  # one graph for every cache and its size


def new_store(model: PreTrainedModel, capacity: int, compile: bool | str = False) -> DynamicKV | StaticKV:
    """A store for a decode that starts with `capacity` slots (a static cache grows when needed):
    `compile` False for the eager path, True (inductor) or a torch.compile backend for the compiled one."""
    if not compile:
        return DynamicKV(model)
    compiled = compiled_forward(model, "inductor" if compile is True else compile)
    return DynamicKV(model) if compiled is None else StaticKV(model, capacity, compiled)


def _round_up(slots: int) -> int:
    return -(-max(slots, 1) // CAPACITY_STEP) * CAPACITY_STEP


def _as_3d(mask: Mask, batch: int, fed: int, cached: int, device: torch.device) -> torch.Tensor:
    """Any decoder mask as the boolean (B, m, S + m) form."""
    if mask is not None and mask.ndim == 3:
        return mask.bool()
    causal = torch.ones((fed, cached + fed), dtype=torch.bool, device=device).tril(cached)
    if mask is None:
        return causal[None].expand(batch, -1, -1)
    return causal[None] & mask.bool()[:, None, :]


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean (B, Q, K) mask as the additive (B, 1, Q, K) float mask every attention accepts
    (transformers passes a 4D mask to the attention as it is)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)[
        :, None
    ]


def _kept(logits: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The columns `logits_to_keep` asks for (transformers' meaning), from every column's logits."""
    if isinstance(logits_to_keep, torch.Tensor):
        return logits[:, logits_to_keep]
    return logits[:, -logits_to_keep:] if logits_to_keep else logits


def _move_kept(keys: torch.Tensor, values: torch.Tensor, start: int, columns: torch.Tensor) -> None:
    """Write each row's chosen columns (B, K), counted from slot `start`, over slots start..start+K-1
    in place (the gather copies them first), so that keeping the first K slots keeps them."""
    kept = slice(start, start + columns.shape[1])
    for states in (keys, values):  # their head sizes may differ
        index = (start + columns)[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[3])
        states[:, :, kept] = states.gather(2, index)


def _pad_left(tensor: torch.Tensor, size: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, 0, size - tensor.shape[-2], 0))


def _merged_layers(first: list[tuple[torch.Tensor, torch.Tensor]], second: list[tuple[torch.Tensor, torch.Tensor]]
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Both batches' keys and values per layer, the shorter padded on the left with holes."""
    merged = []
    for (keys_a, values_a), (keys_b, values_b) in zip(first, second):
        length = max(keys_a.shape[-2], keys_b.shape[-2])
        merged.append((torch.cat([_pad_left(keys_a, length), _pad_left(keys_b, length)]),
                       torch.cat([_pad_left(values_a, length), _pad_left(values_b, length)])))
    return merged
