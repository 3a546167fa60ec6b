"""The real default model (SmolLM2-135M-Instruct, float32): sampled Jacobi and lookahead ==
sampled AR, and drafted Jacobi with a gated drafter == AR. A file of its own so that a second
pytest worker runs it beside test_default_model.py."""

from __future__ import annotations

import pytest
import torch

from cllm.decoding import Sampling, ar, jacobi, left_pad, lookahead
from cllm.decoding.sampling import filtered_probabilities, uniforms
from cllm.models import load_model
from cllm.prompts import BUILTIN_PROMPTS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loaded():
    return load_model("default")


def test_the_shipped_drafter_drafts_for_the_default_model(loaded):
    """`--drafter default`: the gated adapter shipped in the package; the output is AR's and (bf16
    is what it was trained in, float32 here) it accepts more than plain Jacobi does."""
    from cllm.decoding import decode
    from cllm.drafters import load_drafter

    prompts = [loaded.encode_prompt(p) for p in BUILTIN_PROMPTS[:4]]
    settings = dict(max_new_tokens=48)
    expected = decode(loaded, "ar", prompts, **settings).token_ids
    drafted = decode(loaded, "drafted:4:lookup", prompts, draft_model=load_drafter("default", loaded), **settings)
    plain = decode(loaded, "jacobi:4:lookup", prompts, **settings)
    assert drafted.token_ids == plain.token_ids == expected
    forwards = [sum(s.forward_passes for s in out.stats) for out in (drafted, plain)]
    assert forwards[0] < forwards[1], forwards


def test_drafted_jacobi_with_a_gated_drafter_equals_ar(loaded):
    """A random gated LoRA drafter (it drafts badly: only slower), batched, blocks of 8 with the
    lookup guess, 48 tokens."""
    from tiny_models import tiny_adapter

    from cllm.decoding.jacobi import drafted

    prompts = [loaded.encode_prompt(p) for p in BUILTIN_PROMPTS[:6]]
    settings = dict(max_new_tokens=48, eos_token_id=loaded.eos_token_ids, pad_token_id=loaded.pad_token_id)
    input_ids, attention_mask = left_pad(prompts, loaded.pad_token_id)
    expected = ar(loaded.model, input_ids, attention_mask, **settings).token_ids
    adapter = tiny_adapter(loaded.model, seed=1, rank=4, gated=True)
    assert drafted(loaded.model, input_ids, attention_mask, draft_model=adapter, block_size=8, init="lookup",
                   **settings).token_ids == expected


def test_sampled_jacobi_and_lookahead_equal_sampled_ar_on_ten_prompts(loaded):
    """Identical, or (float32) the first difference is a certified near-tie: the draw lies within
    1e-5 of the edge of AR's token's cdf interval (at 64 tokens, row 7 of the multi-candidate Jacobi
    batch met one with these seeds; 32 tokens here)."""
    prompts = [loaded.encode_prompt(p) for p in BUILTIN_PROMPTS]
    sampling, seed = Sampling(temperature=0.7, top_p=0.9), 5
    kwargs = dict(max_new_tokens=32, eos_token_id=loaded.eos_token_ids, pad_token_id=loaded.pad_token_id,
                  sampling=sampling, seed=seed)
    input_ids, attention_mask = left_pad(prompts, loaded.pad_token_id)
    expected = ar(loaded.model, input_ids, attention_mask, **kwargs).token_ids
    greedy = ar(loaded.model, input_ids, attention_mask, **kwargs | {"sampling": Sampling()}).token_ids
    assert sum(a != b for a, b in zip(expected, greedy)) >= 5  # sampling really changes the outputs
    outputs = {
        "jacobi": jacobi(loaded.model, input_ids, attention_mask, block_size=8, **kwargs).token_ids,
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


def test_every_decoder_reports_the_default_models_own_logprobs(loaded):
    """float32: each emitted token's logprob (and top-5) is the real model's log-softmax after the
    true prefix, whichever decoder emitted it (cllm.decoding.logprobs). Within 5e-5: AR's own
    cached forwards already differ from one uncached forward by up to 1.1e-5 here (float32 sums
    in another order), every parallel decoder by 0.9e-5 to 1.5e-5 (measured on 4 prompts x 48)."""
    from cllm.decoding import decode
    from cllm.drafters import load_drafter

    prompts = [loaded.encode_prompt(p) for p in BUILTIN_PROMPTS[:2]]
    drafter = load_drafter("default", loaded)
    for spec in ("ar", "jacobi:8:lookup", "lookahead:3:3:3:4", "drafted:4:lookup"):
        out = decode(loaded, spec, prompts, max_new_tokens=24, logprobs=5, draft_model=drafter)
        for prompt, tokens, entries in zip(prompts, out.token_ids, out.logprobs):
            with torch.no_grad():
                logits = loaded.model(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
            expected = logits.log_softmax(-1)
            assert [e.token for e in entries] == tokens, spec
            for row, entry, token in zip(expected, entries, tokens):
                assert abs(entry.logprob - float(row[token])) < 5e-5, spec
                assert [i for i, _ in entry.top] == row.topk(5).indices.tolist(), spec
