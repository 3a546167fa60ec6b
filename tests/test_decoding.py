"""Exactness: Jacobi (any block size, any initial guess) == our AR loop == transformers greedy generate."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import ARCHS, VOCAB, tiny_model

from cllm.decoding import (
    INIT_STRATEGIES,
    ar,
    count_stationary,
    hf_generate,
    jacobi,
    jacobi_no_cache,
    left_pad,
    lookup_continuation,
)
from cllm.decoding.jacobi import _GuessMaker

BLOCK_SIZES = [1, 2, 3, 8, 16]
SEEDS = range(6)


def random_prompts(rng: random.Random, batch: int) -> list[list[int]]:
    lengths = rng.sample(range(1, 14), batch)  # distinct lengths: real left padding when batch > 1
    return [[rng.randrange(1, VOCAB) for _ in range(length)] for length in lengths]


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    return request.param


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("batch", [1, 3])
def test_jacobi_equals_ar_equals_generate(arch, seed, batch):
    rng = random.Random(f"{arch}-{seed}-{batch}")
    model = tiny_model(arch, seed=seed)
    prompts = random_prompts(rng, batch)
    input_ids, attention_mask = left_pad(prompts, pad_token_id=0)
    max_new_tokens = rng.choice([7, 13, 29, 37, 45])  # never a multiple of 2, 3, 8 or 16
    reference = hf_generate(model, input_ids, attention_mask, max_new_tokens=max_new_tokens).token_ids
    assert all(len(tokens) == max_new_tokens for tokens in reference)
    assert len(set(sum(reference, []))) > 2, "degenerate reference: the test would prove little"

    # An EOS id taken from inside the first row's output, so that row stops mid-block.
    eos = reference[0][rng.randrange(2, max_new_tokens - 1)]
    for eos_token_id in (None, eos):
        expected = hf_generate(
            model, input_ids, attention_mask, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id
        ).token_ids
        assert (
            ar(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id).token_ids
            == expected
        )
        for step, n in enumerate(BLOCK_SIZES):
            init = INIT_STRATEGIES[(seed + step) % len(INIT_STRATEGIES)]  # every guess with every n across seeds
            out = jacobi(model, input_ids, attention_mask, block_size=n, max_new_tokens=max_new_tokens,
                         eos_token_id=eos_token_id, init=init, seed=seed)
            assert out.token_ids == expected, f"n={n} init={init} eos={eos_token_id}"
            for tokens, stats in zip(out.token_ids, out.stats):
                assert stats.new_tokens == len(tokens)
                assert 1 <= stats.forward_passes <= len(tokens)
                assert stats.fast_forward == stats.new_tokens - stats.forward_passes
                assert sum(stats.block_iterations) == stats.forward_passes - 1  # the prefill yields token 0
                assert all(1 <= k <= n for k in stats.block_iterations)
    assert len(expected[0]) < max_new_tokens and expected[0][-1] == eos


def test_eos_list_and_rows_finishing_at_different_times():
    model = tiny_model("llama", seed=3)
    prompts = [[5, 6, 7], [9], [11, 12, 13, 14, 15, 16]]
    input_ids, attention_mask = left_pad(prompts, pad_token_id=0)
    free = ar(model, input_ids, attention_mask, max_new_tokens=30).token_ids
    eos_ids = [free[1][4], free[2][20]]
    expected = hf_generate(model, input_ids, attention_mask, max_new_tokens=30, eos_token_id=eos_ids).token_ids
    got = jacobi(model, input_ids, attention_mask, block_size=8, max_new_tokens=30, eos_token_id=eos_ids)
    assert got.token_ids == expected
    assert len({len(t) for t in got.token_ids}) > 1


def test_batched_rows_equal_single_rows():
    model = tiny_model("qwen2", seed=1)
    prompts = [[3, 4, 5, 6, 7, 8, 9], [20], [30, 31, 32]]
    input_ids, attention_mask = left_pad(prompts, pad_token_id=0)
    batched = jacobi(model, input_ids, attention_mask, block_size=4, max_new_tokens=21)
    for row, prompt in enumerate(prompts):
        single = jacobi(model, torch.tensor([prompt]), block_size=4, max_new_tokens=21)
        assert single.token_ids[0] == batched.token_ids[row]
        # Each row has its own guess generator, so even its trajectory ignores its batch mates.
        assert single.stats[0].block_iterations == batched.stats[row].block_iterations


def full_jacobi_step(model, prefix: list[int], state: torch.Tensor) -> torch.Tensor:
    """One Jacobi iteration the textbook way: no cache, the whole prefix + state through the model."""
    tokens = torch.tensor([prefix + state.tolist()])
    logits = model(input_ids=tokens).logits[0]
    return logits[len(prefix) - 1 : len(prefix) - 1 + len(state)].argmax(-1)


@pytest.mark.parametrize("arch_name", ARCHS)
def test_trajectory_states_are_consecutive_jacobi_iterates(arch_name):
    model = tiny_model(arch_name, seed=2)
    prompt = [7, 8, 9, 10, 11]
    out = jacobi(model, torch.tensor([prompt]), block_size=6, max_new_tokens=20, return_trajectory=True)
    tokens = out.token_ids[0]
    blocks = out.trajectories[0]
    # Token 0 comes from the prompt prefill; the blocks cover the other 19.
    assert [len(b[-1]) for b in blocks] == [6, 6, 6, 1]
    assert torch.cat([b[-1] for b in blocks]).tolist() == tokens[1:]
    prefix = prompt + tokens[:1]
    with torch.no_grad():
        for states, iterations in zip(blocks, out.stats[0].block_iterations):
            assert len(states) == iterations + 1
            for before, after in zip(states[:-1], states[1:]):
                assert torch.equal(full_jacobi_step(model, prefix, before), after)
            # The fixed point maps to itself.
            assert torch.equal(full_jacobi_step(model, prefix, states[-1]), states[-1])
            prefix += states[-1].tolist()


def test_streaming_callback_delivers_exactly_the_output():
    model = tiny_model("gpt2", seed=4)
    input_ids, attention_mask = left_pad([[1, 2, 3], [4, 5]], pad_token_id=0)
    for decoder, kwargs in ((ar, {}), (jacobi, {"block_size": 5})):
        streamed: dict[int, list[int]] = {0: [], 1: []}
        out = decoder(model, input_ids, attention_mask, max_new_tokens=17,
                      on_tokens=lambda row, new: streamed[row].extend(new), **kwargs)
        assert [streamed[0], streamed[1]] == out.token_ids


def test_count_stationary_on_a_hand_made_trajectory():
    # fixed point [1, 2, 3, 4]; position 3 is right from the start while position 0 is wrong
    # and stays right: stationary. Position 2 is right in state 0 but then changes: not stationary
    # from state 0, but right again from state 1 while position 1 is still wrong: stationary.
    states = torch.tensor([
        [9, 9, 3, 4],
        [1, 8, 3, 4],
        [1, 2, 3, 4],
    ])
    assert count_stationary(states) == 2
    changing = torch.tensor([
        [9, 2, 7, 4],
        [1, 5, 3, 0],
        [1, 2, 3, 4],
    ])
    # pos 1: right in state 0 but wrong in state 1, and right again only when all before are fixed;
    # pos 2: right from state 1 while pos 1 wrong -> stationary; pos 3: right only at the end.
    assert count_stationary(changing) == 1
    assert count_stationary(torch.tensor([[1, 2, 3]])) == 0


def test_lookup_continuation_follows_the_latest_longest_match():
    # the last 3 tokens [1, 2, 3] occurred before, followed by 4, 5
    assert lookup_continuation([1, 2, 3, 4, 5, 9, 1, 2, 3], n=4) == [4, 5, 9, 1]
    # only the last token recurs: its latest earlier occurrence wins ([3] at index 5 -> 7)
    assert lookup_continuation([3, 6, 8, 8, 8, 3, 7, 2, 3], n=2) == [7, 2]
    # a 2-token match beats a more recent 1-token match
    assert lookup_continuation([5, 3, 0, 2, 3, 9, 5, 3], n=1) == [0]
    # where the context ends first, what followed goes on repeating itself (a loop of period 2, then 1)
    assert lookup_continuation([9, 4, 6, 4, 6], n=5) == [4, 6, 4, 6, 4]
    assert lookup_continuation([4, 4], n=5) == [4, 4, 4, 4, 4]
    # nothing recurs -> nothing
    assert lookup_continuation([1, 2, 3], n=5) == []
    assert lookup_continuation([7], n=5) == []


@pytest.mark.parametrize("arch_name", ARCHS)
def test_lookup_guess_starts_every_block_from_the_context(arch_name):
    model = tiny_model(arch_name, seed=5)
    prompt = [4, 6, 4, 6, 4, 6, 2]
    out = jacobi(model, torch.tensor([prompt]), block_size=5, max_new_tokens=61, init="lookup", return_trajectory=True)
    reference = jacobi_no_cache(model, torch.tensor([prompt]), block_size=5, max_new_tokens=61, init="lookup",
                                return_trajectory=True)
    assert out.token_ids == reference.token_ids == ar(model, torch.tensor([prompt]), max_new_tokens=61).token_ids
    context, looked_up = prompt + out.token_ids[0][:1], 0
    for states, same_states in zip(out.trajectories[0], reference.trajectories[0]):
        assert torch.equal(states, same_states)
        found = lookup_continuation(context, n=5)[: states.shape[1]]
        assert states[0, : len(found)].tolist() == found
        looked_up += bool(found)
        context += states[-1].tolist()
    assert looked_up >= 2, "too few blocks started from a lookup: the test would prove little"


def test_lookup_refresh_rewrites_the_unfixed_part_only_on_a_disagreeing_two_token_match():
    maker = _GuessMaker("lookup", pad_token_id=0)
    context = torch.tensor(
        [7, 1, 2, 3, 4] + [9, 1, 2]
    )  # prompt, then output: ends in [1, 2], seen before, then 3 4 9 1 2
    block = torch.tensor([[1, 2, 8, 8, 8, 8]])
    maker.refresh_row(context, block[0], start=2, length=6)
    assert block.tolist() == [[1, 2, 3, 4, 9, 1]]

    agreeing = torch.tensor([[1, 2, 3, 8, 8, 8]])  # the iterate already continues with 3: kept whole
    maker.refresh_row(context, agreeing[0], start=2, length=6)
    assert agreeing.tolist() == [[1, 2, 3, 8, 8, 8]]

    one_token_match = torch.tensor([7, 2, 3, 4] + [9, 1, 2])  # only [2] recurs
    block = torch.tensor([[1, 2, 8, 8, 8, 8]])
    maker.refresh_row(one_token_match, block[0], start=2, length=6)
    assert block.tolist() == [[1, 2, 8, 8, 8, 8]]

    for strategy in ("prompt", "repeat", "pad"):  # the other guesses never touch the iterate
        block = torch.tensor([[1, 2, 8, 8, 8, 8]])
        _GuessMaker(strategy, 0).refresh_row(context, block[0], 2, 6)
        assert block.tolist() == [[1, 2, 8, 8, 8, 8]]


def test_bad_arguments_raise_value_error():
    model = tiny_model("llama")
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="block_size"):
        jacobi(model, ids, block_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ar(model, ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="init strategy"):
        jacobi(model, ids, init="zeros")
    with pytest.raises(ValueError, match="left-padded"):
        ar(model, ids, torch.tensor([[1, 1, 0]]))
