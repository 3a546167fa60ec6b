"""The real default model (SmolLM2-135M-Instruct, float32): loading, chat template, Jacobi and
lookahead == AR."""

from __future__ import annotations

import pytest
import torch

from cllm.decoding import ar, jacobi, left_pad, lookahead
from cllm.models import converted_gguf_dir, default_gguf_path, load_model
from cllm.prompts import BUILTIN_PROMPTS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loaded():
    return load_model("default")


def test_default_model_is_converted_once_into_the_cache(loaded):
    cached = converted_gguf_dir(default_gguf_path())
    assert loaded.source == str(cached)
    assert (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file()
    assert loaded.model.dtype == torch.float32
    assert loaded.context_length == 8192


def test_chat_template_is_applied_unless_raw(loaded):
    templated = loaded.tokenizer.decode(loaded.encode_prompt("What is 2+2?"))
    assert templated.startswith("<|im_start|>system") and templated.endswith("<|im_start|>assistant\n")
    assert loaded.tokenizer.decode(loaded.encode_prompt("What is 2+2?", raw=True)) == "What is 2+2?"
    assert loaded.eos_token_ids == [loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_jacobi_equals_ar_on_ten_prompts_at_128_tokens(loaded):
    prompts = [loaded.encode_prompt(p) for p in BUILTIN_PROMPTS]
    kwargs = dict(max_new_tokens=128, eos_token_id=loaded.eos_token_ids, pad_token_id=loaded.pad_token_id)
    input_ids, attention_mask = left_pad(prompts, loaded.pad_token_id)
    expected = ar(loaded.model, input_ids, attention_mask, **kwargs).token_ids
    assert sum(len(t) for t in expected) > 600  # mostly long answers, several cut at 128
    for prompt, reference in zip(prompts, expected):
        got = jacobi(loaded.model, torch.tensor([prompt]), block_size=16, **kwargs)
        assert got.token_ids[0] == reference
        assert got.stats[0].forward_passes <= len(reference)
    # lookup guesses rewrite iterates mid-block; batched, so rows refresh at different iterations
    assert jacobi(loaded.model, input_ids, attention_mask, block_size=16, init="lookup", **kwargs).token_ids == expected


def test_lookahead_and_multi_candidate_jacobi_equal_ar_on_ten_prompts(loaded):
    prompts = [loaded.encode_prompt(p) for p in BUILTIN_PROMPTS]
    kwargs = dict(max_new_tokens=128, eos_token_id=loaded.eos_token_ids, pad_token_id=loaded.pad_token_id)
    input_ids, attention_mask = left_pad(prompts, loaded.pad_token_id)
    expected = ar(loaded.model, input_ids, attention_mask, **kwargs).token_ids
    batched = lookahead(loaded.model, input_ids, attention_mask, window=3, ngram=3, candidates=3, **kwargs)
    assert batched.token_ids == expected
    single = lookahead(loaded.model, torch.tensor([prompts[0]]), **kwargs)  # the defaults, 5:4:5
    assert single.token_ids[0] == expected[0]
    with_candidates = jacobi(loaded.model, input_ids, attention_mask, block_size=16, candidates=3, **kwargs)
    assert with_candidates.token_ids == expected
    assert sum(s.new_tokens for s in batched.stats) > 1.2 * sum(s.forward_passes for s in batched.stats)
