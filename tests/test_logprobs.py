"""Logprobs from every cached decoder are the target's own: the log-softmax of a plain forward
over prompt + output at each emitted token, with the same top tokens (float64 tiny models)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from test_continuous_batching import DECODERS, ScriptedControl, random_requests
from tiny_models import VOCAB, tiny_adapter, tiny_model

from cllm.decoding import Sampling, decode, left_pad
from cllm.decoding.core import Admission
from cllm.decoding.logprobs import prompt_logprobs
from cllm.errors import CllmError

CASES = 12  # per architecture and decoder
SPECS = ["ar", "jacobi:4:lookup", "jacobi:8:repeat:3", "lookahead:3:3:3", "lookahead:2:4:2:3", "drafted:4:lookup"]


def reference(model, prompt: list[int], output: list[int], top: int) -> list[tuple[float, list[int]]]:
    """(log p(token), the top token ids) at each output token, from one forward without a cache."""
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([prompt + output])).logits[0].log_softmax(-1)[len(prompt) - 1 : -1]
    return [(float(row[token]), row.topk(top).indices.tolist()) for row, token in zip(logprobs, output)]


def assert_target_logprobs(model, prompt: list[int], output: list[int], entries, top: int, label: str) -> None:
    assert entries is not None and [e.token for e in entries] == output, label
    for t, (entry, (logprob, top_ids)) in enumerate(zip(entries, reference(model, prompt, output, top))):
        assert abs(entry.logprob - logprob) < 1e-9, f"{label}: token {t}"
        assert [i for i, _ in entry.top] == top_ids, f"{label}: token {t}"
        assert all(abs(v - entry.logprob) < 1e-9 for i, v in entry.top if i == entry.token), label


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_decoder_reports_the_targets_logprobs(arch, spec):
    model = tiny_model(arch, seed=1)
    drafter = tiny_adapter(model, seed=2, gated=True) if spec.startswith("drafted") else None
    for case in range(CASES):
        rng = random.Random(f"logprobs-{arch}-{spec}-{case}")
        prompts = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 10))] for _ in range(rng.randint(1, 3))]
        wanted = [rng.choice([None, 0, 3]) for _ in prompts]
        sampling = rng.choice([Sampling(), Sampling(temperature=0.9, top_p=0.9)])
        eos = rng.choice([None, rng.randrange(1, VOCAB)])
        streamed: dict[int, list] = {}
        out = decode(model, spec, prompts, max_new_tokens=rng.choice([1, 6, 19]), sampling=sampling, seed=case,
                     eos_token_id=eos, draft_model=drafter, logprobs=wanted,
                     on_tokens=lambda row, tokens, logprobs=None: logprobs is None or
                     streamed.setdefault(row, []).extend(logprobs))
        for row, (prompt, top) in enumerate(zip(prompts, wanted)):
            label = f"case {case} row {row} top {top} {sampling}"
            if top is None:
                assert (out.logprobs is None or out.logprobs[row] is None) and row not in streamed, label
                continue
            assert_target_logprobs(model, prompt, out.token_ids[row], out.logprobs[row], top, label)
            assert streamed[row] == out.logprobs[row], label


class LogprobControl(ScriptedControl):
    """ScriptedControl whose joining rows ask for `wanted[request]` top logprobs."""

    def __init__(self, requests: list, wanted: list[int | None]) -> None:
        super().__init__(requests)
        self.wanted = wanted

    def admit(self) -> Admission | None:
        admission = super().admit()
        if admission is None:
            return None
        return replace(admission, logprobs=[self.wanted[i] for i in self.order[-len(admission.prompts):]])


@pytest.mark.parametrize("name", ["ar", "jacobi+candidates", "lookahead"])
def test_rows_joining_with_logprobs_get_the_targets(name):
    """Continuous batching: rows that join later asking for logprobs get the target's, beside rows that do not."""
    model = tiny_model("qwen2", seed=1)
    checked = 0
    for case in range(10):
        rng = random.Random(f"logprobs-joining-{name}-{case}")
        requests = random_requests(rng)
        control = LogprobControl(requests, [rng.choice([None, 0, 2]) for _ in requests])
        decoder, settings = DECODERS[name](model, rng)
        first = [requests[i] for i in control.order]
        input_ids, attention_mask = left_pad([r.prompt for r in first], pad_token_id=0)
        out = decoder(model, input_ids, attention_mask, max_new_tokens=[r.max_new_tokens for r in first],
                      sampling=[r.sampling for r in first], seed=[r.seed for r in first], control=control,
                      logprobs=[control.wanted[i] for i in control.order], **settings)
        for row, number in enumerate(control.order):
            top, label = control.wanted[number], f"case {case} request {number} {settings}"
            if top is None:
                assert out.logprobs is None or out.logprobs[row] is None, label
                continue
            tokens = control.done[row][0]
            assert_target_logprobs(model, requests[number].prompt, tokens, out.logprobs[row], top, label)
            checked += requests[number].arrives > 0
    assert checked >= 3, "too few rows that joined late asked for logprobs"


def test_prompt_logprobs_are_the_targets():
    model = tiny_model("llama", seed=1)
    prompt = [5, 17, 3, 40, 40, 9]
    entries = prompt_logprobs(model, prompt, 2)
    assert entries[0] is None and len(entries) == len(prompt)
    assert_target_logprobs(model, prompt[:1], prompt[1:], entries[1:], 2, "prompt")


def test_a_decoder_without_a_batch_refuses_logprobs():
    with pytest.raises(CllmError, match="cannot report logprobs"):
        decode(tiny_model("llama"), "hf", [[3, 4]], max_new_tokens=2, logprobs=0)
