"""Rows joining and leaving a running decode (a server's continuous batching): every row still gets
exactly the output it gets decoded alone, greedy or sampled, whatever joined or left beside it."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
from tiny_models import ARCHS, VOCAB, tiny_model

from cllm.decoding import Sampling, ar, jacobi, left_pad, lookahead
from cllm.decoding.core import Admission, DecodeStats

CASES_PER_ARCH = 25  # x 4 decoders x 3 architectures = 300 cases


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling
    seed: int
    arrives: int  # the admit() call that brings it (0: in the first batch)
    cancel_at: int | None = None  # the cancelled() call after which it is dropped


class ScriptedControl:
    """Admits requests on schedule, cancels on schedule, records what finished (BatchControl)."""

    def __init__(self, requests: list[Request]) -> None:
        self.requests = requests
        self.admits = self.cancel_checks = 0
        self.order = [i for i, r in enumerate(requests) if r.arrives == 0]  # row index -> request number
        self.done: dict[int, tuple[list[int], DecodeStats]] = {}

    def admit(self) -> Admission | None:
        self.admits += 1
        due = [i for i, r in enumerate(self.requests) if r.arrives == self.admits]
        if not due:
            return None
        self.order += due
        chosen = [self.requests[i] for i in due]
        return Admission([r.prompt for r in chosen], [r.max_new_tokens for r in chosen],
                         [r.sampling for r in chosen], [r.seed for r in chosen])

    def cancelled(self) -> set[int]:
        self.cancel_checks += 1
        return {row for row, number in enumerate(self.order)
                if (at := self.requests[number].cancel_at) is not None and at <= self.cancel_checks}

    def finished(self, row: int, token_ids: list[int], stats: DecodeStats) -> None:
        assert row not in self.done, "a row finished twice"
        self.done[row] = (list(token_ids), stats)


def random_requests(rng: random.Random) -> list[Request]:
    requests = []
    for number in range(rng.randint(2, 7)):
        sampling = rng.choice([Sampling(), Sampling(), Sampling(0.8, 0, 0.9), Sampling(1.2, 10, 1.0)])
        requests.append(Request(
            prompt=[rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 12))],
            max_new_tokens=rng.choice([1, 4, 9, 20, 33]), sampling=sampling, seed=rng.randrange(1000),
            arrives=0 if number == 0 else rng.choice([0, 2, 3, 5, 9, 14]),
            cancel_at=rng.choice([None, None, None, 3, 6]),
        ))
    return requests


DECODERS = {
    "ar": lambda model, rng: (ar, {}),
    "jacobi": lambda model, rng: (
        jacobi,
        {"block_size": rng.choice([2, 4, 8]), "init": rng.choice(["prompt", "lookup"])},
    ),
    "jacobi+candidates": lambda model, rng: (
        jacobi,
        {"block_size": rng.choice([2, 4, 8]), "candidates": rng.randint(1, 3), "ngram": rng.randint(2, 4)},
    ),
    "lookahead": lambda model, rng: (
        lookahead,
        {"window": rng.randint(1, 4), "ngram": rng.randint(2, 4), "candidates": rng.randint(1, 3)},
    ),
}


def decode_scripted(model, decoder, settings: dict, requests: list[Request], eos: int | None,
                    column_budget: int | None = None, **extra):
    """The requests through `decoder`, joining as scripted (under a server's `column_budget` if
    given): (its output, the control, each request's AR output decoded alone)."""
    alone = [ar(model, torch.tensor([r.prompt]), max_new_tokens=r.max_new_tokens, eos_token_id=eos,
                sampling=r.sampling, seed=r.seed).token_ids[0] for r in requests]
    control = ScriptedControl(requests)
    control.column_budget = column_budget
    first = [requests[i] for i in control.order]
    input_ids, attention_mask = left_pad([r.prompt for r in first], pad_token_id=0)
    out = decoder(model, input_ids, attention_mask, max_new_tokens=[r.max_new_tokens for r in first],
                  sampling=[r.sampling for r in first], seed=[r.seed for r in first], eos_token_id=eos,
                  control=control, **settings, **extra)
    return out, control, alone


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", list(DECODERS))
def test_rows_joining_and_leaving_get_their_own_output(arch, name):
    model = tiny_model(arch, seed=1)
    joined_late = cancelled = 0
    for case in range(CASES_PER_ARCH):
        rng = random.Random(f"continuous-{arch}-{name}-{case}")
        requests = random_requests(rng)
        eos = rng.choice([None, rng.randrange(1, VOCAB)])
        decoder, settings = DECODERS[name](model, rng)
        out, control, alone = decode_scripted(model, decoder, settings, requests, eos)
        label = f"case {case}: {settings}"
        assert len(out.token_ids) == len(control.order), label
        for row, number in enumerate(control.order):
            request, expected = requests[number], alone[number]
            tokens, stats = control.done[row]
            assert out.token_ids[row] == tokens, label
            if request.cancel_at is None:
                assert tokens == expected, f"{label}, request {number}"
            else:
                assert tokens == expected[: len(tokens)], f"{label}, cancelled request {number}"
                cancelled += len(tokens) < len(expected)
            assert stats.new_tokens == len(tokens)
        joined_late += sum(0 < r.arrives <= control.admits for r in requests)
        never = [i for i in range(len(requests)) if i not in control.order]
        assert all(requests[i].arrives > control.admits for i in never), "a due request was never admitted"
    assert joined_late > CASES_PER_ARCH and cancelled > 3, "too few joins or cancellations to prove much"


@pytest.mark.parametrize("name", list(DECODERS))
def test_a_column_budget_narrows_the_steps_as_rows_join_and_keeps_every_output(name):
    """A server's column budget (Batch.column_cap): fewer fed columns per row as the batch grows,
    AR steps at 1; every row still gets its own output."""
    model = tiny_model("llama", seed=1)
    for case in range(6):
        rng = random.Random(f"budget-{name}-{case}")
        requests = random_requests(rng)
        budget = rng.choice([1, 3, 8, 40])
        decoder, settings = DECODERS[name](model, rng)
        out, control, alone = decode_scripted(model, decoder, settings, requests, None, column_budget=budget)
        for row, number in enumerate(control.order):
            tokens, stats = control.done[row]
            expected = alone[number]
            assert tokens == expected[: len(tokens)] and (requests[number].cancel_at is not None or
                                                          tokens == expected), f"case {case}, budget {budget}"
            if budget == 1:  # every step an AR step
                assert stats.forward_passes == len(tokens), f"case {case}"
