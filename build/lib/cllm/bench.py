"""Side-by-side decoding speed: every (model, decoder) on the same prompts, in one process, one prompt at a time.

For each prompt the runs go back to back (in a rotating order, so slow drift of the machine does
not favour one of them), after one untimed warm-up run of each. Nothing is excluded: every prompt
enters every statistic, and degenerate (repetitive) outputs are counted, not dropped. With several
models, the first is the reference (the target): every run is also compared with its `ar` run.
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

from cllm.decoding import GREEDY, DecodeOutput, DecoderSpec, Sampling, decode
from cllm.errors import CllmError
from cllm.fidelity import check_same_tokenizer, summarize_positions, teacher_forced_positions
from cllm.files import write_atomically
from cllm.llamacpp import LlamaCpp
from cllm.metrics import common_prefix, is_degenerate
from cllm.models import LoadedModel

DEGENERATE_SPAN = 32  # a repeated span this long marks an output as degenerate (as in collection)


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
    model: str = ""

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def decode_once(
    loaded: LoadedModel,
    spec: DecoderSpec,
    prompt_ids: list[int],
    max_new_tokens: int,
    draft: object | None = None,
    sampling: Sampling = GREEDY,
    seed: int = 0,
    llamacpp: LlamaCpp | None = None,
) -> tuple[DecodeOutput, float]:
    """Decode one prompt; return the output and the wall-clock seconds it took. `draft`: what a
    decoder that needs one drafts with (a model, or a drafter of cllm.drafters)."""
    if spec.kind == "llamacpp":
        if llamacpp is None:
            raise CllmError("the llamacpp row needs the model's GGUF file loaded by llama.cpp")
        start = time.perf_counter()
        output = llamacpp.generate(prompt_ids, max_new_tokens, loaded.eos_token_ids)
        return output, time.perf_counter() - start
    device = loaded.model.device
    _synchronize(device)
    start = time.perf_counter()
    output = decode(loaded, spec, [prompt_ids], max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                    draft_model=draft.model if isinstance(draft, LoadedModel) else draft)
    _synchronize(device)
    return output, time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class BenchModel:
    name: str
    loaded: LoadedModel
    prompts: list[list[int]]  # encoded with this model's tokenizer
    llamacpp: LlamaCpp | None = None  # its GGUF in llama.cpp, for the llamacpp row
    drafter: object | None = None  # its drafter (cllm.drafters), for the drafted rows

    def runs(self, spec: DecoderSpec) -> bool:
        if spec.kind == "drafted":  # a drafter belongs to one model: another model's rows would be that model's
            return self.drafter is not None
        return spec.kind != "llamacpp" or self.llamacpp is not None

    def draft(self, spec: DecoderSpec, assistant: LoadedModel | None) -> object | None:
        return self.drafter if spec.kind == "drafted" else assistant


def run_benchmark(
    models: Sequence[BenchModel],
    specs: Sequence[DecoderSpec],
    max_new_tokens: int,
    repeats: int = 1,
    on_step: Callable[[str, int], None] | None = None,
    draft: LoadedModel | None = None,
    sampling: Sampling = GREEDY,
    seed: int = 0,
) -> list[RunRecord]:
    """Time every decoder of every model on every prompt `repeats` times (batch size 1), after one
    warm-up run of each; `draft` drafts for `hf-assisted`, each model's own `drafter` for its drafted
    rows. Prompt i samples with seed + i. `on_step(what, done)` before each decode: what runs now
    (for a progress line) and how many timed decodes are done."""
    runs = [(model, spec) for model in models for spec in specs if model.runs(spec)]
    say = on_step or (lambda what, done: None)
    for model, spec in runs:
        say(f"warm-up {_named(model, spec)}", 0)
        # a compiled decoder compiles a graph per column width it meets: a whole decode meets them all
        warm_up = max_new_tokens if model.loaded.compile else min(max_new_tokens, 16)
        decode_once(model.loaded, spec, model.prompts[0], warm_up, model.draft(spec, draft), sampling, seed,
                    model.llamacpp)
    records = []
    count = len(models[0].prompts)
    for step, (repeat, index) in enumerate((r, i) for r in range(repeats) for i in range(count)):
        rotation = step % len(runs)
        for model, spec in runs[rotation:] + runs[:rotation]:
            say(f"prompt {index + 1}/{count} {_named(model, spec)}", len(records))
            output, seconds = decode_once(model.loaded, spec, model.prompts[index], max_new_tokens,
                                          model.draft(spec, draft), sampling, seed + index, model.llamacpp)
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
                    model=model.name,
                )
            )
    return records


def _named(model: BenchModel, spec: DecoderSpec) -> str:
    return f"{model.name} {spec.label}" if model.name else spec.label


@dataclass
class DecoderSummary:
    decoder: str
    median_tokens_per_second: float
    p25_tokens_per_second: float
    p75_tokens_per_second: float
    speedup_vs_ar: (
        float | None
    )  # median over runs of (this tokens/s) / (same model's ar tokens/s on the same prompt and repeat)
    tokens_per_forward: float  # all new tokens / all decode forwards
    agreement_with_ar: float | None  # fraction of runs whose token ids equal ar's exactly
    common_prefix_with_ar: float | None  # mean tokens before the first difference from ar
    mean_new_tokens: float
    fast_forward_per_prompt: float
    stationary_per_prompt: float
    model: str = ""
    runs: int = 0
    degenerate_runs: int = 0
    speedup_vs_reference_ar: float | None = None  # the same, against the first model's ar (the target)
    # fidelity to the target (the first model): no speed number without it
    identical_to_target: float | None = None  # fraction of runs whose output equals the target's greedy output
    same_top1_vs_target: float | None = None  # teacher-forced on the target's outputs: same top token (per model)
    kl_vs_target: float | None = None  # ... and mean KL(target || model) per token, nats

    @property
    def name(self) -> str:
        return f"{self.model} {self.decoder}" if self.model else self.decoder


def _quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=4, method="inclusive")[int(q * 4) - 1] if len(values) > 1 else values[0]


def _paired_median_speedup(runs: Sequence[RunRecord], reference: dict) -> float | None:
    pairs = [(r, reference.get((r.prompt_index, r.repeat))) for r in runs]
    if not pairs or any(ref is None for _, ref in pairs):
        return None
    return statistics.median(r.tokens_per_second / ref.tokens_per_second for r, ref in pairs)


def target_runs(records: Sequence[RunRecord]) -> dict[tuple[int, int], RunRecord]:
    """The first model's greedy outputs by (prompt, repeat): its ar runs, else its first decoder's
    (every decoder here is greedy, so any of them gives the target's output)."""
    if not records:
        return {}
    model = records[0].model
    decoder = "ar" if any(r.model == model and r.decoder == "ar" for r in records) else records[0].decoder
    return {(r.prompt_index, r.repeat): r for r in records if r.model == model and r.decoder == decoder}


def teacher_forced_fidelity(models: Sequence[BenchModel], records: Sequence[RunRecord]) -> dict[str, dict]:
    """Per model after the first: same top-1 and mean KL(target || model) teacher-forced on the
    target's outputs of this run (first repeat); models with another tokenizer are left out."""
    reference = target_runs(records)
    target = models[0]
    result = {}
    for model in models[1:]:
        try:
            check_same_tokenizer(model.loaded, target.loaded)
        except CllmError:
            continue
        sequences = [
            (target.prompts[i] + run.token_ids, len(target.prompts[i]))
            for (i, repeat), run in reference.items()
            if repeat == 0
        ]
        summary = summarize_positions(*teacher_forced_positions(model.loaded.model, target.loaded.model, sequences))
        result[model.name] = {"same_top1": summary["same_top1"], "kl_mean": summary["kl_mean"]}
    return result


def summarize(records: Sequence[RunRecord], fidelity: dict[str, dict] | None = None) -> list[DecoderSummary]:
    """One summary per (model, decoder), in first-seen order; the first model's ar is the reference.
    `fidelity` (from `teacher_forced_fidelity`) fills the teacher-forced columns."""
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for record in records:
        groups.setdefault((record.model, record.decoder), []).append(record)
    ar_runs = {
        model: {(r.prompt_index, r.repeat): r for r in runs}
        for (model, decoder), runs in groups.items()
        if decoder == "ar"
    }
    reference_model = records[0].model if records else ""
    reference_outputs = target_runs(records)
    fidelity = fidelity or {}
    summaries = []
    for (model, decoder), runs in groups.items():
        speeds = [r.tokens_per_second for r in runs]
        reference = ar_runs.get(model, {})
        agreement = prefix_with_ar = None
        if reference:
            paired = [(r, reference[r.prompt_index, r.repeat]) for r in runs]
            agreement = sum(r.token_ids == ref.token_ids for r, ref in paired) / len(runs)
            prefix_with_ar = statistics.mean(common_prefix(r.token_ids, ref.token_ids) for r, ref in paired)
        summaries.append(
            DecoderSummary(
                decoder=decoder,
                median_tokens_per_second=statistics.median(speeds),
                p25_tokens_per_second=_quantile(speeds, 0.25),
                p75_tokens_per_second=_quantile(speeds, 0.75),
                speedup_vs_ar=_paired_median_speedup(runs, reference),
                tokens_per_forward=sum(r.new_tokens for r in runs) / max(1, sum(r.forward_passes for r in runs)),
                agreement_with_ar=agreement,
                common_prefix_with_ar=prefix_with_ar,
                mean_new_tokens=statistics.mean(r.new_tokens for r in runs),
                fast_forward_per_prompt=statistics.mean(r.fast_forward for r in runs),
                stationary_per_prompt=statistics.mean(r.stationary for r in runs),
                model=model,
                runs=len(runs),
                degenerate_runs=sum(is_degenerate(r.token_ids, DEGENERATE_SPAN) for r in runs),
                speedup_vs_reference_ar=_paired_median_speedup(runs, ar_runs.get(reference_model, {})),
                identical_to_target=sum(r.token_ids == reference_outputs[r.prompt_index, r.repeat].token_ids
                                        for r in runs) / len(runs),
                same_top1_vs_target=1.0 if model == reference_model else fidelity.get(model, {}).get("same_top1"),
                kl_vs_target=0.0 if model == reference_model else fidelity.get(model, {}).get("kl_mean"),
            )
        )
    return summaries


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def format_ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def _percent(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


def markdown_table(summaries: Sequence[DecoderSummary]) -> str:
    several = len({s.model for s in summaries}) > 1
    header = (
        "| model | decoder | median tok/s | p25-p75 tok/s | speedup vs own ar |"
        + (" speedup vs target ar |" if several else "")
        + " tokens/forward |"
        + (" identical to target | same top-1 as target | KL to target |" if several else "")
        + " identical to ar | common prefix with ar | mean new tokens | fast-forward/prompt"
        " | stationary/prompt | degenerate runs |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for s in summaries:
        agreement = f"{s.agreement_with_ar:.0%}" if s.agreement_with_ar is not None else "-"
        prefix = f"{s.common_prefix_with_ar:.1f}" if s.common_prefix_with_ar is not None else "-"
        lines.append(
            f"| {s.model or '-'} | {s.decoder} | {s.median_tokens_per_second:.1f} | {s.p25_tokens_per_second:.1f}-"
            f"{s.p75_tokens_per_second:.1f} | {format_ratio(s.speedup_vs_ar)} |"
            + (f" {format_ratio(s.speedup_vs_reference_ar)} |" if several else "")
            + f" {s.tokens_per_forward:.3f} |"
            + (f" {_percent(s.identical_to_target, '.0%')} | {_percent(s.same_top1_vs_target, '.1%')} | "
               f"{_percent(s.kl_vs_target, '.3f')} |" if several else "")
            + f" {agreement} | {prefix} | {s.mean_new_tokens:.1f} "
            f"| {s.fast_forward_per_prompt:.1f} | {s.stationary_per_prompt:.1f} | {s.degenerate_runs}/{s.runs} |"
        )
    return "\n".join(lines)


def plot_block_sizes(summaries: Sequence[DecoderSummary], path: Path) -> bool:
    """Speedup over the target's ar and tokens per forward against the Jacobi block size, one line
    per model. Returns False (and draws nothing) when no Jacobi runs were made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jacobi = [s for s in summaries if s.decoder.startswith("jacobi:")]
    if not jacobi:
        return False
    figure, (speed_axis, forward_axis) = plt.subplots(1, 2, figsize=(10, 4))
    parsed = [(DecoderSpec.parse(s.decoder), s) for s in jacobi]
    for model, init in dict.fromkeys((s.model, spec.init) for spec, s in parsed):
        points = sorted(
            ((spec.block_size, s) for spec, s in parsed if (s.model, spec.init) == (model, init)),
            key=lambda point: point[0],
        )
        sizes = [size for size, _ in points]
        label = (model or "model") + ("" if init == "prompt" else f" ({init} guess)")
        speed_axis.plot(sizes, [s.speedup_vs_reference_ar or 0 for _, s in points], marker="o", label=label)
        forward_axis.plot(sizes, [s.tokens_per_forward for _, s in points], marker="o", label=label)
    speed_axis.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    speed_axis.set(
        xlabel="Jacobi block size n", ylabel="speedup vs target AR (median, wall clock)", xscale="log", title="speed"
    )
    forward_axis.set(
        xlabel="Jacobi block size n", ylabel="tokens per forward", xscale="log", title="tokens per forward"
    )
    for axis in (speed_axis, forward_axis):
        axis.set_xticks(sorted({spec.block_size for spec, _ in parsed}))
        axis.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_report(out_dir: Path, meta: dict, summaries: Sequence[DecoderSummary], records: Sequence[RunRecord]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "meta": meta,
        "summary": [asdict(s) for s in summaries],
        "runs": [asdict(r) | {"tokens_per_second": r.tokens_per_second} for r in records],
    }
    write_atomically(out_dir / "bench.json", json.dumps(report, indent=2))
    lines = [f"- {key}: {value}" for key, value in meta.items()]
    figure = out_dir / "bench.png"
    if plot_block_sizes(summaries, figure):
        lines.append(f"\n![speedup and tokens per forward vs block size]({figure.name})")
    write_atomically(out_dir / "bench.md", "\n".join(lines) + "\n\n" + markdown_table(summaries) + "\n")
