"""The drafters of drafted Jacobi (`jacobi(..., drafter=...)`): what predicts the next guesses at
the columns the target verifies, in the same step. Nothing a drafter predicts is emitted before
the target has verified it, so the output is the target's whatever the drafter does.

- `Drafter`: a second model (a full CLLM, say) with its own KV store, one more forward per step.
- `SharedAdapter`: a LoRA adapter of the target. The batch runs every row twice in ONE forward:

      row b      [ target's context b | fed columns ]   adapter off: verifies   -> the output
      row B + b  [ drafter's context b | fed columns ]  adapter on:  drafts     -> the next guesses

  through PEFT's per-row `adapter_names`; the base weights are read once for both rows. Both
  rows are fed the same columns and keep the same accepted ones, so one store of 2B rows
  (`PairedKV`) holds both contexts, and the batch sees B rows.
- `GatedAdapter`: a LoRA adapter switched on per token (`TokenGate`). The batch runs each row's
  fed columns twice in ONE row under a 4-D mask (`GatedKV`; the second time without the last,
  whose draft no step reads):

      columns    [ context b | fed columns (adapter off) | fed columns again (adapter on) ]
      verify     sees the context and the verify columns before it   -> the output
      draft      sees the context and the draft columns before it    -> the next guesses

  One KV cache, the target's: the draft columns read the target's own keys and values of the
  context, and only the verify columns' are ever kept. The drafter must be trained so
  (cllm.training, `gate`): its adapter on at the block's columns only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from cllm.decoding.batch import Batch, _forward_after, _keep_first
from cllm.decoding.core import KVStore, _pad, left_pad
from cllm.decoding.kv import DynamicKV, Mask, _as_3d, new_store


@dataclass(frozen=True)
class SharedAdapter:
    """A LoRA adapter `name` of the target as its drafter. `model` is a PEFT model over a module
    tree that shares every base weight with the target (cllm.drafters builds it), so it adds only
    the adapter's weights."""

    model: PreTrainedModel
    name: str = "drafter"

    def store(self, capacity: int, draft_width: int | None = None) -> PairedKV:
        """`draft_width` is GatedKV's; here the drafter's row is fed every column the target's is."""
        return PairedKV(DynamicKV(self.model), self.name)


class PairedKV:
    """A KV store of B logical rows over an inner store of 2B: rows 0..B-1 the target's (no
    adapter), rows B..2B-1 the drafter's (the adapter on). `forward` returns the target's logits
    and keeps the drafter's in `draft_logits`."""

    def __init__(self, inner: KVStore, adapter: str) -> None:
        self.inner, self.adapter = inner, adapter
        self.draft_logits: torch.Tensor | None = None  # (B, m, V) of the last forward

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: Mask,
                logits_to_keep: int | torch.Tensor = 0) -> torch.Tensor:
        batch = tokens.shape[0]
        twice = (lambda t: None if t is None else torch.cat([t, t]))
        names = ["__base__"] * batch + [self.adapter] * batch
        logits = self.inner.forward(twice(tokens), twice(positions), twice(mask), logits_to_keep, adapter_names=names)
        self.draft_logits = logits[batch:]
        return logits[:batch]

    def empty(self, capacity: int) -> PairedKV:
        return PairedKV(self.inner.empty(capacity), self.adapter)

    def keep(self, count: int) -> None:
        self.inner.keep(count)

    def keep_columns(self, columns: torch.Tensor) -> None:
        self.inner.keep_columns(torch.cat([columns, columns]))

    def select(self, rows: torch.Tensor) -> None:
        self.inner.select(torch.cat([rows, rows + len(self)]))

    def merge(self, other: PairedKV) -> PairedKV:
        """Both batches: [ours, theirs] for the target's rows, then the same for the drafter's."""
        ours, theirs = len(self), len(other)
        merged = self.inner.merge(other.inner)  # rows: our target's, our drafter's, theirs, theirs
        order = torch.cat([torch.arange(ours), 2 * ours + torch.arange(theirs),
                           ours + torch.arange(ours), 2 * ours + theirs + torch.arange(theirs)])
        merged.select(order.to(merged.contents()[0][0].device))
        return PairedKV(merged, self.adapter)

    def contents(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.inner.contents()

    def __len__(self) -> int:
        contents = self.inner.contents()
        return contents[0][0].shape[0] // 2 if contents else 0


class TokenGate:
    """Switches the LoRA adapter `adapter` of a PEFT `model` on per token: while `on(value)`, every
    LoRA branch's output is scaled by `value` ((B, T, 1) or a scalar; 1 on, 0 off), through a
    forward hook on its down-projection (`lora_A`). Outside `on` the adapter is off: the model is
    the target, exactly (the branch adds zeros)."""

    def __init__(self, model: torch.nn.Module, adapter: str) -> None:
        from peft.tuners.lora import LoraLayer

        self.value: torch.Tensor | None = None
        self.first: int | None = None  # when set, `value` is 0 before this column and 1 from it on
        self.handles = [module.lora_A[adapter].register_forward_hook(self._scale) for module in model.modules()
                        if isinstance(module, LoraLayer) and adapter in module.lora_A]
        if not self.handles:
            raise ValueError(f"the model has no LoRA adapter {adapter!r} to gate")

    def _scale(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output * (0.0 if self.value is None else self.value.to(output.dtype))

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()

    @contextmanager
    def on(self, value: torch.Tensor | None, first: int | None = None) -> Iterator[None]:
        """`first`: says that `value` is the adapter off before that column and on from it, so that
        folded layers (`GatedLora`) run their products on those columns alone."""
        previous, self.value, self.first = (self.value, self.first), value, first
        try:
            yield
        finally:
            self.value, self.first = previous


class GatedLora(torch.nn.Module):
    """A PEFT LoRA linear layer folded for decoding: `base(x) + (x A^T)(s B)^T * gate`, read off the
    `TokenGate` (None: the base layer alone, the target exactly). PEFT's own layer does the same in
    about twice the eager ops, and a gated drafted step runs 210 of them (7 projections x 30 layers
    of the default model): folded, the step measured about 15 % cheaper (docs/decoding.md)."""

    def __init__(self, layer: torch.nn.Module, adapter: str, gate: TokenGate) -> None:
        super().__init__()
        self.base_layer, self.gate = layer.base_layer, gate
        # PEFT keeps adapter weights in float32 under a bfloat16 model; the fold runs in the model's
        # dtype, on the transposed factors: (in, r) and (r, out), contiguous for `mm`
        dtype = layer.base_layer.weight.dtype
        down = layer.lora_A[adapter].weight.detach().to(dtype).t().contiguous()
        up = (layer.lora_B[adapter].weight * layer.scaling[adapter]).detach().to(dtype).t().contiguous()
        self.register_buffer("down", down, persistent=False)
        self.register_buffer("up", up, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.gate.value is None:
            return y
        first = self.gate.first
        if first is None:
            return y + torch.matmul(torch.matmul(x, self.down), self.up) * self.gate.value.to(y.dtype)
        # the draft columns alone: half the products of a gated step, no scaling
        if x.shape[0] == 1:  # one row: 2-D views and one in-place addmm_, 1.4 ms less per step here
            y[0, first:].addmm_(torch.mm(x[0, first:], self.down), self.up)
        else:
            y[:, first:] += torch.matmul(torch.matmul(x[:, first:], self.down), self.up)
        return y


def gated_drafter(model: torch.nn.Module, adapter: str) -> GatedAdapter:
    """A trained PEFT model (not trained further) as a gated drafter: its LoRA layers folded into
    `GatedLora` under one `TokenGate`. Training keeps PEFT's layers and the gate's hooks."""
    from peft.tuners.lora import LoraLayer

    gate = TokenGate(model, adapter)
    gate.remove_hooks()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer) and adapter in child.lora_A:
                setattr(parent, name, GatedLora(child, adapter, gate))
    return GatedAdapter(model.eval(), gate)


@dataclass(frozen=True)
class GatedAdapter:
    """A LoRA adapter of the target, trained gated, as its drafter. `model` is a PEFT model over
    a module tree that shares every base weight with the target (cllm.drafters builds it)."""

    model: PreTrainedModel
    gate: TokenGate

    def store(self, capacity: int, draft_width: int | None = None) -> GatedKV:
        return GatedKV(DynamicKV(self.model), self.gate, draft_width)


class GatedKV:
    """The target's KV store, whose `forward` also drafts: it feeds the m columns (verify), then
    the block's columns but its last again (draft; see the module docstring) and returns the
    verify columns' logits, keeping the draft columns' in `draft_logits`. Only verify columns come
    first, so keeping the first columns (`keep`, `keep_columns`) never keeps a draft column."""

    def __init__(self, inner: DynamicKV, gate: TokenGate, draft_width: int | None = None) -> None:
        self.inner, self.gate = inner, gate
        # only the first `draft_width` fed columns are drafted (the block's: n-gram candidates that
        # follow them are verified, not drafted); None: every column
        self.draft_width = draft_width
        self.draft_logits: torch.Tensor | None = None  # (B, min(m, draft_width), V) of the last forward

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: Mask,
                logits_to_keep: int | torch.Tensor = 0) -> torch.Tensor:
        cached = self.inner.cache.get_seq_length()
        batch, m = tokens.shape
        k = m if self.draft_width is None else min(m, self.draft_width)
        # The drafts become the next step's fed guesses: a step that accepts a >= 1 tokens next
        # feeds the guesses predicted at columns a..k-2. Column k-1 predicts the block's last
        # unfixed position, which is predicted again but never fed, so it is not drafted; column 0
        # is never read either, but the drafter was trained with it (draft column 1 reads its keys
        # and values). Two block columns or one: nothing would be read, the target runs alone.
        if not cached or k <= 2:  # or a prefill: the target reads the prompt, nothing drafted yet
            logits = self.inner.forward(tokens, positions, mask, logits_to_keep)
            self.draft_logits = logits if cached else None
            return logits
        d = k - 1
        allowed = _as_3d(mask, batch, m, cached, tokens.device)  # (B, m, S + m)
        verify = torch.cat([allowed, allowed.new_zeros((batch, m, d))], dim=2)
        draft = torch.cat([allowed[:, :d, :cached], allowed.new_zeros((batch, d, m)),
                           allowed[:, :d, cached : cached + d]], dim=2)
        # in the model's dtype: each of the layers that reads it would otherwise convert it again
        gate = torch.cat([torch.zeros(m), torch.ones(d)]).to(tokens.device, self.inner.model.dtype)[None, :, None]
        with self.gate.on(gate, first=m):
            logits = self.inner.forward(torch.cat([tokens, tokens[:, :d]], dim=1),
                                        torch.cat([positions, positions[:, :d]], dim=1),
                                        torch.cat([verify, draft], dim=1), logits_to_keep)
        # column k-1, never read, holds the target's own prediction
        self.draft_logits = torch.cat([logits[:, m:], logits[:, k - 1 : k]], dim=1)
        return logits[:, :m]

    def empty(self, capacity: int) -> GatedKV:
        return GatedKV(self.inner.empty(capacity), self.gate, self.draft_width)

    def keep(self, count: int) -> None:
        self.inner.keep(count)

    def keep_columns(self, columns: torch.Tensor) -> None:
        self.inner.keep_columns(columns)

    def select(self, rows: torch.Tensor) -> None:
        self.inner.select(rows)

    def merge(self, other: GatedKV) -> GatedKV:
        return GatedKV(self.inner.merge(other.inner), self.gate, self.draft_width)

    def contents(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.inner.contents()


ADAPTER_DRAFTERS = (SharedAdapter, GatedAdapter)  # drafters that run inside the target's forward
DraftModel = PreTrainedModel | SharedAdapter | GatedAdapter


class AdapterDrafts:
    """The drafter's side of a batch whose store is a `PairedKV` or `GatedKV` (a `RowState`): its rows start,
    leave and keep columns with the target's inside the store, so only the predictions are read here."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch

    def start(self, which: torch.Tensor) -> None:
        pass  # the prefill ran the drafter's rows too

    def keep(self, keep: torch.Tensor) -> None:
        pass  # the store dropped both rows of each leaving one

    def forward(self, tokens: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """The drafter's prediction (B, m) at the first m columns of the forward the batch just ran
        (m = tokens.shape[1]: the block's; n-gram candidates may follow them)."""
        rows, m = self.batch.rows, tokens.shape[1]
        columns = torch.arange(m, device=tokens.device)
        return rows.pick(self.batch.cache.draft_logits[:, :m], rows.n_out[:, None] + columns)

    def keep_columns(self, accepted: torch.Tensor) -> None:
        pass  # the batch's keep kept the drafter's rows too


class Drafter:
    """A second model's view of the batch (a `RowState`): its own KV store of every row's verified
    context, kept in step with the target's (the same accepted columns), so that it predicts at
    the same fed columns in the same step. It only proposes: nothing it predicts is emitted
    before the target has verified it."""

    def __init__(self, batch: Batch, model: PreTrainedModel, compile: bool | str = False) -> None:
        self.batch, self.model, self.compile = batch, model, compile
        self.store: KVStore | None = None
        self.slot_mask = torch.zeros((0, 0), dtype=torch.long, device=batch.rows.pending.device)  # (B, S')

    def start(self, which: torch.Tensor) -> None:
        """Prefill the drafter with the prompts of the rows at `which` (their first token is `pending`)."""
        rows = self.batch.rows
        prompts = [rows.prompt[i, rows.prompt.shape[1] - int(rows.prompt_len[i]) :].tolist() for i in which.tolist()]
        if not prompts:
            return
        input_ids, attention_mask = (t.to(rows.pending.device) for t in left_pad(prompts, self.batch.pad_token_id))
        store = self.store.empty(input_ids.shape[1]) if self.store is not None else \
            new_store(self.model, input_ids.shape[1], self.compile)
        positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
        store.forward(input_ids, positions, None if bool(attention_mask.all()) else attention_mask, logits_to_keep=1)
        if self.store is None or not len(self.slot_mask):
            self.store, self.slot_mask = store, attention_mask
            return
        size = max(self.slot_mask.shape[1], attention_mask.shape[1])
        self.store = self.store.merge(store)
        self.slot_mask = torch.cat([_pad(self.slot_mask, size, 1, left=True), _pad(attention_mask, size, 1, left=True)])

    def keep(self, keep: torch.Tensor) -> None:
        self.store.select(keep)
        self.slot_mask = self.slot_mask[keep]

    def forward(self, tokens: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """The drafter's prediction (B, m) at the columns the target is fed in this step."""
        rows = self.batch.rows
        return rows.pick(*_forward_after(self.store, self.slot_mask, rows, tokens, real))

    def keep_columns(self, accepted: torch.Tensor) -> None:
        """As `Batch.keep_columns`: the KV of each row's first `accepted` (B,) fed columns."""
        self.slot_mask = _keep_first(self.store, self.slot_mask, accepted)
