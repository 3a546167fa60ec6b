"""`cllm eval fidelity` and its pieces: a model against itself is perfectly faithful, a perturbed copy
is not, and bad input exits 2 with one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import save_tiny_model, tiny_model

from cllm.cli import main
from cllm.fidelity import compare_outputs, summarize_positions, teacher_forced_positions


def test_compare_outputs_counts_identical_outputs_and_the_shared_prefix():
    result = compare_outputs([[1, 2, 3, 4], [1, 2, 9, 9], [5]], [[1, 2, 3, 4], [1, 2, 3, 4], [6, 7]])
    assert result["identical"] == pytest.approx(1 / 3, abs=1e-5)
    assert result["common_prefix_fraction"] == pytest.approx((1 + 0.5 + 0) / 3, abs=1e-5)


def test_summarize_positions_gives_rates_and_quantiles():
    kl = torch.arange(100, dtype=torch.float64)  # 0..99
    summary = summarize_positions(torch.tensor([True] * 75 + [False] * 25), kl)
    assert summary["positions"] == 100 and summary["same_top1"] == 0.75
    assert summary["kl_mean"] == pytest.approx(49.5) and summary["kl_p90"] == pytest.approx(89.1)
    assert summary["kl_p99"] == pytest.approx(98.01)


def test_teacher_forcing_a_model_against_itself_and_a_perturbed_copy():
    model = tiny_model("llama", seed=1)
    sequences = [([3, 4, 5, 6, 7, 8, 9, 10], 3), ([20, 21, 22, 23, 24], 1)]
    same, kl = teacher_forced_positions(model, model, sequences)
    assert same.numel() == 5 + 4 and bool(same.all()) and kl.abs().max() < 1e-9
    perturbed = tiny_model("llama", seed=1)
    with torch.no_grad():
        for parameter in perturbed.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    same, kl = teacher_forced_positions(perturbed, model, sequences)
    assert not bool(same.all()) and kl.mean() > 0.01


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    target = save_tiny_model(root / "target", seed=4, context=4096)
    perturbed = save_tiny_model(root / "perturbed", seed=4, context=4096)
    weights = load_file(perturbed / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    save_file({name: w + 0.05 * torch.randn(w.shape, generator=generator) for name, w in weights.items()},
              str(perturbed / "model.safetensors"), metadata={"format": "pt"})
    return target, perturbed


def run_fidelity(model, target, out, *extra) -> dict:
    code = main(
        [
            "eval",
            "fidelity",
            "--model",
            str(model),
            "--target",
            str(target),
            "--dataset",
            "gsm8k,humaneval",
            "--limit",
            "2",
            "--max-new-tokens",
            "12",
            "--block-size",
            "4",
            "--init",
            "lookup",
            "--out",
            str(out),
            *extra,
        ]
    )
    assert code == 0
    return json.loads(out.read_text())


def test_eval_fidelity_of_a_model_against_itself_is_perfect_and_a_perturbed_copy_is_not(models, tmp_path):
    target, perturbed = models
    itself = run_fidelity(target, target, tmp_path / "self.json")
    assert set(itself["domains"]) == {"gsm8k", "humaneval"} and itself["in_domain"] == "gsm8k"
    for row in itself["domains"].values():
        assert 2 <= row["positions"] <= 2 * 12  # an output may end early at EOS
        assert (row["same_top1"], row["kl_mean"], row["kl_p99"], row["identical"]) == (1.0, 0.0, 0.0, 1.0)
        assert row["perplexity_ratio"] == 1.0
    assert itself["out_of_domain"]["same_top1"] == 1.0
    cache = json.loads((tmp_path / "fidelity-target-outputs.json").read_text())
    assert sum(len(outputs) for outputs in cache.values()) == 4  # 2 prompts x 2 datasets, decoded once
    other = run_fidelity(perturbed, target, tmp_path / "perturbed.json")
    gsm8k = other["domains"]["gsm8k"]
    assert gsm8k["same_top1"] < 1.0 and gsm8k["kl_mean"] > 0 and gsm8k["perplexity_ratio"] != 1.0
    assert (tmp_path / "perturbed.md").read_text().count("| gsm8k (in domain) |") == 1


def test_eval_fidelity_bad_input_exits_2_with_one_line(models, tmp_path, capsys):
    target, _ = models
    other_tokenizer = save_tiny_model(tmp_path / "other", seed=4)
    config = json.loads((other_tokenizer / "tokenizer.json").read_text())
    vocab = config["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (other_tokenizer / "tokenizer.json").write_text(json.dumps(config))
    cases = [
        (["--model", str(target)], "needs --target"),
        (["--model", str(target), "--target", str(tmp_path / "missing")], "missing"),
        (["--model", str(other_tokenizer), "--target", str(target)], "different tokenizers"),
        (["--model", str(target), "--target", str(target), "--dataset", "gsm8k,gsm8k"], "distinct"),
        (["--model", str(target), "--target", str(target), "--dataset", "nonsense"], "nonsense"),
    ]
    for case, expected in cases:
        capsys.readouterr()
        assert (
            main(
                ["eval", "fidelity", "--limit", "1", "--max-new-tokens", "4", "--out", str(tmp_path / "x.json"), *case]
            )
            == 2
        )
        err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
        assert err.startswith("error:") and "Traceback" not in err and expected in err, case
    assert not (tmp_path / "x.json").exists()
