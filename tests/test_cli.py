"""The `cllm` command on a tiny saved model: outputs, JSON, bench reports and clean errors."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import save_tiny_model

from cllm.cli import main
from cllm.errors import CllmError
from cllm.files import check_output_dir

CLLM = [sys.executable, "-m", "cllm.cli"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", eos_token_id=None))


def run_json(capsys, *args: str) -> list[dict]:
    assert main(["generate", *args, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_generate_json_jacobi_equals_ar(model_dir, capsys):
    common = ["Hello there", "--model", model_dir, "--max-new-tokens", "23"]
    ar_record, = run_json(capsys, *common, "--decoder", "ar")
    for block_size in ("1", "4", "16"):
        jacobi_record, = run_json(capsys, *common, "--decoder", "jacobi", "--block-size", block_size)
        assert jacobi_record["token_ids"] == ar_record["token_ids"]
        assert jacobi_record["text"] == ar_record["text"]
    hf_record, = run_json(capsys, *common, "--decoder", "hf")
    assert hf_record["token_ids"] == ar_record["token_ids"]
    assert len(ar_record["token_ids"]) == 23
    assert set(ar_record["stats"]) >= {
        "forward_passes",
        "new_tokens",
        "tokens_per_forward",
        "fast_forward",
        "stationary",
    }


def test_generate_file_batched_matches_single(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["a", "bcd efg", "hi"]) + "\n")
    common = ["--file", str(prompts), "--model", model_dir, "--max-new-tokens", "11", "--decoder", "jacobi"]
    batched = run_json(capsys, *common, "--batch-size", "3")
    single = run_json(capsys, *common)
    assert [r["token_ids"] for r in batched] == [r["token_ids"] for r in single]
    assert [r["prompt"] for r in batched] == ["a", "bcd efg", "hi"]


def test_generate_samples_the_same_text_with_every_decoder_and_batch_size(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["a", "bcd efg", "hi", "xyz"]) + "\n")
    common = ["--file", str(prompts), "--model", model_dir, "--max-new-tokens", "17", "--temperature", "0.9",
              "--top-p", "0.95", "--top-k", "40", "--seed", "11"]
    expected = [r["token_ids"] for r in run_json(capsys, *common, "--decoder", "ar")]
    for decoder in (
        ["jacobi", "--batch-size", "3"],
        ["jacobi", "--candidates", "2"],
        ["lookahead", "--batch-size", "2"],
    ):
        records = run_json(capsys, *common, "--decoder", *decoder)
        assert [r["token_ids"] for r in records] == expected, decoder
    assert [r["seed"] for r in records] == [11, 12, 13, 14] and records[0]["sampling"] == "T=0.9 top-k 40 top-p 0.95"
    greedy = [r["token_ids"] for r in run_json(capsys, *common[:6], "--decoder", "ar")]
    assert greedy != expected
    rest = tmp_path / "rest.jsonl"
    rest.write_text("\n".join(prompts.read_text().splitlines()[1:]) + "\n")
    shifted = [
        r["token_ids"] for r in run_json(capsys, "--file", str(rest), *common[2:-1], "12", "--decoder", "lookahead")
    ]
    assert (
        shifted == expected[1:]
    )  # prompt i samples with seed + i: the same prompts one place earlier, seed one higher


def test_two_processes_checking_the_same_output_directory_both_pass(tmp_path):
    """torchrun ranks check the same --out at once: a check that made and removed the directory
    failed the other rank's check ("No such file or directory") about once in four."""
    outs = [str(tmp_path / str(i) / "out") for i in range(200)]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        failures = [f for f in pool.map(_check_output_dir_error, [o for o in outs for _ in range(2)], chunksize=1) if f]
    assert failures == []
    assert list(tmp_path.iterdir()) == []  # a check creates nothing


def _check_output_dir_error(path: str) -> str | None:
    try:
        check_output_dir(Path(path), "--out")
    except CllmError as exc:
        return str(exc)
    return None


def test_an_output_directory_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(CllmError, match="f.txt is not a directory"):
        check_output_dir(tmp_path / "f.txt" / "sub" / "out", "--out")
    with pytest.raises(CllmError, match="--out .*f.txt is not a directory"):
        check_output_dir(tmp_path / "f.txt", "--out")


@pytest.mark.heavy
def test_generate_streams_text_and_reads_stdin(model_dir):
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    args = ["generate", "-", "--model", model_dir, "--max-new-tokens", "9", "--stats"]
    streamed = subprocess.run(CLLM + args, input="Hi", capture_output=True, text=True, env=env)
    assert streamed.returncode == 0, streamed.stderr
    as_json = subprocess.run(CLLM + args + ["--json"], input="Hi", capture_output=True, text=True, env=env)
    assert streamed.stdout.rstrip("\n") == json.loads(as_json.stdout)["text"]
    assert "tok/fwd" in streamed.stderr


def test_bench_writes_json_and_markdown(model_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--model", model_dir, "--max-new-tokens", "12", "--limit", "3",
                 "--decoders", "hf,ar,jacobi:4", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    summary = {row["decoder"]: row for row in report["summary"]}
    assert set(summary) == {"hf", "ar", "jacobi:4"}
    assert summary["ar"]["speedup_vs_ar"] == pytest.approx(1.0)
    assert summary["jacobi:4"]["agreement_with_ar"] == 1.0 and summary["hf"]["agreement_with_ar"] == 1.0
    assert len(report["runs"]) == 9
    assert "| jacobi:4 |" in (out / "bench.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", ""], "empty prompt"),
        (["generate", "   "], "empty prompt"),
        (["generate", "hi", "--block-size", "0"], "--block-size"),
        (["generate", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["generate", "hi", "--max-new-tokens", "many"], "--max-new-tokens"),
        (["generate", "hi", "--model", "/does/not/exist"], "not found"),
        (["generate", "hi", "--model", "missing.gguf"], "GGUF file not found"),
        (["generate", "hi", "--dtype", "float8"], "unknown dtype"),
        (["generate", "hi", "--dtype", "float16", "--device", "cpu"], "float16"),
        (["generate", "hi", "--device", "tpu"], "unknown device"),
        (["generate", "--file", "nope.jsonl"], "not found"),
        (["generate", "hi", "--file", "nope.jsonl"], "not both"),
        (["bench", "--decoders", "beam"], "unknown decoder"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    # In-process: an uncaught exception (what would print a traceback) fails the test by itself.
    assert main(args) == 2
    stderr = capsys.readouterr().err
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


def test_bad_input_in_a_real_process_prints_no_traceback():
    result = subprocess.run(CLLM + ["generate", "hi", "--block-size", "-3"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: cllm generate: argument --block-size: must be >= 1, got -3"


@pytest.mark.heavy
def test_bad_model_files_are_clear_errors(model_dir, tmp_path):
    corrupt_gguf = tmp_path / "broken.gguf"
    corrupt_gguf.write_bytes(b"GGUF" + os.urandom(64))
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    corrupt_config = tmp_path / "corrupt"
    corrupt_config.mkdir()
    (corrupt_config / "config.json").write_text("{ not json")
    too_long = "x" * 600  # the tiny model's context is 512 tokens (one per character)
    cases = [
        (["--model", str(corrupt_gguf)], "cannot read GGUF"),
        (["--model", str(not_a_model)], "no config.json"),
        (["--model", str(corrupt_config)], "cannot load model"),
        (["--model", model_dir, too_long], "longer than the model's context"),
    ]
    env = os.environ | {"CLLM_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    for extra, message in cases:
        prompt = [] if too_long in extra else ["hi"]
        result = subprocess.run(CLLM + ["generate", *prompt, *extra], capture_output=True, text=True, env=env)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert message in result.stderr, result.stderr


def test_hub_id_offline_is_a_clear_error():
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        CLLM + ["generate", "hi", "--model", "someone/some-model"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 2
    assert "offline" in result.stderr and "Traceback" not in result.stderr
