"""Consistency training: a collator over trajectory entries and `CllmTrainer(transformers.Trainer)`.

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

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import Trainer

from cllm.errors import CllmError
from cllm.files import write_atomically
from cllm.losses import after_eos_mask, ar_loss, consistency_loss, distillation_loss, from_first_difference_mask

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
                student_columns.append(row * total + torch.cat([torch.tensor([start - 1]), torch.arange(first, first + n - 1)]))
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


def _empty_log_window() -> dict[str, float]:
    return {"consistency_loss": 0.0, "ar_loss": 0.0, "micro_batches": 0}


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(1) - 1).clamp(min=0)


def _logits(model, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), logits_to_keep=keep).logits


class CllmTrainer(Trainer):
    """`transformers.Trainer` with the CLLM objective
    L = L_consistency + ar_weight * L_AR + distill_weight * KL(teacher || student) on the teacher's output.

    Without a teacher the consistency targets are the student's own detached logits at the fixed
    point (the paper's q_stopgrad), which drift with the student. With a frozen `teacher` (the
    target, never updated) they are the teacher's logits there, and the distillation term pulls
    the student's whole next-token distribution on the teacher's output back to the teacher's:
    the fidelity levers of docs/training.md.

    Both terms are sums over counted tokens divided by the number of counted tokens of the whole
    optimizer step (every micro-batch of the accumulation window, every process), so gradient
    accumulation and data parallelism give the same gradient as one big batch.
    """

    def __init__(self, *args, ar_weight: float = 1.0, distance: str = "forward_kl", beta: float = 0.5,
                 label_smoothing: float = 0.0, teacher: torch.nn.Module | None = None, distill_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        if distill_weight > 0 and teacher is None:
            raise ValueError("a distillation weight needs a teacher")
        self.teacher = None if teacher is None else teacher.to(self.args.device).eval().requires_grad_(False)
        self.distill_weight = distill_weight
        self.ar_weight = ar_weight
        self.distance = distance
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.model_accepts_loss_kwargs = True  # our loss is already normalised for accumulation
        self.tokens_processed = 0  # real tokens through the forwards, this process
        self.attention = self.model.config._attn_implementation  # the packed mask's format depends on it
        self._log_window = _empty_log_window()

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        counts = torch.zeros(2, dtype=torch.float32, device=device)
        for batch in batches:
            counts[0] += batch["block_mask"].sum()
            counts[1] += (batch["labels"][:, 1:] != IGNORE).sum()
        if self.args.world_size > 1:
            counts = self.accelerator.gather(counts[None]).sum(0)
        return batches, counts

    def _separate_logits(self, model, inputs) -> tuple[torch.Tensor, ...]:
        """student, consistency target, AR and teacher-on-AR (None without a teacher) logits."""
        n = inputs["block_mask"].shape[1]
        width = inputs["labels"].shape[1]
        student_logits = _logits(model, inputs["student_ids"], inputs["student_mask"], n)  # (B, n, V)
        with torch.no_grad():
            target_logits = _logits(self.teacher or model, inputs["target_ids"], inputs["target_mask"], n)
            teacher_ar_logits = (None if self.teacher is None
                                 else _logits(self.teacher, inputs["ar_ids"], inputs["ar_mask"], width)[:, :-1])
        ar_logits = _logits(model, inputs["ar_ids"], inputs["ar_mask"], width)[:, :-1]  # (B, T-1, V)
        return student_logits, target_logits, ar_logits, teacher_ar_logits

    def _packed_logits(self, model, inputs) -> tuple[torch.Tensor, ...]:
        allowed = inputs["packed_allowed"][:, None]  # (B, 1, T, T), used as given by HF's mask code
        if self.attention != "sdpa":  # eager attention adds the mask to the scores
            allowed = torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, torch.finfo(torch.float32).min)
        logits = model(input_ids=inputs["packed_ids"], attention_mask=allowed, position_ids=inputs["packed_positions"]).logits
        grid = logits.flatten(0, 1)
        if self.teacher is None:
            return grid[inputs["student_columns"]], grid[inputs["target_columns"]].detach(), logits[:, :-1], None
        # The teacher reads prompt + l only (the columns before the appended student tokens): the
        # same logits there as over the whole row, since nothing attends to the appended tokens.
        total, width = logits.shape[1], int(inputs["packed_width"])
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=inputs["packed_ids"][:, :width], attention_mask=allowed[:, :, :width, :width],
                                          position_ids=inputs["packed_positions"][:, :width]).logits
        columns = inputs["target_columns"]
        target_logits = teacher_logits.flatten(0, 1)[columns // total * width + columns % total]
        return grid[inputs["student_columns"]], target_logits, logits[:, :-1], teacher_logits[:, :-1]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        packed = "packed_ids" in inputs
        student_logits, target_logits, ar_logits, teacher_ar_logits = (
            self._packed_logits if packed else self._separate_logits)(model, inputs)
        labels = inputs["labels"]
        counts = num_items_in_batch if isinstance(num_items_in_batch, torch.Tensor) and num_items_in_batch.numel() == 2 else None
        consistency = consistency_loss(
            student_logits, target_logits, inputs["block_mask"], self.distance, self.beta,
            num_items=None if counts is None else counts[0],
        )
        autoregressive = ar_loss(ar_logits, labels[:, 1:], self.label_smoothing, num_items=None if counts is None else counts[1])
        loss = consistency + self.ar_weight * autoregressive
        distill = None
        if teacher_ar_logits is not None:
            width = teacher_ar_logits.shape[1]  # packed rows: prompt + l only; the labels after it are ignored
            distill = distillation_loss(ar_logits[:, :width], teacher_ar_logits, labels[:, 1 : width + 1] != IGNORE,
                                        num_items=None if counts is None else counts[1])
            loss = loss + self.distill_weight * distill
        if counts is not None and self.args.world_size > 1:
            loss = loss * self.args.world_size  # DDP averages gradients over processes; our counts are global
        if model.training:
            self._remember_terms(consistency, autoregressive, distill, counts, inputs)
            self.tokens_processed += int(inputs["real_tokens"] if packed else
                                         inputs["student_mask"].sum() + inputs["target_mask"].sum() + inputs["ar_mask"].sum())
        return (loss, {"logits": student_logits}) if return_outputs else loss

    def _remember_terms(self, consistency, autoregressive, distill, counts, inputs) -> None:
        """Adds this micro-batch's per-token means (independent of accumulation) to the log window:
        the log shows their mean since the last log, not one noisy micro-batch."""
        terms = {"consistency_loss": consistency, "ar_loss": autoregressive, "distill_loss": distill}
        if counts is not None:
            labelled = (inputs["labels"][:, 1:] != IGNORE).sum().clamp(min=1)
            scale = {"consistency_loss": counts[0] / inputs["block_mask"].sum().clamp(min=1),
                     "ar_loss": counts[1] / labelled, "distill_loss": counts[1] / labelled}
            terms = {k: None if v is None else v * scale[k] for k, v in terms.items()}
        for key, value in terms.items():
            if value is not None:
                self._log_window[key] = self._log_window.get(key, 0.0) + float(value.detach())
        self._log_window["micro_batches"] += 1

    def log(self, logs: dict, *args, **kwargs) -> None:
        window = self._log_window
        if "loss" in logs and window["micro_batches"]:
            logs = logs | {k: round(v / window["micro_batches"], 4) for k, v in window.items() if k != "micro_batches"}
            self._log_window = _empty_log_window()
        super().log(logs, *args, **kwargs)


PACKING = ("prompt", "entry", "none")  # every block of a prompt in one row | one block per row | three forwards


@dataclass(frozen=True)
class TrainConfig:
    """`cllm train` settings; validated on construction."""

    model: str
    trajectories: str  # a collection directory, or several joined by commas (a data mix)
    out: str
    dtype: str = "float32"
    device: str = "auto"
    learning_rate: float = 2e-5
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 1
    grad_accum: int = 1
    loss_type: str = "gc"
    distance: str = "forward_kl"
    beta: float = 0.5
    ar_weight: float = 1.0
    use_labels: bool = False
    label_smoothing: float = 0.0
    mask_before_first_difference: bool = False
    max_length: int = 1024
    lora: bool = False
    lora_rank: int = 16
    gradient_checkpointing: bool = False
    bf16: bool = False
    save_steps: int = 100
    logging_steps: int = 10
    resume: bool = False
    seed: int = 0
    pack: str = "prompt"  # prompt | entry | none: what one packed forward trains (see PACKING)
    states_per_block: int = 1  # distinct states of a block trained per step (packed rows only)
    warmup_steps: float = 0  # linear warmup: steps, or a fraction of all steps when < 1
    teacher: bool = False  # a frozen copy of the target gives the consistency targets and the distillation term
    distill_weight: float = 0.0  # weight of KL(teacher || student) on the teacher's output (needs teacher)

    def __post_init__(self) -> None:
        from cllm.losses import DISTANCES

        checks = [
            (self.learning_rate > 0, "--lr must be > 0"),
            (self.epochs > 0, "--epochs must be > 0"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "--batch-size and --grad-accum must be >= 1"),
            (self.loss_type in ("gc", "lc"), f"--loss must be gc or lc, got {self.loss_type!r}"),
            (self.distance in DISTANCES, f"--distance must be one of {', '.join(DISTANCES)}"),
            (0 < self.beta < 1, "--beta must lie in (0, 1)"),
            (self.ar_weight >= 0, "--ar-weight must be >= 0"),
            (0 <= self.label_smoothing < 1, "--label-smoothing must lie in [0, 1)"),
            (self.max_length >= 8, "--max-length must be >= 8"),
            (self.save_steps >= 1 and self.logging_steps >= 1, "--save-steps and --logging-steps must be >= 1"),
            (self.pack in PACKING, f"--pack must be one of {', '.join(PACKING)}"),
            (self.states_per_block >= 1, "--states-per-block must be >= 1"),
            (self.warmup_steps >= 0, "--warmup-steps must be >= 0"),
            (self.distill_weight >= 0, "--distill-weight must be >= 0"),
            (self.teacher or self.distill_weight == 0, "--distill-weight needs --teacher (the frozen target)"),
        ]
        for ok, message in checks:
            if not ok:
                raise CllmError(message)


def _with_lora(model, rank: int):
    from peft import LoraConfig, get_peft_model

    targets = [name for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "c_attn", "c_proj")
               if any(module.endswith(name) for module, _ in model.named_modules())]
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, task_type="CAUSAL_LM"))


def _packing(config: TrainConfig, model) -> str:
    """config.pack where the loss allows it: packing needs GC on the teacher's output, and an
    attention that takes a custom 4-D mask; otherwise "none" (three forwards, same loss)."""
    can_pack = (config.loss_type == "gc" and not config.use_labels
                and model.config._attn_implementation in ("sdpa", "eager"))
    return config.pack if can_pack else "none"


def last_complete_checkpoint(checkpoints: Path) -> str | None:
    """The newest `checkpoint-N` that was written to the end, or None.

    Trainer writes a checkpoint in place and its trainer_state.json last, so a kill during a save
    leaves a directory without a readable state: skip it (and delete it, so rotation and later
    saves never mistake it for a good one).
    """
    import shutil

    found = sorted(
        (p for p in checkpoints.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]), reverse=True,
    )
    for path in found:
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            shutil.rmtree(path, ignore_errors=True)
            continue
        _check_weights(path)
        return str(path)
    return None


def _check_weights(checkpoint: Path) -> None:
    """A complete checkpoint whose weight files were damaged later: say so instead of failing deep
    inside Trainer."""
    from safetensors import SafetensorError, safe_open

    for weights in checkpoint.glob("*.safetensors"):
        try:
            with safe_open(str(weights), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as exc:
            raise CllmError(f"checkpoint {checkpoint} is damaged ({weights.name}: {str(exc).splitlines()[0]}); "
                            "delete it to resume from the one before") from None


def train(config: TrainConfig) -> Path:
    """Consistency-train `config.model` on a trajectory collection; save the model (and
    train_summary.json: steps, seconds, tokens/s) to `config.out`."""
    from transformers import TrainingArguments

    from cllm.models import ModelConfig, load_model
    from cllm.trajectories import load_trajectories

    out = Path(config.out)
    checkpoints = out / "checkpoints"
    last = last_complete_checkpoint(checkpoints) if config.resume else None  # first: a damaged one fails fast
    model_config = ModelConfig(name=config.model, dtype=config.dtype, device=config.device)
    loaded = load_model(model_config)
    teacher = load_model(model_config).model if config.teacher else None
    parts = [load_trajectories(path) for path in config.trajectories.split(",")]
    if config.resume:
        from rich.console import Console

        message = f"resuming from {last}" if last else f"no checkpoint in {checkpoints}: starting from the beginning"
        Console(stderr=True).print(message, highlight=False, soft_wrap=True)
    model = loaded.model
    if config.lora:
        model = _with_lora(model, config.lora_rank)
    args = TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        logging_steps=config.logging_steps,
        save_steps=config.save_steps,
        save_total_limit=2,
        bf16=config.bf16,
        activation_checkpointing=config.gradient_checkpointing,
        remove_unused_columns=False,
        report_to=[],
        seed=config.seed,
        use_cpu=loaded.model.device.type == "cpu",
        dataloader_num_workers=0,
    )
    packing = _packing(config, model)
    if packing == "none" and config.states_per_block > 1:
        raise CllmError("--states-per-block > 1 needs a packed row: GC on the target's output, sdpa or eager attention")
    if packing == "prompt":  # group per collection: prompt indices restart in each
        dataset = torch.utils.data.ConcatDataset([PromptGroups(part) for part in parts])
    else:
        import datasets

        dataset = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    collator = TrajectoryCollator(
        pad_token_id=loaded.pad_token_id, eos_token_ids=loaded.eos_token_ids, loss_type=config.loss_type,
        use_labels=config.use_labels, mask_before_first_difference=config.mask_before_first_difference,
        max_length=config.max_length, seed=config.seed, pack=packing != "none",
        states_per_block=config.states_per_block,
    )
    trainer = CllmTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator, ar_weight=config.ar_weight,
        distance=config.distance, beta=config.beta, label_smoothing=config.label_smoothing,
        teacher=teacher, distill_weight=config.distill_weight,
    )
    try:
        result = trainer.train(resume_from_checkpoint=last if config.resume else None)
    except ValueError as exc:
        raise CllmError(f"training failed: {exc}") from exc
    final = trainer.model.merge_and_unload() if config.lora else trainer.model
    if trainer.is_world_process_zero():
        final.save_pretrained(out)
        loaded.tokenizer.save_pretrained(out)
        seconds = result.metrics["train_runtime"]
        summary = {
            "steps_this_run": trainer.state.global_step - (int(Path(last).name.split("-")[1]) if config.resume and last else 0),
            "global_step": trainer.state.global_step,
            "seconds": round(seconds, 2),
            "tokens_this_process": trainer.tokens_processed,
            "tokens_per_second_this_process": round(trainer.tokens_processed / seconds, 1) if seconds else None,
            "train_loss": result.metrics.get("train_loss"),
        }
        summary["seconds_per_step"] = round(seconds / max(1, summary["steps_this_run"]), 3)
        write_atomically(out / "train_summary.json", json.dumps(summary | {"config": asdict(config)}, indent=2))
    _leave_process_group()
    return out


def _leave_process_group() -> None:
    """Under torchrun: wait for rank 0's save, then shut the process group down before exit. A rank
    that exits with its communication threads still running aborts ("terminate called without an
    active exception"), intermittently, as measured on 2 CPU processes."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
