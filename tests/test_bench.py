"""Benchmark statistics on hand-made run records: pairing with ar, agreement, nothing dropped."""

import pytest

from cllm.bench import DecoderSpec, RunRecord, summarize
from cllm.errors import CllmError


def record(decoder, prompt, seconds, tokens, forwards, repeat=0):
    return RunRecord(decoder=decoder, prompt_index=prompt, repeat=repeat, seconds=seconds,
                     new_tokens=len(tokens), forward_passes=forwards, fast_forward=len(tokens) - forwards,
                     stationary=0, token_ids=tokens)


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
    for bad in ("jacobi:0", "jacobi:x", "ar:2", "beam"):
        with pytest.raises(CllmError):
            DecoderSpec.parse(bad)
