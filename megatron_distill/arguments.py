"""Command-line flags and YAML recipes -> ``DistillConfig``.

Flag names follow Megatron-LM (``--num-layers``, ``--tensor-model-parallel-size``, ...). The
teacher's architecture uses the same flags prefixed with ``--teacher-``; each defaults to the
student's value (see the rules for ``--teacher-ffn-hidden-size``, ``--teacher-num-query-groups``
and ``--teacher-kv-channels``). A recipe given with ``--config-file`` is a flat YAML mapping whose
keys are the flag names with underscores (``num_layers: 2``, ``kd_loss: jsd``).

Precedence: flags given on the command line > the ``--config-file`` recipe > built-in defaults.

``parse_config`` does not call ``config.validate``: the entry point calls
``validate(cfg, world_size)`` once the world size is known, before creating process groups.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_distill.config import (
    DATA_SOURCES,
    DEVICES,
    KD_LOSS_IMPLS,
    LR_DECAY_STYLES,
    NORMALIZATIONS,
    OPTIMIZER_STATE_DTYPES,
    POSITION_EMBEDDINGS,
    RECOMPUTE_MODULES,
    ROLLOUT_BACKENDS,
    TRANSFORMER_IMPLS,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DistillConfig,
    LossConfig,
    ModelShape,
    ParallelConfig,
    RolloutConfig,
    TrainConfig,
)
from megatron_distill.losses.reference import LOSS_KINDS

__all__ = [
    "REQUIRED_FLAGS",
    "build_parser",
    "config_to_dict",
    "format_flag_reference",
    "load_recipe",
    "parse_config",
]

REPO_ROOT = Path(__file__).resolve().parent.parent

# Destinations (flag names with underscores) that must be set by the command line or the recipe.
REQUIRED_FLAGS = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length")

_METAVARS = {int: "N", float: "X", str: "STR"}


@dataclass(frozen=True)
class _Flag:
    """One flag: its destination (underscored name), value type, default, choices and help."""

    dest: str
    type: type
    default: Any
    help: str
    choices: tuple | None = None
    metavar: str | None = None
    nargs: str | None = None

    @property
    def option(self) -> str:
        return "--" + self.dest.replace("_", "-")


def _default(cls: type, name: str) -> Any:
    """The dataclass field default, so flag defaults never drift from ``config.py``."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            raise KeyError(f"{cls.__name__}.{name} has no default")
    raise KeyError(f"{cls.__name__} has no field {name}")


def _m(name: str) -> Any:
    return _default(ModelShape, name)


# Architecture flags: the student's as written, the teacher's with a "teacher_" prefix.
_MODEL_FLAGS: tuple[_Flag, ...] = (
    _Flag("num_layers", int, None, "Number of transformer layers (required)."),
    _Flag("hidden_size", int, None, "Transformer hidden size (required)."),
    _Flag("ffn_hidden_size", int, None, "Hidden size of the MLP. Default: 4 x hidden size."),
    _Flag("num_attention_heads", int, None, "Number of attention heads (required)."),
    _Flag(
        "group_query_attention",
        bool,
        False,
        "Use grouped-query attention with --num-query-groups groups (accepted for Megatron-LM "
        "compatibility; giving --num-query-groups alone also enables it, and this flag without "
        "--num-query-groups is an error).",
    ),
    _Flag(
        "num_query_groups",
        int,
        None,
        "Number of key/value head groups (grouped-query attention). Default: the number of "
        "attention heads (plain multi-head attention).",
    ),
    _Flag("kv_channels", int, None, "Per-head key/value size. Default: hidden size / attention heads."),
    _Flag(
        "max_position_embeddings",
        int,
        None,
        "Maximum sequence length the position embedding supports. Default: --seq-length.",
    ),
    _Flag(
        "normalization",
        str,
        _m("normalization"),
        "Normalization layer.",
        NORMALIZATIONS,
        "{LayerNorm,RMSNorm}",
    ),
    _Flag("norm_epsilon", float, _m("norm_epsilon"), "Epsilon of the normalization layers."),
    _Flag("swiglu", bool, _m("swiglu"), "Use a SwiGLU MLP instead of GeLU."),
    _Flag(
        "position_embedding_type",
        str,
        _m("position_embedding_type"),
        "Position embedding.",
        POSITION_EMBEDDINGS,
        "{learned_absolute,rope,none}",
    ),
    _Flag("rotary_base", int, _m("rotary_base"), "Base period of the rotary position embedding (rope)."),
    _Flag(
        "untie_embeddings_and_output_weights",
        bool,
        _m("untie_embeddings_and_output_weights"),
        "Give the output layer its own weights instead of sharing the input embedding's.",
    ),
    _Flag(
        "disable_bias_linear",
        bool,
        not _m("add_bias_linear"),
        "Drop the biases of all linear layers (Megatron-LM: sets add_bias_linear False).",
    ),
    _Flag("add_qkv_bias", bool, _m("add_qkv_bias"), "Add a bias to the QKV projection only."),
    _Flag("qk_layernorm", bool, _m("qk_layernorm"), "Normalize queries and keys before attention."),
    _Flag(
        "vocab_size",
        int,
        None,
        "Vocabulary size (required; the model pads it up to a multiple of the tensor-parallel size).",
    ),
    _Flag(
        "init_method_std", float, _m("init_method_std"), "Standard deviation of the weight initialization."
    ),
    _Flag("hidden_dropout", float, _m("hidden_dropout"), "Dropout probability after attention and MLP."),
    _Flag(
        "attention_dropout", float, _m("attention_dropout"), "Dropout probability of the attention weights."
    ),
)

_TEACHER_HELP = {
    "ffn_hidden_size": (
        "Teacher MLP hidden size. Default: the student's --ffn-hidden-size when --teacher-hidden-size "
        "equals --hidden-size, else 4 x --teacher-hidden-size."
    ),
    "num_query_groups": (
        "Teacher key/value head groups. Default: the student's --num-query-groups when "
        "--teacher-num-attention-heads equals --num-attention-heads (and --teacher-no-group-query-attention "
        "is not given), else --teacher-num-attention-heads (plain multi-head attention)."
    ),
    "kv_channels": (
        "Teacher per-head key/value size. Default: the student's --kv-channels when the teacher's "
        "hidden size and heads equal the student's, else --teacher-hidden-size / "
        "--teacher-num-attention-heads."
    ),
    "group_query_attention": (
        "Teacher uses grouped-query attention. Default: the student's setting; "
        "--teacher-no-group-query-attention forces plain multi-head attention for the teacher."
    ),
    "max_position_embeddings": (
        "Teacher maximum sequence length. Default: the student's (itself --seq-length)."
    ),
}

_PARALLEL_FLAGS: tuple[_Flag, ...] = (
    _Flag(
        "tensor_model_parallel_size",
        int,
        _default(ParallelConfig, "tensor_model_parallel_size"),
        "Tensor-parallel size, the same for student and teacher.",
    ),
    _Flag(
        "pipeline_model_parallel_size",
        int,
        _default(ParallelConfig, "pipeline_model_parallel_size"),
        "Pipeline-parallel size; each stage holds 1/PP of the student's and of the teacher's layers.",
    ),
    _Flag(
        "sequence_parallel",
        bool,
        _default(ParallelConfig, "sequence_parallel"),
        "Megatron sequence parallelism (needs --tensor-model-parallel-size > 1).",
    ),
    _Flag(
        "use_distributed_optimizer",
        bool,
        _default(TrainConfig, "use_distributed_optimizer"),
        "Shard the optimizer state over data-parallel ranks (Megatron DistributedOptimizer).",
    ),
)


def _t(name: str) -> Any:
    return _default(TrainConfig, name)


_TRAIN_FLAGS: tuple[_Flag, ...] = (
    _Flag("seq_length", int, None, "Training sequence length in tokens (required)."),
    _Flag(
        "micro_batch_size", int, _t("micro_batch_size"), "Sequences per micro-batch per data-parallel rank."
    ),
    _Flag(
        "global_batch_size",
        int,
        _t("global_batch_size"),
        "Sequences per iteration over all ranks; a multiple of micro-batch size x data-parallel size.",
    ),
    _Flag("train_iters", int, _t("train_iters"), "Number of distillation iterations."),
    _Flag("lr", float, _t("lr"), "Peak learning rate of the student."),
    _Flag("min_lr", float, _t("min_lr"), "Learning rate at the end of the decay."),
    _Flag(
        "lr_decay_style",
        str,
        _t("lr_decay_style"),
        "Learning-rate decay schedule after warm-up.",
        LR_DECAY_STYLES,
        "{" + ",".join(LR_DECAY_STYLES) + "}",
    ),
    _Flag("lr_warmup_iters", int, _t("lr_warmup_iters"), "Linear warm-up iterations."),
    _Flag("weight_decay", float, _t("weight_decay"), "AdamW weight decay."),
    _Flag("clip_grad", float, _t("clip_grad"), "Gradient clipping by global norm (0 disables)."),
    _Flag("adam_beta1", float, _t("adam_beta1"), "Adam beta1."),
    _Flag("adam_beta2", float, _t("adam_beta2"), "Adam beta2."),
    _Flag("adam_eps", float, _t("adam_eps"), "Adam epsilon."),
    _Flag("bf16", bool, _t("bf16"), "Run both models in bfloat16 (fp32 master weights for the student)."),
    _Flag(
        "use_precision_aware_optimizer",
        bool,
        _t("use_precision_aware_optimizer"),
        "With --bf16: keep the student's fp32 master weights as its bf16 weights plus 16-bit remainders "
        "(exact, 2 bytes instead of 4 per parameter) and the gradients and Adam moments in "
        "--main-grads-dtype / --exp-avg-dtype / --exp-avg-sq-dtype (18 bytes of state per parameter by "
        "default; 12 with bf16 moments, 10 with bf16 gradients too). Not with --use-distributed-optimizer.",
    ),
    _Flag(
        "main_grads_dtype",
        str,
        _t("main_grads_dtype"),
        "Dtype of the student's gradient accumulation and data-parallel reduction "
        "(needs --use-precision-aware-optimizer for bf16).",
        OPTIMIZER_STATE_DTYPES,
        "{" + ",".join(OPTIMIZER_STATE_DTYPES) + "}",
    ),
    _Flag(
        "exp_avg_dtype",
        str,
        _t("exp_avg_dtype"),
        "Dtype of Adam's first moment (needs --use-precision-aware-optimizer for bf16).",
        OPTIMIZER_STATE_DTYPES,
        "{" + ",".join(OPTIMIZER_STATE_DTYPES) + "}",
    ),
    _Flag(
        "exp_avg_sq_dtype",
        str,
        _t("exp_avg_sq_dtype"),
        "Dtype of Adam's second moment (needs --use-precision-aware-optimizer for bf16).",
        OPTIMIZER_STATE_DTYPES,
        "{" + ",".join(OPTIMIZER_STATE_DTYPES) + "}",
    ),
    _Flag(
        "bias_swiglu_fusion",
        bool,
        _t("bias_swiglu_fusion"),
        "On CUDA, Megatron's fused SwiGLU (torch.compile'd): fewer kernels, and one [tokens, FFN] activation "
        "per layer less kept for backward. The CPU always runs the unfused ops.",
    ),
    _Flag(
        "rope_fusion",
        bool,
        _t("rope_fusion"),
        "On CUDA, rotary position embeddings in one Triton kernel each way (Megatron's apply_rope_fusion "
        "without Transformer Engine) instead of ~6 element-wise kernels per call. The CPU always runs the "
        "unfused ops.",
    ),
    _Flag(
        "output_layer_grad_accumulation_fusion",
        bool,
        _t("output_layer_grad_accumulation_fusion"),
        "With the fused loss (--kd-loss-impl fused, local teacher), add the student output layer's weight "
        "gradient straight into its gradient buffer (main_grad) during the loss's forward (Megatron's "
        "gradient-accumulation fusion, for this layer), instead of holding a [vocab, hidden] gradient until "
        "backward: that much less memory at the step's peak.",
    ),
    _Flag(
        "recompute_modules",
        str,
        None,
        "Student activations not kept for backward but recomputed from what is kept: layernorm "
        "(the outputs of both norms of every layer, Megatron's selective recompute), swiglu (the "
        "MLP activation's output, linear_fc2's input). Element-wise work only; gradients unchanged.",
        RECOMPUTE_MODULES,
        "MODULE",
        "+",
    ),
    _Flag("seed", int, _t("seed"), "Random seed of model initialization and dropout."),
    _Flag("log_interval", int, _t("log_interval"), "Log metrics every N iterations."),
    _Flag(
        "transformer_impl",
        str,
        _t("transformer_impl"),
        "Transformer layer implementation.",
        TRANSFORMER_IMPLS,
        "{" + ",".join(TRANSFORMER_IMPLS) + "}",
    ),
    _Flag(
        "device",
        str,
        _t("device"),
        "Where to run: cuda, cpu (gloo backend), or auto (cuda when available).",
        DEVICES,
        "{" + ",".join(DEVICES) + "}",
    ),
    _Flag(
        "metrics_file",
        str,
        _t("metrics_file"),
        "Write per-iteration metrics as JSON lines to PATH.",
        None,
        "PATH",
    ),
    _Flag(
        "distributed_timeout_minutes",
        float,
        _t("distributed_timeout_minutes"),
        "Timeout of collective operations, in minutes.",
    ),
    _Flag(
        "max_skipped_steps",
        int,
        _t("max_skipped_steps"),
        "Stop (with a checkpoint of the last good state, exit code 76) after N consecutive iterations "
        "whose loss or gradient was non-finite on some rank; each such step is skipped on every rank.",
    ),
    _Flag(
        "teacher_pretrain_iters",
        int,
        _t("teacher_pretrain_iters"),
        "Before distilling, train the teacher with cross-entropy on the data for N iterations, so that "
        "a randomly initialized teacher is a distribution worth matching (quickstart; 0: off).",
    ),
    _Flag(
        "teacher_pretrain_lr", float, _t("teacher_pretrain_lr"), "Learning rate of the teacher pre-training."
    ),
)


def _l(name: str) -> Any:
    return _default(LossConfig, name)


_LOSS_FLAGS: tuple[_Flag, ...] = (
    _Flag(
        "kd_loss",
        str,
        _l("kind"),
        "Divergence between teacher and student token distributions: forward_kl = KL(teacher || student), "
        "reverse_kl = KL(student || teacher), jsd = generalized Jensen-Shannon with --kd-beta.",
        LOSS_KINDS,
        "{" + ",".join(LOSS_KINDS) + "}",
    ),
    _Flag(
        "kd_beta",
        float,
        _l("beta"),
        "JSD interpolation in [0, 1] (TRL/GKD convention): 0 is forward KL, 1 is reverse KL.",
    ),
    _Flag(
        "kd_temperature",
        float,
        _l("temperature"),
        "Softmax temperature applied to both models' logits (> 0; no tau^2 rescaling).",
    ),
    _Flag("kd_loss_weight", float, _l("kd_weight"), "Weight of the distillation term in the student loss."),
    _Flag(
        "kd_ce_weight",
        float,
        _l("ce_weight"),
        "Weight of the cross-entropy on the data's labels, mixed into the student loss (0: off).",
    ),
    _Flag(
        "kd_loss_impl",
        str,
        _l("impl"),
        "Loss implementation: fused (output layer + loss kernel), reference (plain PyTorch), "
        "auto (fused where supported).",
        KD_LOSS_IMPLS,
        "{" + ",".join(KD_LOSS_IMPLS) + "}",
    ),
)

_LOSS_FLAGS = _LOSS_FLAGS + (
    _Flag(
        "kd_topk",
        int,
        None,
        "Top-K teacher: the loss uses the teacher's log-probs on its K most likely tokens per position "
        "(with --teacher-remote). forward_kl drops the teacher mass outside K; reverse_kl and jsd renormalize "
        "both distributions over K.",
    ),
    _Flag(
        "kd_topk_renormalize",
        bool,
        False,
        "forward_kl on top-K: renormalize the teacher's K probabilities to sum to 1 first.",
    ),
    _Flag(
        "kd_loss_chunk_tokens",
        int,
        None,
        "Fused loss: tokens per chunk of logits (the loss's [chunk, vocab/TP] buffers in the weights' dtype: "
        "the student's and, with a local teacher, the teacher's). Unset: automatic, the buffers together "
        "as large as the output layer's weight gradient (for a 151,936 x 2048 layer and a local teacher: "
        "1536-token student chunks with 512-token teacher sub-chunks on CUDA at TP=1, else 1024 / 1024). Set: "
        "chunks of N tokens for both. Larger chunks run faster and hold more memory: "
        "benchmarks/NOTES_loss_kernel.md gives measured pairs.",
    ),
)

_DATA_FLAGS: tuple[_Flag, ...] = (
    _Flag(
        "data_source",
        str,
        _default(DataConfig, "source"),
        "Where batches come from: synthetic (a fixed random Markov source built from --data-seed), chat "
        "(--train-data files), indexed (--data-path); auto: chat with --train-data, indexed with "
        "--data-path, else synthetic.",
        DATA_SOURCES,
        "{" + ",".join(DATA_SOURCES) + "}",
    ),
    _Flag(
        "train_data",
        str,
        None,
        "Prompt/response or chat rows (.jsonl, .json, .parquet, .arrow or a datasets save_to_disk dir); "
        "loss on response tokens only.",
        None,
        "FILE",
        "+",
    ),
    _Flag(
        "data_path",
        str,
        None,
        "Megatron indexed datasets: PREFIX (PREFIX.bin/.idx) or WEIGHT PREFIX [WEIGHT PREFIX ...] blends, "
        "as in Megatron-LM (build them with python -m megatron_distill.data.preprocess).",
        None,
        "[W] PREFIX",
        "+",
    ),
    _Flag(
        "tokenizer_type",
        str,
        _default(DataConfig, "tokenizer_type"),
        "Tokenizer kind.",
        ("HuggingFaceTokenizer",),
        "{HuggingFaceTokenizer}",
    ),
    _Flag(
        "tokenizer_model",
        str,
        None,
        "Local Hugging Face tokenizer directory of the student (no hub access). Default: the --load "
        "Hugging Face directory when it holds tokenizer files.",
        None,
        "DIR",
    ),
    _Flag(
        "teacher_tokenizer_model",
        str,
        None,
        "The teacher's tokenizer directory; checked against the student's (the error lists where they "
        "differ). Default: the --teacher-load Hugging Face directory when it holds tokenizer files.",
        None,
        "DIR",
    ),
    _Flag(
        "skip_malformed_rows",
        bool,
        False,
        "Skip and count malformed --train-data rows instead of stopping with an error naming file and row.",
    ),
    _Flag("pack_sequences", bool, False, "Pack several --train-data samples per row (block-diagonal attention)."),
    _Flag(
        "reset_at_document_boundaries",
        bool,
        False,
        "--data-path: restart positions and attention at each EOD token, no loss on EOD inputs.",
    ),
    _Flag("data_cache_path", str, None, "Directory for dataset index caches.", None, "DIR"),
    _Flag(
        "privileged_template",
        str,
        None,
        "Privileged-context self-distillation: the block placed before the prompt in the teacher's input, "
        "with {context} replaced by the row's privileged_context. Default with --teacher self-frozen / "
        "self-live: 'Reference solution (for the teacher only):\\n{context}\\n\\n'.",
        None,
        "TEMPLATE",
    ),
    _Flag(
        "synthetic_branching",
        int,
        _default(DataConfig, "synthetic_branching"),
        "Synthetic data: number of possible next tokens after each token.",
    ),
    _Flag("data_seed", int, _default(DataConfig, "data_seed"), "Seed of data order / the synthetic source."),
)

_MODEL_SOURCE_FLAGS: tuple[_Flag, ...] = (
    _Flag(
        "teacher_load",
        str,
        None,
        "The teacher's weights: a local Hugging Face directory (Llama 3.x, Qwen2/2.5, Qwen3; safetensors). "
        "Its config sets every --teacher-* architecture flag; an explicit flag that disagrees is an error.",
        None,
        "DIR",
    ),
    _Flag(
        "teacher",
        str,
        "separate",
        "Which teacher: separate (its own weights: --teacher-load / --teacher-* flags / --teacher-remote), "
        "self-frozen (a frozen copy of the initial student) or self-live (the current student weights run "
        "without grad, no second copy): privileged-context self-distillation on --train-data rows.",
        ("separate", "self-frozen", "self-live"),
        "{separate,self-frozen,self-live}",
    ),
    _Flag(
        "teacher_remote",
        str,
        None,
        "Use a remote teacher service (python -m megatron_distill.teacher_service) at ADDRESS "
        "(http://host:port) instead of a local teacher; needs --kd-topk. Shared token: "
        "$MEGATRON_DISTILL_TEACHER_TOKEN. Requests go out one iteration ahead.",
        None,
        "ADDRESS",
    ),
    _Flag(
        "teacher_remote_timeout_s",
        float,
        120.0,
        "Seconds per request to the remote teacher before a retry (3 retries with backoff, then an error "
        "naming the address).",
    ),
    _Flag(
        "export_hf",
        str,
        None,
        "After training, write the student as a Hugging Face directory (config, safetensors, tokenizer "
        "files) loadable by transformers. Refuses a non-empty DIR.",
        None,
        "DIR",
    ),
)

def _c(name: str) -> Any:
    return _default(CheckpointConfig, name)


_CHECKPOINT_FLAGS: tuple[_Flag, ...] = (
    _Flag(
        "save",
        str,
        _c("save"),
        "Save checkpoints (student, optimizer, LR schedule, RNG, data position; never the teacher) "
        "under DIR, as iter_NNNNNNN directories in megatron.core.dist_checkpointing's format.",
        None,
        "DIR",
    ),
    _Flag(
        "save_interval",
        int,
        _c("save_interval"),
        "Save every N iterations (needs --save). A checkpoint is always saved after the last iteration.",
    ),
    _Flag(
        "load",
        str,
        _c("load"),
        "Resume from the newest checkpoint under DIR (a --save directory of ours); a DIR without "
        "checkpoints starts from iteration 0, so --save D --load D resumes whenever it can. Any "
        "TP/PP/DP layout may load it.",
        None,
        "DIR",
    ),
    _Flag(
        "keep_last",
        int,
        _c("keep_last"),
        "Keep only the N newest checkpoints (needs --save); older ones are deleted once a new one is "
        "complete. Default: keep all.",
    ),
    _Flag(
        "auto_resume",
        bool,
        _c("auto_resume"),
        "Resume from the newest complete checkpoint under --save (a damaged newest one is reported and the "
        "previous one used); for requeued jobs. Same as --load set to the --save directory.",
    ),
    _Flag(
        "load_optim",
        bool,
        _c("load_optim"),
        "Load the optimizer state with --load (--no-load-optim: fresh Adam moments; the LR schedule "
        "position is still restored).",
    ),
    _Flag(
        "load_rng",
        bool,
        _c("load_rng"),
        "Load the RNG states with --load (--no-load-rng: keep this run's seeds). They are restored "
        "only when the parallel layout is unchanged.",
    ),
)

def _r(name: str) -> Any:
    return _default(RolloutConfig, name)


# On-policy distillation (GKD) and RL: flag destination -> RolloutConfig field.
_ROLLOUT_FIELDS = {
    "on_policy_fraction": "on_policy_fraction",
    "rollout_temperature": "temperature",
    "rollout_top_p": "top_p",
    "rollout_top_k": "top_k",
    "rollout_max_new_tokens": "max_new_tokens",
    "seq_kd": "seq_kd",
    "rollout_seed": "seed",
    "rollouts_per_prompt": "rollouts_per_prompt",
    "rl_loss_weight": "rl_loss_weight",
    "reward_fn": "reward_fn",
    "rollout_backend": "backend",
    "sglang_url": "sglang_url",
    "sglang_weights_dir": "sglang_weights_dir",
    "sglang_sync_interval": "sglang_sync_interval",
    "sglang_timeout_s": "sglang_timeout_s",
}

_ROLLOUT_FLAGS: tuple[_Flag, ...] = (
    _Flag(
        "on_policy_fraction",
        float,
        _r("on_policy_fraction"),
        "GKD's lambda in [0, 1]: the share of each global batch whose responses the student generates from "
        "the rows' prompts with its current weights (the rest keep the dataset's responses). Which samples: "
        "sample groups spread evenly over the global batch, the same whatever the layout (README). Needs "
        "--train-data; 0 is offline KD, unchanged.",
    ),
    _Flag("rollout_temperature", float, _r("temperature"), "Sampling temperature of the rollouts (0 = greedy)."),
    _Flag("rollout_top_p", float, _r("top_p"), "Nucleus sampling of the rollouts, in (0, 1] (1 = off)."),
    _Flag("rollout_top_k", int, _r("top_k"), "Top-k sampling of the rollouts (0 = off)."),
    _Flag(
        "rollout_max_new_tokens",
        int,
        _r("max_new_tokens"),
        "Most tokens generated per response; also capped so that prompt + response fit --seq-length + 1. A "
        "response stops after the tokenizer's EOS or the chat template's end-of-turn token.",
    ),
    _Flag(
        "seq_kd",
        bool,
        _r("seq_kd"),
        "Sequence-level KD (GKD's seq_kd, as in TRL): the samples that are not on-policy get responses generated "
        "by the teacher instead of the dataset's.",
    ),
    _Flag(
        "rollout_seed",
        int,
        _r("seed"),
        "Seed of rollout sampling (the noise is a hash of seed, iteration, data-parallel rank, row and token; "
        "the global RNG is not used).",
    ),
    _Flag(
        "rollouts_per_prompt",
        int,
        _r("rollouts_per_prompt"),
        "Responses generated per prompt (the group of the RL baseline); a multiple of it must divide "
        "--global-batch-size / data-parallel size.",
    ),
    _Flag(
        "rl_loss_weight",
        float,
        _r("rl_loss_weight"),
        "Weight of the policy-gradient term (REINFORCE, baseline = the mean reward of the prompt's rollouts) on "
        "the student's rollouts, added to the distillation term and normalized by the same global token count. "
        "Needs --rollouts-per-prompt >= 2; selects the reference loss path (0: off).",
    ),
    _Flag(
        "reward_fn",
        str,
        _r("reward_fn"),
        "Reward function 'package.module:function', called fn(prompt, response, reference) -> float on the "
        "decoded texts (reference: the row's 'reference' field, '' when absent).",
        None,
        "MODULE:FN",
    ),
    _Flag(
        "rollout_backend",
        str,
        _r("backend"),
        "Who generates the student's rollouts: megatron (in place, under the training layout) or sglang (an "
        "sglang server at --sglang-url, loading the student exported to --sglang-weights-dir; teacher rollouts "
        "of --seq-kd stay in place). Checked against a stand-in server only (README).",
        ROLLOUT_BACKENDS,
    ),
    _Flag(
        "sglang_url",
        str,
        _r("sglang_url"),
        "http://HOST:PORT of the sglang server serving the student (native /generate and "
        "/update_weights_from_disk); an --api-key of the server is read from $MEGATRON_DISTILL_SGLANG_API_KEY.",
        None,
        "URL",
    ),
    _Flag(
        "sglang_weights_dir",
        str,
        _r("sglang_weights_dir"),
        "Directory the engine exports the student to (step_NNNNNNN, Hugging Face format, the two newest kept) "
        "for the sglang server to load: must be readable by the server at the same path.",
        None,
        "DIR",
    ),
    _Flag(
        "sglang_sync_interval",
        int,
        _r("sglang_sync_interval"),
        "Export the student and update the sglang server's weights every N iterations (1: every rollout comes "
        "from the current weights; N > 1: up to N - 1 optimizer steps stale).",
    ),
    _Flag(
        "sglang_timeout_s",
        float,
        _r("sglang_timeout_s"),
        "Seconds per HTTP attempt to the sglang server (a whole rollout batch must be generated within it); "
        "connection errors, timeouts and 5xx answers are retried 3 times with backoff. 4 x this must stay below "
        "--distributed-timeout-minutes (the other ranks wait in a collective meanwhile).",
    ),
)

# Flag destination -> (section of DistillConfig, field name).
_FIELD_MAP: dict[str, tuple[str, str]] = {
    **{f.dest: ("parallel", f.dest) for f in _PARALLEL_FLAGS if f.dest != "use_distributed_optimizer"},
    "use_distributed_optimizer": ("train", "use_distributed_optimizer"),
    **{f.dest: ("train", f.dest) for f in _TRAIN_FLAGS},
    "kd_loss": ("loss", "kind"),
    "kd_beta": ("loss", "beta"),
    "kd_temperature": ("loss", "temperature"),
    "kd_loss_weight": ("loss", "kd_weight"),
    "kd_ce_weight": ("loss", "ce_weight"),
    "kd_loss_impl": ("loss", "impl"),
    "kd_topk": ("loss", "topk"),
    "kd_topk_renormalize": ("loss", "topk_renormalize"),
    "kd_loss_chunk_tokens": ("loss", "chunk_tokens"),
    "data_source": ("data", "source"),
    **{f.dest: ("data", f.dest) for f in _DATA_FLAGS if f.dest != "data_source"},
    **{f.dest: ("checkpoint", f.dest) for f in _MODEL_SOURCE_FLAGS if f.dest != "teacher"},
    "teacher": ("checkpoint", "teacher_mode"),
    **{f.dest: ("checkpoint", f.dest) for f in _CHECKPOINT_FLAGS},
    **{dest: ("rollout", name) for dest, name in _ROLLOUT_FIELDS.items()},
}


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to the help of flags whose default is a real value."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default not in (None, argparse.SUPPRESS) and "%(default)" not in help_text:
            help_text += " (default: %(default)s)"
        return help_text


class _TeacherBooleanAction(argparse.Action):
    """``--teacher-X`` sets True, ``--teacher-no-X`` sets False; default None = the student's value."""

    def __init__(self, option_strings: list[str], dest: str, default: Any = None, help: str | None = None):
        options = []
        for option in option_strings:
            options += [option, option.replace("--teacher-", "--teacher-no-", 1)]
        super().__init__(options, dest, nargs=0, default=default, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, not (option_string or "").startswith("--teacher-no-"))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def _is_bool(action: argparse.Action) -> bool:
    return action.nargs == 0 and action.dest != "help"


def _add(group: argparse._ArgumentGroup, flag: _Flag, *, option: str, default: Any, help_text: str) -> None:
    if flag.type is bool:
        bool_action = (
            _TeacherBooleanAction if option.startswith("--teacher-") else argparse.BooleanOptionalAction
        )
        group.add_argument(option, action=bool_action, default=default, help=help_text)
    else:
        group.add_argument(
            option,
            type=flag.type,
            default=default,
            choices=flag.choices,
            metavar=flag.metavar or _METAVARS[flag.type],
            help=help_text,
            **({"nargs": flag.nargs} if flag.nargs else {}),
        )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of a distillation run (every flag has a help string).

    Boolean flags also accept a ``--no-`` form, so that a recipe's ``true`` can be turned off on
    the command line. Required flags are not marked required here: they may come from the recipe,
    and ``parse_config`` checks them after merging.
    """
    parser = argparse.ArgumentParser(
        prog="pretrain_distill.py",
        description="Distill a teacher GPT into a student GPT on Megatron-Core.",
        epilog="Precedence: command-line flags > --config-file recipe > built-in defaults.",
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
    )
    recipe = parser.add_argument_group("recipe")
    recipe.add_argument(
        "--config-file",
        type=str,
        default=None,
        metavar="PATH",
        help="YAML recipe (e.g. configs/quickstart.yaml): a flat mapping whose keys are flag names with "
        "underscores (num_layers: 2, kd_loss: jsd). Flags on the command line override it. A relative path "
        "not found from the working directory is looked up from the repository root.",
    )

    student = parser.add_argument_group(
        "student model", "Architecture of the student (Megatron-LM flag names)."
    )
    for flag in _MODEL_FLAGS:
        _add(student, flag, option=flag.option, default=flag.default, help_text=flag.help)
        if flag.dest == "max_position_embeddings":
            seq = next(f for f in _TRAIN_FLAGS if f.dest == "seq_length")
            _add(student, seq, option=seq.option, default=seq.default, help_text=seq.help)

    teacher = parser.add_argument_group(
        "teacher model",
        "Architecture of the teacher: the student's flags prefixed with --teacher-, each defaulting to the "
        "student's value (teacher and student read the same tokens, so there is no --teacher-seq-length).",
    )
    for flag in _MODEL_FLAGS:
        help_text = _TEACHER_HELP.get(flag.dest)
        if help_text is None:
            base = flag.help.replace(" (required).", ".").replace(" (required; ", " (")
            help_text = f"Teacher: {base[0].lower()}{base[1:]} Default: the student's value."
        _add(teacher, flag, option="--teacher-" + flag.option[2:], default=None, help_text=help_text)

    for title, description, flags in (
        (
            "parallelism",
            "Layout shared by student and teacher; data-parallel size = world / (TP x PP).",
            _PARALLEL_FLAGS,
        ),
        (
            "training",
            "Optimization, batching, logging.",
            tuple(f for f in _TRAIN_FLAGS if f.dest != "seq_length"),
        ),
        (
            "distillation",
            "The student's loss: kd weight x divergence + ce weight x cross-entropy.",
            _LOSS_FLAGS,
        ),
        ("data", None, _DATA_FLAGS),
        ("checkpointing", "Saving and resuming (megatron_distill/checkpointing.py).", _CHECKPOINT_FLAGS),
        (
            "on-policy distillation and RL",
            "GKD: the student (or, with --seq-kd, the teacher) generates responses in place under the training "
            "layout, then the same schedule and loss train on them; optional policy-gradient term "
            "(megatron_distill/onpolicy.py).",
            _ROLLOUT_FLAGS,
        ),
        (
            "Hugging Face models",
            "--load also accepts a Hugging Face directory: the student then starts from those weights and "
            "its config sets every student architecture flag.",
            _MODEL_SOURCE_FLAGS,
        ),
    ):
        group = parser.add_argument_group(title, description)
        for flag in flags:
            _add(group, flag, option=flag.option, default=flag.default, help_text=flag.help)
    return parser


def _value_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


def _resolve_path(path: str) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_absolute() and (REPO_ROOT / p).is_file():
        return REPO_ROOT / p
    tried = f"{p.resolve()}" + ("" if p.is_absolute() else f" or {REPO_ROOT / p}")
    raise ConfigError(f"--config-file {path!r}: no such file (looked for {tried})")


def _check_value(key: str, value: Any, action: argparse.Action, path: Path) -> Any:
    where = f"key {key!r} in {path}"
    if value is None:
        if action.default is None:
            return None
        raise ConfigError(f"{where}: null is not allowed (default {action.default!r})")
    if _is_bool(action):
        if not isinstance(value, bool):
            raise ConfigError(
                f"{where}: expected a boolean (true/false), got {type(value).__name__} {value!r}"
            )
        return value
    kind = action.type or str
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{where}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def load_recipe(path: str, parser: argparse.ArgumentParser | None = None) -> dict[str, Any]:
    """Load a YAML recipe with OmegaConf and check it against the parser's flags.

    Returns ``{dest: value}``. Raises ``ConfigError`` for a missing or unreadable file, a recipe
    that is not a flat mapping, an unknown key (naming the key, the file and the closest known
    key) or a value of the wrong type (naming key, file and the expected type).
    """
    from omegaconf import OmegaConf

    parser = parser or build_parser()
    file = _resolve_path(path)
    try:
        raw = OmegaConf.to_container(OmegaConf.load(file), resolve=True)
    except Exception as exc:  # yaml / omegaconf parse or interpolation errors
        raise ConfigError(f"--config-file {file}: cannot read it as YAML: {exc}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"--config-file {file}: expected a mapping of flag names to values")
    actions = _value_actions(parser)
    known = sorted(d for d in actions if d != "config_file")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        if key == "config_file":
            raise ConfigError(f"key 'config_file' in {file}: a recipe cannot include another recipe")
        if key not in actions:
            close = difflib.get_close_matches(key.replace("-", "_"), known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key {key!r} in {file} (keys are flag names with underscores){hint}")
        values[key] = _check_value(key, value, actions[key], file)
    return values


# Training settings that a Hugging Face config also holds: taken from it unless given, never a conflict.
_HF_SOFT_FIELDS = ("hidden_dropout", "attention_dropout", "max_position_embeddings", "init_method_std")


def is_hf_dir(path: str | None) -> bool:
    """Whether ``path`` is a Hugging Face model directory (has ``config.json``, no checkpoints of ours)."""
    if not path:
        return False
    p = Path(path)
    return (p / "config.json").is_file() and not (p / "latest_checkpointed_iteration.txt").exists()


def _apply_hf_configs(values: dict[str, Any], explicit: set[str]) -> None:
    """Fill student / teacher architecture flags from Hugging Face configs (--load, --teacher-load).

    An explicitly given flag (command line or recipe) that disagrees with the HF config is an error
    naming the flag, its value, the config file and the config's value.
    """
    from megatron_distill.models.hf_config import shape_from_hf_config

    values.setdefault("student_hf", None)
    for prefix, key in (("", "load"), ("teacher_", "teacher_load")):
        path = values.get(key)
        if not path:
            continue
        if not is_hf_dir(path):
            continue  # --load of one of our checkpoints; a bad --teacher-load is reported at start-up
        shape = shape_from_hf_config(path)
        for flag in _MODEL_FLAGS:
            if flag.dest == "group_query_attention":
                continue
            dest = prefix + flag.dest
            hf_value = (not shape.add_bias_linear) if flag.dest == "disable_bias_linear" else getattr(
                shape, flag.dest)
            given = values.get(dest)
            if flag.dest in _HF_SOFT_FIELDS:
                if dest not in explicit or given is None:
                    values[dest] = hf_value
                continue
            if dest in explicit and given is not None and given != hf_value:
                raise ConfigError(
                    f"--{dest.replace('_', '-')} {given} disagrees with {Path(path) / 'config.json'}, which "
                    f"gives {hf_value}: drop the flag or use a matching value"
                )
            values[dest] = hf_value
        if flag_tok := ("tokenizer_model" if prefix == "" else "teacher_tokenizer_model"):
            if not values.get(flag_tok) and (Path(path) / "tokenizer_config.json").is_file():
                values[flag_tok] = str(path)
        if key == "load":
            values["student_hf"] = str(path)
            values["load"] = None  # not a checkpoint to resume from


def _explicit_dests(argv: list[str]) -> set[str]:
    """Destinations given on the command line (parse again with every default suppressed)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _model_kwargs(values: dict[str, Any], prefix: str) -> dict[str, Any]:
    kwargs = {}
    for flag in _MODEL_FLAGS:
        value = values[prefix + flag.dest]
        if flag.dest == "disable_bias_linear":
            kwargs["add_bias_linear"] = None if value is None else not value
        elif flag.dest != "group_query_attention":
            kwargs[flag.dest] = value
    return kwargs


def _build_student(values: dict[str, Any]) -> ModelShape:
    kwargs = _model_kwargs(values, "")
    if values["group_query_attention"] and kwargs["num_query_groups"] is None:
        raise ConfigError("--group-query-attention needs --num-query-groups")
    if kwargs["max_position_embeddings"] is None:
        kwargs["max_position_embeddings"] = values["seq_length"]
    return ModelShape(**kwargs)


def _build_teacher(values: dict[str, Any], student: ModelShape) -> ModelShape:
    kwargs = _model_kwargs(values, "teacher_")
    explicit_ffn, explicit_kv = kwargs["ffn_hidden_size"], kwargs["kv_channels"]
    explicit_groups, gqa = kwargs["num_query_groups"], values["teacher_group_query_attention"]
    for name, value in list(kwargs.items()):
        if value is None:
            kwargs[name] = getattr(student, name)
    same_hidden = kwargs["hidden_size"] == student.hidden_size
    same_heads = kwargs["num_attention_heads"] == student.num_attention_heads
    # Sizes derived from width / heads follow the teacher's own width / heads when those differ.
    kwargs["ffn_hidden_size"] = (
        explicit_ffn if explicit_ffn is not None else (student.ffn_hidden_size if same_hidden else None)
    )
    kwargs["kv_channels"] = (
        explicit_kv
        if explicit_kv is not None
        else (student.kv_channels if same_hidden and same_heads else None)
    )
    if explicit_groups is not None:
        if gqa is False:
            raise ConfigError("--teacher-num-query-groups contradicts --teacher-no-group-query-attention")
        groups = explicit_groups
    elif gqa is False:
        groups = kwargs["num_attention_heads"]
    elif same_heads:
        groups = student.num_query_groups
    elif gqa:
        raise ConfigError(
            "--teacher-group-query-attention with --teacher-num-attention-heads different from the "
            "student's needs --teacher-num-query-groups"
        )
    else:
        groups = kwargs["num_attention_heads"]
    kwargs["num_query_groups"] = groups
    return ModelShape(**kwargs)


def _build_config(values: dict[str, Any]) -> DistillConfig:
    student = _build_student(values)
    teacher = _build_teacher(values, student)
    sections: dict[str, dict[str, Any]] = {"parallel": {}, "train": {}, "loss": {}, "data": {}, "checkpoint": {},
                                           "rollout": {}}
    for dest, (section, name) in _FIELD_MAP.items():
        sections[section][name] = values[dest]
    sections["checkpoint"]["student_hf"] = values.get("student_hf")
    for name in ("train_data", "data_path"):
        sections["data"][name] = list(sections["data"][name] or [])
    sections["train"]["recompute_modules"] = list(sections["train"]["recompute_modules"] or [])
    return DistillConfig(
        student=student,
        teacher=teacher,
        parallel=ParallelConfig(**sections["parallel"]),
        loss=LossConfig(**sections["loss"]),
        train=TrainConfig(**sections["train"]),
        data=DataConfig(**sections["data"]),
        checkpoint=CheckpointConfig(**sections["checkpoint"]),
        rollout=RolloutConfig(**sections["rollout"]),
    )


def parse_config(argv: list[str] | None = None) -> DistillConfig:
    """Parse flags (``sys.argv[1:]`` when ``argv`` is None) and any ``--config-file`` recipe.

    Command-line flags override the recipe, which overrides the defaults. Problems (bad flags,
    recipe errors, missing required flags) exit through ``parser.error`` (status 2, message on
    stderr). Does not call ``config.validate``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    values = vars(parser.parse_args(argv))
    if values["config_file"]:
        try:
            recipe = load_recipe(values["config_file"], parser)
        except ConfigError as exc:
            parser.error(str(exc))
        explicit = _explicit_dests(argv)
        values.update({k: v for k, v in recipe.items() if k not in explicit})
        explicit |= set(recipe)
    else:
        explicit = _explicit_dests(argv)
    try:
        _apply_hf_configs(values, explicit)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    missing = [d for d in REQUIRED_FLAGS if values[d] is None]
    if missing:
        names = ", ".join("--" + d.replace("_", "-") for d in missing)
        parser.error(
            f"the following arguments are required (on the command line or in --config-file): {names}"
        )
    try:
        return _build_config(values)
    except ConfigError as exc:
        parser.error(str(exc))


def config_to_dict(cfg: DistillConfig) -> dict[str, Any]:
    """The config as nested plain dicts (student, teacher, parallel, loss, train, data, checkpoint, rollout)."""
    return dataclasses.asdict(cfg)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def format_flag_reference(parser: argparse.ArgumentParser | None = None) -> str:
    """A markdown reference of every flag (flag, default, help), one table per argument group."""
    parser = parser or build_parser()
    out: list[str] = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        out.append(f"### {group.title}\n")
        if group.description:
            out.append(f"{group.description}\n")
        out.append("| flag | default | description |")
        out.append("| --- | --- | --- |")
        for a in actions:
            if _is_bool(a):
                flag = ", ".join(f"`{o}`" for o in a.option_strings)
            else:
                flag = f"`{a.option_strings[0]} {a.metavar}`"
            if a.dest in REQUIRED_FLAGS:
                default = "required"
            elif a.default is None:
                default = (
                    "student's value" if a.dest.startswith("teacher_") and a.dest not in _FIELD_MAP else "-"
                )
            else:
                default = f"`{a.default}`"
            help_text = (a.help or "") % {"default": a.default, "prog": parser.prog}
            out.append(f"| {_md(flag)} | {_md(default)} | {_md(help_text)} |")
        out.append("")
    return "\n".join(out)
