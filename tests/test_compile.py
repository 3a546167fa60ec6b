"""The compiled path (`compile=...`, cllm.decoding.kv.StaticKV): a static cache, padded column
widths and a compiled forward give the eager path's outputs, token for token.

The randomized cases run dynamo with its `eager` backend (the whole static-cache path, traced, in
float64, seconds per graph); a few compile with inductor for real: AOTInductor packages on disk
(float32, and float16 with autotuned GEMMs), and torch.compile where a width cannot be exported."""

from __future__ import annotations

import json
import random
import weakref

import pytest
import torch
from test_continuous_batching import DECODERS as JOINING_DECODERS
from test_continuous_batching import decode_scripted, random_requests
from test_lookahead import random_case
from tiny_models import ARCHS, VOCAB, save_tiny_model, tiny_model
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from cllm.cli import main
from cllm.decoding import ar, jacobi, left_pad, lookahead
from cllm.decoding import compiled as compiled_module
from cllm.decoding import kv as kv_module
from cllm.decoding.compiled import package_directory
from cllm.decoding.kv import DynamicKV, StaticKV, new_store

pytestmark = pytest.mark.heavy  # compiles with inductor



@pytest.fixture(scope="module")
def models() -> dict:
    """One model per architecture for the module: its graphs are traced once, not per test."""
    return {arch: tiny_model(arch, seed=1) for arch in ARCHS}


def random_decoder(rng: random.Random):
    """One of the cached decoders with random settings: (name, function, keyword arguments)."""
    kind = rng.choice(["ar", "jacobi", "jacobi+candidates", "lookahead"])
    if kind == "ar":
        return kind, ar, {}
    if kind == "lookahead":
        return (
            kind,
            lookahead,
            {"window": rng.randint(1, 5), "ngram": rng.randint(2, 5), "candidates": rng.randint(1, 5)},
        )
    settings = {"block_size": rng.choice([1, 2, 4, 8, 16]), "init": rng.choice(["prompt", "repeat", "lookup"])}
    if kind == "jacobi+candidates":
        settings |= {"candidates": rng.randint(1, 4), "ngram": rng.randint(2, 5)}
    return kind, jacobi, settings


@pytest.mark.parametrize("arch", ARCHS)
def test_static_path_equals_ar_on_randomized_cases(arch, models, monkeypatch):
    monkeypatch.setattr(kv_module, "CAPACITY_STEP", 8)  # small caches: most decodes must grow theirs
    model = models[arch]
    for case in range(30):
        rng = random.Random(f"static-{arch}-{case}")
        input_ids, attention_mask, max_new_tokens, eos, expected = random_case(model, rng)
        name, decoder, settings = random_decoder(rng)
        streamed: dict[int, list[int]] = {}
        out = decoder(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, eos_token_id=eos, seed=case,
                      compile="eager", on_tokens=lambda row, tokens: streamed.setdefault(row, []).extend(tokens),
                      **settings)
        label = f"case {case}: {name} {settings} B={input_ids.shape[0]} eos={eos}"
        assert out.token_ids == expected, label
        assert [streamed.get(row, []) for row in range(input_ids.shape[0])] == expected, label


@pytest.mark.parametrize("arch", ARCHS)
def test_static_path_under_continuous_batching(arch, models):
    """Rows joining (their caches merged), leaving and being cancelled, through the static path."""
    model = models[arch]
    for case in range(10):
        rng = random.Random(f"static-joining-{arch}-{case}")
        requests = random_requests(rng)
        eos = rng.choice([None, rng.randrange(1, VOCAB)])
        name = rng.choice(list(JOINING_DECODERS))
        decoder, settings = JOINING_DECODERS[name](model, rng)
        _, control, alone = decode_scripted(model, decoder, settings, requests, eos, compile="eager")
        for row, number in enumerate(control.order):
            tokens, _ = control.done[row]
            expected = alone[number] if requests[number].cancel_at is None else alone[number][: len(tokens)]
            assert tokens == expected, f"case {case}: {name} {settings}, request {number}"


def test_padded_columns_and_kept_slots_change_nothing():
    """A forward of 3 columns padded to 4, then keeping 1 of them: the next forward's logits equal
    those of one eager forward of the whole sequence."""
    model = tiny_model("llama", seed=2)
    tokens = torch.tensor([[5, 9, 17, 33, 41, 2, 70]])
    positions = torch.arange(7)[None]
    reference = model(input_ids=tokens[:, :6], position_ids=positions[:, :6]).logits
    store = new_store(model, 16, compile="eager")
    assert isinstance(store, StaticKV)
    store.forward(tokens[:, :3], positions[:, :3], None)
    store.forward(tokens[:, 3:6], positions[:, 3:6], None)  # padded to 4 columns
    store.keep(1)  # the slots of 41, 2 and the padding hold stale writes from now on
    assert store.length == 4
    logits = store.forward(tokens[:, 4:6], positions[:, 4:6], None)
    torch.testing.assert_close(logits, reference[:, 4:6], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("compile", [False, "eager"])
def test_kept_columns_per_row_equal_a_plain_forward(compile):
    """After one forward of `pending` and two 2-token candidates, row 0 keeps `pending` and the second
    candidate, row 1 `pending` and the first candidate's first token (a hole after it): the next
    forward's logits equal a plain forward of each row's prompt and kept tokens (both stores)."""
    model = tiny_model("qwen2", seed=2)
    prompt = torch.tensor([[5, 9, 17, 33], [8, 3, 60, 12]])
    fed = torch.tensor([[41, 2, 70, 11, 19], [7, 25, 4, 30, 6]])  # pending | a1 a2 | b1 b2
    store = new_store(model, 16, compile=compile)
    store.forward(prompt, torch.arange(4).expand(2, -1), None)
    own = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 1, 0], [1, 0, 0, 1, 1]]).bool()
    allowed = torch.cat([torch.ones((5, 4), dtype=torch.bool), own], dim=1).expand(2, -1, -1)
    store.forward(fed, torch.tensor([4, 5, 6, 5, 6]).expand(2, -1), allowed)
    store.keep_columns(torch.tensor([[0, 3, 4], [0, 1, 0]]))
    following = torch.tensor([[50], [51]])
    slots = torch.tensor([[1] * 7 + [1], [1] * 6 + [0, 1]], dtype=torch.bool)
    logits = store.forward(following, torch.tensor([[7], [6]]), slots[:, None, :])
    for row, kept in ((0, [41, 11, 19]), (1, [7, 25])):
        alone = model(torch.cat([prompt[row], torch.tensor(kept), following[row]])[None]).logits[0, -1]
        torch.testing.assert_close(logits[row, 0], alone, rtol=1e-9, atol=1e-9)


@pytest.fixture
def inductor_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CLLM_HOME", str(tmp_path))
    # as torch leaves it once it has looked for its cache (cllm replaces it; undone after the test)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    torch._dynamo.reset()
    return tmp_path


@pytest.fixture
def untuned(monkeypatch):
    """The product's compile options without GEMM autotuning, which would spend most of a minute per
    column width (test_autotuned_gemms_match_eager covers it)."""
    monkeypatch.setattr(compiled_module, "CPU_INDUCTOR_OPTIONS",
                        {**compiled_module.CPU_INDUCTOR_OPTIONS, "max_autotune": False})


def test_autotuned_gemms_match_eager(inductor_home):
    """AR through the options the product compiles with on a CPU: a package with frozen weights and
    autotuned GEMMs (float16: inductor's C++ GEMM template is among the candidates it times)."""
    model = tiny_model("gpt2", seed=5, dtype=torch.float16)
    input_ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    expected = ar(model, input_ids, max_new_tokens=12).token_ids
    assert ar(model, input_ids, max_new_tokens=12, compile=True).token_ids == expected


def test_packages_match_eager_in_float32_and_a_second_process_loads_them(inductor_home, untuned, monkeypatch, capsys):
    monkeypatch.setattr(kv_module, "CAPACITY_STEP", 8)  # the cache grows: its size is a dynamic dimension
    model = tiny_model("llama", seed=3, dtype=torch.float32)
    input_ids, attention_mask = left_pad([[4, 8, 15, 16, 23, 42], [7, 7, 3]], pad_token_id=0)
    common = dict(max_new_tokens=24, seed=0)
    expected = ar(model, input_ids, attention_mask, **common).token_ids
    runs = {
        "ar": lambda: ar(model, input_ids, attention_mask, compile=True, **common),
        "jacobi": lambda: jacobi(model, input_ids, attention_mask, block_size=4, init="lookup", compile=True, **common),
        "lookahead": lambda: lookahead(model, input_ids, attention_mask, window=2, ngram=2, candidates=1, compile=True,
                                       **common),
    }
    for name, run in runs.items():
        assert run().token_ids == expected, name
    packages = sorted(package_directory().glob("*.pt2"))
    # rows that finish early leave the batch: the last steps run one row
    assert [path.name.split("-", 2)[2] for path in packages] == ["w1-b1.pt2", "w1-bN.pt2", "w4-b1.pt2", "w4-bN.pt2"]
    assert capsys.readouterr().err.count("compiling the model's forward for") == 4

    with monkeypatch.context() as second_process:  # nothing compiled in memory, nothing may be exported again
        second_process.setattr(compiled_module, "_COMPILED", weakref.WeakKeyDictionary())
        second_process.setattr(torch.export, "export", lambda *args, **kwargs: pytest.fail("exported again"))
        for name, run in runs.items():
            assert run().token_ids == expected, name
    assert capsys.readouterr().err == ""

    # the packages hold frozen weights: a model changed in place, or another one of the same shapes,
    # must get its own package, not decode with these weights
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
    changed = ar(model, input_ids, attention_mask, **common).token_ids
    assert changed != expected
    assert runs["ar"]().token_ids == changed
    assert len(list(package_directory().glob("*.pt2"))) == 5


def test_a_width_that_cannot_be_exported_is_compiled_in_the_process(inductor_home, untuned, monkeypatch, capsys):

    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported op in this test")

    monkeypatch.setattr(torch.export, "export", refuse)
    torch._dynamo.utils.counters.clear()
    model = tiny_model("qwen2", seed=7, dtype=torch.float32)
    input_ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    expected = ar(model, input_ids, max_new_tokens=12).token_ids
    assert ar(model, input_ids, max_new_tokens=12, compile=True).token_ids == expected
    error = capsys.readouterr().err
    assert "unsupported op in this test" in error and "compiling it in this process" in error
    assert "eagerly" not in error and torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0


def test_failed_compilation_falls_back_to_eager_with_one_message(capsys):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler in this test")

    torch._dynamo.reset()  # dynamo would reuse a graph an earlier test traced for the same forward code
    model = tiny_model("qwen2", seed=4)
    input_ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    expected = ar(model, input_ids, max_new_tokens=12).token_ids
    for _ in range(2):
        assert jacobi(model, input_ids, block_size=4, max_new_tokens=12, compile=broken_backend).token_ids == expected
    assert capsys.readouterr().err.count("compiling failed") == 1


def test_missing_cxx_compiler_says_so_and_decodes_eagerly(capsys, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(compiled_module.shutil, "which", lambda name: None)
    model = tiny_model("gpt2", seed=5)
    assert isinstance(new_store(model, 32, compile=True), DynamicKV)
    assert "needs a C++ compiler" in capsys.readouterr().err


def test_cli_compile_gives_the_eager_output(tmp_path, untuned, capsys, monkeypatch):
    monkeypatch.setenv("CLLM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    model_dir = str(save_tiny_model(tmp_path / "model", eos_token_id=None))
    common = ["generate", "Hello there", "--model", model_dir, "--max-new-tokens", "9", "--decoder", "ar", "--json"]
    assert main(common) == 0
    eager = json.loads(capsys.readouterr().out)
    assert main([*common, "--compile"]) == 0
    captured = capsys.readouterr()
    assert "eagerly" not in captured.err, captured.err
    compiled = json.loads(captured.out)
    assert compiled["token_ids"] == eager["token_ids"] and compiled["compile"] is True
