"""Consistency training: `CllmTrainer(transformers.Trainer)`, whose `compute_loss` is the CLLM
objective over the batches of cllm.collate (what one forward trains, and why packing leaves the
loss unchanged, is described there), and `train()`, which runs a `TrainConfig`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import Trainer

from cllm.collate import IGNORE, PromptGroups, TrajectoryCollator
from cllm.errors import CllmError
from cllm.files import write_atomically
from cllm.losses import ar_loss, consistency_loss, distillation_loss
from cllm.train_config import TrainConfig


def _empty_log_window() -> dict[str, float]:
    return {"micro_batches": 0}  # and each loss term that was computed


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

    def __init__(
        self,
        *args,
        ar_weight: float = 1.0,
        distance: str = "forward_kl",
        beta: float = 0.5,
        label_smoothing: float = 0.0,
        teacher: torch.nn.Module | None = None,
        distill_weight: float = 0.0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if distill_weight > 0 and teacher is None:
            raise ValueError("a distillation weight needs a teacher")
        self.teacher_placement: str | None = None  # "sharded" or "replica", for train_summary.json
        self.teacher = None if teacher is None else self._place_teacher(teacher)
        self.distill_weight = distill_weight
        self.ar_weight = ar_weight
        self.distance = distance
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.model_accepts_loss_kwargs = True  # our loss is already normalised for accumulation
        self.tokens_processed = 0  # real tokens through the forwards, this process
        self.attention = self.model.config._attn_implementation  # the packed mask's format depends on it
        self._log_window = _empty_log_window()

    def _place_teacher(self, teacher: torch.nn.Module) -> torch.nn.Module:
        """The frozen teacher on this rank's device: sharded like the student where the engine
        shards (FSDP, DeepSpeed ZeRO-3), else a replica."""
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        zero3 = self.is_deepspeed_enabled and is_deepspeed_zero3_enabled()
        self.teacher_placement = "sharded" if self.is_fsdp_enabled or zero3 else "replica"
        if self.is_fsdp_enabled:
            return shard_for_inference(teacher)
        if zero3:
            return _zero3_inference_engine(teacher, self.accelerator.state.deepspeed_plugin.deepspeed_config)
        return teacher

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
            allowed = torch.zeros(allowed.shape, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(torch.float32).min
            )
        logits = model(
            input_ids=inputs["packed_ids"], attention_mask=allowed, position_ids=inputs["packed_positions"]
        ).logits
        grid = logits.flatten(0, 1)
        if self.teacher is None:
            return grid[inputs["student_columns"]], grid[inputs["target_columns"]].detach(), logits[:, :-1], None
        # The teacher reads prompt + l only (the columns before the appended student tokens): the
        # same logits there as over the whole row, since nothing attends to the appended tokens.
        total, width = logits.shape[1], int(inputs["packed_width"])
        with torch.no_grad():
            teacher_logits = self.teacher(
                input_ids=inputs["packed_ids"][:, :width],
                attention_mask=allowed[:, :, :width, :width],
                position_ids=inputs["packed_positions"][:, :width],
            ).logits
        columns = inputs["target_columns"]
        target_logits = teacher_logits.flatten(0, 1)[columns // total * width + columns % total]
        return grid[inputs["student_columns"]], target_logits, logits[:, :-1], teacher_logits[:, :-1]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        packed = "packed_ids" in inputs
        student_logits, target_logits, ar_logits, teacher_ar_logits = (
            self._packed_logits if packed else self._separate_logits)(model, inputs)
        labels = inputs["labels"]
        counts = (
            num_items_in_batch
            if isinstance(num_items_in_batch, torch.Tensor) and num_items_in_batch.numel() == 2
            else None
        )
        consistency = consistency_loss(
            student_logits, target_logits, inputs["block_mask"], self.distance, self.beta,
            num_items=None if counts is None else counts[0],
        )
        autoregressive = ar_loss(
            ar_logits, labels[:, 1:], self.label_smoothing, num_items=None if counts is None else counts[1]
        )
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
            self.tokens_processed += int(
                inputs["real_tokens"]
                if packed
                else inputs["student_mask"].sum() + inputs["target_mask"].sum() + inputs["ar_mask"].sum()
            )
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


class GatedDrafterTrainer(CllmTrainer):
    """Trains a gated drafter (cllm.decoding.drafting.GatedAdapter) as it drafts: the target (the
    adapter off) reads prefix + y* once without gradients, which gives the consistency targets at
    the block and the KV of the context; the student then runs the block's columns (the last
    prefix token and y[:-1]) with the adapter on, after that KV. The adapter never sees the
    context, so the AR and distillation terms (on the target's output) have nothing to train."""

    def __init__(self, *args, gate, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = gate

    def _gated_logits(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        n = inputs["block_mask"].shape[1]
        ids, mask, target_ids = inputs["student_ids"], inputs["student_mask"], inputs["target_ids"]
        context = ids.shape[1] - n  # student and target differ in the block only
        with torch.no_grad():
            out = model(input_ids=target_ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True,
                        logits_to_keep=n)
        out.past_key_values.crop(-n)  # the context's KV, the block's dropped
        with self.gate.on(torch.ones((), device=ids.device)):
            student = model(input_ids=ids[:, context:], attention_mask=mask, position_ids=_positions(mask)[:, context:],
                            past_key_values=out.past_key_values, use_cache=True).logits
        return student, out.logits

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student_logits, target_logits = self._gated_logits(model, inputs)
        counts = (num_items_in_batch if isinstance(num_items_in_batch, torch.Tensor) and num_items_in_batch.numel() == 2
                  else None)
        loss = consistency_loss(student_logits, target_logits, inputs["block_mask"], self.distance, self.beta,
                                num_items=None if counts is None else counts[0])
        if model.training:
            self._remember_terms(loss, None, None, counts, inputs)
            self.tokens_processed += int(inputs["target_mask"].sum() + inputs["block_mask"].numel())
        if counts is not None and self.args.world_size > 1:
            loss = loss * self.args.world_size
        return (loss, {"logits": student_logits}) if return_outputs else loss


def _with_lora(model, rank: int, targets: str = "", start: str = "", gated: bool = False):
    """`model` with fresh LoRA adapters, or with the adapter in `start` (trainable) when given."""
    from peft import LoraConfig, get_peft_model

    from cllm.drafters import lora_targets

    modules = lora_targets(model, targets)
    if start:
        return _from_adapter(model, start, rank, modules, gated)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _from_adapter(model, start: str, rank: int, modules: list[str], gated: bool):
    from peft import PeftModel

    from cllm.drafters import DEFAULT_DRAFTER, SHIPPED, drafter_kind

    directory = SHIPPED if start == DEFAULT_DRAFTER else Path(start)
    path = directory / "adapter_config.json"
    if not path.is_file():
        raise CllmError(f"--init-adapter: {start} is not a LoRA adapter directory (no adapter_config.json)")
    saved = json.loads(path.read_text())
    kind, theirs = drafter_kind(directory), sorted(saved.get("target_modules") or [])
    if saved.get("r") != rank or theirs != sorted(modules):
        raise CllmError(f"--init-adapter: {start} has rank {saved.get('r')} on {', '.join(theirs)}; pass the same "
                        f"--lora-rank and --lora-targets (got {rank} on {', '.join(sorted(modules))})")
    if (kind == "gated") != gated:
        raise CllmError(f"--init-adapter: {start} is a {kind} drafter; train it "
                        f"{'with' if kind == 'gated' else 'without'} --gated")
    return PeftModel.from_pretrained(model, str(directory), is_trainable=True)


def _packing(config: TrainConfig, model) -> str:
    """config.pack where the loss allows it: packing needs GC on the teacher's output, and an
    attention that takes a custom 4-D mask; otherwise "none" (three forwards, same loss)."""
    can_pack = (config.loss_type == "gc" and not config.use_labels
                and model.config._attn_implementation in ("sdpa", "eager"))
    return config.pack if can_pack else "none"


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch, or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


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
    teacher = load_model(model_config).model if config.teacher and not config.gated else None
    parts = [load_trajectories(path) for path in config.trajectories.split(",")]
    if config.resume:
        from rich.console import Console

        message = f"resuming from {last}" if last else f"no checkpoint in {checkpoints}: starting from the beginning"
        Console(stderr=True).print(message, highlight=False, soft_wrap=True)
    model = loaded.model
    if config.attn_implementation:
        _set_attention(model, config.attn_implementation)
        if teacher is not None:
            _set_attention(teacher, config.attn_implementation)
    if config.lora:
        model = _with_lora(model, config.lora_rank, config.lora_targets, config.init_adapter, config.gated)
    args = TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.lr_scheduler,
        weight_decay=config.weight_decay,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        logging_steps=config.logging_steps,
        save_steps=config.save_steps,
        save_total_limit=2,
        bf16=config.bf16,
        activation_checkpointing=config.gradient_checkpointing,
        remove_unused_columns=False,
        report_to=[] if config.report_to == "none" else [name.strip() for name in config.report_to.split(",")],
        seed=config.seed,
        use_cpu=loaded.model.device.type == "cpu",
        dataloader_num_workers=0,
    )
    packing = "none" if config.gated else _packing(config, model)  # the gated student reads the context's KV
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
    common = dict(model=model, args=args, train_dataset=dataset, data_collator=collator, ar_weight=config.ar_weight,
                  distance=config.distance, beta=config.beta, label_smoothing=config.label_smoothing,
                  teacher=teacher, distill_weight=config.distill_weight)
    if config.gated:
        from cllm.decoding.drafting import TokenGate

        trainer = GatedDrafterTrainer(**common, gate=TokenGate(model, model.active_adapter))
    else:
        trainer = CllmTrainer(**common)
    try:
        result = trainer.train(resume_from_checkpoint=last if config.resume else None)
    except ValueError as exc:
        raise CllmError(f"training failed: {exc}") from exc
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        _save_sharded(trainer, config, out)
    else:
        final = trainer.model.merge_and_unload() if config.lora and not config.adapter_only else trainer.model
        if config.adapter_only and config.bf16:
            final = final.to(torch.bfloat16)  # a drafter at half the size; it drafts in the decode dtype anyway
        if trainer.is_world_process_zero():
            final.save_pretrained(out)
    if trainer.is_world_process_zero():
        loaded.tokenizer.save_pretrained(out)
        if config.adapter_only:
            from cllm.drafters import write_drafter_kind

            write_drafter_kind(out, "gated" if config.gated else "rows")
        from cllm.card import describe, write_card
        from cllm.trajectories import read_manifest

        manifests = [read_manifest(Path(path)) for path in config.trajectories.split(",")]
        write_card(out, describe(config, manifests, trainer.state.global_step))
        seconds = result.metrics["train_runtime"]
        summary = {
            "steps_this_run": trainer.state.global_step
            - (int(Path(last).name.split("-")[1]) if config.resume and last else 0),
            "global_step": trainer.state.global_step,
            "seconds": round(seconds, 2),
            "tokens_this_process": trainer.tokens_processed,
            "tokens_per_second_this_process": round(trainer.tokens_processed / seconds, 1) if seconds else None,
            "train_loss": result.metrics.get("train_loss"),
            "processes": trainer.args.world_size,
            "engine": "fsdp" if trainer.is_fsdp_enabled else "deepspeed" if trainer.is_deepspeed_enabled else
            "ddp" if trainer.args.world_size > 1 else "single",
            "teacher": trainer.teacher_placement,
        }
        summary["seconds_per_step"] = round(seconds / max(1, summary["steps_this_run"]), 3)
        write_atomically(out / "train_summary.json", json.dumps(summary | {"config": asdict(config)}, indent=2))
    _leave_process_group()
    return out


def shard_for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen model sharded over the process group with FSDP2's `fully_shard`: one unit per
    decoder layer (the model's `_no_split_modules`) and one for the rest, each gathered for its
    forward and resharded after it, so that a rank holds 1/world of the weights instead of a
    replica. Its all-gathers are collectives: every rank must run every forward."""
    from torch.distributed.fsdp import fully_shard

    layers = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in layers:
            fully_shard(module, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)  # the root would otherwise stay gathered for a backward
    return model


def _zero3_inference_engine(model: torch.nn.Module, training_config: dict):
    """A frozen model partitioned over the ranks by DeepSpeed ZeRO-3: an engine with no optimizer,
    from the run's own DeepSpeed config, whose forwards gather each layer's weights in turn. The
    values the Trainer fills only at train() ("auto") are left to DeepSpeed's defaults."""
    import deepspeed

    def settled(value):
        if isinstance(value, dict):
            return {key: settled(item) for key, item in value.items() if item != "auto"}
        return value

    config = {key: item for key, item in settled(training_config).items() if key not in ("optimizer", "scheduler")}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()  # DeepSpeedEngine.eval returns None, not the engine
    return engine


def _set_attention(model, implementation: str) -> None:
    try:
        model.set_attn_implementation(implementation)
    except (ValueError, ImportError) as exc:
        raise CllmError(f"--attn-implementation {implementation}: {str(exc).splitlines()[0]}") from None


def _save_sharded(trainer: Trainer, config: TrainConfig, out: Path) -> None:
    """FSDP / DeepSpeed hold the weights sharded across ranks: `Trainer.save_model` (on every rank)
    gathers them into one checkpoint. A LoRA model is saved as its adapter that way, then merged
    into the base weights on rank 0 unless --adapter-only asked for the adapter."""
    trainer.save_model(str(out))
    if not config.lora or config.adapter_only or not trainer.is_world_process_zero():
        return
    from peft import PeftModel
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from cllm.models import ModelConfig, load_model

    # Under ZeRO-3, from_pretrained would partition the base (deepspeed.zero.Init), a collective
    # that rank 0 runs alone here: a hang. Training is over, so this process leaves ZeRO-3.
    unset_hf_deepspeed_config()
    base = load_model(ModelConfig(name=config.model, dtype=config.dtype, device="cpu")).model
    PeftModel.from_pretrained(base, str(out)).merge_and_unload().save_pretrained(out)
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        (out / name).unlink(missing_ok=True)


def _leave_process_group() -> None:
    """Under torchrun: wait for rank 0's save, then shut the process group down before exit (its
    communication threads still running at exit abort a rank; `cllm train` also skips the
    interpreter's teardown under a launcher, cllm.cli.train._end_launched_process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
