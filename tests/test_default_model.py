"""The real default model (SmolLM2-135M-Instruct, float32): loading, chat template, Jacobi,
lookahead and drafted Jacobi == AR, greedy (sampled: test_default_model_sampled.py)."""

from __future__ import annotations

import pytest
import torch

from cllm.data import SourceOptions, load_prompts
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


@pytest.fixture(scope="module")
def twenty_prompts(loaded) -> list[list[int]]:
    """The ten built-in prompts and the first ten GSM8K test questions."""
    questions = load_prompts("gsm8k", SourceOptions(split="test"), limit=10)
    return [loaded.encode_prompt(p) for p in BUILTIN_PROMPTS] + [loaded.encode_prompt(q.text) for q in questions]


def greedy_settings(loaded) -> dict:
    return dict(max_new_tokens=128, eos_token_id=loaded.eos_token_ids, pad_token_id=loaded.pad_token_id)


@pytest.fixture(scope="module")
def greedy(loaded, twenty_prompts) -> list[list[int]]:
    """Batched greedy AR, the reference every greedy test compares with: the built-in prompts at
    128 tokens, the GSM8K ones at the 48 their tests read."""
    settings = greedy_settings(loaded)
    chat, gsm8k = (left_pad(part, loaded.pad_token_id) for part in (twenty_prompts[:10], twenty_prompts[10:]))
    return ar(loaded.model, *chat, **settings).token_ids + ar(loaded.model, *gsm8k, **settings | {
        "max_new_tokens": 48}).token_ids


def test_jacobi_equals_ar_on_ten_prompts_at_128_tokens(loaded, twenty_prompts, greedy):
    input_ids, attention_mask = left_pad(twenty_prompts[:10], loaded.pad_token_id)
    expected = greedy[:10]
    assert sum(len(t) for t in expected) > 600  # mostly long answers, several cut at 128
    plain = jacobi(loaded.model, input_ids, attention_mask, block_size=16, **greedy_settings(loaded))
    assert plain.token_ids == expected
    assert all(stats.forward_passes <= len(reference) for stats, reference in zip(plain.stats, expected))
    # lookup guesses rewrite iterates mid-block; batched, so rows refresh at different iterations
    # (blocks of 8: a float32 forward costs its columns)
    with_lookup = jacobi(loaded.model, input_ids, attention_mask, block_size=8, init="lookup",
                         **greedy_settings(loaded))
    assert with_lookup.token_ids == expected


def test_lookahead_multi_candidate_and_drafted_jacobi_equal_ar_on_twenty_prompts(loaded, twenty_prompts, greedy):
    """Batched on ten prompts each (the twenty between them), their first 48 tokens (a prefix of the
    128-token reference): lookahead 2:3:2 with a draft of 6 (every part of its step: a two-level
    window, candidates, a draft), 8-token Jacobi blocks with 2 candidates, and drafted Jacobi with a
    random LoRA drafter (it drafts badly: only slower); lookahead's defaults (5:4:5, no draft) on
    one prompt at 64. Narrow steps and 48 tokens: a float32 batch costs its columns."""
    from tiny_models import tiny_adapter

    from cllm.decoding.jacobi import drafted

    settings = greedy_settings(loaded) | {"max_new_tokens": 48}
    first_48 = [tokens[:48] for tokens in greedy]
    chat, gsm8k = left_pad(twenty_prompts[:10], loaded.pad_token_id), left_pad(twenty_prompts[10:], loaded.pad_token_id)
    looked = lookahead(loaded.model, *gsm8k, window=2, ngram=3, candidates=2, draft=6, **settings)
    assert looked.token_ids == first_48[10:]
    assert sum(s.new_tokens for s in looked.stats) > 1.2 * sum(s.forward_passes for s in looked.stats)
    single = lookahead(loaded.model, torch.tensor([twenty_prompts[0]]), **settings | {"max_new_tokens": 64})
    assert single.token_ids[0] == greedy[0][:64]
    with_candidates = jacobi(loaded.model, *chat, block_size=8, candidates=2, **settings)
    assert with_candidates.token_ids == first_48[:10]
    adapter = tiny_adapter(loaded.model, seed=1, rank=4)
    assert drafted(loaded.model, *gsm8k, draft_model=adapter, block_size=8, init="lookup",
                   **settings).token_ids == first_48[10:]
