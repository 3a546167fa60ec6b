"""`cllm distill` runs the tiny recipe end to end, then skips every finished stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny_models import save_tiny_model

from cllm.cli import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.heavy
def test_tiny_recipe_end_to_end_then_skipped(tmp_path, capsys):
    data = tmp_path / "gsm8k.jsonl"
    rows = [{"question": f"Tom has {a} apples and buys {a}. How many?", "answer": f"{a} + {a} = {2 * a}\n#### {2 * a}"}
            for a in range(1, 6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = yaml.safe_load((RECIPES / "tiny.yaml").read_text())
    recipe["model"] = str(save_tiny_model(tmp_path / "target", eos_token_id=None, context=2048))
    recipe["out"] = str(tmp_path / "run")
    for options in [
        recipe["collect"],
        *recipe["collect_more"].values(),
        recipe["bench"]["gsm8k"],
        *recipe["eval"].values(),
    ]:
        options["path"] = str(data)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))

    assert main(["distill", str(path)]) == 0
    out = tmp_path / "run"
    report = json.loads((out / "report.json").read_text())
    assert report["train"]["global_step"] == 4
    assert (out / "trajectories-more" / "summary-p000of001.json").is_file()
    config = json.loads((out / "cllm" / "train_summary.json").read_text())["config"]
    assert config["trajectories"] == f"{out / 'trajectories'},{out / 'trajectories-more'}" and config["teacher"]
    rows = {(r["model"], r["decoder"]) for r in report["bench"]["gsm8k"]}
    assert rows == {(m, d) for m in ("target", "cllm") for d in ("ar", "jacobi:2", "jacobi:4")}
    assert all(r["agreement_with_ar"] == 1.0 for r in report["bench"]["gsm8k"])  # float32 tiny model: exact
    assert set(report["eval"]) == {"gsm8k-target", "gsm8k-cllm", "perplexity-target", "perplexity-cllm", "fidelity"}
    assert 0 <= report["eval"]["fidelity"]["gsm8k"]["same_top1"] < 1  # 4 steps at lr 1e-3 move a tiny model
    for row in report["bench"]["gsm8k"]:  # no speed without its fidelity
        assert row["same_top1_vs_target"] == 1.0 if row["model"] == "target" else row["same_top1_vs_target"] < 1.0
        assert row["identical_to_target"] is not None and row["kl_vs_target"] is not None
    assert report["eval"]["gsm8k-cllm"]["n"] == 3
    assert (out / "bench" / "gsm8k" / "bench.png").is_file() and (out / "report.md").is_file()
    facts = json.loads((out / "cllm" / "config.json").read_text())["cllm"]  # the directory says what made it
    assert facts["recipe"] == str(path)
    measured = report["eval"]["fidelity"]["gsm8k"]["same_top1"]
    assert facts["fidelity"]["domains"]["gsm8k"]["same_top1"] == measured
    assert f"| gsm8k | 2 | {measured:.1%} |" in (out / "cllm" / "README.md").read_text()
    capsys.readouterr()

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name != "report.json"}
    assert main(["distill", str(path)]) == 0
    err = capsys.readouterr().err
    assert "train: done" in err and "skipped" in err
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}  # nothing recomputed


def test_bad_recipes_are_clear_errors(tmp_path, capsys):
    assert main(["distill", str(tmp_path / "missing.yaml")]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("out: x\ntrian: {}\n")
    assert main(["distill", str(bad)]) == 2
    assert "unknown keys trian" in capsys.readouterr().err


def test_a_failing_stage_stops_distill_with_a_clear_error(tmp_path, capfd):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"out": str(tmp_path / "run"), "model": str(save_tiny_model(tmp_path / "m")),
                                      "collect": {"dataset": "gsm8k", "path": str(tmp_path / "missing.jsonl")}}))
    assert main(["distill", str(recipe)]) == 2
    err = capfd.readouterr().err
    assert "missing.jsonl" in err and "stage failed (exit status 2): cllm collect" in err
    assert not (tmp_path / "run" / "cllm").exists()


def test_a_stage_dtype_overrides_the_recipe_dtype(tmp_path):
    from cllm.distill import run_distill

    recipe = {"out": str(tmp_path / "run"), "dtype": "float32", "train": {"max_steps": 1},
              "bench": {"fp32": {"limit": 1}, "bf16": {"limit": 1, "dtype": "bfloat16"}}}
    (tmp_path / "run").mkdir()
    calls: list[list[str]] = []
    run_distill(recipe, calls.append, lambda message: None)

    def dtype_of(argv: list[str]) -> str:
        last = max(i for i, flag in enumerate(argv) if flag == "--dtype")  # argparse keeps the last
        return argv[last + 1]

    by_stage = {(argv[0], argv[argv.index("--out") + 1]): dtype_of(argv) for argv in calls}
    assert by_stage[("bench", str(tmp_path / "run" / "bench" / "bf16"))] == "bfloat16"
    assert by_stage[("bench", str(tmp_path / "run" / "bench" / "fp32"))] == "float32"
    assert by_stage[("train", str(tmp_path / "run" / "cllm"))] == "float32"


def test_a_bench_or_eval_runs_again_when_the_recipe_changes_its_command(tmp_path):
    from cllm.distill import command_line, run_distill

    out = tmp_path / "run"
    (out / "cllm").mkdir(parents=True)
    (out / "cllm" / "train_summary.json").write_text("{}")
    calls: list[list[str]] = []

    def fake_run(argv: list[str]) -> None:
        calls.append(argv)
        if argv[0] in ("bench", "eval"):
            target = Path(argv[argv.index("--out") + 1])
            report = target / "bench.json" if argv[0] == "bench" else target
            report.parent.mkdir(parents=True, exist_ok=True)
            command = command_line(argv)  # what the real commands record in their reports
            report.write_text(
                json.dumps(
                    {"summary": [], "meta": {"command": command}} if argv[0] == "bench" else {"command": command}
                )
            )

    def stages(recipe: dict) -> list[str]:
        calls.clear()
        run_distill(recipe, fake_run, lambda message: None)
        return [argv[0] for argv in calls if argv[0] != "collect"]  # collect is never complete here

    recipe = {"out": str(out), "bench": {"b": {"limit": 1}}, "eval": {"perplexity": {"limit": 1}}}
    assert stages(recipe) == ["bench", "eval", "eval"]
    assert stages(recipe) == []
    recipe["bench"]["b"]["limit"] = 2
    assert stages(recipe) == ["bench"]


def test_a_drafter_recipe_benches_and_evaluates_the_target_with_its_drafter(tmp_path):
    from cllm.distill import run_distill

    out = tmp_path / "run"
    recipe = {"out": str(out), "train": {"lora": True, "adapter_only": True},
              "bench": {"gsm8k": {"decoders": "ar,drafted:16", "model": "lossy"}},
              "eval": {"fidelity": {}, "gsm8k": {"decoder": "jacobi"}}}
    out.mkdir()
    calls: list[list[str]] = []
    said: list[str] = []
    run_distill(recipe, calls.append, said.append)
    bench, = [argv for argv in calls if argv[0] == "bench"]
    assert bench[:6] == ["bench", "--model", "default", "--drafter", str(out / "cllm"), "--out"]
    assert bench[bench.index("--decoders") :][:2] == ["--decoders", "ar,drafted:16"] and "lossy" in bench
    evals = [argv for argv in calls if argv[0] == "eval"]
    assert [argv[1] for argv in evals] == ["gsm8k"] and "--drafter" in evals[0]
    assert any("a drafter's outputs are the target's own" in line for line in said)


def test_recipes_ship_in_the_package_and_are_found_by_name(capsys):
    """`cllm distill quick` works from a wheel: the recipes live in the package (recipes/ links there)."""
    from cllm.distill import SHIPPED, resolve_recipe

    assert main(["distill", "--list"]) == 0
    listing = capsys.readouterr().out
    assert listing.startswith("drafter-d1 ") and "\nquick " in listing and str(SHIPPED) in listing
    assert resolve_recipe("quick") == SHIPPED / "quick.yaml" == resolve_recipe("quick.yaml")
    assert (Path(__file__).parents[1] / "recipes").resolve() == SHIPPED.resolve()
    assert main(["distill"]) == 2 and "or --list" in capsys.readouterr().err


def test_a_larger_collect_limit_extends_a_finished_collection(tmp_path):
    from cllm.distill import _collection_complete

    collection = tmp_path / "trajectories"
    collection.mkdir()
    (collection / "cllm_manifest.json").write_text(json.dumps({"format": "cllm-trajectories", "config": {"limit": 64}}))
    (collection / "summary-p000of001.json").write_text(
        json.dumps({"prompts_total": 64, "prompts_collected": 60, "prompts_resumed": 4}))
    assert _collection_complete(collection, 64)
    assert not _collection_complete(collection, 128)  # the recipe now asks for more prompts: collect resumes
    assert not _collection_complete(collection, None)  # no limit: the whole dataset
    assert not _collection_complete(tmp_path / "missing", 64)


def test_every_shipped_recipe_passes_only_flags_its_commands_take(tmp_path):
    """A misspelt key in a recipe would fail minutes into `cllm distill`; here every stage's command
    line of every shipped recipe parses."""
    from cllm.cli import build_parser
    from cllm.distill import SHIPPED, run_distill

    parser = build_parser()
    for path in sorted(SHIPPED.glob("*.yaml")):
        recipe = yaml.safe_load(path.read_text()) | {"out": str(tmp_path / path.stem)}
        calls: list[list[str]] = []
        run_distill(recipe, calls.append, lambda message: None)
        assert calls, path
        for argv in calls:
            parser.parse_args(argv)  # CllmError names the flag and the command
