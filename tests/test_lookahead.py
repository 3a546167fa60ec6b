"""Lookahead decoding, multi-candidate Jacobi and transformers' speculative baselines == greedy AR,
token for token."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import ARCHS, VOCAB, tiny_model

from cllm.decoding import ar, hf_assisted, hf_pld, jacobi, left_pad, lookahead
from cllm.decoding.kv import DynamicKV
from cllm.decoding.lookahead import _step_mask
from cllm.decoding.ngrams import NgramPool

CASES_PER_ARCH = 170  # 510 randomized cases in all


def random_case(model, rng: random.Random):
    """1-4 left-padded prompts, a length limit, maybe an EOS from inside the first row's output (that
    row then stops early), and greedy AR's output: (input_ids, attention_mask, max_new_tokens, eos, expected)."""
    prompts = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 14))] for _ in range(rng.randint(1, 4))]
    input_ids, attention_mask = left_pad(prompts, pad_token_id=0)
    max_new_tokens = rng.choice([1, 5, 17, 33])
    eos = None
    if rng.random() < 0.5:
        eos = rng.choice(ar(model, input_ids, attention_mask, max_new_tokens=max_new_tokens).token_ids[0])
    expected = ar(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, eos_token_id=eos).token_ids
    return input_ids, attention_mask, max_new_tokens, eos, expected


@pytest.mark.parametrize("arch", ARCHS)
def test_lookahead_equals_ar_on_randomized_cases(arch):
    model = tiny_model(arch, seed=1)
    gained = 0
    for case in range(CASES_PER_ARCH):
        rng = random.Random(f"{arch}-{case}")
        input_ids, attention_mask, max_new_tokens, eos, expected = random_case(model, rng)
        batch = input_ids.shape[0]
        window, ngram, candidates = rng.randint(1, 5), rng.randint(2, 5), rng.randint(1, 5)
        draft = rng.choice([0, rng.randint(1, 12)])
        streamed: dict[int, list[int]] = {}
        out = lookahead(model, input_ids, attention_mask, window=window, ngram=ngram, candidates=candidates,
                        draft=draft, max_new_tokens=max_new_tokens, eos_token_id=eos, seed=case,
                        on_tokens=lambda row, tokens: streamed.setdefault(row, []).extend(tokens))
        assert out.token_ids == expected, (
            f"case {case}: W={window} N={ngram} G={candidates} D={draft} B={batch} eos={eos}"
        )
        assert [streamed.get(row, []) for row in range(batch)] == expected
        for stats, tokens in zip(out.stats, expected):
            assert stats.new_tokens == len(tokens) and stats.fast_forward == len(tokens) - stats.forward_passes
        gained += sum(s.fast_forward for s in out.stats)
    assert gained > 20, "the verification branch never accepted a candidate: the test would prove little"


@pytest.mark.parametrize("arch", ARCHS)
def test_multi_candidate_jacobi_equals_ar_on_randomized_cases(arch):
    model = tiny_model(arch, seed=1)
    gained_by_candidates = 0
    for case in range(CASES_PER_ARCH):
        rng = random.Random(f"candidates-{arch}-{case}")
        input_ids, attention_mask, max_new_tokens, eos, expected = random_case(model, rng)
        batch = input_ids.shape[0]
        block_size, candidates, ngram = rng.choice([1, 2, 4, 8, 16]), rng.randint(1, 5), rng.randint(2, 6)
        init = rng.choice(["prompt", "repeat", "lookup"])
        common = dict(block_size=block_size, max_new_tokens=max_new_tokens, eos_token_id=eos, init=init, seed=case)
        out = jacobi(model, input_ids, attention_mask, candidates=candidates, ngram=ngram, **common)
        assert out.token_ids == expected, (
            f"case {case}: n={block_size} G={candidates} N={ngram} B={batch} {init} eos={eos}"
        )
        if case % 10 == 0:  # the same without candidates, for what they add
            plain = jacobi(model, input_ids, attention_mask, **common)
            gained_by_candidates += sum(s.fast_forward for s in out.stats) - sum(s.fast_forward for s in plain.stats)
    assert gained_by_candidates > 0, "candidates never added a token: the test would prove little"


def test_step_mask_by_hand():
    """`pending`, 2 levels x 2 columns of window, one candidate of 2 tokens (N = 3)."""
    mask = _step_mask(levels=2, window=2, counts=torch.tensor([[True]]), ngram=3)[0]
    # columns: p | (0,0) (0,1) (1,0) (1,1) | c0 c1
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],  # pending
        [1, 1, 0, 0, 0, 0, 0],  # level 0, column 0
        [1, 1, 1, 0, 0, 0, 0],  # level 0, column 1: level 0 up to its column
        [1, 1, 0, 1, 0, 0, 0],  # level 1, column 0: level 0 up to column 0, then its diagonal
        [1, 1, 1, 0, 1, 0, 0],  # level 1, column 1
        [1, 0, 0, 0, 0, 1, 0],  # candidate token 0: pending and itself
        [1, 0, 0, 0, 0, 1, 1],  # candidate token 1
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)
    absent = _step_mask(levels=1, window=1, counts=torch.tensor([[False], [True]]), ngram=2)
    assert absent[0, 2].tolist() == [False, False, True]  # an absent candidate sees nothing else
    assert absent[1, 2].tolist() == [True, False, True]
    drafted = _step_mask(levels=1, window=1, counts=torch.zeros((2, 0), dtype=torch.bool), ngram=2,
                         drafted=torch.tensor([[True, True, False], [False, False, False]]))
    # columns: p | w | d0 d1 d2: draft tokens see pending and the draft's earlier tokens; missing ones only themselves
    assert drafted[0, 2:].int().tolist() == [[1, 0, 1, 0, 0], [1, 0, 1, 1, 0], [0, 0, 0, 0, 1]]
    assert drafted[1, 2:].int().tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]


@pytest.mark.parametrize("arch", ARCHS)
def test_step_mask_isolates_candidates_and_draft(arch):
    """Every candidate's and the draft's logits in one lookahead-shaped forward equal those of a
    separate forward of the prefix, `pending` and that candidate alone (float64, each attention backend; the
    eager attention takes its softmax in float32, hence its tolerance)."""
    for attention, tolerance in (("eager", 1e-5), ("sdpa", 1e-10)):
        model = tiny_model(arch, seed=3)
        model.set_attn_implementation(attention)
        rng = random.Random(f"isolation-{arch}")
        prefix = torch.tensor([[rng.randrange(1, VOCAB) for _ in range(9)]])
        window, levels, groups, ngram = 3, 2, 3, 3
        fed = torch.tensor([[rng.randrange(1, VOCAB) for _ in range(1 + levels * window + groups * (ngram - 1) + 4)]])
        present = torch.tensor([[True, True, False]])
        drafted = torch.tensor([[True, True, True, False]])
        mask = _step_mask(levels, window, present, ngram, drafted)
        store = DynamicKV(model)
        store.forward(prefix, torch.arange(9)[None], None)
        last = 9
        span = torch.arange(levels * window)
        positions = torch.cat([torch.tensor([last]), last + 1 + span % window + span // window,
                               last + 1 + torch.arange(levels).repeat(groups), last + 1 + torch.arange(4)])[None]
        allowed = torch.cat([torch.ones((1, fed.shape[1], 9), dtype=torch.bool), mask], dim=2)
        together = store.forward(fed, positions, allowed)[0]
        start = 1 + levels * window
        pieces = [(start + g * (ngram - 1), ngram - 1) for g in range(2)] + [(start + groups * (ngram - 1), 3)]
        for first, length in pieces:
            alone = model(torch.cat([prefix, fed[:, :1], fed[:, first : first + length]], dim=1)).logits[0, 10:]
            torch.testing.assert_close(together[first : first + length], alone, rtol=0, atol=tolerance)


def test_ngram_pool_keeps_the_newest_distinct_continuations():
    pool = NgramPool(ngram=3, size=2)
    for gram in ([1, 2, 3], [1, 4, 5], [1, 2, 3], [1, 6, 7]):
        pool.add(gram)
    assert pool.candidates(1) == [(6, 7), (2, 3)]
    assert pool.candidates(9) == []
    incremental, whole = NgramPool(3, 10), NgramPool(3, 10)
    context = [5, 1, 2, 5, 1, 3, 5, 1]
    for end in range(1, len(context) + 1):
        incremental.add_context(torch.tensor(context[:end]))
    whole.add_context(torch.tensor(context))
    assert incremental.table == whole.table == {5: [(1, 3), (1, 2)], 1: [(3, 5), (2, 5)], 2: [(5, 1)], 3: [(5, 1)]}


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_baselines_equal_ar(arch):
    model, draft = tiny_model(arch, seed=2), tiny_model(arch, seed=5)
    for case in range(4):
        rng = random.Random(f"baselines-{arch}-{case}")
        prompt = torch.tensor([[rng.randrange(1, VOCAB) for _ in range(rng.randint(2, 12))]])
        expected = ar(model, prompt, max_new_tokens=21).token_ids
        pld = hf_pld(model, prompt, lookup_tokens=3, max_new_tokens=21)
        assisted = hf_assisted(model, prompt, draft_model=draft, max_new_tokens=21)
        assert pld.token_ids == expected and assisted.token_ids == expected
        assert pld.stats[0].forward_passes <= 21 and assisted.stats[0].forward_passes <= 21
    with pytest.raises(ValueError, match="one prompt at a time"):
        hf_pld(model, torch.ones((2, 3), dtype=torch.long), max_new_tokens=2)


def test_bad_settings_raise_value_error():
    model = tiny_model("llama")
    prompt = torch.ones((1, 3), dtype=torch.long)
    for settings in ({"window": 0}, {"ngram": 1}, {"candidates": 0}, {"draft": -1}):
        with pytest.raises(ValueError, match="lookahead needs"):
            lookahead(model, prompt, max_new_tokens=2, **settings)
    with pytest.raises(ValueError, match="pure Jacobi"):
        jacobi(model, prompt, max_new_tokens=2, candidates=2, return_trajectory=True)
    with pytest.raises(ValueError, match="candidates must be"):
        jacobi(model, prompt, max_new_tokens=2, candidates=-1)
