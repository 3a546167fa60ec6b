"""OpenAI fidelity of `cllm serve` with the official client (sync, async, streamed): logprobs and
top_logprobs that are the target's own whichever decoder serves, echo with the prompt's logprobs
(max_tokens 0, as evaluation harnesses ask), Predicted Outputs."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import torch
from test_serve import NAME, chat, running_server
from tiny_models import save_tiny_model

from cllm.decoding import decode
from cllm.models import ModelConfig, load_model

PROMPT = "Tell me a story about a cat."


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(ModelConfig(name=str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", eos_token_id=1,
                                                           chat_template=True))))


def target_logprobs(loaded, prompt_ids: list[int], output_ids: list[int]) -> list[float]:
    """log p(token | everything before it) of each output token, from one plain forward of the target."""
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([prompt_ids + output_ids])).logits[0].float()
    logprobs = logits.log_softmax(-1)[len(prompt_ids) - 1 : -1]
    return [float(row[token]) for row, token in zip(logprobs, output_ids)]


def _drafter(loaded, tmp_path):
    from tiny_models import save_tiny_adapter

    from cllm.drafters import load_drafter

    return load_drafter(str(save_tiny_adapter(loaded.source, tmp_path / "adapter", seed=4)), loaded)


@pytest.mark.parametrize("decoder", ["ar", "jacobi:4", "lookahead:3:3:3:4", "drafted:4"])
def test_logprobs_of_a_greedy_answer_are_the_targets_whichever_decoder_serves(loaded, decoder, tmp_path):
    drafter = _drafter(loaded, tmp_path) if decoder.startswith("drafted") else None
    with running_server(loaded, decoder, drafter=drafter) as server:
        answer = chat(server.client, PROMPT, max_tokens=24, temperature=0, logprobs=True, top_logprobs=3)
        streamed = list(chat(server.client, PROMPT, max_tokens=24, temperature=0, logprobs=True, top_logprobs=3,
                             stream=True))
        plain = chat(server.client, PROMPT, max_tokens=24, temperature=0)
    content = answer.choices[0].logprobs.content
    assert plain.choices[0].logprobs is None
    prompt_ids = loaded.encode_messages([{"role": "user", "content": PROMPT}])
    output_ids = decode(loaded, "ar", [prompt_ids], max_new_tokens=24).token_ids[0]  # greedy AR: what was served
    output_ids = [token for token in output_ids if token not in loaded.eos_token_ids]
    expected = target_logprobs(loaded, prompt_ids, output_ids)
    assert [entry.token for entry in content] == [loaded.tokenizer.decode([token]) for token in output_ids]
    assert len(content) == len(expected) > 0
    for entry, logprob in zip(content, expected):
        assert abs(entry.logprob - logprob) < 1e-5
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob >= entry.logprob - 1e-6  # greedy
        assert bytes(entry.bytes).decode() == entry.token
    in_chunks = [e for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
                 for e in chunk.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 6)) for e in in_chunks] == [(e.token, round(e.logprob, 6)) for e in content]


def test_echo_with_logprobs_scores_the_prompt_as_evaluation_harnesses_ask(loaded):
    """lm-eval's loglikelihood requests: echo, max_tokens 0, logprobs 1: the prompt's tokens with
    the target's logprob of each after the ones before it (none for the first), nothing generated."""
    text = "The cat sat on the mat."
    ids = list(loaded.tokenizer(text).input_ids)
    with running_server(loaded, "jacobi:4") as server:
        scored = server.client.completions.create(model=NAME, prompt=text, max_tokens=0, echo=True, logprobs=1,
                                                  temperature=0)
        both = server.client.completions.create(model=NAME, prompt=ids, max_tokens=5, echo=True, logprobs=2,
                                                temperature=0)
        refused = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": text, "max_tokens": 0})
        refused_chat = httpx.post(server.url + "/v1/chat/completions",
                                  json={"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                                        "top_logprobs": 2})
    choice = scored.choices[0]
    assert choice.text == text and scored.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = target_logprobs(loaded, ids[:1], ids[1:])
    assert all(abs(a - b) < 1e-5 for a, b in zip(lp.token_logprobs[1:], expected))
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(ids))]
    # echo with a completion: the prompt's entries, then the answer's (the target's too)
    generated = both.choices[0].logprobs
    assert both.choices[0].text.startswith(text) and len(generated.tokens) == len(ids) + 5
    assert generated.token_logprobs[: len(ids)][1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-6)
    answer_ids = loaded.tokenizer(both.choices[0].text[len(text):], add_special_tokens=False).input_ids
    assert generated.token_logprobs[len(ids):] == pytest.approx(target_logprobs(loaded, ids, answer_ids), abs=1e-5)
    assert all(len(top) <= 2 for top in generated.top_logprobs[1:])
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"
    assert refused_chat.status_code == 400 and "logprobs" in refused_chat.json()["error"]["message"]


def test_the_async_client_streams_and_answers_like_the_sync_one(loaded):
    """The async client: whole, streamed, with logprobs, with a prediction, and a completion with
    echo: the same as the sync client's answers."""
    messages = [{"role": "user", "content": PROMPT}]
    with running_server(loaded, "jacobi:4") as server:
        sync = chat(server.client, PROMPT, max_tokens=16, temperature=0, logprobs=True, top_logprobs=2)
        expected = sync.choices[0].message.content
        echoed = server.client.completions.create(model=NAME, prompt="abc", max_tokens=4, echo=True, logprobs=1)

        async def ask() -> tuple:
            client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
            create = client.chat.completions.create
            whole = await create(model=NAME, messages=messages, max_tokens=16, temperature=0, logprobs=True,
                                 top_logprobs=2)
            stream = await create(model=NAME, messages=messages, max_tokens=16, temperature=0, stream=True)
            pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
            predicted = await create(model=NAME, messages=messages, max_tokens=16, temperature=0,
                                     prediction={"type": "content", "content": expected})
            completion = await client.completions.create(model=NAME, prompt="abc", max_tokens=4, echo=True,
                                                         logprobs=1)
            await client.close()
            return whole, "".join(pieces), predicted, completion

        whole, joined, predicted, completion = asyncio.run(ask())
    assert whole.choices[0].message.content == joined == predicted.choices[0].message.content == expected
    assert whole.choices[0].logprobs.content == sync.choices[0].logprobs.content
    assert completion.choices[0].text == echoed.choices[0].text
    assert completion.choices[0].logprobs.token_logprobs == echoed.choices[0].logprobs.token_logprobs


@pytest.mark.parametrize("decoder", ["jacobi:8", "lookahead:3:3:3"])
def test_a_right_prediction_gives_the_same_text_in_fewer_forwards(loaded, decoder):
    """OpenAI's Predicted Outputs: the prediction only guesses. The true answer as the prediction:
    the same text, fewer forwards; a wrong one: still the same text."""
    with running_server(loaded, decoder) as server:
        def ask(prediction: str | None):
            extra = {"prediction": {"type": "content", "content": prediction}} if prediction is not None else {}
            return chat(server.client, PROMPT, max_tokens=40, temperature=0, **extra)

        plain = ask(None)
        text = plain.choices[0].message.content
        right, wrong = ask(text), ask("Something else entirely, " * 3)
        parts = server.client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": PROMPT}], max_tokens=40, temperature=0,
            prediction={"type": "content", "content": [{"type": "text", "text": text}]})
    assert right.choices[0].message.content == wrong.choices[0].message.content == text
    assert parts.choices[0].message.content == text and len(text) > 20
    forwards = [answer.model_extra["cllm"]["forward_passes"] for answer in (plain, right, parts)]
    assert forwards[1] == forwards[2] < forwards[0] / 2, forwards
