"""Build one pipeline stage's slice of a Megatron-Core GPTModel from a ``ModelShape``.

The model file stays a plain Megatron GPTModel; how it is split (TP, PP) is given here by the
process groups in ``pg_collection`` and the stage flags, nothing else.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import ModuleSpec, TransformerConfig
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

from megatron_distill.config import ModelShape, ParallelConfig
from megatron_distill.models.norms import TorchNorm
from megatron_distill.models.recompute_mlp import ActivationRecomputeMLP, fix_checkpoint_without_output_default
from megatron_distill.models.rope_fusion import install as install_rope_fusion
from megatron_distill.models.sdpa_attention import SDPACoreAttention


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """Vocabulary rows in the embedding / output layer: ``vocab_size`` rounded up to a TP multiple."""
    return int(math.ceil(vocab_size / tp_size) * tp_size)


def transformer_config(
    shape: ModelShape,
    parallel: ParallelConfig,
    *,
    bf16: bool,
    for_training: bool,
    swiglu_fusion: bool = False,
    recompute_norms: bool = False,
    rope_fusion: bool = False,
) -> TransformerConfig:
    """Megatron ``TransformerConfig`` for one model. A frozen teacher gets no dropout.

    ``swiglu_fusion``: Megatron's fused SwiGLU (``bias_swiglu_impl``, torch.compile'd; CUDA only
    here): one kernel each way, and only the FFN input kept for backward, not also silu's output.
    ``recompute_norms``: Megatron's selective recompute of the two norms of every layer (their
    outputs are not kept; recomputed from their inputs, which are kept anyway).
    ``rope_fusion``: RoPE in one Triton kernel each way (``rope_fusion.py``; CUDA only here), for
    non-interleaved rotary embeddings.
    """
    dtype = torch.bfloat16 if bf16 else torch.float32
    if recompute_norms:
        fix_checkpoint_without_output_default()
    rope_fusion = rope_fusion and shape.position_embedding_type == "rope" and install_rope_fusion()
    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        kv_channels=shape.kv_channels,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        normalization=shape.normalization,
        layernorm_epsilon=shape.norm_epsilon,
        gated_linear_unit=shape.swiglu,
        activation_func=F.silu if shape.swiglu else F.gelu,
        add_bias_linear=shape.add_bias_linear,
        add_qkv_bias=shape.add_qkv_bias,
        qk_layernorm=shape.qk_layernorm,
        init_method_std=shape.init_method_std,
        hidden_dropout=shape.hidden_dropout if for_training else 0.0,
        attention_dropout=shape.attention_dropout if for_training else 0.0,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        # Normalise by the global batch's token count (see training.py), not per micro-batch.
        calculate_per_token_loss=True,
        # Fusions that need apex / TE are off; they do not change the math.
        bias_activation_fusion=swiglu_fusion and shape.swiglu,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=rope_fusion,
        **({"recompute_granularity": "selective", "recompute_modules": ["layernorm"]} if recompute_norms else {}),
    )


def layer_spec(shape: ModelShape, transformer_impl: str, layers_on_stage: int, recompute_swiglu: bool = False):
    """Megatron spec of this stage's transformer block: local modules or Transformer Engine.

    The local spec swaps Megatron's torch norm wrapper for ``TorchNorm`` (sequence parallelism
    without apex) and its unfused core attention for ``SDPACoreAttention`` (flash kernels);
    ``recompute_swiglu`` its MLP for ``ActivationRecomputeMLP``.
    """
    if transformer_impl == "transformer_engine":
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=shape.qk_layernorm)
    spec = get_gpt_layer_local_spec(qk_layernorm=shape.qk_layernorm, normalization=shape.normalization)
    sub = spec.submodules
    sub.input_layernorm = TorchNorm
    sub.pre_mlp_layernorm = TorchNorm
    attn = sub.self_attention.submodules
    attn.core_attention = SDPACoreAttention
    if recompute_swiglu:
        sub.mlp = ModuleSpec(module=ActivationRecomputeMLP, submodules=sub.mlp.submodules)
    if shape.qk_layernorm:
        attn.q_layernorm = TorchNorm
        attn.k_layernorm = TorchNorm
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=[spec] * layers_on_stage, layer_norm=TorchNorm),
    )


def build_gpt_stage(
    shape: ModelShape,
    config: TransformerConfig,
    *,
    pre_process: bool,
    post_process: bool,
    pg_collection: ProcessGroupCollection,
    transformer_impl: str = "local",
    recompute_swiglu: bool = False,
) -> GPTModel:
    """This rank's part of a GPT model: its layers of its PP stage, its TP shard of each.

    ``pre_process`` builds the embedding (first stage), ``post_process`` the final norm and
    output layer (last stage). The output layer keeps its vocab shard (``parallel_output``).
    """
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(
            shape, transformer_impl, shape.num_layers // pg_collection.pp.size(), recompute_swiglu
        ),
        vocab_size=padded_vocab_size(shape.vocab_size, pg_collection.tp.size()),
        max_sequence_length=shape.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not shape.untie_embeddings_and_output_weights,
        position_embedding_type=shape.position_embedding_type,
        rotary_base=shape.rotary_base,
        pg_collection=pg_collection,
    )
