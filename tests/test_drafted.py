"""Drafted Jacobi (the target verifies, a drafter drafts the next guesses) == AR, token for token,
whatever the drafter: a second model, a LoRA adapter run as the second row of the same forward or
gated per column in the same row, random (only slower) or the target itself (exactly plain Jacobi)."""

from __future__ import annotations

import random

import pytest
from test_continuous_batching import decode_scripted, random_requests
from tiny_models import ARCHS, VOCAB, tiny_adapter, tiny_model

from cllm.decoding import Sampling, ar, decode, jacobi, left_pad
from cllm.decoding.jacobi import drafted

CASES = 80  # per architecture and drafter kind: 720 one-batch cases
JOINING_CASES = 34  # the same, with rows joining and leaving: 306 cases
KINDS = ("model", "adapter", "gated")


def _drafter(kind: str, target, arch: str):
    return tiny_model(arch, seed=2) if kind == "model" else tiny_adapter(target, seed=2, gated=kind == "gated")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_drafted_equals_ar_with_a_random_drafter(arch, kind):
    """Greedy or sampled, batch 1-4, EOS inside blocks: the output is the target's whatever the drafts."""
    target = tiny_model(arch, seed=1)
    drafter = _drafter(kind, target, arch)
    for case in range(CASES):
        rng = random.Random(f"drafted-{arch}-{kind}-{case}")
        prompts = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 14))] for _ in range(rng.randint(1, 4))]
        input_ids, attention_mask = left_pad(prompts, pad_token_id=0)
        sampling = rng.choice([Sampling(), Sampling(temperature=0.9, top_p=0.9)])
        common = dict(max_new_tokens=rng.choice([1, 5, 17, 33]), sampling=sampling, seed=case)
        expected = ar(target, input_ids, attention_mask, **common).token_ids
        if rng.random() < 0.5:  # an EOS the output meets, often inside a block: AR's output cut after it
            eos = common["eos_token_id"] = rng.choice(expected[0])
            expected = [tokens[: tokens.index(eos) + 1] if eos in tokens else tokens for tokens in expected]
        block_size, init = rng.choice([1, 2, 4, 8, 16]), rng.choice(["prompt", "repeat", "lookup"])
        if kind != "model" and rng.random() < 0.5:  # n-gram candidates beside the block: adapter drafters
            common |= dict(candidates=rng.choice([1, 3]), ngram=rng.choice([2, 4]))
        out = drafted(target, input_ids, attention_mask, draft_model=drafter, block_size=block_size, init=init,
                      **common)
        assert out.token_ids == expected, f"case {case}: n={block_size} {init} B={len(prompts)} {common}"
        for stats, tokens in zip(out.stats, expected):
            assert stats.new_tokens == len(tokens) and stats.fast_forward == len(tokens) - stats.forward_passes


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_drafted_rows_joining_and_leaving_get_their_own_output(arch, kind):
    target = tiny_model(arch, seed=1)
    drafter = _drafter(kind, target, arch)
    for case in range(JOINING_CASES):
        rng = random.Random(f"drafted-joining-{arch}-{kind}-{case}")
        requests = random_requests(rng)
        eos = rng.choice([None, rng.randrange(1, VOCAB)])
        settings = {"block_size": rng.choice([2, 4, 8]), "init": rng.choice(["prompt", "lookup"])}
        out, control, alone = decode_scripted(target, drafted, settings, requests, eos, draft_model=drafter)
        for row, number in enumerate(control.order):
            tokens, _ = control.done[row]
            expected = alone[number]
            assert tokens == (expected if requests[number].cancel_at is None else expected[: len(tokens)]), \
                f"case {case}: {settings}, request {number}"


@pytest.mark.parametrize("kind", ("model", "zero adapter", "zero gated adapter"))
@pytest.mark.parametrize("arch", ARCHS)
def test_the_target_as_its_own_drafter_is_plain_jacobi(arch, kind):
    """Plain Jacobi's next guess is the target's prediction; drafted with the target as drafter
    (itself, or an adapter that changes nothing) makes the same guesses from the same context, so
    every statistic is the same."""
    model = tiny_model(arch, seed=1)
    drafter = model if kind == "model" else tiny_adapter(model, random=False, gated="gated" in kind)
    input_ids, attention_mask = left_pad([[5, 9, 2, 7], [3, 1], [8, 8, 4, 6, 2, 9, 1]], pad_token_id=0)
    common = dict(block_size=6, max_new_tokens=40, init="prompt", seed=3)
    plain = jacobi(model, input_ids, attention_mask, **common)
    self_drafted = drafted(model, input_ids, attention_mask, draft_model=drafter, **common)
    assert self_drafted.token_ids == plain.token_ids
    assert [s.to_dict() for s in self_drafted.stats] == [s.to_dict() for s in plain.stats]


def test_the_gate_switches_the_adapter_per_column():
    """Gate 0: the target exactly; gate 1: the adapted model; and a gated step's draft columns are
    the adapted model's prediction at the fed columns after the target's own KV of the context."""
    import torch

    from cllm.decoding.kv import DynamicKV

    model = tiny_model("llama", seed=1)
    drafter = tiny_adapter(model, seed=3, gated=True)
    context, fed = torch.tensor([[4, 9, 2, 7, 1]]), torch.tensor([[3, 8, 6]])
    target = model(input_ids=torch.cat([context, fed], 1)).logits
    assert torch.equal(drafter.model(input_ids=torch.cat([context, fed], 1)).logits, target)
    with drafter.gate.on(torch.ones(())):
        adapted = drafter.model(input_ids=torch.cat([context, fed], 1)).logits
    assert not torch.allclose(adapted, target)
    plain = DynamicKV(drafter.model)
    plain.forward(context, torch.arange(5)[None], None)  # gate off: the target's KV of the context
    with drafter.gate.on(torch.ones(())):
        expected_drafts = plain.forward(fed, torch.arange(5, 8)[None], None)
    store = drafter.store(8)
    store.forward(context, torch.arange(5)[None], None)
    verified = store.forward(fed, torch.arange(5, 8)[None], None)
    torch.testing.assert_close(verified, target[:, 5:], rtol=0, atol=1e-12)
    # every column drafted but the last, whose draft no step reads: the target's own prediction there
    torch.testing.assert_close(store.draft_logits[:, :2], expected_drafts[:, :2], rtol=0, atol=1e-12)
    torch.testing.assert_close(store.draft_logits[:, 2], target[:, 7], rtol=0, atol=1e-12)
    assert store.inner.cache.get_seq_length() == 5 + 3 + 2  # the verify columns, then two draft columns
    store.keep(2)
    assert store.inner.cache.get_seq_length() == 7  # the context and two verify columns, no draft column
    candidate = torch.cat([fed, torch.tensor([[5]])], dim=1)  # the block's 3 columns, then a candidate's
    beside = drafter.store(8, draft_width=3)
    beside.forward(context, torch.arange(5)[None], None)
    beside.forward(candidate, torch.arange(5, 9)[None], None)
    torch.testing.assert_close(beside.draft_logits, store.draft_logits, rtol=0, atol=1e-12)  # the candidate not drafted
    for width in (2, 1):  # two block columns or one (the one after them only verified): nothing worth drafting
        narrow = drafter.store(8, draft_width=width)
        narrow.forward(context, torch.arange(5)[None], None)
        torch.testing.assert_close(narrow.forward(fed, torch.arange(5, 8)[None], None), target[:, 5:], rtol=0,
                                   atol=1e-12)
        torch.testing.assert_close(narrow.draft_logits, target[:, 5:], rtol=0, atol=1e-12)  # the target alone
        assert narrow.inner.cache.get_seq_length() == 8  # no draft column fed


@pytest.mark.parametrize("init", ("prompt", "lookup"))
def test_a_gated_steps_first_and_last_draft_columns_are_never_read(monkeypatch, init):
    """What a gated step leaves out or fills with the target's prediction (the block's last
    column) and what it keeps only for the drafter's sake (column 0) never becomes a fed guess:
    overwritten with noise, the decode takes the same forwards."""
    import torch

    from cllm.decoding.drafting import GatedKV

    target = tiny_model("llama", seed=1)
    drafter = tiny_adapter(target, random=False, gated=True)  # drafts what the target predicts: some hit
    input_ids, attention_mask = left_pad([[5, 9, 2, 7], [3, 1], [8, 8, 4, 6, 2, 9, 1]], pad_token_id=0)
    forward = GatedKV.forward
    noise = torch.Generator().manual_seed(0)

    def noisy(self, *args, **kwargs):
        logits = forward(self, *args, **kwargs)
        if self.draft_logits is not None and self.draft_logits.shape[1] > 1:
            self.draft_logits = self.draft_logits.clone()  # alone, the target's logits are its drafts
            for column in (0, self.draft_logits.shape[1] - 1):
                self.draft_logits[:, column] = torch.randn(self.draft_logits[:, column].shape, generator=noise,
                                                           dtype=self.draft_logits.dtype)
        return logits

    for n in (3, 4, 6):
        common = dict(block_size=n, max_new_tokens=40, init=init, seed=3, draft_model=drafter)
        clean = drafted(target, input_ids, attention_mask, **common)
        with monkeypatch.context() as patch:
            patch.setattr(GatedKV, "forward", noisy)
            noised = drafted(target, input_ids, attention_mask, **common)
        assert noised.token_ids == clean.token_ids
        assert [s.forward_passes for s in noised.stats] == [s.forward_passes for s in clean.stats], n
        assert sum(s.forward_passes for s in clean.stats) < sum(len(t) for t in clean.token_ids)  # some drafts hit


def test_a_bfloat16_target_drafts_through_its_float32_adapter_folded():
    """PEFT keeps a LoRA adapter's weights in float32 under a bfloat16 model; the folded drafter
    runs them in the model's dtype and drafts what PEFT's own layers draft (bfloat16 rounding
    apart: this random adapter's deltas are as large as the model's own)."""
    import torch

    model = tiny_model("llama", seed=1, dtype=torch.bfloat16)
    folded = tiny_adapter(model, seed=3, gated=True)
    hooked = tiny_adapter(model, seed=3, gated=True, folded=False)
    assert {p.dtype for name, p in hooked.model.named_parameters() if "lora_" in name} == {torch.float32}
    context, fed = torch.tensor([[4, 9, 2, 7, 1]]), torch.tensor([[3, 8, 6]])
    drafts = []
    for drafter in (folded, hooked):
        store = drafter.store(8)
        store.forward(context, torch.arange(5)[None], None)
        store.forward(fed, torch.arange(5, 8)[None], None)
        drafts.append(store.draft_logits.float())
    assert torch.equal(drafts[0].argmax(-1), drafts[1].argmax(-1))
    assert (drafts[0] - drafts[1]).norm() < 0.25 * drafts[1].norm()


def test_an_adapter_drafter_leaves_the_target_unchanged():
    """The adapter lives on a copy of the module tree that shares the weights: the target's own
    forward (every other decoder) is as before, and no weight is duplicated."""
    model = tiny_model("llama", seed=1)
    prompts = [[3, 5, 7], [2, 4]]
    before = decode(model, "ar", prompts, max_new_tokens=20).token_ids
    adapter = tiny_adapter(model, seed=3)
    assert decode(model, "ar", prompts, max_new_tokens=20).token_ids == before
    shared = {p.data_ptr() for p in model.parameters()}
    base = [p for name, p in adapter.model.named_parameters() if "lora_" not in name]
    assert base and all(p.data_ptr() in shared for p in base)


def test_decode_runs_drafted_by_name_and_needs_a_draft_model():
    target, drafter = tiny_model("qwen2", seed=1), tiny_model("qwen2", seed=2)
    prompts = [[3, 5, 7], [2, 4]]
    expected = decode(target, "ar", prompts, max_new_tokens=20).token_ids
    assert decode(target, "drafted:8:lookup", prompts, max_new_tokens=20, draft_model=drafter).token_ids == expected
    from cllm.errors import CllmError

    with pytest.raises(CllmError, match="needs a drafter"):
        decode(target, "drafted:8", prompts, max_new_tokens=20)
    with pytest.raises(CllmError, match="candidates go with an adapter drafter"):
        decode(target, "drafted:8:lookup:3", prompts, max_new_tokens=20, draft_model=drafter)
    adapter = tiny_adapter(target, seed=2, gated=True)
    assert decode(target, "drafted:8:lookup:3", prompts, max_new_tokens=20, draft_model=adapter).token_ids == expected
