"""Weight-only int8 linear layers: the layer against its dequantized weights, and the decoders
still exact against AR of the quantized model."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import save_tiny_model, tiny_model
from transformers.pytorch_utils import Conv1D

from cllm.cli import main
from cllm.decoding import ar, jacobi, left_pad, lookahead
from cllm.errors import CllmError
from cllm.quantize import Int8Linear, quantize_weights


def test_int8_linear_is_the_linear_of_its_dequantized_weights():
    torch.manual_seed(0)
    linear = torch.nn.Linear(40, 24, bias=True)
    quantized = Int8Linear(linear.weight, linear.bias)
    x = torch.randn(3, 5, 40)
    expected = torch.nn.functional.linear(x, quantized.dequantized(), linear.bias)
    assert torch.allclose(quantized(x), expected, atol=1e-5)
    # int8 with one scale per row: every weight within half a step of the original
    step = linear.weight.abs().amax(dim=1, keepdim=True) / 127
    assert ((quantized.dequantized() - linear.weight).abs() <= step / 2 + 1e-7).all()
    assert quantized.weight_int8.dtype == torch.int8 and quantized.weight_int8.abs().max() == 127
    assert quantized.weight.shape == linear.weight.shape


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_decoders_equal_ar_of_the_quantized_model(arch):
    model = tiny_model(arch, seed=3, dtype=torch.float32)
    replaced = quantize_weights(model, "int8")
    assert replaced >= 2 * 4 and not any(isinstance(m, (torch.nn.Linear, Conv1D)) for m in model.modules())
    prompts = [[5, 17, 33, 2, 9], [40, 41], [7, 7, 7, 12, 60, 61, 3, 88]]
    input_ids, mask = left_pad(prompts, 0)
    expected = ar(model, input_ids, mask, max_new_tokens=24).token_ids
    for block_size in (4, 16):
        assert jacobi(model, input_ids, mask, max_new_tokens=24, block_size=block_size).token_ids == expected
    assert lookahead(model, input_ids, mask, max_new_tokens=24, window=3, ngram=3, candidates=3).token_ids == expected


def test_quantization_refuses_what_it_cannot_run():
    with pytest.raises(CllmError, match="float32 or bfloat16"):
        quantize_weights(tiny_model("llama"), "int8")  # float64
    with pytest.raises(CllmError, match="unknown quantization"):
        quantize_weights(tiny_model("llama", dtype=torch.float32), "int4")


def test_generate_quantized_from_the_command_line(tmp_path, capsys):
    model_dir = str(save_tiny_model(tmp_path / "model"))
    common = ["generate", "Hello", "--model", model_dir, "--max-new-tokens", "12", "--json", "--quantize", "int8"]
    assert main([*common, "--decoder", "ar"]) == 0
    ar_record = json.loads(capsys.readouterr().out)
    assert main([*common, "--decoder", "jacobi", "--block-size", "4"]) == 0
    jacobi_record = json.loads(capsys.readouterr().out)
    assert jacobi_record["token_ids"] == ar_record["token_ids"] and ar_record["quantize"] == "int8"
    assert len(ar_record["token_ids"]) == 12
