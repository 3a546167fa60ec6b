"""Quality evaluation: answer extraction, HumanEval execution, perplexity, and the `cllm eval` command."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import save_tiny_model

from cllm.cli import main
from cllm.evaluation import extract_code, extract_gsm8k_answer, gsm8k_reference, humaneval_problems, perplexity
from cllm.models import ModelConfig, load_model
from cllm.sandbox import Limits, run_untrusted


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", eos_token_id=None, context=4096))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She pays 3 * 4 = 12 dollars.\n#### 12", "12"),
        ("#### 1,234", "1234"),
        ("So the answer is $18.", "18"),
        ("The answer is: **42**", "42"),
        ("Answer: -7 degrees", "-7"),
        ("The final result is \\boxed{3.50}", "3.5"),
        ("2 + 3 = 5 apples, then 5 * 2 = 10. She has 10 apples left.", "10"),
        ("It costs 7.00 dollars", "7"),
        ("The answer is 5. Check: 5 + 1 = 6", "5"),  # the stated answer wins over a later number
        ("#### 8\nThe answer is 9", "8"),  # the dataset's own marker wins
        ("I do not know.", None),
        ("Total: $1,000,000.", "1000000"),
        ("That is .5 of the cake", "0.5"),
    ],
)
def test_gsm8k_answer_extraction(text, expected):
    assert extract_gsm8k_answer(text) == expected


def test_gsm8k_reference_reads_the_marker():
    assert gsm8k_reference("16 - 3 - 4 = <<16-3-4=9>>9\n9 * 2 = $<<9*2=18>>18\n#### 18") == "18"
    with pytest.raises(Exception, match="####"):
        gsm8k_reference("no marker 18")


def test_canonical_humaneval_solutions_pass_and_wrong_ones_fail():
    problems = humaneval_problems(limit=4)
    for problem in problems:
        def check(completion: str) -> bool:
            program = extract_code(completion, problem["prompt"], problem["entry_point"])
            return run_untrusted(
                f"{program}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n", Limits(seconds=10)
            ).passed

        body = problem["canonical_solution"]
        assert check(body), problem["task_id"]  # raw continuation of the prompt
        full = problem["prompt"] + body
        assert check(f"Here you go:\n```python\n{full}```\nDone."), problem["task_id"]  # a chat answer
        assert not check("    return None\n"), problem["task_id"]


def test_perplexity_matches_a_hand_computation(model_dir):
    loaded = load_model(ModelConfig(name=model_dir))
    text = "hello world, this is a test of perplexity windows"
    report = perplexity(loaded, [text], window=8)
    ids = loaded.tokenizer(text)["input_ids"]
    with torch.no_grad():
        nll, count = 0.0, 0
        for start in range(0, len(ids) - 1, 7):
            chunk = torch.tensor([ids[start : start + 8]])
            if chunk.shape[1] < 2:
                break
            logits = loaded.model(input_ids=chunk).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
            count += chunk.shape[1] - 1
    assert report["tokens"] == len(ids) - 1 == count
    assert report["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_eval_gsm8k_same_score_with_jacobi_and_ar(model_dir, tmp_path, capsys):
    data = tmp_path / "gsm8k.jsonl"
    rows = [{"question": f"What is {a} plus {a}?", "answer": f"{a} + {a} = {2 * a}\n#### {2 * a}"} for a in range(1, 5)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reports = {}
    for decoder in ("ar", "jacobi"):
        out = tmp_path / f"{decoder}.json"
        assert main(["eval", "gsm8k", "--path", str(data), "--model", model_dir, "--decoder", decoder,
                     "--max-new-tokens", "20", "--block-size", "4", "--out", str(out)]) == 0
        reports[decoder] = json.loads(out.read_text())
    capsys.readouterr()
    assert reports["ar"]["n"] == 4 and len(reports["ar"]["items"]) == 4
    assert [i["token_ids"] for i in reports["ar"]["items"]] == [i["token_ids"] for i in reports["jacobi"]["items"]]
    assert [i["reference"] for i in reports["ar"]["items"]] == ["2", "4", "6", "8"]
    assert reports["jacobi"]["accuracy"] == reports["ar"]["accuracy"]


def test_eval_perplexity_and_humaneval_cli(model_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 10)
    assert (
        main(["eval", "perplexity", "--text", str(text), "--model", model_dir, "--out", str(tmp_path / "p.json")]) == 0
    )
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["tokens"] == len(text.read_text()) - 1 and report["perplexity"] > 1
    assert main(["eval", "humaneval", "--limit", "2", "--max-new-tokens", "8", "--model", model_dir,
                 "--out", str(tmp_path / "h.json")]) == 0
    report = json.loads((tmp_path / "h.json").read_text())
    assert report["n"] == 2 and report["pass@1"] == 0.0  # random weights write no working code
    assert {i["status"] for i in report["items"]} <= {"failed", "timeout"}
    capsys.readouterr()


def test_eval_humaneval_refuses_to_run_code_unprotected(model_dir, tmp_path, capsys, monkeypatch):
    from cllm import sandbox
    monkeypatch.setattr(sandbox, "unavailable_reason", lambda: "namespaces are disabled")
    common = ["eval", "humaneval", "--limit", "1", "--max-new-tokens", "4", "--model", model_dir]
    assert main([*common, "--out", str(tmp_path / "refused.json")]) == 2
    stderr = capsys.readouterr().err.strip()
    assert len(stderr.splitlines()) == 1 and "namespaces are disabled" in stderr and "--unsafe-exec" in stderr
    assert not (tmp_path / "refused.json").exists()
    assert main([*common, "--unsafe-exec", "--out", str(tmp_path / "unsafe.json")]) == 0
    assert json.loads((tmp_path / "unsafe.json").read_text())["n"] == 1


def test_eval_mtbench_writes_fastchat_answers(model_dir, tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    assert main(["eval", "mtbench", "--limit", "2", "--second-turn", "--max-new-tokens", "6", "--model", model_dir,
                 "--model-id", "tiny", "--answers", str(answers), "--out", str(tmp_path / "m.json")]) == 0
    capsys.readouterr()
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["question_id"] for r in records] == [81, 82]
    for record in records:
        assert record["model_id"] == "tiny" and set(record) >= {"answer_id", "tstamp", "choices"}
        assert len(record["choices"][0]["turns"]) == 2


def test_viz_writes_html_and_png_for_two_models(model_dir, tmp_path, capsys):
    other = str(save_tiny_model(tmp_path / "other", seed=1, eos_token_id=None))
    out = tmp_path / "viz"
    assert main(["viz", "Hello there", "--model", model_dir, "--model", other, "--block-size", "4",
                 "--blocks", "2", "--out", str(out)]) == 0
    page = (out / "trajectory.html").read_text()
    assert page.count("<table>") == 4 and "y(0)" in page and "class='ok" in page
    assert (out / "trajectory.png").stat().st_size > 1000
    capsys.readouterr()
