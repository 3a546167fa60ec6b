"""`TrainConfig`, the settings of a consistency training run, without torch: `cllm train` derives
its flags from the fields (their help, flag name and choices live here, once), and
`cllm.training.train` runs it."""

from __future__ import annotations

import math
from dataclasses import MISSING, Field, dataclass, field, fields

from cllm.errors import CllmError

PACKING = ("prompt", "entry", "none")  # every block of a prompt in one row | one block per row | three forwards
DISTANCES = ("forward_kl", "reverse_kl", "jsd", "argmax_ce")  # the divergences cllm.losses implements
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial",
              "inverse_sqrt", "warmup_stable_decay")  # transformers' SchedulerType values that need no extra kwargs


def flag(default, help: str, name: str | None = None, choices: tuple[str, ...] | None = None):
    """A field that `cllm train` offers as `--name` (the field's name with dashes, unless given)."""
    return field(default=default, metadata={"help": help, "flag": name, "choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    """`cllm train` settings; validated on construction."""

    model: str
    trajectories: str  # a collection directory, or several joined by commas (a data mix)
    out: str
    dtype: str = "float32"
    device: str = "auto"
    learning_rate: float = flag(2e-5, "learning rate", name="--lr")
    epochs: float = flag(1.0, "epochs over the entries")
    max_steps: int = flag(-1, "optimizer steps; overrides --epochs when > 0")
    batch_size: int = flag(1, "entries per micro-batch; prompts (all their blocks) with --pack prompt")
    grad_accum: int = flag(1, "micro-batches per optimizer step")
    loss_type: str = flag("gc", "global or local consistency", name="--loss", choices=("gc", "lc"))
    distance: str = flag("forward_kl", "divergence D; argmax_ce: cross-entropy to the target's top token",
                         choices=DISTANCES)
    beta: float = flag(0.5, "beta of the generalized JSD")
    ar_weight: float = flag(1.0, "weight w of the AR loss; both terms are per-token means")
    use_labels: bool = flag(False, "AR loss on dataset labels instead of the target's output")
    label_smoothing: float = flag(0.0, "for the AR loss")
    mask_before_first_difference: bool = flag(
        False, "count only block positions from the first one where the state is wrong (original code)")
    max_length: int = flag(1024, "longest sequence in tokens")
    lora: bool = flag(False, "train LoRA adapters (PEFT), merged into the saved model")
    lora_rank: int = flag(16, "LoRA rank")
    lora_targets: str = flag("", "with --lora: comma-separated projections to adapt (e.g. down_proj,o_proj); empty: "
                             "every attention and MLP projection. Fewer make a drafter's step cheaper (each "
                             "adapted projection adds a few small kernels to the forward)")
    adapter_only: bool = flag(False, "with --lora: save the unmerged PEFT adapter (adapter_config.json and its "
                              "weights, a few MB; bf16 with --bf16) instead of the merged model: a drafter for "
                              "`--drafter`")
    init_adapter: str = flag("", "with --lora: start from this LoRA adapter (a `--adapter-only` directory, or "
                             "'default': the shipped drafter) instead of fresh weights, e.g. to train a drafter "
                             "further on its own drafted states (`cllm collect --drafter`); its rank and "
                             "projections are the adapter's (--lora-rank and --lora-targets must not differ)")
    gated: bool = flag(False, "with --adapter-only: train a gated drafter (cllm.decoding.drafting.GatedAdapter): the "
                       "adapter on at the block's columns only, over the target's own KV of the context; "
                       "consistency loss only, toward the target's fixed point (no teacher copy needed)")
    gradient_checkpointing: bool = flag(False, "trade compute for memory")
    bf16: bool = flag(False, "bf16 autocast (where the device supports it)")
    save_steps: int = flag(100, "checkpoint every N steps")
    logging_steps: int = flag(10, "log every N steps")
    resume: bool = flag(False, "continue from the last checkpoint in OUT/checkpoints")
    seed: int = flag(0, "seed of state sampling and training")
    pack: str = flag("prompt", "what one forward trains, for GC on the target's output with sdpa or eager attention "
                     "(otherwise: none): 'prompt' packs every block of a prompt into one row (a batch counts "
                     "prompts), 'entry' one block per row, 'none' runs three forwards per block (student, target, "
                     "AR). Each block's loss is the same", choices=PACKING)
    states_per_block: int = flag(1, "with --pack prompt or entry: train up to K distinct states of each block in "
                                 "the same row (they share its prefix, so K states cost K x (n - 1) extra tokens, "
                                 "not K forwards)")
    lr_scheduler: str = flag("linear", "learning-rate schedule after the warmup (transformers' lr_scheduler_type)",
                             choices=SCHEDULERS)
    weight_decay: float = flag(0.0, "AdamW weight decay")
    report_to: str = flag("none", "where the Trainer logs besides the console: none, or comma-separated "
                          "integrations it knows (tensorboard, wandb, ...; each needs its package installed)")
    attn_implementation: str = flag("", "attention kernel to train with (sdpa, eager, flash_attention_2, ...; "
                                    "default: the model's). Packed rows need sdpa or eager")
    warmup_steps: float = flag(0.0, "linear learning-rate warmup: a number of steps, or a fraction of all steps "
                               "when < 1")
    teacher: bool = flag(False, "keep a frozen copy of the target as teacher: consistency targets come from it, not "
                         "from the drifting student (one more no-grad forward per step)")
    distill_weight: float = flag(0.0, "weight of KL(teacher || student) over the whole next-token distribution on "
                                 "the teacher's output; needs --teacher")

    def __post_init__(self) -> None:
        numbers = [getattr(self, f.name) for f in fields(self) if f.type in ("float", "int")]
        checks = [
            (all(math.isfinite(value) for value in numbers), "training settings must be finite numbers"),
            (self.learning_rate > 0, "--lr must be > 0"),
            (self.epochs > 0, "--epochs must be > 0"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "--batch-size and --grad-accum must be >= 1"),
            (self.loss_type in ("gc", "lc"), f"--loss must be gc or lc, got {self.loss_type!r}"),
            (self.distance in DISTANCES, f"--distance must be one of {', '.join(DISTANCES)}"),
            (0 < self.beta < 1, "--beta must lie in (0, 1)"),
            (self.ar_weight >= 0, "--ar-weight must be >= 0"),
            (0 <= self.label_smoothing < 1, "--label-smoothing must lie in [0, 1)"),
            (self.max_length >= 8, "--max-length must be >= 8"),
            (self.lora_rank >= 1, "--lora-rank must be >= 1"),
            (self.lora or not self.lora_targets, "--lora-targets needs --lora"),
            (self.lora or not self.adapter_only, "--adapter-only needs --lora"),
            (self.lora or not self.init_adapter, "--init-adapter needs --lora"),
            (self.adapter_only or not self.gated, "--gated needs --lora --adapter-only (it trains a drafter)"),
            (not self.gated or (not self.teacher and self.distill_weight == 0 and not self.gradient_checkpointing),
             "--gated reads its targets from the target itself (the adapter off): without --teacher, "
             "--distill-weight and --gradient-checkpointing"),
            (self.save_steps >= 1 and self.logging_steps >= 1, "--save-steps and --logging-steps must be >= 1"),
            (self.pack in PACKING, f"--pack must be one of {', '.join(PACKING)}"),
            (self.states_per_block >= 1, "--states-per-block must be >= 1"),
            (self.warmup_steps >= 0, "--warmup-steps must be >= 0"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.lr_scheduler in SCHEDULERS, f"--lr-scheduler must be one of {', '.join(SCHEDULERS)}"),
            (self.distill_weight >= 0, "--distill-weight must be >= 0"),
            (self.teacher or self.distill_weight == 0, "--distill-weight needs --teacher (the frozen target)"),
        ]
        for ok, message in checks:
            if not ok:
                raise CllmError(message)


def flag_fields() -> list[Field]:
    """The fields `cllm train` offers as flags, in order."""
    return [f for f in fields(TrainConfig) if "help" in f.metadata and f.default is not MISSING]


def flag_name(f: Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")
