"""HF config.json -> ModelShape for Llama 3.x, Qwen2.5 and Qwen3; unsupported configs raise, naming file and field.

The configs are the published ones (transformers 4.x layout: ``rope_theta`` / ``rope_scaling``
at the top level), plus the transformers 5 layout (``rope_parameters``).
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_distill.config import ModelShape
from megatron_distill.models.hf_config import (
    HFConfigError,
    hf_config_from_shape,
    hf_rope_scaling,
    shape_from_hf_config,
)

LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
}
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
    "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_cache": True, "use_mrope": False, "use_sliding_window": False, "vocab_size": 151936,
}
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 12288, "max_position_embeddings": 40960,
    "max_window_layers": 36, "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 36,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}
QWEN3_06B_V5 = {  # transformers 5 layout: rope_parameters, dtype, layer_types; head_dim*heads != hidden
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 128, "hidden_size": 1024,
    "intermediate_size": 3072, "max_position_embeddings": 40960, "num_attention_heads": 16,
    "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "dtype": "bfloat16",
    "layer_types": ["full_attention"] * 28, "use_sliding_window": False, "vocab_size": 151936,
}


def _write(tmp_path, config: dict, name: str = "model") -> str:
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_llama31_untied_gqa_with_llama3_rope(tmp_path):
    shape = shape_from_hf_config(_write(tmp_path, LLAMA31_8B))
    assert shape == ModelShape(
        num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8, kv_channels=128,
        ffn_hidden_size=14336, vocab_size=128256, max_position_embeddings=131072, normalization="RMSNorm",
        norm_epsilon=1e-5, swiglu=True, position_embedding_type="rope", rotary_base=500000,
        untie_embeddings_and_output_weights=True, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=False,
        init_method_std=0.02, hidden_dropout=0.0, attention_dropout=0.0,
    )
    assert hf_rope_scaling(LLAMA31_8B) == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192}


def test_qwen25_tied_qkv_bias():
    shape = shape_from_hf_config(QWEN25_05B)
    assert (shape.num_query_groups, shape.kv_channels, shape.rotary_base) == (2, 64, 1000000)
    assert shape.add_qkv_bias and not shape.add_bias_linear and not shape.qk_layernorm
    assert not shape.untie_embeddings_and_output_weights
    assert shape.norm_epsilon == 1e-6 and shape.hidden_dropout == 0.0 and shape.attention_dropout == 0.0
    assert hf_rope_scaling(QWEN25_05B) is None


def test_qwen3_qk_norm_and_head_dim():
    shape = shape_from_hf_config(QWEN3_8B)
    assert shape.qk_layernorm and not shape.add_qkv_bias and shape.untie_embeddings_and_output_weights
    assert (shape.kv_channels, shape.num_query_groups, shape.ffn_hidden_size) == (128, 8, 12288)
    v5 = shape_from_hf_config(QWEN3_06B_V5)
    assert v5.kv_channels == 128 and v5.hidden_size == 1024 and v5.rotary_base == 1000000
    assert not v5.untie_embeddings_and_output_weights
    # Qwen3's default head_dim is 128, not hidden / heads
    assert shape_from_hf_config({k: v for k, v in QWEN3_06B_V5.items() if k != "head_dim"}).kv_channels == 128
    # MHA: no num_key_value_heads means one KV head per query head
    no_gqa = {k: v for k, v in LLAMA31_8B.items() if k != "num_key_value_heads"}
    assert shape_from_hf_config(no_gqa).num_query_groups == 32


@pytest.mark.parametrize("config", [LLAMA31_8B, QWEN25_05B, QWEN3_8B, QWEN3_06B_V5], ids=["llama", "qwen2", "qwen3",
                                                                                          "qwen3-v5"])
def test_config_round_trip_and_transformers_reads_it(tmp_path, config):
    from transformers import AutoConfig

    shape = shape_from_hf_config(config)
    written = hf_config_from_shape(shape, source_config=config, dtype=torch.bfloat16,
                                   rope_scaling=hf_rope_scaling(config))
    assert shape_from_hf_config(written) == shape
    assert hf_rope_scaling(written) == hf_rope_scaling(config)
    assert written.get("eos_token_id") == config.get("eos_token_id")  # kept from the source
    loaded = AutoConfig.from_pretrained(_write(tmp_path, written))
    assert type(loaded).__name__ == config["architectures"][0].replace("ForCausalLM", "Config")
    assert loaded.num_key_value_heads == shape.num_query_groups and loaded.head_dim == shape.kv_channels
    assert loaded.tie_word_embeddings == (not shape.untie_embeddings_and_output_weights)
    assert loaded.dtype == torch.bfloat16
    # without a source: the architecture follows from the shape
    fresh = hf_config_from_shape(shape, rope_scaling=hf_rope_scaling(config))
    assert fresh["architectures"] == config["architectures"] and shape_from_hf_config(fresh) == shape


@pytest.mark.parametrize("change,field", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "GPT2LMHeadModel"),
    ({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": 8}, "MixtralForCausalLM"),
    ({"num_experts": 64}, "num_experts"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type='dynamic'"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_parameters.rope_type"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ({"hidden_size": None}, "hidden_size"),
    ({"model_type": "qwen2"}, "model_type='qwen2'"),
])
def test_unsupported_configs_raise_naming_file_and_field(tmp_path, change, field):
    path = _write(tmp_path, {**LLAMA31_8B, **change})
    with pytest.raises(HFConfigError) as err:
        shape_from_hf_config(path)
    assert field in str(err.value) and "model/config.json" in str(err.value)


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        shape_from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(HFConfigError, match="config.json: not valid JSON"):
        shape_from_hf_config(tmp_path)


def test_export_config_refuses_shapes_hf_cannot_express():
    shape = shape_from_hf_config(LLAMA31_8B)
    gelu = ModelShape(**{**shape.__dict__, "swiglu": False})
    with pytest.raises(HFConfigError, match="swiglu"):
        hf_config_from_shape(gelu)
    with pytest.raises(HFConfigError, match="qk_layernorm"):
        hf_config_from_shape(shape, architecture="Qwen3ForCausalLM")
