"""The real default model (SmolLM2-135M-Instruct, float32): loading, chat template, Jacobi and
lookahead == AR."""

from __future__ import annotations

import pytest
import torch

from cllm.data import SourceOptions, load_prompts
from cllm.decoding import Sampling, ar, jacobi, left_pad, lookahead
from cllm.decoding.sampling import filtered_probabilities, uniforms
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
    """Batched greedy AR on the twenty prompts: the reference every greedy test compares with."""
    input_ids, attention_mask = left_pad(twenty_prompts, loaded.pad_token_id)
    return ar(loaded.model, input_ids, attention_mask, **greedy_settings(loaded)).token_ids


def test_jacobi_equals_ar_on_ten_prompts_at_128_tokens(loaded, twenty_prompts, greedy):
    input_ids, attention_mask = left_pad(twenty_prompts[:10], loaded.pad_token_id)
    expected = greedy[:10]
    assert sum(len(t) for t in expected) > 600  # mostly long answers, several cut at 128
    plain = jacobi(loaded.model, input_ids, attention_mask, block_size=16, **greedy_settings(loaded))
    assert plain.token_ids == expected
    assert all(stats.forward_passes <= len(reference) for stats, reference in zip(plain.stats, expected))
    # lookup guesses rewrite iterates mid-block; batched, so rows refresh at different iterations
    with_lookup = jacobi(loaded.model, input_ids, attention_mask, block_size=16, init="lookup",
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
    assert drafted(loaded.model, *gsm8k, draft_model=adapter, block_size=16, init="lookup",
                   **settings).token_ids == first_48[10:]


def test_sampled_jacobi_and_lookahead_equal_sampled_ar_on_ten_prompts(loaded, greedy):
    """Identical, or (float32) the first difference is a certified near-tie: the draw lies within
    1e-5 of the edge of AR's token's cdf interval (at 64 tokens, row 7 of the multi-candidate Jacobi
    batch met one with these seeds; 32 tokens here)."""
    prompts = [loaded.encode_prompt(p) for p in BUILTIN_PROMPTS]
    sampling, seed = Sampling(temperature=0.7, top_p=0.9), 5
    kwargs = dict(max_new_tokens=32, eos_token_id=loaded.eos_token_ids, pad_token_id=loaded.pad_token_id,
                  sampling=sampling, seed=seed)
    input_ids, attention_mask = left_pad(prompts, loaded.pad_token_id)
    expected = ar(loaded.model, input_ids, attention_mask, **kwargs).token_ids
    assert sum(a != b[:32] for a, b in zip(expected, greedy[:10])) >= 5  # sampling really changes the outputs
    outputs = {
        "jacobi": jacobi(loaded.model, input_ids, attention_mask, block_size=16, **kwargs).token_ids,
        "jacobi+candidates": jacobi(loaded.model, input_ids, attention_mask, block_size=8, candidates=2,
                                    **kwargs).token_ids,
        "lookahead": lookahead(loaded.model, input_ids, attention_mask, window=2, ngram=3, candidates=2, draft=6,
                               **kwargs).token_ids,
    }
    for name, got in outputs.items():
        different = [row for row in range(len(prompts)) if got[row] != expected[row]]
        assert len(different) <= 1, f"{name}: rows {different} differ"
        for row in different:
            distance = _draw_distance_to_edge(loaded.model, prompts[row], expected[row], got[row], sampling, seed + row)
            assert distance < 1e-5, f"{name}, row {row}: a real difference, the draw is {distance:.2e} from the edge"


def _draw_distance_to_edge(
    model, prompt: list[int], reference: list[int], got: list[int], sampling: Sampling, seed: int
) -> float:
    """At the first position where `got` leaves `reference`: how far the draw lies from the nearest
    edge of the reference token's cdf interval, with the logits of a plain forward."""
    t = next(i for i, (a, b) in enumerate(zip(reference, got)) if a != b)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + reference[:t]])).logits[0, -1]
    cdf = filtered_probabilities(logits, sampling).cumsum(-1)
    draw = float(uniforms([seed], t + 1)[0, t]) * float(cdf[-1])
    token = reference[t]
    lower = float(cdf[token - 1]) if token else 0.0
    return min(abs(draw - lower), abs(draw - float(cdf[token])))
