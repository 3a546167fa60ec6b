"""Predicted Outputs: whatever the prediction (the true answer, an edited one, noise), every parallel
decoder's output is AR's; a right prediction is accepted a block per forward."""

from __future__ import annotations

import math
import random

import pytest
import torch
from tiny_models import VOCAB, tiny_adapter, tiny_model

from cllm.decoding import Sampling, decode
from cllm.decoding.prediction import predicted_continuation

SPECS = ["jacobi:4", "jacobi:8:lookup:2", "lookahead:3:3:3", "lookahead:2:3:2:5", "drafted:4"]
CASES = 6


def test_the_continuation_follows_where_the_output_aligns_with_the_prediction():
    prediction = torch.tensor([10, 11, 12, 13, 10, 11, 14, 15])
    assert predicted_continuation(prediction, torch.tensor([], dtype=torch.long), 3) == [10, 11, 12]
    assert predicted_continuation(prediction, torch.tensor([99, 12]), 2) == [13, 10]
    # "10 11" occurs twice: the occurrence nearest to the output's own position wins
    assert predicted_continuation(prediction, torch.tensor([1, 2, 3, 4, 5, 10, 11]), 2) == [14, 15]
    assert predicted_continuation(prediction, torch.tensor([10, 11]), 2) == [12, 13]
    assert predicted_continuation(prediction, torch.tensor([50]), 2) == []
    assert predicted_continuation(prediction, torch.tensor([15]), 2) == []  # nothing follows its only occurrence


def _edited(tokens: list[int], rng: random.Random) -> list[int]:
    """The answer with a few tokens replaced, inserted and deleted, as an edited file is."""
    edited = list(tokens)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(edited) + 1)
        kind = rng.choice(["replace", "insert", "delete"])
        if kind == "insert" or not edited or at == len(edited):
            edited.insert(at, rng.randrange(1, VOCAB))
        elif kind == "replace":
            edited[at] = rng.randrange(1, VOCAB)
        else:
            del edited[at]
    return edited


@pytest.mark.parametrize("spec", SPECS)
def test_any_prediction_keeps_the_output_and_a_right_one_is_accepted_a_block_at_a_time(spec):
    model = tiny_model("llama", seed=1)
    drafter = tiny_adapter(model, seed=2, gated=True) if spec.startswith("drafted") else None
    forwards = {"none": 0, "right": 0}
    for case in range(CASES):
        rng = random.Random(f"prediction-{spec}-{case}")
        prompts = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 10))] for _ in range(rng.randint(1, 3))]
        sampling = rng.choice([Sampling(), Sampling(temperature=0.9, top_p=0.9)])
        common = dict(max_new_tokens=rng.choice([5, 17, 30]), sampling=sampling, seed=case, draft_model=drafter,
                      eos_token_id=rng.choice([None, rng.randrange(1, VOCAB)]))
        expected = decode(model, "ar", prompts, **common).token_ids
        # some rows of the edited and noisy batches have no prediction at all
        kinds = {"none": None, "right": expected,
                 "edited": [_edited(t, rng) if rng.random() < 0.7 else None for t in expected],
                 "noise": [[rng.randrange(1, VOCAB) for _ in range(rng.randint(0, 20))] if rng.random() < 0.7
                           else None for t in expected]}
        for kind, predictions in kinds.items():
            out = decode(model, spec, prompts, predictions=predictions, **common)
            assert out.token_ids == expected, f"case {case}, {kind} prediction, {sampling}"
            if kind in forwards:
                forwards[kind] += sum(s.forward_passes for s in out.stats)
            if kind == "right" and spec.startswith("jacobi"):
                block = int(spec.split(":")[1])
                for stats, tokens in zip(out.stats, expected):  # the prefill's token, then a block per forward
                    assert stats.forward_passes <= 1 + math.ceil((len(tokens) - 1) / block), f"case {case}"
    assert forwards["right"] < 0.6 * forwards["none"], forwards
