"""Benchmark statistics on hand-made run records: pairing with ar, agreement, nothing dropped."""

import pytest

from cllm.bench import RunRecord, summarize
from cllm.cli.common import short_names
from cllm.decoding import INIT_STRATEGIES, DecoderSpec
from cllm.errors import CllmError


def record(decoder, prompt, seconds, tokens, forwards, repeat=0, model=""):
    return RunRecord(decoder=decoder, prompt_index=prompt, repeat=repeat, seconds=seconds,
                     new_tokens=len(tokens), forward_passes=forwards, fast_forward=len(tokens) - forwards,
                     stationary=0, token_ids=tokens, model=model)


def test_summary_pairs_runs_with_ar_on_the_same_prompt():
    records = [
        record("ar", 0, 1.0, [1, 2, 3, 4], 4),
        record("ar", 1, 2.0, [5, 6], 2),
        record("jacobi:4", 0, 0.5, [1, 2, 3, 4], 2),  # 2x faster, identical
        record("jacobi:4", 1, 4.0, [5, 7], 2),  # 2x slower, differs at token 1
    ]
    by_name = {s.decoder: s for s in summarize(records)}
    jacobi = by_name["jacobi:4"]
    assert jacobi.speedup_vs_ar == pytest.approx((2.0 + 0.5) / 2)
    assert jacobi.agreement_with_ar == 0.5
    assert jacobi.common_prefix_with_ar == pytest.approx((4 + 1) / 2)
    assert jacobi.tokens_per_forward == pytest.approx(6 / 4)
    assert jacobi.median_tokens_per_second == pytest.approx((8.0 + 0.5) / 2)
    assert by_name["ar"].speedup_vs_ar == 1.0 and by_name["ar"].agreement_with_ar == 1.0


def test_decoder_spec_parsing():
    assert DecoderSpec.parse("jacobi:8") == DecoderSpec("jacobi", 8)
    assert DecoderSpec.parse("jacobi").block_size == 16
    assert DecoderSpec.parse("hf").label == "hf"
    assert DecoderSpec.parse("jacobi:8:lookup") == DecoderSpec("jacobi", 8, "lookup")
    assert DecoderSpec.parse("jacobi:8:lookup").label == "jacobi:8:lookup"
    assert DecoderSpec.parse("jacobi:8:prompt").label == "jacobi:8"
    assert INIT_STRATEGIES == ("prompt", "repeat", "pad", "lookup")
    assert DecoderSpec.parse("lookahead").decoder_kwargs() == {"window": 5, "ngram": 4, "candidates": 5, "draft": 0}
    assert DecoderSpec.parse("jacobi:16").decoder_kwargs() == {"block_size": 16, "init": "prompt"}
    assert DecoderSpec.parse("jacobi:16:lookup:3").decoder_kwargs() == {
        "block_size": 16,
        "init": "lookup",
        "candidates": 3,
        "ngram": 4,
    }
    assert DecoderSpec.parse("jacobi:16:prompt:3").label == "jacobi:16:prompt:3"
    assert DecoderSpec.parse("lookahead:7:3:2").decoder_kwargs() == {
        "window": 7,
        "ngram": 3,
        "candidates": 2,
        "draft": 0,
    }
    assert DecoderSpec.parse("lookahead:7:3:2").label == "lookahead:7:3:2"
    assert DecoderSpec.parse("lookahead:7:3:2:9").decoder_kwargs()["draft"] == 9
    assert DecoderSpec.parse("lookahead:7:3:2:9").label == "lookahead:7:3:2:9"
    assert DecoderSpec.parse("hf-pld").label == "hf-pld:10" and DecoderSpec.parse("hf-pld:4").lookup_tokens == 4
    assert DecoderSpec.parse("hf-assisted").decoder_kwargs() == {}
    for bad in (
        "jacobi:0",
        "jacobi:x",
        "ar:2",
        "beam",
        "jacobi:8:zeros",
        "jacobi:8:lookup:1:2",
        "jacobi:8:lookup:0",
        "lookahead:5",
        "lookahead:5:1:5",
        "lookahead:5:4:5:0",
        "lookahead:5:4:5:1:2",
        "lookahead:0:4:5",
        "hf-pld:0",
        "hf-pld:1:2",
        "hf-assisted:3",
    ):
        with pytest.raises(CllmError):
            DecoderSpec.parse(bad)


def test_two_models_compare_against_the_target_ar_and_count_degenerate_runs(tmp_path):
    from cllm.bench import markdown_table, write_report

    loop = [7, 8] * 20  # a 40-token repetition: degenerate
    records = [
        record("ar", 0, 1.0, [1, 2, 3, 4], 4, model="target"),
        record("jacobi:4", 0, 1.0, [1, 2, 3, 4], 4, model="target"),
        record("ar", 0, 1.0, [1, 2, 3, 9], 4, model="cllm"),
        record("jacobi:4", 0, 0.25, [1, 2, 3, 9], 1, model="cllm"),
        record("ar", 1, 10.0, loop, 40, model="target"),
        record("jacobi:4", 1, 10.0, loop, 40, model="target"),
        record("ar", 1, 5.0, loop, 40, model="cllm"),
        record("jacobi:4", 1, 2.5, loop, 10, model="cllm"),
    ]
    summaries = {(s.model, s.decoder): s for s in summarize(records)}
    cllm = summaries["cllm", "jacobi:4"]
    assert cllm.speedup_vs_ar == pytest.approx((4.0 + 2.0) / 2)  # vs the CLLM's own ar
    assert cllm.speedup_vs_reference_ar == pytest.approx((4.0 + 4.0) / 2)  # vs the target's ar
    assert cllm.tokens_per_forward == pytest.approx(44 / 11)
    assert cllm.degenerate_runs == 1 and cllm.runs == 2  # counted, not dropped
    assert summaries["target", "ar"].speedup_vs_reference_ar == 1.0
    table = markdown_table(list(summaries.values()))
    assert "speedup vs target ar" in table and "| cllm | jacobi:4 |" in table
    write_report(tmp_path, {"command": "test"}, list(summaries.values()), records)
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert "bench.png" in (tmp_path / "bench.md").read_text()


def test_models_with_the_same_directory_name_get_distinct_labels():
    assert short_names(["default", "runs/a5/cllm", "runs/a8/cllm"]) == ["default", "a5/cllm", "a8/cllm"]
    assert short_names(["default", "runs/a8/cllm/"]) == ["default", "cllm"]
    assert short_names(["x/run/cllm", "y/run/cllm"]) == ["x/run/cllm", "y/run/cllm"]


def test_llamacpp_reference_row_on_the_default_model(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional extra")
    import json

    from cllm.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "--model", "default", "--decoders", "ar,llamacpp", "--limit", "2", "--max-new-tokens", "24",
                 "--out", str(out)]) == 0
    rows = {row["decoder"]: row for row in json.loads((out / "bench.json").read_text())["summary"]}
    assert rows["llamacpp"]["tokens_per_forward"] == 1.0 and rows["llamacpp"]["mean_new_tokens"] > 0
    assert 0 <= rows["llamacpp"]["agreement_with_ar"] <= 1  # Q4_1 kernels vs the dequantized weights: reported
