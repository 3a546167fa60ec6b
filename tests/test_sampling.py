"""Exact sampling: the filter and the draw by hand, the draws' independence of batch and length,
AR sampling's distribution (chi-square), and Jacobi, multi-candidate Jacobi and lookahead giving
AR's sampled output token for token."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import ARCHS, VOCAB, tiny_model
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from cllm.decoding import ar, hf_generate, jacobi, left_pad, lookahead
from cllm.decoding.sampling import Sampling, filtered_probabilities, row_seeds, sample, uniforms
from cllm.errors import CllmError

CASES_PER_ARCH = 110  # 330 randomized cases, each checked for Jacobi, lookahead and multi-candidate Jacobi


def test_greedy_is_argmax_and_needs_no_draws():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert sample(logits, Sampling(), torch.empty(0)).tolist() == [1, 0]


def test_the_draw_is_the_inverse_cdf():
    logits = torch.tensor([0.25, 0.25, 0.5]).log().expand(6, 3)
    draws = torch.tensor([0.0, 0.2499, 0.25, 0.4999, 0.5, 0.9999], dtype=torch.float64)
    assert sample(logits, Sampling(temperature=1.0), draws).tolist() == [0, 0, 1, 1, 2, 2]
    impossible = torch.tensor([[0.0, float("-inf"), 0.0]]).expand(3, 3)  # a token of probability 0 is never drawn
    assert sample(impossible, Sampling(temperature=1.0), torch.tensor([0.4999, 0.5, 0.5001])).tolist() == [0, 2, 2]


def test_filters_by_hand():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()

    def kept(**settings) -> list[int]:
        return (filtered_probabilities(logits, Sampling(temperature=1.0, **settings)) > 0).nonzero().flatten().tolist()

    assert kept() == [0, 1, 2, 3]
    assert kept(top_k=2) == [0, 1]
    assert kept(top_p=0.7) == [0, 1]  # 0.5 < 0.7: the token that crosses p is kept
    assert kept(top_p=0.5) == [0]  # the mass before token 1 already reaches p
    assert kept(top_p=0.81) == [0, 1, 2]
    assert kept(top_p=0.82) == [0, 1, 2]
    assert kept(top_k=3, top_p=0.82) == [0, 1]  # top-p sees the mass renormalized after top-k: 0.8 / 0.95 >= 0.82
    tied = torch.tensor([1.0, 2.0, 2.0, 0.0])
    assert (filtered_probabilities(tied, Sampling(1.0, top_k=1)) > 0).tolist() == [False, True, True, False]
    scaled = filtered_probabilities(torch.tensor([0.0, 1.0]), Sampling(temperature=0.5))
    assert torch.allclose(scaled, torch.tensor([0.0, 2.0], dtype=torch.float64).softmax(0))


def test_top_p_over_a_large_vocabulary_equals_a_full_sort_for_every_row_alone_or_batched():
    """Peaked rows find their nucleus in a short partial top-k, flat ones (a guess after a wrong
    token) in a longer one or the full sort; every row keeps what a full sort keeps, ties included."""
    generator = torch.Generator().manual_seed(11)
    scales = torch.tensor([8.0, 3.0, 1.0, 0.3, 0.0])[:, None]  # 0: all 5000 tokens tied
    logits = torch.randn(5, 5000, generator=generator, dtype=torch.float64) * scales
    logits[1, :40] = logits[1, 0]  # a tie straddling the first partial top-k
    for top_p in (0.5, 0.9, 0.99):
        probs = logits.softmax(dim=-1)
        ordered = probs.sort(dim=-1, descending=True).values
        needed = ((ordered.cumsum(dim=-1) - ordered) < top_p).sum(dim=-1, keepdim=True)
        expected = probs >= ordered.gather(-1, needed - 1)
        batched = filtered_probabilities(logits, Sampling(1.0, top_p=top_p)) > 0
        assert torch.equal(batched, expected)
        for row in range(5):
            assert torch.equal(filtered_probabilities(logits[row], Sampling(1.0, top_p=top_p)) > 0, expected[row])
    assert int(expected[4].sum()) == 5000 and int(expected[0].sum()) < 64


@pytest.mark.parametrize("settings", [(0.7, 0, 1.0), (1.0, 7, 1.0), (1.3, 0, 0.8), (0.5, 12, 0.6)])
def test_filters_agree_with_transformers_warpers(settings):
    temperature, top_k, top_p = settings
    logits = torch.randn(64, VOCAB, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    ours = filtered_probabilities(logits, Sampling(temperature, top_k, top_p))
    torch.testing.assert_close(ours, _reference_probabilities(logits, temperature, top_k, top_p))


def _reference_probabilities(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """transformers' own warpers, in the order `generate` applies them."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers(None, logits.double().clone()).softmax(dim=-1)


def test_draws_are_fixed_by_seed_and_index_only():
    table = uniforms([7, 8, 7], 50)
    assert table.dtype == torch.float64 and bool((table >= 0).all() and (table < 1).all())
    assert torch.equal(table[0], table[2]) and not torch.equal(table[0], table[1])
    assert torch.equal(uniforms([8], 20)[0], table[1, :20])  # the value at t does not depend on the length
    many = uniforms(list(range(100)), 100).flatten()
    assert abs(float(many.mean()) - 0.5) < 0.01 and abs(float(many.var()) - 1 / 12) < 0.005
    assert row_seeds(5, 3) == [5, 6, 7] and row_seeds([9, 1], 2) == [9, 1]
    with pytest.raises(ValueError, match="2 seeds for a batch of 3"):
        row_seeds([1, 2], 3)


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_k=-1),
                                 dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(CllmError):
        Sampling(**({"temperature": 1.0} | bad))


def _chi_square_p_value(observed: torch.Tensor, probabilities: torch.Tensor) -> float:
    """Pearson's test; bins expected below 5 are pooled into one."""
    expected = probabilities * observed.sum()
    small = expected < 5
    observed = torch.cat([observed[~small], observed[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    statistic = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(statistic / 2)))


@pytest.mark.parametrize("settings", [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.5, 10, 1.0), (1.2, 6, 0.9)])
def test_ar_sampling_follows_the_filtered_distribution(settings):
    """4000 seeds of one prompt: the first token (drawn at the prefill) and the second token of the
    rows whose first token is the commonest (drawn in the decoding loop) against transformers'
    warpers on the model's logits. Fixed seeds: the outcome is deterministic, not flaky."""
    temperature, top_k, top_p = settings
    model = tiny_model("llama", seed=4)
    prompt = [5, 17, 33, 2, 60]
    draws = 4000
    out = ar(model, torch.tensor([prompt] * draws), max_new_tokens=2, sampling=Sampling(temperature, top_k, top_p),
             seed=list(range(1000, 1000 + draws)))
    first = torch.tensor([t[0] for t in out.token_ids])
    commonest = int(first.mode().values)
    second = torch.tensor([t[1] for t in out.token_ids if t[0] == commonest])
    assert len(second) > 300
    for tokens, context in ((first, prompt), (second, prompt + [commonest])):
        with torch.no_grad():
            logits = model(torch.tensor([context])).logits[0, -1]
        expected = _reference_probabilities(logits[None], temperature, top_k, top_p)[0]
        observed = torch.bincount(tokens, minlength=VOCAB).double()
        assert float(observed[expected == 0].sum()) == 0, "a filtered-out token was drawn"
        assert int((observed > 0).sum()) > 2, "too peaked a distribution tests little"
        assert _chi_square_p_value(observed, expected) > 1e-3


def _random_sampling(rng: random.Random) -> Sampling:
    return Sampling(temperature=rng.choice([0.5, 0.7, 1.0, 1.5]), top_k=rng.choice([0, 0, 3, 20]),
                    top_p=rng.choice([1.0, 0.9, 0.5]))


@pytest.mark.parametrize("arch", ARCHS)
def test_parallel_decoders_reproduce_ar_sampling(arch):
    model = tiny_model(arch, seed=1)
    differs_from_greedy = fast_forwarded = 0
    for case in range(CASES_PER_ARCH):
        rng = random.Random(f"sampling-{arch}-{case}")
        prompts = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 14))] for _ in range(rng.randint(1, 4))]
        input_ids, attention_mask = left_pad(prompts, pad_token_id=0)
        batch = input_ids.shape[0]
        sampling, seed, max_new_tokens = _random_sampling(rng), rng.randrange(10**6), rng.choice([1, 5, 17, 33])
        common = dict(max_new_tokens=max_new_tokens, sampling=sampling, seed=seed)
        eos = None
        if rng.random() < 0.5:  # a token from inside the first row's sample: that row stops early
            eos = rng.choice(ar(model, input_ids, attention_mask, **common).token_ids[0])
        common["eos_token_id"] = eos
        expected = ar(model, input_ids, attention_mask, **common).token_ids
        label = f"case {case}: B={batch} {sampling} seed={seed} eos={eos}"

        block_size, init = rng.choice([2, 4, 8, 16]), rng.choice(["prompt", "repeat", "lookup"])
        streamed: dict[int, list[int]] = {}
        by_jacobi = jacobi(model, input_ids, attention_mask, block_size=block_size, init=init, **common,
                           on_tokens=lambda row, tokens, into=streamed: into.setdefault(row, []).extend(tokens))
        assert by_jacobi.token_ids == expected, f"jacobi n={block_size} {init}, {label}"
        assert [streamed.get(row, []) for row in range(batch)] == expected
        by_candidates = jacobi(model, input_ids, attention_mask, block_size=block_size, init=init,
                               candidates=rng.randint(1, 4), ngram=rng.randint(2, 5), **common)
        assert by_candidates.token_ids == expected, f"multi-candidate jacobi n={block_size}, {label}"
        window, ngram, candidates = rng.randint(1, 4), rng.randint(2, 5), rng.randint(1, 4)
        by_lookahead = lookahead(
            model, input_ids, attention_mask, window=window, ngram=ngram, candidates=candidates, **common
        )
        assert by_lookahead.token_ids == expected, f"lookahead {window}:{ngram}:{candidates}, {label}"

        greedy = ar(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, eos_token_id=eos).token_ids
        differs_from_greedy += expected != greedy
        fast_forwarded += sum(s.fast_forward for s in by_jacobi.stats + by_lookahead.stats)
    assert differs_from_greedy > CASES_PER_ARCH // 2, (
        "the samples are mostly the greedy output: the test would prove little"
    )
    assert fast_forwarded > 50


def test_a_row_samples_the_same_alone_or_in_a_batch():
    model = tiny_model("llama", seed=1)
    prompts = [[3, 4, 5], [9, 8, 7, 6, 5, 4], [11]]
    input_ids, attention_mask = left_pad(prompts, pad_token_id=0)
    sampling = Sampling(temperature=1.0, top_p=0.9)
    batched = lookahead(model, input_ids, attention_mask, max_new_tokens=20, sampling=sampling, seed=40).token_ids
    for row, prompt in enumerate(prompts):
        alone = ar(model, torch.tensor([prompt]), max_new_tokens=20, sampling=sampling, seed=40 + row).token_ids[0]
        assert alone == batched[row]
    other_seed = ar(model, input_ids, attention_mask, max_new_tokens=20, sampling=sampling, seed=[1, 2, 3]).token_ids
    assert other_seed != batched


def test_transformers_sampling_reference_is_seeded_and_leaves_the_global_generator_alone():
    model = tiny_model("qwen2", seed=2)
    prompt = torch.tensor([[4, 5, 6, 7]])
    sampling = Sampling(temperature=1.0, top_k=20)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = hf_generate(model, prompt, max_new_tokens=30, sampling=sampling, seed=1).token_ids
    assert torch.equal(torch.get_rng_state(), state)
    assert hf_generate(model, prompt, max_new_tokens=30, sampling=sampling, seed=1).token_ids == first
    assert hf_generate(model, prompt, max_new_tokens=30, sampling=sampling, seed=2).token_ids != first
    assert hf_generate(model, prompt, max_new_tokens=30).token_ids == ar(model, prompt, max_new_tokens=30).token_ids
