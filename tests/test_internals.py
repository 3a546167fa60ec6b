"""The transformers and torch internals the compiled path touches still hold (fails loudly on an
upgrade that changes them), and each helper does what the compiled path needs of it."""

import torch
from tiny_models import tiny_config, tiny_model
from transformers import StaticCache

from cllm.decoding.compiled import CPU_INDUCTOR_OPTIONS
from cllm.decoding.internals import attention_implementation, check, set_write_position, unmark_static_addresses


def test_every_internal_the_compiled_path_touches_still_holds():
    assert check(tiny_config("llama"), CPU_INDUCTOR_OPTIONS) == []


def test_an_unknown_inductor_option_is_reported():
    assert any("not_an_option" in problem for problem in check(tiny_config("llama"), {"not_an_option": 1}))


def test_the_write_position_moves_back_and_the_next_write_lands_there():
    config = tiny_config("llama")
    cache = StaticCache(config=config, max_cache_len=8)
    layer = cache.layers[0]
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    layer.update(torch.ones(1, heads, 3, dim), torch.ones(1, heads, 3, dim))
    set_write_position(cache, 1)
    layer.update(torch.full((1, heads, 1, dim), 2.0), torch.full((1, heads, 1, dim), 2.0))
    assert layer.keys[0, 0, :3, 0].tolist() == [1.0, 2.0, 1.0]
    unmark_static_addresses(cache)
    assert not hasattr(layer.keys, "_dynamo_static_input_type")


def test_the_attention_implementation_is_switched_for_one_call_only():
    model = tiny_model("llama")
    before = model.config._attn_implementation
    with attention_implementation(model.config, "eager"):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == before


def test_auto_device_is_each_rank_s_own_gpu(monkeypatch):
    """Under torchrun / accelerate launch every rank loads onto its LOCAL_RANK's GPU, not all onto GPU 0."""
    import torch

    from cllm.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda", 3)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_a_missing_extra_is_named_with_its_install_command():
    import pytest

    from cllm.errors import CllmError, require_extra

    require_extra("serve", "json")  # present: nothing happens
    with pytest.raises(CllmError, match=r"needs no_such_module_xyz, in cllm's 'serve' extra: pip install 'cllm\["):
        require_extra("serve", "json", "no_such_module_xyz")
