"""`cllm distill RECIPE.yaml`: collect -> train -> bench -> eval for one target model, resumable.

A recipe names the target model and, per stage, the flags of the matching `cllm` command
(`block_size: 16` becomes `--block-size 16`, `augment: true` becomes `--augment`); a stage's own
`dtype`/`device`/`threads` override the recipe-wide ones (argparse keeps the last). Every stage
writes into the recipe's `out` directory and is skipped when its output is complete; collection
and training resume from where an interrupted run stopped. A bench or eval report records the
command that made it: when the recipe asks for another command, the stage runs again instead of
reporting numbers made with other settings. Each stage runs in its own process (`cllm ...`), so
a bench never times decoding inside a process that has just trained. The final report
(report.md, report.json) puts target and CLLM side by side. A recipe whose training has
`adapter_only: true` makes a drafter: its benches and evals run the target with `--drafter`
(a bench's own `model:` adds a lossy CLLM beside it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from cllm.errors import CllmError
from cllm.files import read_text, write_atomically

STAGES = ("collect", "train", "bench", "eval")
SHIPPED = Path(__file__).parent / "recipes"  # in the package, so `cllm distill quick` works from a wheel


def shipped_recipes() -> dict[str, str]:
    """name -> the first line of its comment, for every recipe that ships with cllm."""
    def summary(path: Path) -> str:
        first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "# (no comment)")
        return first.lstrip("# ").strip()

    return {path.stem: summary(path) for path in sorted(SHIPPED.glob("*.yaml"))}


def resolve_recipe(name: str) -> Path:
    """A recipe file, or the name of a shipped one (`quick`, `drafter-g1`, ...)."""
    path = Path(name)
    if path.is_file():
        return path
    if path.is_dir():
        raise CllmError(f"{name} is a directory, not a recipe file")
    shipped = SHIPPED / f"{name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    raise CllmError(f"recipe not found: {name} is neither a file nor a shipped recipe ({', '.join(shipped_recipes())}; "
                    "`cllm distill --list` says what each does)")


def load_recipe(path: Path) -> dict:
    import yaml

    text = read_text(path, "recipe")
    try:
        recipe = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CllmError(f"{path}: not valid YAML{where} ({problem})") from None
    if not isinstance(recipe, dict) or "out" not in recipe:
        raise CllmError(f"{path}: a recipe is a mapping with at least 'out' (see `cllm distill --list`)")
    from cllm.paths import cllm_home

    recipe["out"] = str(recipe["out"]).replace("{cllm_home}", str(cllm_home()))  # the quick recipe writes there
    unknown = set(recipe) - {"out", "model", "dtype", "device", "threads", "collect_more", *STAGES}
    if unknown:
        raise CllmError(f"{path}: unknown keys {', '.join(sorted(unknown))}")
    for stage in (*STAGES, "collect_more"):
        if not isinstance(recipe.get(stage, {}), dict):
            raise CllmError(f"{path}: '{stage}' must be a mapping of flags")
    for name, options in (recipe.get("collect_more") or {}).items():
        if not isinstance(options, dict):
            raise CllmError(f"{path}: collect_more.{name} must be a mapping of collect flags")
    return recipe


def flags(options: dict) -> list[str]:
    """{'block_size': 16, 'augment': True, 'raw': False} -> ['--block-size', '16', '--augment']."""
    result = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            result.append(flag)
        elif value is not False and value is not None:
            result += [flag, str(value)]
    return result


def run_distill(recipe: dict, run: Callable[[list[str]], None], say: Callable[[str], None],
                source: str | None = None) -> dict:
    """Runs the missing stages through `run(argv)` (the cllm command line) and returns the report.
    `source`: the recipe's file, which a CLLM's model card then names."""
    out = Path(recipe["out"])
    target = str(recipe.get("model", "default"))
    cllm = out / "cllm"
    common = flags({k: recipe[k] for k in ("dtype", "device", "threads") if k in recipe})

    collections = {"trajectories": recipe.get("collect", {})}
    collections |= {f"trajectories-{name}": options for name, options in (recipe.get("collect_more") or {}).items()}
    for directory, options in collections.items():
        trajectories = out / directory
        if _collection_complete(trajectories, options.get("limit")):
            say(f"collect: done ({trajectories}), skipped")
        else:
            run(["collect", "--model", target, "--out", str(trajectories), *common, *flags(options)])

    if (cllm / "train_summary.json").is_file():
        say(f"train: done ({cllm}), skipped")
    else:
        mix = [arg for directory in collections for arg in ("--trajectories", str(out / directory))]
        run(
            ["train", "--model", target, *mix, "--out", str(cllm), "--resume", *common, *flags(recipe.get("train", {}))]
        )

    drafter = bool((recipe.get("train") or {}).get("adapter_only"))  # the output drafts for the target
    made = ["--drafter", str(cllm)] if drafter else ["--model", str(cllm)]
    for name, options in (recipe.get("bench") or {}).items():
        report = out / "bench" / name / "bench.json"
        argv = ["bench", "--model", target, *made, "--out", str(report.parent), *common, *flags(options)]
        _run_unless_done(f"bench {name}", report, argv, run, say)

    for task, options in (recipe.get("eval") or {}).items():
        if drafter and task == "fidelity":
            say("eval fidelity: skipped, a drafter's outputs are the target's own")
            continue
        if drafter:
            report = out / "eval" / f"{task}-drafted.json"
            argv = ["eval", task, "--model", target, *made, "--out", str(report), *common, *flags(options)]
            _run_unless_done(f"eval {task} drafted", report, argv, run, say)
            continue
        if task == "fidelity":  # of the CLLM to the target
            report = out / "eval" / "fidelity.json"
            argv = [
                "eval",
                "fidelity",
                "--model",
                str(cllm),
                "--target",
                target,
                "--out",
                str(report),
                *common,
                *flags(options),
            ]
            _run_unless_done("eval fidelity", report, argv, run, say)
            continue
        for label, model in (("target", target), ("cllm", str(cllm))):
            report = out / "eval" / f"{task}-{label}.json"
            argv = ["eval", task, "--model", model, "--out", str(report), *common, *flags(options)]
            _run_unless_done(f"eval {task} {label}", report, argv, run, say)
    if source is not None:
        from cllm.card import record

        record(cllm, recipe=source)
    return write_report(out)


def command_line(argv: list[str]) -> str:
    """How a report records the `cllm` command that made it (compared when deciding to skip a stage)."""
    return "cllm " + " ".join(argv)


def _run_unless_done(
    stage: str, report: Path, argv: list[str], run: Callable[[list[str]], None], say: Callable[[str], None]
) -> None:
    wanted = command_line(argv)
    if report.is_file():
        made_by = _recorded_command(report)
        if made_by == wanted:
            say(f"{stage}: done, skipped")
            return
        say(f"{stage}: {report} was made by another command ({made_by}), running it again")
    run(argv)


def _recorded_command(report: Path) -> str | None:
    try:
        data = json.loads(report.read_text())
    except ValueError:
        return None
    return data.get("command") or data.get("meta", {}).get("command")


def _collection_complete(trajectories: Path, limit: int | None) -> bool:
    """True when every shard's summary says all its prompts are in (collect writes it at the end)
    and the collection was made with this `limit`: a recipe that asks for more prompts extends it."""
    summaries = list(trajectories.glob("summary-p*.json"))
    manifest = trajectories / "cllm_manifest.json"
    if not summaries or not manifest.is_file() or json.loads(manifest.read_text())["config"].get("limit") != limit:
        return False
    shards = int(summaries[0].stem.split("of")[-1])
    done = [json.loads(p.read_text()) for p in summaries]
    return len(done) == shards and all(
        d["prompts_collected"] + d["prompts_resumed"] == d["prompts_total"] for d in done
    )


def write_report(out: Path) -> dict:
    """report.json and report.md from the stage outputs found under `out`."""
    from cllm.bench import format_ratio

    report: dict = {"out": str(out)}
    summary = out / "cllm" / "train_summary.json"
    if summary.is_file():
        train = json.loads(summary.read_text())
        report["train"] = {
            k: train[k] for k in ("global_step", "seconds", "tokens_this_process", "train_loss") if k in train
        }
    report["bench"] = {}
    for path in sorted((out / "bench").glob("*/bench.json")):
        bench = json.loads(path.read_text())
        report["bench"][path.parent.name] = [
            {
                k: row.get(k)
                for k in (
                    "model",
                    "decoder",
                    "median_tokens_per_second",
                    "speedup_vs_ar",
                    "speedup_vs_reference_ar",
                    "tokens_per_forward",
                    "identical_to_target",
                    "same_top1_vs_target",
                    "kl_vs_target",
                    "agreement_with_ar",
                    "degenerate_runs",
                    "runs",
                )
            }
            for row in bench["summary"]
        ]
    report["eval"] = {}
    for path in sorted((out / "eval").glob("*.json")):
        result = json.loads(path.read_text())
        if "task" not in result:  # not a report: the fidelity cache of the target's outputs
            continue
        headline = {k: result[k] for k in ("n", "accuracy", "pass@1", "perplexity", "questions") if k in result}
        if result.get("task") == "fidelity":
            headline = {domain: {k: row.get(k) for k in ("same_top1", "kl_mean", "identical", "perplexity_ratio")}
                        for domain, row in result["domains"].items()} | {"out_of_domain": result.get("out_of_domain")}
        if "decoding" in result:
            headline["tokens_per_forward"] = result["decoding"]["tokens_per_forward"]
        report["eval"][path.stem] = headline
    write_atomically(out / "report.json", json.dumps(report, indent=2))
    lines = [f"# cllm distill report: {out}", ""]
    if "train" in report:
        lines.append(f"Training: {report['train']}\n")
    for name, rows in report["bench"].items():
        lines += [
            f"## bench {name}",
            "",
            "| model | decoder | median tok/s | vs own ar | vs target ar | tokens/forward "
            "| identical to target | same top-1 as target | KL to target | identical to ar | degenerate |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            def cell(key: str, form: str) -> str:
                return "-" if row.get(key) is None else format(row[key], form)

            lines.append(
                f"| {row['model']} | {row['decoder']} | {row['median_tokens_per_second']:.1f} "
                f"| {format_ratio(row['speedup_vs_ar'])} "
                f"| {format_ratio(row['speedup_vs_reference_ar'])} | {row['tokens_per_forward']:.3f} "
                f"| {cell('identical_to_target', '.0%')} | {cell('same_top1_vs_target', '.1%')} "
                f"| {cell('kl_vs_target', '.3f')} "
                f"| {cell('agreement_with_ar', '.0%')} | {row['degenerate_runs']}/{row['runs']} |"
            )
        lines.append("")
    if report["eval"]:
        lines += ["## eval", "", "| task-model | result |", "|---|---|"]
        lines += [f"| {name} | {values} |" for name, values in report["eval"].items()]
    write_atomically(out / "report.md", "\n".join(lines) + "\n")
    return report
