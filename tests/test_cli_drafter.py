"""`--drafter` on the command line: a saved LoRA adapter or a full model drafts, the output stays the
model's; a drafter that cannot be used is one line and exit 2."""

from __future__ import annotations

import json

import pytest
from tiny_models import save_tiny_adapter, save_tiny_model

from cllm.cli import main
from cllm.models import ModelConfig, load_model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("drafter")
    target = save_tiny_model(root / "target", eos_token_id=None)
    save_tiny_adapter(target, root / "adapter", seed=5)
    corrupt = save_tiny_adapter(target, root / "corrupt", seed=5)
    weights = next(corrupt.glob("adapter_model.*"))
    weights.write_bytes(weights.read_bytes()[:100])
    bad_kind = save_tiny_adapter(target, root / "bad-kind", seed=5)
    (bad_kind / "drafter.json").write_text('{"kind": "columns"}')
    other = save_tiny_model(root / "other-tokenizer", eos_token_id=None)
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text().replace('"<eos>"', '"<end>"'))
    return {"target": str(target), "adapter": str(root / "adapter"), "corrupt": str(corrupt),
            "model": str(save_tiny_model(root / "full", seed=3, eos_token_id=None)), "other": str(other),
            "root": str(root), "bad-kind": str(bad_kind)}


def _generate(capsys, *args: str) -> list[dict]:
    assert main(["generate", *args, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("drafter", ["adapter", "model"])
def test_drafted_generate_equals_ar(dirs, drafter, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Hello there", "abc", "x y z 1 2 3")))
    common = ["--file", str(prompts), "--model", dirs["target"], "--max-new-tokens", "30", "--dtype", "float32"]
    for sampled in ([], ["--temperature", "0.9", "--seed", "4"]):
        expected = [r["token_ids"] for r in _generate(capsys, *common, *sampled, "--decoder", "ar")]
        records = _generate(capsys, *common, *sampled, "--decoder", "jacobi", "--block-size", "6",
                            "--drafter", dirs[drafter], "--batch-size", "2")
        assert [r["token_ids"] for r in records] == expected
        assert all(r["decoder"] == "drafted:6" and r["drafter"] == dirs[drafter] for r in records)


def test_an_adapter_drafter_shares_the_target_s_weights(dirs):
    """A loaded adapter adds only its own weights: the base ones are the target's tensors."""
    from cllm.drafters import load_drafter

    target = load_model(ModelConfig(dirs["target"]))
    drafter = load_drafter(dirs["adapter"], target)
    lora = [p for name, p in drafter.model.named_parameters() if "lora_" in name]
    assert lora and sum(p.numel() for p in lora) < 0.5 * sum(p.numel() for p in target.model.parameters())
    shared = {p.data_ptr() for p in target.model.parameters()}
    assert all(p.data_ptr() in shared for name, p in drafter.model.named_parameters() if "lora_" not in name)


@pytest.mark.parametrize(
    "name, extra, message",
    [
        ("missing", [], "drafter not found"),
        ("corrupt", [], "cannot load the adapter"),
        ("other", [], "another tokenizer"),
        ("root", [], "neither a PEFT adapter"),
        ("default", [], "drafts for the default model"),
        ("bad-kind", [], "unknown drafter kind"),
        ("adapter", ["--decoder", "ar"], "--drafter drafts the guesses of --decoder jacobi"),
        ("adapter", ["--candidates", "2"], "drop --candidates"),
    ],
)
def test_a_bad_drafter_is_one_line_and_exit_2(dirs, name, extra, message, capsys):
    path = {"default": "default"}.get(name) or dirs.get(name, "/does/not/exist")
    assert main(["generate", "hi", "--model", dirs["target"], "--drafter", path, *extra]) == 2
    stderr = capsys.readouterr().err
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_bench_runs_drafted_rows_for_the_first_model_only(dirs, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--model", dirs["target"], "--model", dirs["model"], "--decoders", "ar,drafted:4",
                 "--drafter", dirs["adapter"], "--limit", "2", "--max-new-tokens", "12", "--out", str(out)]) == 0
    rows = json.loads((out / "bench.json").read_text())["summary"]
    drafted = [r for r in rows if r["decoder"] == "drafted:4"]
    assert len(drafted) == 1 and drafted[0]["agreement_with_ar"] == 1.0
    assert main(["bench", "--model", dirs["target"], "--decoders", "ar,drafted:4", "--out", str(out)]) == 2
    assert "--drafter goes with drafted" in capsys.readouterr().err


def test_the_shipped_drafter_is_small_and_gated():
    """`--drafter default` needs no training: the default model's adapter is inside the package
    (its use on the real model: test_default_model_sampled.py)."""
    from cllm.drafters import SHIPPED, drafter_kind

    files = {path.name: path.stat().st_size for path in SHIPPED.iterdir()}
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    assert sum(files.values()) <= 10 * 2**20, files
    assert drafter_kind(SHIPPED) == "gated"
