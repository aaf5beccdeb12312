"""Hugging Face ``config.json`` <-> ``ModelShape`` for Llama 3.x, Qwen2 / Qwen2.5 and Qwen3.

Supported: ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM`` with SiLU SwiGLU
MLPs, RMSNorm, full causal attention (grouped-query or not), tied or untied embeddings, RoPE
with no scaling or Llama 3.1's ``llama3`` scaling. Anything else (other architectures, MoE,
sliding-window attention when enabled, other RoPE scalings, partial rotary, biases other than
Qwen2's q/k/v bias, quantized checkpoints) raises ``HFConfigError`` naming the file and field.

Megatron settings the mapping relies on without a ``ModelShape`` field: ``rotary_interleaved``
is False (Megatron's default, HF's ``rotate_half`` convention), ``rotary_percent`` is 1.0, the
attention softmax scale is ``1/sqrt(head_dim)`` and the layer norms are not zero-centred.

``llama3`` RoPE scaling cannot be expressed in ``ModelShape``: ``shape_from_hf_config`` accepts
it, ``hf_rope_scaling`` returns its parameters and ``apply_rope_scaling`` (called by
``hf_convert.load_hf_into_stage``) rescales a built stage's rotary frequencies exactly as HF
does. A stage built from the shape alone, without that call, has plain RoPE.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from megatron_distill.config import ModelShape

# architecture -> (model_type, default head_dim is hidden/heads (None) or a fixed number)
ARCHITECTURES: dict[str, tuple[str, int | None]] = {
    "LlamaForCausalLM": ("llama", None),
    "Qwen2ForCausalLM": ("qwen2", None),
    "Qwen3ForCausalLM": ("qwen3", 128),
}
_MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


class HFConfigError(ValueError):
    """An HF config this converter cannot map; the message names the file and the field."""


def read_hf_config(source: str | os.PathLike | Mapping[str, Any] | Any) -> tuple[dict[str, Any], str]:
    """``(config dict, where)`` from a model dir, a ``config.json`` path, a dict or a ``PretrainedConfig``.

    ``where`` names the file (or ``<dict>``) for error messages. Raises FileNotFoundError when a
    dir has no ``config.json``; never touches the network.
    """
    if isinstance(source, Mapping):
        return dict(source), "<config dict>"
    if hasattr(source, "to_dict") and not isinstance(source, (str, os.PathLike)):
        return source.to_dict(), f"<{type(source).__name__}>"
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no HF config: {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f), path
    except json.JSONDecodeError as err:
        raise HFConfigError(f"{path}: not valid JSON ({err})") from err


def hf_architecture(config: Mapping[str, Any], where: str = "<config>") -> str:
    """The supported architecture named by ``config["architectures"]`` (or its ``model_type``)."""
    archs = config.get("architectures") or []
    by_type = {mt: arch for arch, (mt, _) in ARCHITECTURES.items()}
    if not archs and config.get("model_type") in by_type:
        archs = [by_type[config["model_type"]]]
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise HFConfigError(
            f"{where}: architectures={archs} (model_type={config.get('model_type')!r}) is not supported; "
            f"supported: {sorted(ARCHITECTURES)}"
        )
    model_type = ARCHITECTURES[archs[0]][0]
    if config.get("model_type", model_type) != model_type:
        raise HFConfigError(f"{where}: model_type={config['model_type']!r} does not match architectures={archs}")
    return archs[0]


def _rope(config: Mapping[str, Any], where: str) -> tuple[float, dict[str, float] | None]:
    """(rope_theta, llama3 scaling params or None) from v4 (rope_theta/rope_scaling) or v5 (rope_parameters)."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or {}
    field = "rope_parameters" if params else "rope_scaling"
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise HFConfigError(
            f"{where}: {field}.rope_type={kind!r} is not supported (only none/'default' and 'llama3')"
        )
    missing = [k for k in _LLAMA3_KEYS if k not in merged]
    if missing:
        raise HFConfigError(f"{where}: {field} of rope_type 'llama3' lacks {missing}")
    params = {k: float(merged[k]) for k in _LLAMA3_KEYS}
    params["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    return float(theta), params


def _check_supported(config: Mapping[str, Any], arch: str, where: str) -> None:
    def bad(field: str, why: str) -> HFConfigError:
        return HFConfigError(f"{where}: {field}={config.get(field)!r} is not supported for {arch} ({why})")

    for field in _MOE_FIELDS:
        if config.get(field):
            raise bad(field, "mixture-of-experts models are not supported")
    if config.get("quantization_config"):
        raise bad("quantization_config", "quantized checkpoints are not supported; use a bf16/fp32 one")
    if config.get("hidden_act", "silu") != "silu":
        raise bad("hidden_act", "only SiLU SwiGLU MLPs")
    if config.get("use_mrope"):
        raise bad("use_mrope", "multimodal RoPE")
    if config.get("use_sliding_window"):
        raise bad("use_sliding_window", "sliding-window attention")
    layer_types = config.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise bad("layer_types", "only full attention layers")
    if float(config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise bad("partial_rotary_factor", "rotary on all head dims only")
    if config.get("attention_bias"):
        raise bad("attention_bias", "o_proj bias has no Megatron equivalent here")
    if config.get("mlp_bias"):
        raise bad("mlp_bias", "MLP biases are not supported")


def shape_from_hf_config(source: str | os.PathLike | Mapping[str, Any] | Any) -> ModelShape:
    """The ``ModelShape`` of an HF Llama 3.x / Qwen2 / Qwen3 model (dropout 0).

    ``source``: model dir, path of its ``config.json``, a config dict or a ``PretrainedConfig``.
    Raises ``HFConfigError`` naming the file and field for anything not supported.
    """
    config, where = read_hf_config(source)
    arch = hf_architecture(config, where)
    _check_supported(config, arch, where)
    for field in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if not isinstance(config.get(field), int) or config[field] <= 0:
            raise HFConfigError(f"{where}: {field}={config.get(field)!r} must be a positive integer")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    default_head_dim = ARCHITECTURES[arch][1] or hidden // heads
    head_dim = config.get("head_dim") or default_head_dim
    theta, _ = _rope(config, where)
    return ModelShape(
        num_layers=config["num_hidden_layers"],
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads") or heads,
        kv_channels=head_dim,
        ffn_hidden_size=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        max_position_embeddings=config.get("max_position_embeddings", 2048),
        normalization="RMSNorm",
        norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        swiglu=True,
        position_embedding_type="rope",
        rotary_base=int(theta) if float(theta).is_integer() else theta,
        untie_embeddings_and_output_weights=not config.get("tie_word_embeddings", False),
        add_bias_linear=False,
        add_qkv_bias=arch == "Qwen2ForCausalLM",
        qk_layernorm=arch == "Qwen3ForCausalLM",
        init_method_std=float(config.get("initializer_range", 0.02)),
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )


def hf_rope_scaling(source: str | os.PathLike | Mapping[str, Any] | Any) -> dict[str, float] | None:
    """The ``llama3`` RoPE scaling parameters of an HF config (``factor``, ``low_freq_factor``,
    ``high_freq_factor``, ``original_max_position_embeddings``), or None without scaling."""
    config, where = read_hf_config(source)
    return _rope(config, where)[1]


def apply_rope_scaling(model: torch.nn.Module, rope_scaling: Mapping[str, float] | None) -> None:
    """Rescale a built GPTModel stage's RoPE frequencies with ``llama3`` scaling (HF's formula).

    No-op for ``None``. Records the parameters as ``model.hf_rope_scaling`` (read by the export).
    Must run before the stage's first forward (Megatron caches the rotary embedding).
    """
    if rope_scaling is None:
        return
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is None:
        raise ValueError("apply_rope_scaling: the model has no rotary_pos_emb (not a RoPE GPTModel)")
    dim = rotary.inv_freq.numel() * 2
    inv_freq = 1.0 / (model.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaled = rotary._apply_scaling(
        inv_freq, factor=rope_scaling["factor"], low_freq_factor=rope_scaling["low_freq_factor"],
        high_freq_factor=rope_scaling["high_freq_factor"],
        original_max_position_embeddings=rope_scaling["original_max_position_embeddings"],
    )
    rotary.inv_freq = scaled.to(rotary.inv_freq.device)
    type(rotary).forward.cache_clear()
    model.hf_rope_scaling = dict(rope_scaling)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def hf_config_from_shape(
    shape: ModelShape,
    *,
    architecture: str | None = None,
    source_config: str | os.PathLike | Mapping[str, Any] | Any = None,
    dtype: torch.dtype = torch.float32,
    rope_scaling: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """An HF ``config.json`` dict for ``shape`` (keys readable by transformers 4.x and 5.x).

    Starts from ``source_config`` (e.g. the teacher's or the student's original config: token
    ids, chat settings) when given and overwrites every field the shape determines.
    ``architecture`` defaults to the source's, else Qwen3 if ``qk_layernorm``, Qwen2 if
    ``add_qkv_bias``, Llama otherwise. ``rope_scaling``: the llama3 parameters the model runs
    with, None for plain RoPE; never inherited from ``source_config`` (the model decides).
    """
    base: dict[str, Any] = {}
    if source_config is not None:
        base, where = read_hf_config(source_config)
        architecture = architecture or hf_architecture(base, where)
    if architecture is None:
        architecture = (
            "Qwen3ForCausalLM" if shape.qk_layernorm
            else "Qwen2ForCausalLM" if shape.add_qkv_bias else "LlamaForCausalLM"
        )
    if architecture not in ARCHITECTURES:
        raise HFConfigError(f"architecture {architecture!r} is not supported; supported: {sorted(ARCHITECTURES)}")
    check_hf_compatible(shape, architecture)
    for key in ("transformers_version", "torch_dtype", "dtype", "rope_scaling", "rope_parameters", "auto_map"):
        base.pop(key, None)
    theta = float(shape.rotary_base)
    rope_params: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if rope_scaling is not None:
        rope_params = {"rope_type": "llama3", "rope_theta": theta, **dict(rope_scaling)}
    model_type = ARCHITECTURES[architecture][0]
    base.update(
        architectures=[architecture],
        model_type=model_type,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.ffn_hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_query_groups,
        head_dim=shape.kv_channels or shape.hidden_size // shape.num_attention_heads,
        vocab_size=shape.vocab_size,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=shape.norm_epsilon,
        hidden_act="silu",
        tie_word_embeddings=not shape.untie_embeddings_and_output_weights,
        rope_theta=theta,
        rope_scaling=dict(rope_params) if rope_scaling is not None else None,
        rope_parameters=rope_params,
        torch_dtype=_dtype_name(dtype),
        dtype=_dtype_name(dtype),
        attention_dropout=0.0,
    )
    base.setdefault("initializer_range", shape.init_method_std)
    if model_type == "llama":
        base.update(attention_bias=False, mlp_bias=False)
    else:
        base.update(use_sliding_window=False, sliding_window=None, layer_types=["full_attention"] * shape.num_layers)
        base.setdefault("max_window_layers", shape.num_layers)
    if model_type == "qwen3":
        base["attention_bias"] = False
    return base


def check_hf_compatible(shape: ModelShape, architecture: str) -> None:
    """Raise ``HFConfigError`` unless ``shape`` is expressible as ``architecture`` in HF."""
    problems = []
    if not (shape.swiglu and shape.normalization == "RMSNorm" and shape.position_embedding_type == "rope"):
        problems.append("needs swiglu, RMSNorm and rope position embeddings")
    if shape.add_bias_linear:
        problems.append("needs add_bias_linear=False")
    if shape.add_qkv_bias != (architecture == "Qwen2ForCausalLM"):
        problems.append(f"add_qkv_bias={shape.add_qkv_bias} (q/k/v bias exactly for Qwen2)")
    if shape.qk_layernorm != (architecture == "Qwen3ForCausalLM"):
        problems.append(f"qk_layernorm={shape.qk_layernorm} (q/k norms exactly for Qwen3)")
    if problems:
        raise HFConfigError(f"model shape is not an HF {architecture}: " + "; ".join(problems))
