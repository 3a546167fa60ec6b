"""Drafted Jacobi (the target verifies, a second model drafts the next guesses) == AR, token for token,
whatever the drafter: a random one (only slower) or the target itself (exactly plain Jacobi)."""

from __future__ import annotations

import random

import pytest
from tiny_models import ARCHS, VOCAB, tiny_model

from cllm.decoding import Sampling, ar, decode, jacobi, left_pad
from cllm.decoding.jacobi import drafted

CASES_PER_ARCH = 60  # 180 randomized cases in all


@pytest.mark.parametrize("arch", ARCHS)
def test_drafted_equals_ar_with_a_random_drafter(arch):
    """Greedy or sampled, batch 1-4, EOS inside blocks: the output is the target's whatever the drafts."""
    target, drafter = tiny_model(arch, seed=1), tiny_model(arch, seed=2)
    for case in range(CASES_PER_ARCH):
        rng = random.Random(f"drafted-{arch}-{case}")
        prompts = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 14))] for _ in range(rng.randint(1, 4))]
        input_ids, attention_mask = left_pad(prompts, pad_token_id=0)
        sampling = rng.choice([Sampling(), Sampling(temperature=0.9, top_p=0.9)])
        common = dict(max_new_tokens=rng.choice([1, 5, 17, 33]), sampling=sampling, seed=case)
        if rng.random() < 0.5:
            common["eos_token_id"] = rng.choice(ar(target, input_ids, attention_mask, **common).token_ids[0])
        expected = ar(target, input_ids, attention_mask, **common).token_ids
        block_size, init = rng.choice([1, 2, 4, 8, 16]), rng.choice(["prompt", "repeat", "lookup"])
        out = drafted(target, input_ids, attention_mask, draft_model=drafter, block_size=block_size, init=init,
                      **common)
        assert out.token_ids == expected, f"case {case}: n={block_size} {init} B={len(prompts)} {common}"
        for stats, tokens in zip(out.stats, expected):
            assert stats.new_tokens == len(tokens) and stats.fast_forward == len(tokens) - stats.forward_passes


@pytest.mark.parametrize("arch", ARCHS)
def test_the_target_as_its_own_drafter_is_plain_jacobi(arch):
    """Plain Jacobi's next guess is the target's prediction; drafted with the target as drafter
    makes the same guesses from the same context, so every statistic is the same."""
    model = tiny_model(arch, seed=1)
    input_ids, attention_mask = left_pad([[5, 9, 2, 7], [3, 1], [8, 8, 4, 6, 2, 9, 1]], pad_token_id=0)
    common = dict(block_size=6, max_new_tokens=40, init="prompt", seed=3)
    plain = jacobi(model, input_ids, attention_mask, **common)
    self_drafted = drafted(model, input_ids, attention_mask, draft_model=model, **common)
    assert self_drafted.token_ids == plain.token_ids
    assert [s.to_dict() for s in self_drafted.stats] == [s.to_dict() for s in plain.stats]


def test_decode_runs_drafted_by_name_and_needs_a_draft_model():
    target, drafter = tiny_model("qwen2", seed=1), tiny_model("qwen2", seed=2)
    prompts = [[3, 5, 7], [2, 4]]
    expected = decode(target, "ar", prompts, max_new_tokens=20).token_ids
    assert decode(target, "drafted:8:lookup", prompts, max_new_tokens=20, draft_model=drafter).token_ids == expected
    from cllm.errors import CllmError

    with pytest.raises(CllmError, match="draft model"):
        decode(target, "drafted:8", prompts, max_new_tokens=20)
