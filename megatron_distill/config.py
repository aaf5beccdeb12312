"""Typed configuration of a distillation run, validated once before any process group exists.

``DistillConfig`` is built at the entry point (``arguments.py``: flags + YAML recipe) and then
handed down explicitly; no module reads a global args object.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_distill.losses.reference import LOSS_KINDS

NORMALIZATIONS = ("LayerNorm", "RMSNorm")
POSITION_EMBEDDINGS = ("learned_absolute", "rope", "none")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
OPTIMIZER_STATE_DTYPES = ("fp32", "bf16")
RECOMPUTE_MODULES = ("layernorm", "swiglu")
TRANSFORMER_IMPLS = ("local", "transformer_engine")
KD_LOSS_IMPLS = ("auto", "fused", "reference")
DEVICES = ("auto", "cuda", "cpu")
DATA_SOURCES = ("auto", "synthetic", "chat", "indexed")
TEACHER_MODES = ("separate", "self-frozen", "self-live")
DEFAULT_REWARD_FN = "megatron_distill.rollout.rl:exact_match_reward"
ROLLOUT_BACKENDS = ("megatron", "sglang")
# The sglang client's retries after a failed attempt and first backoff (doubled each time).
SGLANG_RETRIES, SGLANG_BACKOFF_S = 3, 1.0


def sglang_worst_case_seconds(timeout_s: float) -> float:
    """The longest an sglang request can take before it fails: every attempt times out, plus the backoffs."""
    return (SGLANG_RETRIES + 1) * timeout_s + SGLANG_BACKOFF_S * (2**SGLANG_RETRIES - 1)


class ConfigError(ValueError):
    """A configuration problem; the message names the flag(s) to change."""


@dataclass
class ModelShape:
    """Architecture of one GPT model (student or teacher), in Megatron-LM's terms."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    max_position_embeddings: int
    ffn_hidden_size: int | None = None
    num_query_groups: int | None = None
    kv_channels: int | None = None
    normalization: str = "LayerNorm"
    norm_epsilon: float = 1e-5
    swiglu: bool = False
    position_embedding_type: str = "learned_absolute"
    rotary_base: int = 10000
    untie_embeddings_and_output_weights: bool = False
    add_bias_linear: bool = True
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    init_method_std: float = 0.02
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads


@dataclass
class ParallelConfig:
    """Tensor / pipeline / data parallel layout shared by student and teacher."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False


@dataclass
class LossConfig:
    """How the student is trained: the distillation term and an optional CE term."""

    kind: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    impl: str = "auto"
    topk: int | None = None
    topk_renormalize: bool = False
    chunk_tokens: int | None = None


@dataclass
class TrainConfig:
    """Optimisation, batching and logging."""

    seq_length: int = 128
    micro_batch_size: int = 1
    global_batch_size: int = 1
    train_iters: int = 10
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_warmup_iters: int = 0
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    bf16: bool = False
    seed: int = 1234
    log_interval: int = 1
    transformer_impl: str = "local"
    device: str = "auto"
    use_distributed_optimizer: bool = False
    use_precision_aware_optimizer: bool = False
    main_grads_dtype: str = "fp32"
    exp_avg_dtype: str = "fp32"
    exp_avg_sq_dtype: str = "fp32"
    bias_swiglu_fusion: bool = True
    output_layer_grad_accumulation_fusion: bool = True
    rope_fusion: bool = True
    recompute_modules: list[str] = field(default_factory=list)
    metrics_file: str | None = None
    teacher_pretrain_iters: int = 0
    teacher_pretrain_lr: float = 1e-3
    distributed_timeout_minutes: float = 10.0
    max_skipped_steps: int = 10


@dataclass
class DataConfig:
    """Where batches come from: ``synthetic`` (a fixed random Markov source built from the seed),
    ``chat`` (``train_data`` files: prompt/response or chat rows) or ``indexed`` (Megatron
    ``.bin/.idx`` blends in ``data_path``); ``auto`` picks from which of those is set."""

    source: str = "auto"
    synthetic_branching: int = 4
    data_seed: int = 4321
    train_data: list[str] = field(default_factory=list)
    data_path: list[str] = field(default_factory=list)
    tokenizer_type: str = "HuggingFaceTokenizer"
    tokenizer_model: str | None = None
    teacher_tokenizer_model: str | None = None
    skip_malformed_rows: bool = False
    pack_sequences: bool = False
    reset_at_document_boundaries: bool = False
    data_cache_path: str | None = None
    privileged_template: str | None = None


@dataclass
class CheckpointConfig:
    """Saving and resuming (``checkpointing.py``). ``load``: a directory of our checkpoints."""

    save: str | None = None
    save_interval: int | None = None
    load: str | None = None
    keep_last: int | None = None
    load_optim: bool = True
    load_rng: bool = True
    # Hugging Face directories: the student's initial weights (set when --load is an HF dir),
    # the teacher's weights, and where to export the trained student.
    auto_resume: bool = False
    student_hf: str | None = None
    teacher_load: str | None = None
    export_hf: str | None = None
    teacher_remote: str | None = None
    teacher_remote_timeout_s: float = 120.0
    # "separate" (its own weights), "self-frozen" (a frozen copy of the initial student) or
    # "self-live" (the current student weights, no grad): privileged-context self-distillation.
    teacher_mode: str = "separate"


@dataclass
class RolloutConfig:
    """On-policy distillation (GKD) and the RL term (``megatron_distill/onpolicy.py``).

    ``on_policy_fraction`` (GKD's lambda): the share of each global batch whose responses the
    student generates from the batch's prompts; the rest keep the dataset's responses, or, with
    ``seq_kd``, get responses generated by the teacher. ``rl_loss_weight`` > 0 adds a
    REINFORCE-with-group-baseline term on the student's rollouts, ``rollouts_per_prompt`` samples
    per prompt, rewarded by ``reward_fn`` (``module:function``).

    ``backend``: who generates the student's rollouts: ``megatron`` (in place, under the training
    layout) or ``sglang`` (an sglang server at ``sglang_url``, which loads the student exported
    to ``sglang_weights_dir`` every ``sglang_sync_interval`` iterations; rollout/sglang_rollout.py).
    """

    on_policy_fraction: float = 0.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    seq_kd: bool = False
    seed: int = 1234
    rollouts_per_prompt: int = 1
    rl_loss_weight: float = 0.0
    reward_fn: str = DEFAULT_REWARD_FN
    backend: str = "megatron"
    sglang_url: str | None = None
    sglang_weights_dir: str | None = None
    sglang_sync_interval: int = 1
    sglang_timeout_s: float = 120.0

    @property
    def enabled(self) -> bool:
        """Whether any response is generated (student rollouts or teacher sequences)."""
        return self.on_policy_fraction > 0 or self.seq_kd


@dataclass
class DistillConfig:
    """Everything a run needs; built once at the entry point and passed explicitly."""

    student: ModelShape
    teacher: ModelShape
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)

    def data_parallel_size(self, world_size: int) -> int:
        """DP = world / (TP x PP)."""
        p = self.parallel
        return world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)

    def num_microbatches(self, world_size: int) -> int:
        """Micro-batches per data-parallel rank per iteration."""
        t = self.train
        return t.global_batch_size // (t.micro_batch_size * self.data_parallel_size(world_size))


def _check_model(shape: ModelShape, prefix: str, parallel: ParallelConfig) -> list[str]:
    errors = []
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    flag = f"--{prefix}" if prefix else "--"
    for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_position_embeddings"):
        if getattr(shape, name) <= 0:
            errors.append(f"{flag}{name.replace('_', '-')} must be > 0, got {getattr(shape, name)}")
    for name in ("ffn_hidden_size", "num_query_groups", "kv_channels"):
        value = getattr(shape, name)
        if value is not None and value <= 0:
            errors.append(f"{flag}{name.replace('_', '-')} must be > 0, got {value}")
    if errors:
        return errors
    if shape.num_attention_heads % tp:
        errors.append(
            f"{flag}num-attention-heads ({shape.num_attention_heads}) must be divisible by "
            f"--tensor-model-parallel-size ({tp})"
        )
    if shape.num_query_groups % tp:
        errors.append(
            f"{flag}num-query-groups ({shape.num_query_groups}) must be divisible by "
            f"--tensor-model-parallel-size ({tp})"
        )
    if shape.num_attention_heads % shape.num_query_groups:
        errors.append(
            f"{flag}num-attention-heads ({shape.num_attention_heads}) must be divisible by "
            f"{flag}num-query-groups ({shape.num_query_groups})"
        )
    if shape.kv_channels is None and shape.hidden_size % shape.num_attention_heads:
        errors.append(
            f"{flag}hidden-size ({shape.hidden_size}) must be divisible by "
            f"{flag}num-attention-heads ({shape.num_attention_heads}) (or set {flag}kv-channels)"
        )
    if shape.num_layers % pp:
        errors.append(
            f"{flag}num-layers ({shape.num_layers}) must be divisible by "
            f"--pipeline-model-parallel-size ({pp})"
        )
    if shape.ffn_hidden_size % tp:
        errors.append(
            f"{flag}ffn-hidden-size ({shape.ffn_hidden_size}) must be divisible by "
            f"--tensor-model-parallel-size ({tp})"
        )
    if shape.normalization not in NORMALIZATIONS:
        errors.append(f"{flag}normalization must be one of {NORMALIZATIONS}, got {shape.normalization!r}")
    if shape.position_embedding_type not in POSITION_EMBEDDINGS:
        errors.append(
            f"{flag}position-embedding-type must be one of {POSITION_EMBEDDINGS}, "
            f"got {shape.position_embedding_type!r}"
        )
    return errors


def _check_checkpoint(ckpt: CheckpointConfig) -> list[str]:
    errors = []
    if ckpt.save_interval is not None and ckpt.save_interval <= 0:
        errors.append(f"--save-interval must be > 0, got {ckpt.save_interval}")
    if ckpt.keep_last is not None and ckpt.keep_last < 1:
        errors.append(f"--keep-last must be >= 1, got {ckpt.keep_last}")
    for value, flag in ((ckpt.save_interval, "--save-interval"), (ckpt.keep_last, "--keep-last")):
        if value is not None and not ckpt.save:
            errors.append(f"{flag} needs --save DIR")
    for value, flag in ((ckpt.load_optim, "--no-load-optim"), (ckpt.load_rng, "--no-load-rng")):
        if not value and not ckpt.load:
            errors.append(f"{flag} needs --load DIR")
    return errors


def _check_rollout(cfg: DistillConfig, world_size: int) -> list[str]:
    """On-policy / sequence-level KD / RL rules (``RolloutConfig``)."""
    ro, errors = cfg.rollout, []
    if not 0.0 <= ro.on_policy_fraction <= 1.0:
        errors.append(f"--on-policy-fraction must be in [0, 1], got {ro.on_policy_fraction}")
    if not ro.temperature >= 0.0:
        errors.append(f"--rollout-temperature must be >= 0 (0 = greedy), got {ro.temperature}")
    if not 0.0 < ro.top_p <= 1.0:
        errors.append(f"--rollout-top-p must be in (0, 1], got {ro.top_p}")
    if ro.top_k < 0:
        errors.append(f"--rollout-top-k must be >= 0 (0 = off), got {ro.top_k}")
    if ro.max_new_tokens < 1:
        errors.append(f"--rollout-max-new-tokens must be >= 1, got {ro.max_new_tokens}")
    if ro.rollouts_per_prompt < 1:
        errors.append(f"--rollouts-per-prompt must be >= 1, got {ro.rollouts_per_prompt}")
    if ro.rl_loss_weight < 0:
        errors.append(f"--rl-loss-weight must be >= 0, got {ro.rl_loss_weight}")
    what = "--on-policy-fraction > 0 / --seq-kd"
    if ro.enabled:
        if not cfg.data.train_data or cfg.data.source not in ("auto", "chat"):
            errors.append(f"{what} generate responses to the prompts of --train-data rows: give --train-data")
        if cfg.data.pack_sequences:
            errors.append(f"{what} cannot be combined with --pack-sequences")
        if cfg.checkpoint.teacher_remote:
            errors.append(f"{what} need a local teacher: --teacher-remote is not supported with rollouts yet")
        if ro.seq_kd and (cfg.checkpoint.teacher_mode != "separate" or cfg.data.privileged_template):
            errors.append("--seq-kd with privileged-context self-distillation (--teacher self-* / "
                          "--privileged-template): the teacher would generate without its context; use "
                          "--on-policy-fraction (the student's rollouts, scored by the teacher with the context)")
    if ro.enabled and ro.rollouts_per_prompt > 1 and world_size % (
            cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size) == 0:
        per_dp = cfg.train.global_batch_size // max(cfg.data_parallel_size(world_size), 1)
        if per_dp % ro.rollouts_per_prompt:
            errors.append(
                f"--global-batch-size / data-parallel size ({per_dp}) must be a multiple of --rollouts-per-prompt "
                f"({ro.rollouts_per_prompt}): a prompt's rollouts stay on one data-parallel rank"
            )
    if ro.rl_loss_weight > 0:
        if ro.on_policy_fraction == 0:
            errors.append("--rl-loss-weight > 0 needs --on-policy-fraction > 0 (the RL term is on the student's "
                          "rollouts)")
        if ro.rollouts_per_prompt < 2:
            errors.append("--rl-loss-weight > 0 needs --rollouts-per-prompt >= 2 (the baseline is the mean reward "
                          "of a prompt's rollouts; with one rollout every advantage is 0)")
        if cfg.loss.impl == "fused":
            errors.append("--rl-loss-weight > 0 needs the student's logits: use --kd-loss-impl reference (or auto)")
        module, sep, attr = ro.reward_fn.partition(":")
        if not (module and sep and attr):
            errors.append(f"--reward-fn must look like 'package.module:function', got {ro.reward_fn!r}")
    return errors + _check_sglang(cfg)


def _check_sglang(cfg: DistillConfig) -> list[str]:
    """``--rollout-backend sglang``: a server URL, an export dir, student rollouts, an HF-exportable student."""
    ro, errors = cfg.rollout, []
    if ro.backend not in ROLLOUT_BACKENDS:
        return [f"--rollout-backend must be one of {ROLLOUT_BACKENDS}, got {ro.backend!r}"]
    if ro.backend != "sglang":
        for value, flag in ((ro.sglang_url, "--sglang-url"), (ro.sglang_weights_dir, "--sglang-weights-dir")):
            if value:
                errors.append(f"{flag} needs --rollout-backend sglang")
        return errors
    if not ro.sglang_url:
        errors.append("--rollout-backend sglang needs --sglang-url http://HOST:PORT (the sglang server)")
    elif not ro.sglang_url.startswith(("http://", "https://")):
        errors.append(f"--sglang-url must start with http:// or https://, got {ro.sglang_url!r}")
    if not ro.sglang_weights_dir:
        errors.append("--rollout-backend sglang needs --sglang-weights-dir DIR (where the student is exported for "
                      "the server to load; the server must read it at the same path)")
    if ro.on_policy_fraction <= 0:
        errors.append("--rollout-backend sglang generates the student's rollouts: it needs --on-policy-fraction > 0")
    if ro.sglang_sync_interval < 1:
        errors.append(f"--sglang-sync-interval must be >= 1, got {ro.sglang_sync_interval}")
    if not ro.sglang_timeout_s > 0:
        errors.append(f"--sglang-timeout-s must be > 0, got {ro.sglang_timeout_s}")
    elif sglang_worst_case_seconds(ro.sglang_timeout_s) >= 60 * cfg.train.distributed_timeout_minutes:
        # The other ranks wait in a collective while one rank talks to the server: it must give up first.
        errors.append(
            f"--sglang-timeout-s {ro.sglang_timeout_s} x {SGLANG_RETRIES + 1} attempts + backoff "
            f"({sglang_worst_case_seconds(ro.sglang_timeout_s):.0f} s) must stay below --distributed-timeout-minutes "
            f"({cfg.train.distributed_timeout_minutes} min): the other ranks wait for the server's answer in a "
            "collective; lower the first or raise the second"
        )
    s = cfg.student
    if not (s.swiglu and s.normalization == "RMSNorm" and s.position_embedding_type == "rope"
            and not s.add_bias_linear):
        errors.append("--rollout-backend sglang exports the student as a Hugging Face Llama / Qwen model: it needs "
                      "--swiglu --normalization RMSNorm --position-embedding-type rope --disable-bias-linear")
    return errors


def _check_optimizer_precision(train: TrainConfig) -> list[str]:
    errors = []
    dtypes = {"--main-grads-dtype": train.main_grads_dtype, "--exp-avg-dtype": train.exp_avg_dtype,
              "--exp-avg-sq-dtype": train.exp_avg_sq_dtype}
    for flag, value in dtypes.items():
        if value not in OPTIMIZER_STATE_DTYPES:
            errors.append(f"{flag} must be one of {OPTIMIZER_STATE_DTYPES}, got {value!r}")
    if train.use_precision_aware_optimizer:
        if not train.bf16:
            errors.append("--use-precision-aware-optimizer keeps fp32 master weights as the bf16 weights plus "
                          "16-bit remainders: it needs --bf16")
        if train.use_distributed_optimizer:
            errors.append("--use-precision-aware-optimizer cannot be combined with --use-distributed-optimizer yet")
    else:
        changed = [flag for flag, value in dtypes.items() if value != "fp32"]
        if changed:
            errors.append(f"{', '.join(changed)} set without --use-precision-aware-optimizer (the default optimizer "
                          "keeps fp32 gradients and moments)")
    return errors


def validate(cfg: DistillConfig, world_size: int) -> None:
    """Check the whole config for a world of ``world_size`` processes.

    Raises ``ConfigError`` listing every problem, each naming the flag(s) involved.
    """
    errors: list[str] = []
    par, train, loss = cfg.parallel, cfg.train, cfg.loss
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        errors.append("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    if world_size % (tp * pp):
        errors.append(
            f"world size ({world_size} processes) must be a multiple of --tensor-model-parallel-size "
            f"x --pipeline-model-parallel-size ({tp} x {pp} = {tp * pp})"
        )
    errors += _check_model(cfg.student, "", par)
    errors += _check_model(cfg.teacher, "teacher-", par)
    if cfg.student.vocab_size != cfg.teacher.vocab_size:
        errors.append(
            f"student --vocab-size ({cfg.student.vocab_size}) and --teacher-vocab-size "
            f"({cfg.teacher.vocab_size}) must be equal: the losses compare distributions over one vocabulary"
        )
    if par.sequence_parallel and tp == 1:
        errors.append("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if loss.kind not in LOSS_KINDS:
        errors.append(f"--kd-loss must be one of {LOSS_KINDS}, got {loss.kind!r}")
    if not 0.0 <= loss.beta <= 1.0:
        errors.append(f"--kd-beta must be in [0, 1], got {loss.beta}")
    if not loss.temperature > 0.0:
        errors.append(f"--kd-temperature must be > 0, got {loss.temperature}")
    if loss.kd_weight < 0 or loss.ce_weight < 0:
        errors.append("--kd-loss-weight and --kd-ce-weight must be >= 0")
    if loss.kd_weight == 0 and loss.ce_weight == 0 and cfg.rollout.rl_loss_weight == 0:
        errors.append("--kd-loss-weight and --kd-ce-weight are both 0 (and no --rl-loss-weight): nothing to train on")
    if loss.impl == "fused" and loss.ce_weight > 0:
        errors.append(
            "--kd-loss-impl fused computes the distillation term only: use --kd-loss-impl reference (or auto) "
            "with --kd-ce-weight > 0"
        )
    mode = cfg.checkpoint.teacher_mode
    if mode not in TEACHER_MODES:
        errors.append(f"--teacher must be one of {TEACHER_MODES}, got {mode!r}")
    elif mode != "separate":
        if not cfg.data.train_data:
            errors.append(f"--teacher {mode} (privileged-context self-distillation) needs --train-data rows "
                          "with a privileged_context field")
        if cfg.checkpoint.teacher_load or cfg.checkpoint.teacher_remote or train.teacher_pretrain_iters:
            errors.append(f"--teacher {mode} uses the student as the teacher: drop --teacher-load / "
                          "--teacher-remote / --teacher-pretrain-iters")
    if (mode != "separate" or cfg.data.privileged_template) and cfg.data.pack_sequences:
        errors.append("privileged context (--teacher self-* or --privileged-template) cannot be combined "
                      "with --pack-sequences")
    if cfg.checkpoint.teacher_remote:
        if not loss.topk or loss.topk < 1:
            errors.append("--teacher-remote needs --kd-topk K (K >= 1): the service answers top-K log-probs")
        if cfg.checkpoint.teacher_load or train.teacher_pretrain_iters:
            errors.append("--teacher-remote replaces the local teacher: drop --teacher-load / --teacher-pretrain-iters")
        if cfg.data.pack_sequences:
            errors.append("--teacher-remote scores whole rows as one sequence: it cannot be combined with "
                          "--pack-sequences")
        if loss.ce_weight > 0 and loss.impl == "fused":
            errors.append("--kd-ce-weight > 0 needs --kd-loss-impl reference or auto")
    elif loss.topk is not None:
        errors.append("--kd-topk is only supported with --teacher-remote for now")
    if loss.impl not in KD_LOSS_IMPLS:
        errors.append(f"--kd-loss-impl must be one of {KD_LOSS_IMPLS}, got {loss.impl!r}")
    if loss.chunk_tokens is not None and loss.chunk_tokens < 1:
        errors.append(f"--kd-loss-chunk-tokens must be >= 1 (or unset: automatic), got {loss.chunk_tokens}")
    if train.seq_length > cfg.student.max_position_embeddings and cfg.student.position_embedding_type == (
        "learned_absolute"
    ):
        errors.append(
            f"--seq-length ({train.seq_length}) exceeds --max-position-embeddings "
            f"({cfg.student.max_position_embeddings})"
        )
    if train.seq_length > cfg.teacher.max_position_embeddings and cfg.teacher.position_embedding_type == (
        "learned_absolute"
    ):
        errors.append(
            f"--seq-length ({train.seq_length}) exceeds --teacher-max-position-embeddings "
            f"({cfg.teacher.max_position_embeddings})"
        )
    if train.seq_length <= 1:
        errors.append(f"--seq-length must be > 1, got {train.seq_length}")
    if train.micro_batch_size < 1 or train.global_batch_size < 1:
        errors.append("--micro-batch-size and --global-batch-size must be >= 1")
    elif world_size % (tp * pp) == 0:
        dp = cfg.data_parallel_size(world_size)
        if train.global_batch_size % (train.micro_batch_size * dp):
            errors.append(
                f"--global-batch-size ({train.global_batch_size}) must be divisible by "
                f"--micro-batch-size x data-parallel size ({train.micro_batch_size} x {dp})"
            )
    if par.sequence_parallel and train.seq_length % tp:
        errors.append(
            f"--seq-length ({train.seq_length}) must be divisible by --tensor-model-parallel-size ({tp}) "
            "with --sequence-parallel"
        )
    if train.train_iters < 0:
        errors.append(f"--train-iters must be >= 0, got {train.train_iters}")
    if train.lr_decay_style not in LR_DECAY_STYLES:
        errors.append(f"--lr-decay-style must be one of {LR_DECAY_STYLES}, got {train.lr_decay_style!r}")
    if train.min_lr > train.lr:
        errors.append(f"--min-lr ({train.min_lr}) must be <= --lr ({train.lr})")
    if train.transformer_impl not in TRANSFORMER_IMPLS:
        errors.append(
            f"--transformer-impl must be one of {TRANSFORMER_IMPLS}, got {train.transformer_impl!r}"
        )
    if train.device not in DEVICES:
        errors.append(f"--device must be one of {DEVICES}, got {train.device!r}")
    errors += _check_optimizer_precision(train)
    unknown = [m for m in train.recompute_modules if m not in RECOMPUTE_MODULES]
    if unknown:
        errors.append(f"--recompute-modules: {unknown} not supported (choose from {RECOMPUTE_MODULES})")
    if "swiglu" in train.recompute_modules and not cfg.student.swiglu:
        errors.append("--recompute-modules swiglu needs a SwiGLU student (--swiglu)")
    if train.recompute_modules and train.transformer_impl != "local":
        errors.append("--recompute-modules applies to --transformer-impl local")
    if train.max_skipped_steps < 1:
        errors.append(f"--max-skipped-steps must be >= 1, got {train.max_skipped_steps}")
    if cfg.checkpoint.auto_resume and not cfg.checkpoint.save:
        errors.append("--auto-resume needs --save DIR (it resumes from the newest complete checkpoint there)")
    if train.log_interval < 1:
        errors.append(f"--log-interval must be >= 1, got {train.log_interval}")
    if cfg.data.synthetic_branching < 1:
        errors.append(f"--synthetic-branching must be >= 1, got {cfg.data.synthetic_branching}")
    errors += _check_checkpoint(cfg.checkpoint)
    errors += _check_rollout(cfg, world_size)
    data = cfg.data
    if data.source not in DATA_SOURCES:
        errors.append(f"--data-source must be one of {DATA_SOURCES}, got {data.source!r}")
    if data.train_data and data.data_path:
        errors.append("give either --train-data (chat / prompt-response files) or --data-path (indexed), not both")
    if data.source == "chat" and not data.train_data:
        errors.append("--data-source chat needs --train-data FILE [FILE ...]")
    if data.source == "indexed" and not data.data_path:
        errors.append("--data-source indexed needs --data-path [WEIGHT] PREFIX ...")
    if (data.train_data or data.data_path) and not data.tokenizer_model:
        errors.append("--train-data / --data-path need --tokenizer-model DIR (a local Hugging Face tokenizer)")
    if data.pack_sequences and not data.train_data:
        errors.append("--pack-sequences applies to --train-data only")
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
