"""Training batches from trajectory entries: `TrajectoryCollator` and `PromptGroups` (cllm.training trains on them).

Per entry and step the collator samples one state y of the block trajectory (global consistency,
GC: uniform over the states that are not the fixed point, augmented ones included; local
consistency, LC: an adjacent pair y(j), y(j+1)) and builds three left-padded sequences:

    student  prefix + y[:-1]                q_theta(.|y_<i, x) at the n block positions
    target   prefix + y*[:-1]  (or y(j+1))  q_stopgrad(.|y*_<i, x), one no-grad forward
    ar       prompt + teacher output        -log q_theta(l_i | l_<i, x) on the output tokens

Block positions are right-padded to the longest block of the batch and masked, so the logits
of the block are always the last n columns (`logits_to_keep`: the LM head runs on those only).

With `pack` (GC on the teacher's output, the default) the three forwards become one. The target
sequence prefix + y* is a prefix of the AR sequence prompt + l (the blocks tile l), so its logits
are the AR forward's logits at the block's columns, detached; the student's n - 1 block tokens go
after the AR sequence, with their own positions and an attention mask that shows them the prefix
and each other causally but hides l's block and beyond:

    columns   prompt + l (causal)      padding     y_0 .. y_{n-2}
    student   logits at the last prefix column, then at the appended columns
    target    logits at l's block columns, detached
    ar        logits at every column of prompt + l

Nothing attends to the appended tokens, so each logit is the same function of the weights as in
the three separate forwards: the loss and its gradient are equal (tests/test_train.py checks it),
at about half the cost.

Every block of a prompt shares prompt + l, so `PromptGroups` hands the collator all of a prompt's
entries as one item and the row carries each block's n - 1 student tokens after it (each block
sees its own prefix and itself only): one forward trains ~12 blocks (256 tokens, n = 16) for about
the price of one, and the AR term sees l once instead of once per block. `states_per_block` = K
appends K distinct states of each block the same way (K x (n - 1) tokens per block): K GC samples
of a block per step for a longer row rather than K forwards.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from cllm.losses import after_eos_mask, from_first_difference_mask

IGNORE = -100


def _gc_states(entry: dict) -> list[list[int]]:
    """The states GC trains from: the trajectory's and the augmented ones, the fixed point excluded."""
    return [s for s in entry["states"][:-1] + list(entry.get("augmented_states") or []) if s != entry["fixed_point"]]


@dataclass
class TrajectoryCollator:
    pad_token_id: int
    eos_token_ids: list[int]
    loss_type: str = "gc"  # gc | lc
    use_labels: bool = False  # AR loss on dataset labels instead of the teacher's output
    mask_before_first_difference: bool = False
    max_length: int = 1024
    seed: int = 0
    pack: bool = False  # one forward per entry (see the module docstring); GC on the teacher's output only
    states_per_block: int = 1  # packed rows only: distinct GC states of each block, side by side in the row

    def __post_init__(self) -> None:
        if self.loss_type not in ("gc", "lc"):
            raise ValueError(f"loss type must be gc or lc, got {self.loss_type!r}")
        if self.pack and (self.loss_type != "gc" or self.use_labels):
            raise ValueError("packing needs GC with the AR loss on the teacher's output (its target is a prefix of it)")
        if self.states_per_block > 1 and not self.pack:
            raise ValueError("several states per block need a packed row (they share its prefix)")
        self.rng = random.Random(self.seed)

    def _pair(self, entry: dict) -> tuple[list[int], list[int]]:
        """(student block, target block) for one entry."""
        states, fixed_point = entry["states"], entry["fixed_point"]
        if self.loss_type == "lc":
            j = self.rng.randrange(len(states) - 1) if len(states) > 1 else 0
            return states[j], states[min(j + 1, len(states) - 1)]
        candidates = _gc_states(entry)
        return (self.rng.choice(candidates) if candidates else fixed_point), fixed_point

    def _pairs(self, entry: dict) -> list[tuple[list[int], list[int]]]:
        """Up to `states_per_block` GC pairs of one entry, distinct states drawn without replacement."""
        if self.states_per_block == 1:
            return [self._pair(entry)]
        candidates = _gc_states(entry)
        chosen = self.rng.sample(candidates, min(self.states_per_block, len(candidates))) or [entry["fixed_point"]]
        return [(state, entry["fixed_point"]) for state in chosen]

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
            mask[row, width - len(sequence) :] = 1
        return ids, mask

    def _block_mask(self, student: list[int], target: list[int], n: int) -> torch.Tensor:
        length = len(target)
        counted = torch.arange(n) < length
        counted[:length] &= after_eos_mask(torch.tensor([target]), self.eos_token_ids)[0]
        if self.mask_before_first_difference:
            counted[:length] &= from_first_difference_mask(torch.tensor([student]), torch.tensor([target]))[0]
        return counted

    def __call__(self, entries: list[dict]) -> dict[str, torch.Tensor]:
        if self.pack:  # an item is an entry, or a PromptGroups list of entries
            return self._packed([item if isinstance(item, list) else [item] for item in entries])
        n = max(len(e["fixed_point"]) for e in entries)
        students, targets, block_masks, ar_sequences, ar_starts = [], [], [], [], []
        for entry in entries:
            student, target = self._pair(entry)
            length = len(target)
            prefix = entry["prefix_ids"][-(self.max_length - n) :]  # keep the end: it conditions the block
            pad = [self.pad_token_id] * (n - length)
            students.append(prefix + (student + pad)[:-1])
            targets.append(prefix + (target + pad)[:-1])
            block_masks.append(self._block_mask(student, target, n))
            output = entry["label_ids"] if self.use_labels and entry.get("label_ids") else entry["teacher_output_ids"]
            sequence = (entry["prompt_ids"] + output)[-self.max_length :]
            ar_sequences.append(sequence)
            ar_starts.append(max(1, len(sequence) - len(output)))
        student_ids, student_mask = self._left_pad(students)
        target_ids, target_mask = self._left_pad(targets)
        ar_ids, ar_mask = self._left_pad(ar_sequences)
        labels = torch.full_like(ar_ids, IGNORE)  # HF convention: labels[t] = the token at t
        width = ar_ids.shape[1]
        for row, (sequence, start) in enumerate(zip(ar_sequences, ar_starts)):
            offset = width - len(sequence)
            labels[row, offset + start :] = ar_ids[row, offset + start :]
        return {
            "student_ids": student_ids, "student_mask": student_mask,
            "target_ids": target_ids, "target_mask": target_mask,
            "block_mask": torch.stack(block_masks),
            "ar_ids": ar_ids, "ar_mask": ar_mask, "labels": labels,
        }

    def _packed(self, groups: list[list[dict]]) -> dict[str, torch.Tensor]:
        """One right-padded row per group of blocks of one prompt: prompt + l, padding, then each
        block's n - 1 student tokens."""
        n = max(len(e["fixed_point"]) for group in groups for e in group)
        rows = [self._packed_row(group) for group in groups]
        width = max(len(sequence) for sequence, _, _ in rows)
        total = width + max(len(blocks) for _, _, blocks in rows) * (n - 1)
        ids = torch.full((len(rows), total), self.pad_token_id, dtype=torch.long)
        positions = torch.zeros_like(ids)
        allowed = torch.zeros((len(rows), total, total), dtype=torch.bool)
        labels = torch.full_like(ids, IGNORE)
        causal = torch.ones((total, total), dtype=torch.bool).tril()
        student_columns, target_columns, block_masks = [], [], []  # columns index the flattened (row, column) grid
        for row, (sequence, output_start, blocks) in enumerate(rows):
            length = len(sequence)
            ids[row, :length] = torch.tensor(sequence)
            positions[row, :length] = torch.arange(length)
            allowed[row, :length, :length] = causal[:length, :length]
            allowed[row, length:, 0] = True  # unused columns look at one real token: an empty softmax row is NaN
            labels[row, max(1, output_start) : length] = ids[row, max(1, output_start) : length]
            for k, (start, student, target) in enumerate(blocks):
                first = width + k * (n - 1)
                appended = slice(first, first + n - 1)
                ids[row, appended] = torch.tensor((student + [self.pad_token_id] * (n - len(student)))[:-1])
                positions[row, appended] = start + torch.arange(n - 1)
                allowed[row, appended, :start] = True
                allowed[row, appended, appended] = causal[: n - 1, : n - 1]
                student_columns.append(
                    row * total + torch.cat([torch.tensor([start - 1]), torch.arange(first, first + n - 1)])
                )
                target_columns.append(row * total + (start - 1 + torch.arange(n)).clamp(max=length - 1))
                block_masks.append(self._block_mask(student, target, n))
        return {
            "packed_ids": ids, "packed_positions": positions, "packed_allowed": allowed,
            "student_columns": torch.stack(student_columns), "target_columns": torch.stack(target_columns),
            "block_mask": torch.stack(block_masks), "labels": labels,
            "real_tokens": torch.tensor(sum(len(sequence) + len(blocks) * (n - 1) for sequence, _, blocks in rows)),
            "packed_width": torch.tensor(width),  # columns of prompt + l; the student tokens come after
        }

    def _packed_row(self, group: list[dict]) -> tuple[list[int], int, list[tuple[int, list[int], list[int]]]]:
        """(prompt + l cut to max_length, where l starts in it, [(block's first column, student, target)])."""
        prompt, output = group[0]["prompt_ids"], group[0]["teacher_output_ids"]
        full = prompt + output
        blocks = []
        for entry in group:
            if entry["prompt_ids"] != prompt or entry["teacher_output_ids"] != output:
                raise ValueError("a packed row holds blocks of one prompt and one teacher output")
            start = len(entry["prefix_ids"])  # the block's first column in `full`
            for student, target in self._pairs(entry):
                if full[start : start + len(target)] != target:
                    raise ValueError("an entry's fixed point is not its block of the teacher output: collect again")
                blocks.append((start, student, target))
        cut = min(max(0, len(full) - self.max_length), min(start for start, _, _ in blocks) - 1)  # keep every block
        return full[cut:], len(prompt) - cut, [(start - cut, student, target) for start, student, target in blocks]


class PromptGroups(torch.utils.data.Dataset):
    """A trajectory collection with one item per prompt: the list of its block entries, so that
    `TrajectoryCollator(pack=True)` trains every block of a prompt in one packed row."""

    def __init__(self, entries) -> None:
        self.entries = entries
        groups: dict[int, list[int]] = {}
        for index, prompt_index in enumerate(entries["prompt_index"]):
            groups.setdefault(prompt_index, []).append(index)
        self.groups = list(groups.values())

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> list[dict]:
        return [self.entries[i] for i in self.groups[index]]
