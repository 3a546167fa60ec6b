"""oneDNN linear layers (--onednn): the same product as torch's linear up to float32 rounding,
gradients where training wants them, and every decoder still equal to AR of the same model."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import save_tiny_model, tiny_adapter, tiny_model

from cllm.cli import main
from cllm.decoding import ar, jacobi, left_pad, lookahead
from cllm.decoding.jacobi import drafted
from cllm.errors import CllmError
from cllm.models import ModelConfig
from cllm.onednn import OneDnnLinear, use_onednn


def test_a_onednn_layer_is_the_linear_product_and_trains_through_torchs():
    torch.manual_seed(0)
    plain = torch.nn.Linear(40, 24)
    layer = OneDnnLinear(40, 24)
    layer.load_state_dict(plain.state_dict())
    x = torch.randn(3, 5, 40)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), plain(x), rtol=1e-5, atol=1e-5)
    layer(x).sum().backward()  # the oneDNN op has no backward: with gradients on, torch's linear runs
    plain(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad)


def test_the_packed_weight_follows_the_layers_weight():
    """The layer multiplies by a packed copy of its weight: the copy is made again when the weight
    is written in place or replaced, and a deep copy of the layer packs its own."""
    import copy

    torch.manual_seed(0)
    layer, x = OneDnnLinear(40, 24), torch.randn(2, 3, 40)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
        layer.weight.mul_(2)  # in place, as merging a LoRA adapter does
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
        layer.weight = torch.nn.Parameter(torch.randn(24, 40))
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
        twin = copy.deepcopy(layer)
        twin.weight.add_(1)
        torch.testing.assert_close(twin(x), torch.nn.functional.linear(x, twin.weight, twin.bias))
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_decoders_equal_ar_of_a_model_with_onednn_layers(arch):
    model = tiny_model(arch, seed=3, dtype=torch.float32)
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert use_onednn(model) == linears >= 1
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    prompts = [[5, 17, 33, 2, 9], [40, 41], [7, 7, 7, 12, 60, 61, 3, 88]]
    input_ids, mask = left_pad(prompts, 0)
    settings = dict(max_new_tokens=24)
    with torch.no_grad():
        expected = ar(model, input_ids, mask, **settings).token_ids
        for block_size in (4, 16):
            assert jacobi(model, input_ids, mask, block_size=block_size, **settings).token_ids == expected
        assert lookahead(model, input_ids, mask, window=3, ngram=3, candidates=3, **settings).token_ids == expected
        drafter = tiny_adapter(model, seed=4, gated=True)  # PEFT wraps a oneDNN layer as any linear layer
        assert drafted(model, input_ids, mask, draft_model=drafter, block_size=4, **settings).token_ids == expected


def test_onednn_refuses_what_it_cannot_run():
    with pytest.raises(CllmError, match="for float32"):
        use_onednn(tiny_model("llama"))  # float64
    with pytest.raises(CllmError, match="not with --compile"):
        ModelConfig(onednn=True, compile=True)
    with pytest.raises(CllmError, match="not with --quantize"):
        ModelConfig(onednn=True, quantize="int8")


def test_generate_with_onednn_from_the_command_line(tmp_path, capsys):
    model_dir = str(save_tiny_model(tmp_path / "model"))
    common = ["generate", "Hello", "--model", model_dir, "--max-new-tokens", "12", "--json", "--onednn"]
    assert main([*common, "--decoder", "ar"]) == 0
    ar_record = json.loads(capsys.readouterr().out)
    assert main([*common, "--decoder", "jacobi", "--block-size", "4"]) == 0
    jacobi_record = json.loads(capsys.readouterr().out)
    assert jacobi_record["token_ids"] == ar_record["token_ids"] and ar_record["onednn"] is True
    assert main(["generate", "Hello", "--model", model_dir, "--onednn", "--dtype", "bfloat16"]) == 2
    assert "for float32" in capsys.readouterr().err
