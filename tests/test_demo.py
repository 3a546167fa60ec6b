"""`cllm demo`: the exact decoders beside AR (identical text), then target vs CLLM (speed and
fidelity side by side) when a CLLM exists."""

from __future__ import annotations

import pytest
from tiny_models import save_tiny_model

from cllm.cli import main


def test_demo_compares_a_cllm_with_its_target(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # the whole table, not rich's squeezed one
    target = save_tiny_model(tmp_path / "target", seed=2, context=4096)
    cllm = save_tiny_model(tmp_path / "cllm", seed=3, context=4096)  # same tokenizer, other weights
    assert (
        main(["demo", "--model", str(target), "--cllm", str(cllm), "--max-new-tokens", "8", "--block-size", "4"]) == 0
    )
    out = " ".join(capsys.readouterr().out.split())
    assert "Fidelity of the CLLM" in out and "same top token" in out and "KL" in out
    assert "jacobi:16:lookup" in out and "same top-1 as target" in out
    assert out.count("identical to AR") == 3 * 3 and "differs" not in out  # 3 prompts x 3 exact peers of AR


def test_demo_refuses_a_cllm_with_another_tokenizer(tmp_path, capsys):
    target = save_tiny_model(tmp_path / "target", seed=2)
    other = save_tiny_model(tmp_path / "other", seed=2)
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text().replace('"a":', '"A_":'))
    assert main(["demo", "--model", str(target), "--cllm", str(other), "--max-new-tokens", "4"]) == 2
    assert "different tokenizers" in " ".join(capsys.readouterr().err.split())


@pytest.mark.slow
def test_demo_finds_the_quick_cllm_in_cllm_home(tmp_path, monkeypatch, capsys):
    from cllm.models import converted_gguf_dir, default_gguf_path, load_model

    load_model("default")  # converts the GGUF into the real cache once
    quick = tmp_path / "home" / "quick" / "cllm"
    quick.parent.mkdir(parents=True)
    quick.symlink_to(converted_gguf_dir(default_gguf_path()))  # the target itself stands in for a CLLM
    monkeypatch.setattr("cllm.cli.recipe.quick_cllm", lambda: quick)  # $CLLM_HOME (the model cache) stays as it is
    assert main(["demo", "--max-new-tokens", "8"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "same top token 100.0%, KL 0.000" in out
    assert out.count("drafted:3:lookup identical to AR") == 3  # the shipped drafter, float32: exact
    assert "float32, oneDNN linear layers" in out  # the demo's default path on a CPU


def test_demo_says_when_speed_comes_from_repetition(tmp_path, capsys, monkeypatch):
    import cllm.bench

    monkeypatch.setattr(cllm.bench, "is_degenerate", lambda tokens, span: True)  # as if every output looped
    target = save_tiny_model(tmp_path / "target", seed=2, context=4096)
    cllm_dir = save_tiny_model(tmp_path / "cllm", seed=3, context=4096)
    assert main(["demo", "--model", str(target), "--cllm", str(cllm_dir), "--max-new-tokens", "8"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "cllm jacobi:16:lookup: 3 of 3 outputs are repetition loops" in out
