"""Side-by-side decoding speed: every decoder on the same prompts, in one process, one prompt at a time.

For each prompt the decoders run back to back (in a rotating order, so slow drift of the machine
does not favour one of them), after one untimed warm-up run of each. Nothing is excluded: every
prompt enters every statistic.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cllm.decoding import DECODERS, DecodeOutput
from cllm.errors import CllmError
from cllm.models import LoadedModel


@dataclass(frozen=True)
class DecoderSpec:
    """`hf`, `ar`, or `jacobi` with a block size; written `jacobi:16` on the command line."""

    kind: str
    block_size: int = 1

    @property
    def label(self) -> str:
        return f"jacobi:{self.block_size}" if self.kind == "jacobi" else self.kind

    @classmethod
    def parse(cls, text: str) -> DecoderSpec:
        kind, _, size = text.partition(":")
        if kind not in DECODERS:
            raise CllmError(f"unknown decoder {text!r}; use hf, ar or jacobi:N")
        if kind != "jacobi":
            if size:
                raise CllmError(f"decoder {kind} takes no block size")
            return cls(kind)
        try:
            block_size = int(size or 16)
        except ValueError:
            raise CllmError(f"bad block size in {text!r}") from None
        if block_size < 1:
            raise CllmError(f"block size must be >= 1 in {text!r}")
        return cls("jacobi", block_size)


@dataclass
class RunRecord:
    decoder: str
    prompt_index: int
    repeat: int
    seconds: float
    new_tokens: int
    forward_passes: int
    fast_forward: int
    stationary: int
    token_ids: list[int] = field(repr=False)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def decode_once(
    loaded: LoadedModel, spec: DecoderSpec, prompt_ids: list[int], max_new_tokens: int
) -> tuple[DecodeOutput, float]:
    """Decode one prompt; return the output and the wall-clock seconds it took."""
    device = loaded.model.device
    input_ids = torch.tensor([prompt_ids], device=device)
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=loaded.eos_token_ids, pad_token_id=loaded.pad_token_id)
    if spec.kind == "jacobi":
        kwargs["block_size"] = spec.block_size
    _synchronize(device)
    start = time.perf_counter()
    output = DECODERS[spec.kind](loaded.model, input_ids, **kwargs)
    _synchronize(device)
    return output, time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_benchmark(
    loaded: LoadedModel,
    prompts: Sequence[list[int]],
    specs: Sequence[DecoderSpec],
    max_new_tokens: int,
    repeats: int = 1,
    on_step: Callable[[], None] | None = None,
) -> list[RunRecord]:
    """Time every decoder on every prompt `repeats` times (batch size 1), after one warm-up run of each."""
    for spec in specs:
        decode_once(loaded, spec, prompts[0], min(max_new_tokens, 16))
    records = []
    for step, (repeat, index) in enumerate((r, i) for r in range(repeats) for i in range(len(prompts))):
        prompt = prompts[index]
        rotation = step % len(specs)
        for spec in list(specs[rotation:]) + list(specs[:rotation]):
            output, seconds = decode_once(loaded, spec, prompt, max_new_tokens)
            stats = output.stats[0]
            records.append(
                RunRecord(
                    decoder=spec.label,
                    prompt_index=index,
                    repeat=repeat,
                    seconds=seconds,
                    new_tokens=stats.new_tokens,
                    forward_passes=stats.forward_passes,
                    fast_forward=stats.fast_forward,
                    stationary=stats.stationary,
                    token_ids=output.token_ids[0],
                )
            )
            if on_step is not None:
                on_step()
    return records


@dataclass
class DecoderSummary:
    decoder: str
    median_tokens_per_second: float
    p25_tokens_per_second: float
    p75_tokens_per_second: float
    speedup_vs_ar: float | None  # median over runs of (this tokens/s) / (ar tokens/s on the same prompt and repeat)
    tokens_per_forward: float  # all new tokens / all decode forwards
    agreement_with_ar: float | None  # fraction of runs whose token ids equal ar's exactly
    common_prefix_with_ar: float | None  # mean tokens before the first difference from ar
    mean_new_tokens: float
    fast_forward_per_prompt: float
    stationary_per_prompt: float


def _quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=4, method="inclusive")[int(q * 4) - 1] if len(values) > 1 else values[0]


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def summarize(records: Sequence[RunRecord]) -> list[DecoderSummary]:
    by_decoder: dict[str, list[RunRecord]] = {}
    for record in records:
        by_decoder.setdefault(record.decoder, []).append(record)
    reference = {(r.prompt_index, r.repeat): r for r in by_decoder.get("ar", [])}
    summaries = []
    for decoder, runs in by_decoder.items():
        speeds = [r.tokens_per_second for r in runs]
        speedup = agreement = common_prefix = None
        if reference:
            paired = [(r, reference[r.prompt_index, r.repeat]) for r in runs]
            speedup = statistics.median(r.tokens_per_second / ref.tokens_per_second for r, ref in paired)
            agreement = sum(r.token_ids == ref.token_ids for r, ref in paired) / len(runs)
            common_prefix = statistics.mean(_common_prefix(r.token_ids, ref.token_ids) for r, ref in paired)
        summaries.append(
            DecoderSummary(
                decoder=decoder,
                median_tokens_per_second=statistics.median(speeds),
                p25_tokens_per_second=_quantile(speeds, 0.25),
                p75_tokens_per_second=_quantile(speeds, 0.75),
                speedup_vs_ar=speedup,
                tokens_per_forward=sum(r.new_tokens for r in runs) / max(1, sum(r.forward_passes for r in runs)),
                agreement_with_ar=agreement,
                common_prefix_with_ar=common_prefix,
                mean_new_tokens=statistics.mean(r.new_tokens for r in runs),
                fast_forward_per_prompt=statistics.mean(r.fast_forward for r in runs),
                stationary_per_prompt=statistics.mean(r.stationary for r in runs),
            )
        )
    return summaries


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def markdown_table(summaries: Sequence[DecoderSummary]) -> str:
    header = (
        "| decoder | median tok/s | p25-p75 tok/s | speedup vs ar | tokens/forward | identical to ar "
        "| common prefix with ar | mean new tokens | fast-forward/prompt | stationary/prompt |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for s in summaries:
        speedup = f"{s.speedup_vs_ar:.2f}x" if s.speedup_vs_ar is not None else "-"
        agreement = f"{s.agreement_with_ar:.0%}" if s.agreement_with_ar is not None else "-"
        prefix = f"{s.common_prefix_with_ar:.1f}" if s.common_prefix_with_ar is not None else "-"
        lines.append(
            f"| {s.decoder} | {s.median_tokens_per_second:.1f} | {s.p25_tokens_per_second:.1f}-"
            f"{s.p75_tokens_per_second:.1f} | {speedup} | {s.tokens_per_forward:.3f} | {agreement} | {prefix} "
            f"| {s.mean_new_tokens:.1f} | {s.fast_forward_per_prompt:.1f} | {s.stationary_per_prompt:.1f} |"
        )
    return "\n".join(lines)


def write_report(out_dir: Path, meta: dict, summaries: Sequence[DecoderSummary], records: Sequence[RunRecord]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "meta": meta,
        "summary": [asdict(s) for s in summaries],
        "runs": [asdict(r) | {"tokens_per_second": r.tokens_per_second} for r in records],
    }
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2))
    lines = [f"- {key}: {value}" for key, value in meta.items()]
    (out_dir / "bench.md").write_text("\n".join(lines) + "\n\n" + markdown_table(summaries) + "\n")
