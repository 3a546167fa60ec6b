"""`cllm serve` on a tiny model, talked to with the official openai client: the same text as
`cllm generate`, concurrent streams, the queue's 429s, 400s for malformed requests, disconnects,
timeouts, metrics, graceful shutdown; `cllm chat` and `cllm serve-bench`."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import openai
import pytest
import uvicorn
from tiny_models import save_tiny_model

from cllm.cli import build_parser, main
from cllm.cli.serve import SERVED
from cllm.decoding import DecoderSpec
from cllm.decoding.spec import SERVABLE
from cllm.errors import CllmError
from cllm.models import ModelConfig, load_model
from cllm.serving.api import create_app
from cllm.serving.engine import Engine
from cllm.serving.load import free_port
from cllm.serving.schemas import ChatCompletionRequest, parse
from cllm.serving.settings import ServeSettings
from cllm.serving.text import TextAssembler

CLLM = [sys.executable, "-m", "cllm.cli"]
NAME = "tiny"
# With the tokenizer's <eos> (id 1) as EOS, some of these end early (mid-block), others run to the limit.
PROMPTS = ["Tell me a story about a cat.", "abc", "Why is the sky blue?", "Count: 1, 2, 3", "Name three colors.",
           "hello", "What is 2+2?", "x"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", eos_token_id=1, chat_template=True))


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(ModelConfig(name=model_dir))


@pytest.fixture(scope="module")
def endless_dir(tmp_path_factory) -> str:
    """A model without EOS: every answer runs to its max_tokens (long requests that stay running)."""
    return str(save_tiny_model(tmp_path_factory.mktemp("endless") / "model", chat_template=True, endless=True))


@pytest.fixture(scope="module")
def endless(endless_dir):
    return load_model(ModelConfig(name=endless_dir))


@contextmanager
def running_server(loaded, decoder: str = "jacobi:8", max_batch: int = 8, max_queue: int = 64, drafter=None,
                   **settings):
    """The app under uvicorn in a thread of this process, on a free port."""
    spec = DecoderSpec.parse(decoder)
    engine = Engine(loaded, spec, max_batch=max_batch, max_queue=max_queue, drafter=drafter)
    app = create_app(engine, ServeSettings(NAME, spec.label, **settings))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    try:
        yield SimpleNamespace(
            url=url, engine=engine, client=openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        )
    finally:
        server.should_exit = True
        thread.join(30)


def generated(capsys, model_dir: str, prompts: list[str], *args: str) -> list[dict]:
    """`cllm generate --json` records of these prompts (one call per prompt: prompt 0's seed is --seed)."""
    records = []
    for prompt in prompts:
        assert main(["generate", prompt, "--model", model_dir, "--json", *args]) == 0
        records += [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return records


def chat(client, prompt: str, **kwargs):
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}], **kwargs)


def streamed(client, prompt: str, **kwargs) -> tuple[str, list]:
    chunks = list(chat(client, prompt, stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_a_drafted_server_answers_concurrent_requests_with_the_model_s_own_text(loaded, model_dir, tmp_path, capsys):
    """A LoRA drafter in the serving batch (rows joining and leaving in pairs): every answer is the
    model's own AR text."""
    from concurrent.futures import ThreadPoolExecutor

    from tiny_models import save_tiny_adapter

    from cllm.drafters import load_drafter

    expected = generated(capsys, model_dir, PROMPTS, "--decoder", "ar", "--max-new-tokens", "40")
    drafter = load_drafter(str(save_tiny_adapter(model_dir, tmp_path / "adapter", seed=4)), loaded)
    with running_server(loaded, "drafted:8", max_batch=4, drafter=drafter) as server:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            responses = list(pool.map(lambda p: chat(server.client, p, max_tokens=40, temperature=0), PROMPTS))
    assert [r.choices[0].message.content for r in responses] == [r["text"] for r in expected]
    assert {r.model_extra["cllm"]["decoder"] for r in responses} == {"drafted:8"}


@pytest.mark.parametrize(
    "decoder, generate_flags",
    [
        ("ar", ["--decoder", "ar"]),
        ("jacobi:8", ["--decoder", "jacobi", "--block-size", "8"]),
        (
            "lookahead:3:3:3:6",
            ["--decoder", "lookahead", "--window", "3", "--ngram", "3", "--candidates", "3", "--draft", "6"],
        ),
    ],
)
def test_chat_and_completions_equal_generate(loaded, model_dir, capsys, decoder, generate_flags):
    spec = DecoderSpec.parse(decoder)
    flags = [*generate_flags, "--max-new-tokens", "40"]
    expected = generated(capsys, model_dir, PROMPTS, *flags)
    raw = generated(capsys, model_dir, PROMPTS[:3], *flags, "--raw")
    sampled = generated(capsys, model_dir, PROMPTS[:3], *flags, "--temperature", "0.8", "--top-p", "0.9", "--seed", "7")
    reasons = set()
    with running_server(loaded, decoder) as server:
        for prompt, record in zip(PROMPTS, expected):
            response = chat(server.client, prompt, max_tokens=40, temperature=0)
            assert response.choices[0].message.content == record["text"]
            assert response.usage.completion_tokens == len(record["token_ids"])
            assert response.model_extra["cllm"]["decoder"] == spec.label
            reasons.add(response.choices[0].finish_reason)
            text, chunks = streamed(server.client, prompt, max_tokens=40, temperature=0)
            assert text == record["text"]
            assert chunks[-1].usage.completion_tokens == len(record["token_ids"])
            assert chunks[-2].choices[0].finish_reason == response.choices[0].finish_reason
        for prompt, record in zip(PROMPTS, raw):
            completion = server.client.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0)
            assert completion.choices[0].text == record["text"]
            pieces = server.client.completions.create(
                model=NAME, prompt=prompt, max_tokens=40, temperature=0, stream=True
            )
            assert "".join(p.choices[0].text for p in pieces) == record["text"]
        for prompt, record in zip(PROMPTS, sampled):
            response = chat(server.client, prompt, max_tokens=40, temperature=0.8, top_p=0.9, seed=7)
            assert response.choices[0].message.content == record["text"]
    assert reasons == {"stop", "length"}  # EOS inside the output and the limit both came up


def test_sixteen_concurrent_streams_get_their_own_texts(loaded, model_dir, capsys):
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} #{i}" for i in range(16)]
    limits = [10 + 7 * (i % 5) for i in range(16)]
    expected = [generated(capsys, model_dir, [p], "--decoder", "ar", "--max-new-tokens", str(n))[0]["text"]
                for p, n in zip(prompts, limits)]
    with running_server(loaded, "jacobi:4", max_batch=5) as server:  # more requests than rows: later ones join
        with ThreadPoolExecutor(16) as pool:
            texts = list(pool.map(lambda args: streamed(server.client, args[0], max_tokens=args[1], temperature=0)[0],
                                  zip(prompts, limits)))
        assert texts == expected
        assert server.engine.counters.decoder_calls < 16  # requests shared decoder calls
        assert server.engine.running == 0 and server.engine.queue_depth == 0


def posted_together(url: str, count: int, prompt: str, max_tokens: int) -> list[httpx.Response]:
    """`count` identical chat requests sent at once, non-streamed."""
    body = {"model": NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: httpx.post(url + "/v1/chat/completions", timeout=60, json=body), range(count)))


def test_a_flood_beyond_the_queue_gets_429_and_the_server_keeps_serving(endless):
    with running_server(endless, "ar", max_batch=1, max_queue=2) as server:
        responses = posted_together(server.url, 12, "flood", max_tokens=400)
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) >= 3 and statuses.count(429) >= 1 and set(statuses) == {200, 429}, statuses
        refused = next(r for r in responses if r.status_code == 429)
        assert int(refused.headers["Retry-After"]) >= 1
        assert "busy" in refused.json()["error"]["message"]
        assert chat(server.client, "still there?", max_tokens=5).usage.completion_tokens >= 1
        metrics = httpx.get(server.url + "/metrics").text
        assert 'cllm_requests_total{endpoint="/v1/chat/completions",status="429"}' in metrics


BAD_CHAT_BODIES = [
    (b"{", "not valid JSON"),
    (b"[1, 2]", "object"),
    (b'"text"', "object"),
    (b"{}", "model"),
    (b'{"model": "tiny"}', "messages"),
    (b'{"model": "tiny", "messages": []}', "messages"),
    (b'{"model": "tiny", "messages": "hi"}', "messages"),
    (b'{"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}', "role"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": 3}]}', "content"),
    (b'{"model": "tiny", "messages": [{"role": "user"}]}', "content"),
    (b'{"model": 5, "messages": [{"role": "user", "content": "hi"}]}', "model"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "3"}', "max_tokens"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "max_tokens"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -4}', "max_tokens"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2.5}', "max_tokens"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}', "context"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}', "temperature"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', "temperature"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}', "top_p"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}', "top_p"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_k": -2}', "top_k"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "seed": "s"}', "seed"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": 7}', "stop"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": ["a","b","c","d","e"]}', "stop"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2}', "n"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "logprobs": 1}', "logprobs"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 21}',
     "top_logprobs"),
    ('{"model": "tiny", "messages": [{"role": "user", "content": "%s"}]}' % ("long " * 200), "context"),
]
BAD_COMPLETION_BODIES = [
    (b'{"model": "tiny", "prompt": 5}', "prompt"),
    (b'{"model": "tiny", "prompt": ["a", "b"], "stream": true}', "stream one prompt at a time"),
    (b'{"model": "tiny", "prompt": []}', "1 to 16 prompts"),
    (('{"model": "tiny", "prompt": %s}' % json.dumps(["a"] * 17)).encode(), "1 to 16 prompts"),
    (b'{"model": "tiny", "prompt": [1, "a"]}', "prompt"),
    (b'{"model": "tiny", "prompt": [[]]}', "token ids"),
    (b'{"model": "tiny", "prompt": [1, 99999999]}', "token ids"),
    (b'{"model": "tiny", "prompt": ""}', "prompt"),
    (b'{"model": "tiny", "prompt": "a", "echo": true, "stream": true}', "echo"),
    (b'{"model": "tiny", "prompt": "a", "logprobs": 6}', "logprobs"),
    (b'{"model": "tiny", "prompt": "a", "max_tokens": 0}', "max_tokens"),
]


def test_malformed_requests_get_400_with_a_message(loaded):
    with running_server(loaded) as server:
        for path, cases in (("/v1/chat/completions", BAD_CHAT_BODIES), ("/v1/completions", BAD_COMPLETION_BODIES)):
            for body, word in cases:
                response = httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"})
                assert response.status_code == 400, (body, response.text)
                message = response.json()["error"]["message"]
                assert word in message, (body, message)
        unknown_model = httpx.post(server.url + "/v1/chat/completions",
                                   json={"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]})
        assert unknown_model.status_code == 404 and "tiny" in unknown_model.json()["error"]["message"]
        assert httpx.get(server.url + "/v1/nothing").status_code == 404
        assert httpx.get(server.url + "/v1/chat/completions").status_code == 405
        # unknown fields are ignored, as OpenAI's own clients send many
        ok = httpx.post(server.url + "/v1/chat/completions", json={
            "model": NAME, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 3, "user": "me", "presence_penalty": 0, "something_new": {"a": 1}})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            chat(server.client, "hi", max_tokens=0)
        assert "500" not in httpx.get(server.url + "/metrics").text.split("cllm_generated_tokens")[0]


def test_a_client_that_disconnects_frees_its_row(endless):
    with running_server(endless, "ar") as server:
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=30, json={
                "model": NAME, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 450,
                "stream": True}) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if '"content": "' in line and '"content": ""' not in line)
            assert server.engine.running == 1
        deadline = time.monotonic() + 10
        while server.engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.engine.running == 0
        assert 0 < server.engine.counters.new_tokens < 450  # it left before its limit


def test_timeouts_end_requests_with_504_and_the_server_goes_on(endless):
    with running_server(endless, "ar", max_batch=1, request_timeout=0.3) as server:
        responses = posted_together(server.url, 3, "slow", max_tokens=450)
        timed_out = [r for r in responses if r.status_code == 504]
        assert timed_out and all("timed out" in r.json()["error"]["message"] for r in timed_out)
        assert chat(server.client, "quick", max_tokens=3).usage.completion_tokens >= 1


def test_stop_strings_end_the_text_before_them(loaded, model_dir, capsys):
    record, = generated(capsys, model_dir, [PROMPTS[2]], "--decoder", "ar", "--max-new-tokens", "30")
    stop = record["text"][7:9]
    with running_server(loaded) as server:
        response = chat(server.client, PROMPTS[2], max_tokens=30, stop=[stop, "never"])
        assert response.choices[0].message.content == record["text"][: record["text"].index(stop)]
        assert response.choices[0].finish_reason == "stop"
        text, _ = streamed(server.client, PROMPTS[2], max_tokens=30, stop=stop)
        assert text == response.choices[0].message.content


def test_health_models_metrics_and_page(loaded):
    with running_server(loaded) as server:
        health = httpx.get(server.url + "/health").json()
        assert health["status"] == "ok" and health["model"] == NAME and health["decoder"] == "jacobi:8"
        assert health["column_budget"] == 8  # by default: one row at full width
        assert [m.id for m in server.client.models.list()] == [NAME]
        chat(server.client, "hi", max_tokens=12)
        streamed(server.client, "hello", max_tokens=12)
        metrics = httpx.get(server.url + "/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        for series in ("cllm_requests_total", "cllm_generated_tokens_total", "cllm_tokens_per_forward",
                       "cllm_queue_depth", "cllm_running_requests", "cllm_time_to_first_token_seconds_bucket",
                       "cllm_request_latency_seconds_count 2.0"):
            assert series in metrics.text, series
        page = httpx.get(server.url + "/")
        assert page.status_code == 200 and "/v1/chat/completions" in page.text and "tokens/forward" in page.text


def test_text_assembler_holds_back_what_could_become_a_stop_string(loaded):
    tokenizer = loaded.tokenizer
    ids = tokenizer("abcdefgh").input_ids
    assembler = TextAssembler(tokenizer, stop=["def", "xyz"])
    pieces = [assembler.add([token]) for token in ids]
    assert pieces[:3] == ["a", "b", "c"] and pieces[3:5] == ["", ""]  # "d", "de" may begin "def"
    assert "".join(pieces) == "abc" and assembler.stopped and assembler.flush() == ""
    plain = TextAssembler(tokenizer, stop=["zz"])
    assert "".join(plain.add([t]) for t in tokenizer("abz").input_ids) == "ab"
    assert plain.flush() == "z"  # the end: a partial stop string is text after all


def test_requests_are_validated_strictly():
    good = parse(
        ChatCompletionRequest, b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 1}'
    )
    assert good.temperature == 1.0 and good.token_limit is None


def test_the_cli_lists_the_decoders_the_engine_serves():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    choices = next(a.choices for a in serve._actions if "--decoder" in a.option_strings)
    assert SERVABLE == ("ar", "jacobi", "drafted", "lookahead")
    assert tuple(choices) == tuple(SERVED) == ("ar", "jacobi", "lookahead")  # drafted: jacobi with --drafter
    with pytest.raises(CllmError, match="cannot serve"):
        Engine(None, DecoderSpec.parse("hf"))


@pytest.mark.heavy
@pytest.mark.parametrize("grace", ["0", "30"])
def test_serve_shuts_down_gracefully_and_ends_running_streams(endless_dir, grace):
    port = free_port()
    process = subprocess.Popen([*CLLM, "serve", "--model", endless_dir, "--served-name", NAME, "--decoder", "ar",
                                "--port", str(port), "--shutdown-grace", grace, "--log-level", "warning"],
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health")
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
                time.sleep(0.2)
        lines = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
                "model": NAME, "messages": [{"role": "user", "content": "long"}], "max_tokens": 480,
                "stream": True}) as response:
            for line in response.iter_lines():
                lines.append(line)
                if len(lines) == 3:
                    process.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once it has shut down, so the process ends as SIGTERM asks
        assert process.wait(60) in (0, -signal.SIGTERM)
        log = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
    assert "Traceback" not in log, log
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    last = json.loads(data[-2])
    if grace == "0":
        assert "shutting down" in last["error"]["message"]  # the running stream was ended, cleanly
    else:
        assert last["choices"][0]["finish_reason"] == "length"  # it was let finish


@pytest.mark.heavy
def test_chat_streams_replies_keeps_history_and_survives_ctrl_c(model_dir, endless_dir, capsys):
    expected, = generated(capsys, model_dir, ["hello"], "--decoder", "jacobi", "--max-new-tokens", "30")
    process = subprocess.Popen([*CLLM, "chat", "--model", model_dir, "--max-new-tokens", "30"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=os.environ | {"COLUMNS": "1000"})
    out, _ = process.communicate("hello\n/stats\n/reset\n/nope\n/quit\n", timeout=120)
    assert process.returncode == 0, out
    assert expected["text"] in out
    assert "tokens/forward" in out and "conversation forgotten" in out and "unknown command /nope" in out

    process = subprocess.Popen([*CLLM, "chat", "--model", endless_dir, "--decoder", "ar", "--max-new-tokens", "480"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=os.environ | {"COLUMNS": "1000"})
    process.stdin.write("tell me everything\n")
    process.stdin.flush()
    seen = ""
    while "model>" not in seen:
        seen += process.stdout.read(1)
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate("/stats\n/quit\n", timeout=120)
    assert process.returncode == 0, seen + out
    assert "(stopped)" in out and "last reply:" in out  # the reply stopped and the chat went on


@pytest.mark.heavy
def test_serve_bench_reports_every_decoder_and_level(model_dir, tmp_path):
    out = tmp_path / "load"
    result = subprocess.run([*CLLM, "serve-bench", "--model", model_dir, "--decoders", "ar,jacobi:4",
                             "--concurrency", "1,3", "--requests", "4", "--max-new-tokens", "12", "--out", str(out)],
                            check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    levels = json.loads((out / "serve-bench.json").read_text())["levels"]
    assert [(r["label"], r["concurrency"]) for r in levels] == [("ar", 1), ("ar", 3), ("jacobi:4", 1), ("jacobi:4", 3)]
    assert all(r["errors"] == 0 and r["tokens_per_second"] > 0 and r["ttft_p50"] <= r["latency_p50"] for r in levels)
    assert "| jacobi:4 | 3 |" in (out / "serve-bench.md").read_text()


@pytest.mark.heavy
def test_live_page_chats_in_a_real_browser_and_colours_fast_forwarded_text(loaded, model_dir, capsys):
    if shutil.which("chromium") is None:  # scripts/setup.sh installs Debian's where it may
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("no chromium: scripts/setup.sh could not install Debian's, and CI must run the browser test")
        pytest.skip("no chromium installed (scripts/setup.sh installs Debian's when run as root)")
    from playwright import sync_api
    prompt = PROMPTS[0]
    expected, = generated(capsys, model_dir, [prompt], "--decoder", "jacobi", "--block-size", "8", "--init", "lookup",
                          "--max-new-tokens", "60")
    with running_server(loaded, "jacobi:8:lookup") as server:
        _, chunks = streamed(server.client, prompt, max_tokens=60, temperature=0)
        fast = [c for c in chunks if c.choices and c.choices[0].delta.content
                and c.model_extra["cllm"]["tokens"] > c.model_extra["cllm"]["forwards"]]
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.goto(server.url + "/")
                page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
                page.fill("#max_tokens", "60")
                page.fill("#prompt", prompt)
                page.press("#prompt", "Enter")
                page.wait_for_selector(".assistant .stats:has-text('tokens/forward')", timeout=30000)
                reply = page.eval_on_selector(".assistant", "e => [...e.childNodes].filter(n => n.nodeName === 'SPAN')"
                                              ".map(n => n.textContent).join('')")
                coloured = page.eval_on_selector_all(".assistant span.ff", "spans => spans.map(s => s.textContent)")
            finally:
                browser.close()
    assert reply == expected["text"]
    assert coloured == [c.choices[0].delta.content for c in fast]


def test_what_openai_clients_send_is_understood_or_refused_with_a_400_that_says_so(loaded):
    hi = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    with running_server(loaded) as server:
        url = server.url + "/v1/chat/completions"
        # null means absent; top_k -1 is vLLM's "off"; response_format text is what the server does anyway
        ok = httpx.post(url, json=hi | {"stream": None, "temperature": None, "n": None, "top_k": -1,
                                        "stop": None, "response_format": {"type": "text"}, "tool_choice": "none"})
        assert ok.status_code == 200 and ok.json()["system_fingerprint"] == "cllm-jacobi_8"
        refused = [({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                   ({"tool_choice": "auto"}, "tool_choice"), ({"functions": [{"name": "f"}]}, "functions"),
                   ({"response_format": {"type": "json_object"}}, "response_format"),
                   ({"max_tokens": "3"}, "max_tokens"), ({"top_k": -2}, "top_k"),
                   ({"max_tokens": 100000}, "max_tokens")]
        for extra, param in refused:
            response = httpx.post(url, json=hi | extra)
            error = response.json()["error"]
            assert response.status_code == 400 and error["param"] == param and param in error["message"], extra
        assert "no tool or function calling" in httpx.post(url, json=hi | {"tool_choice": "auto"}).text
        with pytest.raises(openai.BadRequestError, match="response_format"):
            server.client.chat.completions.create(model=NAME, messages=hi["messages"], max_tokens=3,
                                                  response_format={"type": "json_object"})


def test_large_bodies_get_413_before_parsing_and_the_server_goes_on(loaded):
    hi = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with running_server(loaded, max_body_bytes=2000) as server:
        url = server.url + "/v1/chat/completions"
        big = hi | {"messages": [{"role": "user", "content": "x" * 5000}]}
        declared = httpx.post(url, json=big)
        assert declared.status_code == 413 and "at most 2000" in declared.json()["error"]["message"]
        chunked = httpx.post(url, content=(b"x" * 500 for _ in range(10)))  # no Content-Length: counted as it comes
        assert chunked.status_code == 413 and "passes 2000 bytes" in chunked.json()["error"]["message"]
        assert httpx.post(url, json=hi).status_code == 200


def test_a_prompt_longer_than_the_context_can_hold_is_refused_before_it_is_tokenized(loaded, monkeypatch):
    hi = {"model": NAME, "max_tokens": 2}
    with running_server(loaded) as server:
        monkeypatch.setattr(type(loaded.tokenizer), "__call__", lambda *a, **k: pytest.fail("tokenized"))
        monkeypatch.setattr(type(loaded.tokenizer), "apply_chat_template", lambda *a, **k: pytest.fail("tokenized"))
        long = "x" * 600_000  # under the body limit, over any context of 512 tokens
        for path, body, param in (("/v1/completions", {"prompt": long}, "prompt"),
                                  ("/v1/chat/completions", {"messages": [{"role": "user", "content": long}]},
                                   "messages")):
            response = httpx.post(server.url + path, json=hi | body)
            error = response.json()["error"]
            assert response.status_code == 400 and error["param"] == param and "context" in error["message"]


def test_an_api_key_guards_the_api_but_not_health(loaded):
    hi = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with running_server(loaded, api_key="sekret") as server:
        url = server.url + "/v1/chat/completions"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            response = httpx.post(url, json=hi, headers=headers)
            assert response.status_code == 401 and "API key" in response.json()["error"]["message"], headers
            assert response.headers["www-authenticate"] == "Bearer"
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert httpx.post(url, json=hi, headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert httpx.get(server.url + "/health").status_code == 200
        keyed = openai.OpenAI(base_url=server.url + "/v1", api_key="sekret", max_retries=0)
        assert keyed.chat.completions.create(model=NAME, messages=hi["messages"], max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            server.client.chat.completions.create(model=NAME, messages=hi["messages"], max_tokens=2)


def _malformed_bodies(count: int, seed: int = 0) -> list[bytes]:
    """Valid requests broken at random: fields of the wrong type or range, unknown roles and parts,
    truncated or mangled JSON, non-UTF-8 bytes."""
    rng = random.Random(seed)
    values = [None, True, -1, 0, 2**70, 1e308, -0.5, float("nan"), "", "x" * 300, [], [1, "a"], {}, {"a": {"b": []}},
              [{"role": "user"}], [{"type": "image_url"}]]
    fields = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
              "stream_options", "n", "logprobs", "tools", "response_format", "max_completion_tokens", "echo"]
    bodies = []
    for number in range(count):
        body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "max_tokens": 2}
        for _ in range(rng.randint(1, 3)):
            body[rng.choice(fields)] = rng.choice(values)
        text = json.dumps(body, allow_nan=True).encode()
        kind = number % 5
        if kind == 1:
            text = text[: rng.randint(0, len(text) - 1)]
        elif kind == 2:
            position = rng.randrange(len(text))
            text = text[:position] + bytes([rng.randrange(256)]) + text[position + 1:]
        elif kind == 3:
            text = rng.choice([b"\xff\xfe", b"null", b"[]", b"1e999", b'{"messages": [[[[[[]]]]]]}']) + text[:5]
        bodies.append(text)
    return bodies


def test_a_hundred_malformed_bodies_never_get_a_500_nor_stop_the_server(loaded):
    with running_server(loaded) as server:
        for number, body in enumerate(_malformed_bodies(100)):
            path = "/v1/chat/completions" if number % 2 else "/v1/completions"
            response = httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"},
                                  timeout=60)
            assert response.status_code < 500, (body, response.text)
            if response.status_code >= 400:
                assert response.json()["error"]["message"], body
        assert httpx.get(server.url + "/health").json()["status"] == "ok"
        assert chat(server.client, "hi", max_tokens=2).choices[0].message.content is not None


def test_completions_take_token_ids_and_batches_of_prompts(loaded):
    """OpenAI's prompt forms: a batch gets one choice per prompt (index = position), each the same
    text as that prompt alone; token ids are the same prompt as their text."""
    with running_server(loaded) as server:
        def complete(prompt):
            return server.client.completions.create(model=NAME, prompt=prompt, max_tokens=6)

        singles = [complete(text) for text in ("hello world", "abc", "jacobi")]
        alone = [single.choices[0].text for single in singles]
        batch = complete(["hello world", "abc", "jacobi"])
        assert [c.index for c in batch.choices] == [0, 1, 2] and [c.text for c in batch.choices] == alone
        assert batch.usage.completion_tokens == sum(single.usage.completion_tokens for single in singles)
        assert batch.usage.prompt_tokens == sum(single.usage.prompt_tokens for single in singles)
        ids = [list(loaded.tokenizer(text).input_ids) for text in ("hello world", "abc")]
        assert complete(ids[0]).choices[0].text == alone[0]
        assert [c.text for c in complete(ids).choices] == alone[:2]


def test_cors_origins_and_keep_alive_comments(endless):
    hi = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with running_server(endless, cors_origins=("http://app.example",)) as server:
        url = server.url + "/v1/chat/completions"
        preflight = httpx.options(url, headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                                                "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        answer = httpx.post(url, json=hi, headers={"Origin": "http://app.example"})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "http://app.example"
        assert "access-control-allow-origin" not in httpx.post(url, json=hi, headers={"Origin": "http://evil"}).headers
    with running_server(endless, max_batch=1, keepalive_seconds=0.1) as server:
        url = server.url + "/v1/chat/completions"
        assert "access-control-allow-origin" not in httpx.post(url, json=hi, headers={"Origin": "http://a"}).headers
        with ThreadPoolExecutor(1) as pool:  # one long request holds the only row: the next one waits, idle
            long = pool.submit(httpx.post, url, json=hi | {"max_tokens": 200}, timeout=120)
            deadline = time.monotonic() + 30
            while not server.engine.running:
                assert time.monotonic() < deadline and not long.done(), long.result().text
                time.sleep(0.01)
            with httpx.stream("POST", url, json=hi | {"stream": True}, timeout=120) as stream:
                lines = [line for line in stream.iter_lines() if line]
            assert long.result().status_code == 200
        assert ": keep-alive" in lines and lines[-1] == "data: [DONE]"
        assert all(line.startswith(("data: ", ": keep-alive")) for line in lines)


def test_a_chat_template_file_replaces_the_model_s(loaded, tmp_path):
    from cllm.cli.serve import _use_chat_template

    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    model = load_model(ModelConfig(name=loaded.source))
    _use_chat_template(model, template)
    assert model.encode_messages([{"role": "user", "content": "hi"}]) == list(model.tokenizer("[hi]").input_ids)
    template.write_text("{% for m in messages %}")
    with pytest.raises(CllmError, match="--chat-template"):
        _use_chat_template(model, template)


@pytest.mark.slow
def test_the_text_grows_by_the_incremental_decoder_and_ends_as_the_whole_decode(loaded, monkeypatch):
    """Random chunks of real-model tokens (multi-byte characters split across tokens, special
    tokens): released text == tokenizer.decode of everything, and nothing is decoded whole
    before the end (linear in the answer)."""
    from cllm.models import load_model

    tokenizer = load_model("default").tokenizer
    text = "héllo → ok<|im_end|> 你好, wörld: ∑ 🙂 end " * 3
    ids = list(tokenizer(text).input_ids)
    rng = random.Random(0)
    for _ in range(5):
        calls = []
        real = tokenizer.decode
        monkeypatch.setattr(tokenizer, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
        assembler = TextAssembler(tokenizer)
        pieces, at = [], 0
        while at < len(ids):
            step = rng.randint(1, 4)
            pieces.append(assembler.add(ids[at : at + step]))
            at += step
        assert calls == [], "the whole output was decoded again for a new token"
        pieces.append(assembler.flush())
        monkeypatch.undo()
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
        assert all("\ufffd" not in piece for piece in pieces)
    tiny = TextAssembler(loaded.tokenizer)  # the tiny test tokenizer: a fallback or a stream, the same text
    assert "".join(tiny.add([t]) for t in loaded.tokenizer("abc xyz").input_ids) + tiny.flush() == "abc xyz"
