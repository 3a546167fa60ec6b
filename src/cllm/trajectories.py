"""Jacobi trajectory collection: one training entry per converged block, written as durable shards.

Output directory layout (loadable with `datasets.load_dataset(DIR)` or `load_trajectories(DIR)`):

    cllm_manifest.json                 format marker + the collection config (checked on resume)
    data/train-p000of001-b000000.parquet   the entries of one batch of prompts
    summary-p000of001.json             what the last run of that process shard did

A batch's shard is written to a temporary file and renamed into place, so a kill never leaves a
half-written shard; a re-run skips every batch whose shard exists. Batches are cut from the full
prompt list (never from what is left), and every prompt's guesses are seeded by its own index,
so an interrupted and resumed collection holds exactly the entries of an uninterrupted one.

With a `drafter` the states are those of exact drafted Jacobi (the target verifies, the drafter
proposes the next iterate, `init` may be lookup): the drafter's own states, to train it further on
what it meets when it drafts. The fixed points are the target's greedy output either way.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cllm.data import PromptRecord
from cllm.decoding import INIT_STRATEGIES, DecodeOutput, DecoderSpec, accepted_per_iteration, decode, jacobi_no_cache
from cllm.drafters import load_draft_model
from cllm.errors import CllmError
from cllm.files import write_atomically
from cllm.metrics import is_degenerate
from cllm.models import LoadedModel

FORMAT = "cllm-trajectories"
FORMAT_VERSION = 1
MANIFEST = "cllm_manifest.json"
ENGINES = ("kv", "nokv")

SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt_index", pa.int64()),
        ("block_index", pa.int32()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("prefix_ids", pa.list_(pa.int32())),
        ("states", pa.list_(pa.list_(pa.int32()))),
        ("augmented_states", pa.list_(pa.list_(pa.int32()))),
        ("fixed_point", pa.list_(pa.int32())),
        ("teacher_output_ids", pa.list_(pa.int32())),
        ("label_ids", pa.list_(pa.int32())),
        ("iterations", pa.int32()),
        ("degenerate", pa.bool_()),
        ("model", pa.string()),
        ("block_size", pa.int32()),
        ("dtype", pa.string()),
        ("init", pa.string()),
        ("seed", pa.int64()),
    ]
)


@dataclass(frozen=True)
class CollectConfig:
    """Everything that determines the entries; a resumed run must use the same values."""

    model: str
    dataset: str
    dataset_path: str | None = None
    template: str = "chat"
    dtype: str = "float32"
    block_size: int = 16
    max_new_tokens: int = 256
    batch_size: int = 8
    limit: int | None = None
    init: str = "prompt"
    seed: int = 0
    augment: bool = False
    drop_degenerate: bool = False
    engine: str = "kv"
    degenerate_span: int = 32
    max_prompt_chars: int | None = None
    drafter: str | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.block_size >= 1, f"--block-size must be >= 1, got {self.block_size}"),
            (self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.limit is None or self.limit >= 1, f"--limit must be >= 1, got {self.limit}"),
            (self.init in INIT_STRATEGIES, f"unknown --init {self.init!r}"),
            (
                self.init != "lookup" or self.drafter is not None,
                "--init lookup rewrites iterates mid-block, so its states are not Jacobi "
                "trajectories: collect with prompt, repeat or pad (with --drafter it may: a drafter's "
                "states are what drafted:N:lookup meets)",
            ),
            (self.engine in ENGINES, f"unknown --engine {self.engine!r}; choose kv or nokv"),
            (self.template in ("chat", "raw"), f"unknown --template {self.template!r}; choose chat or raw"),
            (
                self.engine == "kv" or self.batch_size == 1,
                "--engine nokv decodes one prompt at a time: use --batch-size 1",
            ),
            (self.engine == "kv" or self.drafter is None, "--drafter collects with --engine kv"),
        ]
        for ok, message in checks:
            if not ok:
                raise CllmError(message)

    def prompt_seed(self, prompt_index: int) -> int:
        return self.seed * 1_000_003 + prompt_index


@dataclass
class CollectSummary:
    prompts_total: int = 0
    prompts_collected: int = 0
    prompts_resumed: int = 0
    entries: int = 0
    dropped_entries: int = 0
    degenerate_prompts: int = 0
    new_tokens: int = 0
    forward_passes: int = 0
    block_iterations: list[int] = field(default_factory=list, repr=False)
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    @property
    def mean_iterations_per_block(self) -> float:
        return float(np.mean(self.block_iterations)) if self.block_iterations else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["block_iterations"]
        return data | {
            "tokens_per_second": round(self.tokens_per_second, 3),
            "mean_iterations_per_block": round(self.mean_iterations_per_block, 3),
            "blocks": len(self.block_iterations),
        }


def augment_states(states: list[list[int]], fixed_point: list[int], rng: random.Random) -> list[list[int]]:
    """For every intermediate state, a copy with a random non-empty subset of its wrong tokens
    reset to their fixed-point values (the paper's data augmentation)."""
    augmented = []
    for state in states[:-1]:
        wrong = [i for i, (a, b) in enumerate(zip(state, fixed_point)) if a != b]
        if not wrong:
            continue
        chosen = set(rng.sample(wrong, rng.randint(1, len(wrong))))
        augmented.append([fixed_point[i] if i in chosen else t for i, t in enumerate(state)])
    return augmented


def build_entries(
    config: CollectConfig,
    prompt_index: int,
    record: PromptRecord,
    prompt_ids: list[int],
    label_ids: list[int] | None,
    tokens: list[int],
    blocks: list[torch.Tensor],
) -> list[dict]:
    """The entries of one prompt: block b covers output tokens after token 0 (from the prefill)."""
    degenerate = is_degenerate(tokens, config.degenerate_span)
    rng = random.Random(config.prompt_seed(prompt_index))
    entries, offset = [], 1
    for block_index, trajectory in enumerate(blocks):
        states = trajectory.tolist()
        fixed_point = states[-1]
        entries.append(
            {
                "prompt_id": record.id,
                "prompt_index": prompt_index,
                "block_index": block_index,
                "prompt_ids": prompt_ids,
                "prefix_ids": prompt_ids + tokens[:offset],
                "states": states,
                "augmented_states": augment_states(states, fixed_point, rng) if config.augment else [],
                "fixed_point": fixed_point,
                "teacher_output_ids": tokens,
                "label_ids": label_ids,
                "iterations": len(states) - 1,
                "degenerate": degenerate,
                "model": config.model,
                "block_size": config.block_size,
                "dtype": config.dtype,
                "init": config.init,
                "seed": config.seed,
            }
        )
        offset += len(fixed_point)
    assert offset == len(tokens) or not blocks, "blocks must tile the output after token 0"
    return entries


class CollectionDir:
    """The output directory: manifest checks, finished batches, atomic shard writes."""

    def __init__(self, root: Path, config: CollectConfig, shard_index: int, num_shards: int) -> None:
        self.root = root
        self.data = root / "data"
        self.part = f"p{shard_index:03d}of{num_shards:03d}"
        self._open(config)

    def _open(self, config: CollectConfig) -> None:
        # Every rank of a launch opens the same directory at once: the manifest comes first, so a
        # directory without one never holds more than a manifest being written (.tmp-*), and each
        # rank removes only its own strays, never a shard another rank is writing.
        if not check_collection(self.root, config):
            expected = {"format": FORMAT, "version": FORMAT_VERSION, "config": asdict(config)}
            write_atomically(self.root / MANIFEST, json.dumps(expected, indent=2))
        self.data.mkdir(exist_ok=True)
        for stray in self.data.glob(f".tmp-train-{self.part}-b*"):
            stray.unlink(missing_ok=True)  # a temporary file of a killed run: its batch is redone

    def shard_path(self, batch_number: int) -> Path:
        return self.data / f"train-{self.part}-b{batch_number:06d}.parquet"

    def set_limit(self, config: CollectConfig, batches: int) -> None:
        """Records this run's --limit; a smaller one than a previous run's would leave that run's
        later batches in the training data, so it is refused."""
        beyond = [
            p for p in self.data.glob(f"train-{self.part}-b*.parquet") if int(p.stem.rsplit("-b", 1)[1]) >= batches
        ]
        if beyond:
            raise CllmError(f"{self.root} already holds more prompts than this --limit asks for ({len(beyond)} batches "
                            "more); use that run's --limit or larger, or a new --out directory")
        manifest_path = self.root / MANIFEST
        manifest = read_manifest(self.root)
        if manifest["config"].get("limit") != config.limit:
            manifest["config"]["limit"] = config.limit
            write_atomically(manifest_path, json.dumps(manifest, indent=2).encode())

    def finished(self, batch_number: int, prompt_ids: list[str]) -> bool:
        path = self.shard_path(batch_number)
        if not path.is_file():
            return False
        try:
            covered = json.loads((check_shard(path).metadata or {})[b"cllm_prompt_ids"])
        except (KeyError, json.JSONDecodeError):
            raise CllmError(f"shard {path} does not record its prompts; delete it to collect them again") from None
        if covered != prompt_ids:
            raise CllmError(f"shard {path} covers other prompts than this run's batch; use a new --out directory")
        return True

    def write(self, batch_number: int, prompt_ids: list[str], entries: list[dict]) -> None:
        table = pa.Table.from_pylist(entries, schema=SCHEMA)
        table = table.replace_schema_metadata({"cllm_prompt_ids": json.dumps(prompt_ids)})
        path = self.shard_path(batch_number)
        temporary = self.data / f".tmp-{path.name}"
        pq.write_table(table, temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        temporary.replace(path)

    def write_summary(self, summary: CollectSummary) -> None:
        write_atomically(self.root / f"summary-{self.part}.json", json.dumps(summary.to_dict(), indent=2).encode())


def _decode_batch(
    loaded: LoadedModel, config: CollectConfig, prompts: list[list[int]], seeds: list[int], drafter=None
) -> DecodeOutput:
    if config.engine == "nokv":  # the original code's reference loop, one prompt per batch
        return jacobi_no_cache(loaded.model, torch.tensor(prompts, device=loaded.model.device), seed=seeds,
                               block_size=config.block_size, max_new_tokens=config.max_new_tokens,
                               eos_token_id=loaded.eos_token_ids, pad_token_id=loaded.pad_token_id, init=config.init,
                               return_trajectory=True)
    kind = "jacobi" if drafter is None else "drafted"
    spec = DecoderSpec(kind, block_size=config.block_size, init=config.init)
    return decode(loaded, spec, prompts, max_new_tokens=config.max_new_tokens, seed=seeds, return_trajectory=True,
                  draft_model=drafter)


def process_shard(shard_index: int | None, num_shards: int | None) -> tuple[int, int]:
    """This process's share (index, count) of a collection: as given, else from torchrun's /
    accelerate's RANK and WORLD_SIZE (each process's model goes to its LOCAL_RANK's GPU by itself:
    cllm.models.resolve_device)."""
    num_shards = num_shards or int(os.environ.get("WORLD_SIZE", "1"))
    shard_index = shard_index if shard_index is not None else int(os.environ.get("RANK", "0"))
    if not 0 <= shard_index < num_shards:
        raise CllmError(f"--shard-index must be in [0, {num_shards}), got {shard_index}")
    return shard_index, num_shards


def shard_prompts(count: int, shard_index: int, num_shards: int) -> list[int]:
    """Indices of the prompts this process handles (round robin over the process shards)."""
    if not 0 <= shard_index < num_shards:
        raise CllmError(f"--shard-index must be in [0, {num_shards}), got {shard_index}")
    return list(range(shard_index, count, num_shards))


def collect(
    loaded: LoadedModel,
    records: Sequence[PromptRecord],
    config: CollectConfig,
    out_dir: Path,
    shard_index: int = 0,
    num_shards: int = 1,
    on_batch: Callable[[int, int], None] | None = None,
) -> CollectSummary:
    """Collect the trajectories of this process's share of `records` into `out_dir`.

    `on_batch(prompts, new_tokens)` is called after every batch (collected or resumed), for progress.
    """
    directory = CollectionDir(out_dir, config, shard_index, num_shards)
    mine = shard_prompts(len(records), shard_index, num_shards)
    directory.set_limit(config, -(-len(mine) // config.batch_size))
    summary = CollectSummary(prompts_total=len(mine))
    drafter = None if config.drafter is None else load_draft_model(config.drafter, loaded)
    start = time.perf_counter()
    for batch_number, first in enumerate(range(0, len(mine), config.batch_size)):
        indices = mine[first : first + config.batch_size]
        batch = [records[i] for i in indices]
        ids = [r.id for r in batch]
        if directory.finished(batch_number, ids):
            summary.prompts_resumed += len(batch)
            if on_batch:
                on_batch(len(batch), 0)
            continue
        prompt_ids = [loaded.encode_prompt(r.formatted(config.template), raw=config.template == "raw") for r in batch]
        output = _decode_batch(loaded, config, prompt_ids, [config.prompt_seed(i) for i in indices], drafter)
        entries = []
        for index, record, prompt, tokens, stats, blocks in zip(
            indices, batch, prompt_ids, output.token_ids, output.stats, output.trajectories
        ):
            label_ids = loaded.tokenizer(record.label, add_special_tokens=False).input_ids if record.label else None
            prompt_entries = build_entries(config, index, record, prompt, label_ids, tokens, blocks)
            degenerate = bool(prompt_entries) and prompt_entries[0]["degenerate"]
            summary.degenerate_prompts += degenerate
            if degenerate and config.drop_degenerate:
                summary.dropped_entries += len(prompt_entries)
                prompt_entries = []
            entries += prompt_entries
            summary.new_tokens += stats.new_tokens
            summary.forward_passes += stats.forward_passes
            summary.block_iterations += stats.block_iterations
        directory.write(batch_number, ids, entries)
        summary.prompts_collected += len(batch)
        summary.entries += len(entries)
        if on_batch:
            on_batch(len(batch), sum(len(t) for t in output.token_ids))
    summary.seconds = time.perf_counter() - start
    directory.write_summary(summary)
    return summary


def check_collection(root: Path, config: CollectConfig) -> bool:
    """Whether `root` holds a collection this config may resume (True) or is free for a new one
    (False); anything else is a CllmError. Writes nothing: `cllm collect` calls it before loading
    the model, so that a wrong --out fails at once."""
    if root.exists() and not root.is_dir():
        raise CllmError(f"{root} exists and is not a directory")
    # One listing, not an is_file() then a listing: another rank may write the manifest in between.
    names = {p.name for p in root.iterdir()} if root.exists() else set()
    if MANIFEST not in names:
        if any(not name.startswith(".tmp-") for name in names):  # .tmp-*: a manifest being written
            raise CllmError(f"{root} exists, is not empty and is not a cllm trajectory collection")
        return False
    manifest = read_manifest(root, hint="use a new --out directory")
    if manifest.get("format") != FORMAT:
        raise CllmError(f"{root} is not a cllm trajectory collection; use a new --out directory")
    if manifest.get("version") != FORMAT_VERSION:
        raise CllmError(f"{root} was written by format version {manifest.get('version')}, not {FORMAT_VERSION}")
    # --limit may change: prompts come in dataset order, so a larger limit extends the collection
    differing = sorted(k for k, v in asdict(config).items() if k != "limit" and manifest["config"].get(k) != v)
    if differing:
        raise CllmError(f"{root} holds a collection with different settings ({', '.join(differing)}); "
                        "re-run with the same settings to resume, or use a new --out directory")
    for shard in (root / "data").glob("train-*.parquet"):
        check_shard(shard)  # a damaged shard is reported now, not after hours of decoding
    return True


def read_manifest(root: Path, hint: str = "collect it again") -> dict:
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CllmError(f"{root / MANIFEST} is corrupt; {hint}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        raise CllmError(f"{root / MANIFEST} is corrupt; {hint}")
    return manifest


def check_shard(path: Path) -> pa.Schema:
    """The shard's schema, or a CllmError saying what is wrong with the file."""
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError):
        raise CllmError(f"shard {path} is unreadable (truncated or not parquet); delete it and re-run cllm collect "
                        "to redo its prompts") from None
    missing = [name for name in SCHEMA.names if name not in schema.names]
    if missing:
        raise CllmError(f"{path} is not a cllm trajectory shard: it lacks the columns {', '.join(missing)}")
    return schema


def shard_files(root: Path) -> list[Path]:
    """The shards of a finished or partial collection, each checked readable."""
    if not root.exists():
        raise CllmError(f"trajectories directory not found: {root}")
    if not root.is_dir():
        raise CllmError(f"{root} is not a directory (a trajectory collection is one)")
    if not (root / MANIFEST).is_file():
        raise CllmError(f"{root} is not a cllm trajectory collection (no {MANIFEST})")
    read_manifest(root)
    files = sorted((root / "data").glob("train-*.parquet"))
    for path in files:
        check_shard(path)
    return files


def read_entries(root: Path) -> pa.Table:
    """All entries of a collection, in prompt then block order."""
    files = shard_files(root)
    if not files:
        return SCHEMA.empty_table()
    try:
        table = pa.concat_tables(pq.read_table(f, schema=SCHEMA) for f in files)
    except (pa.ArrowException, OSError) as exc:
        raise CllmError(f"the shards of {root} are unreadable: {str(exc).splitlines()[0]}") from None
    return table.sort_by([("prompt_index", "ascending"), ("block_index", "ascending")])


def load_trajectories(root: str | Path):
    """The collection as a `datasets.Dataset`."""
    import datasets

    files = shard_files(Path(root))
    if not files:
        raise CllmError(f"{root} holds no entries yet")
    return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")


def inspect_collection(root: Path, histogram_max: int = 16) -> dict:
    """Counts and distributions of a collection, for `cllm data inspect`."""

    table = read_entries(root)
    manifest = read_manifest(root)
    rows = table.select(["prompt_id", "states", "iterations", "degenerate"]).to_pylist()
    gained: dict[int, int] = {}
    for row in rows:
        for count in accepted_per_iteration(torch.tensor(row["states"])):
            key = min(count, histogram_max)
            gained[key] = gained.get(key, 0) + 1
    degenerate_prompts = {r["prompt_id"] for r in rows if r["degenerate"]}
    iterations = [r["iterations"] for r in rows]
    return {
        "config": manifest["config"],
        "shards": len(shard_files(root)),
        "entries": len(rows),
        "prompts": len({r["prompt_id"] for r in rows}),
        "mean_iterations_per_block": float(np.mean(iterations)) if iterations else 0.0,
        "tokens_gained_per_iteration": dict(sorted(gained.items())),
        "degenerate_entries": sum(r["degenerate"] for r in rows),
        "degenerate_prompts": len(degenerate_prompts),
        "sample": table.slice(0, 1).to_pylist()[0] if len(rows) else None,
    }
